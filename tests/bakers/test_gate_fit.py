"""The gated ridge fit shared by the rank1 route and kl-full's warm start."""

from __future__ import annotations

import pytest
import torch

from bakery.bakers.gate_fit import GateFit, steered_positions


def test_steered_positions_follow_the_collated_layout():
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    P = 3
    assert steered_positions(mask, P, "response").tolist() == [[False] * 3 + [True] * 3] * 2
    assert steered_positions(mask, P, "prompt").tolist() == [[True] * 3 + [False] * 3] * 2
    assert steered_positions(mask, P, "all").all()


def test_a_separable_gate_is_found_across_batches():
    """Rows whose first feature says 'steer here': u . a is 1 there and 0 elsewhere, fitted from
    two batches, with the statistics to show it."""
    g = torch.Generator().manual_seed(0)
    gate = GateFit()
    for _ in range(2):
        a = torch.randn(400, 16, generator=g)
        on = torch.rand(400, generator=g) > 0.5
        a[:, 0] = on.float() * 2.0 + 0.01 * torch.randn(400, generator=g)
        gate.add(a, on)
    u = gate.solve(ridge=1e-6)
    st = gate.stats(u)
    assert st["rows"] == 800
    assert st["on_mean"] == pytest.approx(1.0, abs=0.02) and st["off_mean"] == pytest.approx(0.0, abs=0.02)
    assert st["rmse"] < 0.05 and st["on_std"] < 0.05


def test_scale_sets_the_target_and_an_ungated_fit_has_no_off_side():
    """With ``scale`` (the sandwich-norm case) u . a follows the scale: here it is linear in a, so
    the fit is exact and u . a / scale is 1 on every row."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 8, generator=g)
    a[:, 0] = 1.0  # a constant feature, so an affine scale is reachable
    w = torch.tensor([2.0, 0.5, -0.3, 0, 0, 0, 0, 0])
    gate = GateFit()
    gate.add(a, torch.ones(300, dtype=torch.bool), a @ w)
    u = gate.solve(ridge=1e-9)
    st = gate.stats(u)
    assert "off_mean" not in st and st["rows"] == 300
    assert torch.allclose(u, w, atol=1e-3) and st["on_std"] < 1e-3
    with pytest.raises(ValueError, match="no rows"):
        GateFit().solve()
