"""Runtime steering after the attention of a block (bakery.steering.sites): the reference of
``bias --site attn-out`` bakes."""

import pytest
import torch

from bakery.models import load_model
from bakery.steering.sites import AttnOutSteering, SiteError


def test_attn_out_steering_adds_at_the_attention_write(tiny_models):
    m = load_model(tiny_models("llama"))
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    g = torch.Generator().manual_seed(0)
    d1, d2 = torch.randn(32, generator=g), torch.randn(32, generator=g)
    captured = []
    # what block 1's MLP norm reads: the residual after attention
    norm = m.model.layers[1].post_attention_layernorm
    h = norm.register_forward_pre_hook(lambda mod, a: captured.append(a[0].clone()))
    with torch.no_grad():
        plain = m(input_ids=ids).logits
        with AttnOutSteering(m, [(1, d1), (1, d2)]):  # two terms at one block add up
            both = m(input_ids=ids).logits
        with AttnOutSteering(m, [(1, d1 + d2)]):
            summed = m(input_ids=ids).logits
        after = m(input_ids=ids).logits
    h.remove()
    assert torch.allclose(captured[1] - captured[0], (d1 + d2).expand_as(captured[0]), atol=1e-5)
    assert torch.allclose(both, summed, atol=1e-5) and not torch.allclose(both, plain, atol=1e-3)
    assert torch.equal(after, plain)  # the hooks are gone


def test_attn_out_steering_on_granite_adds_delta_to_the_residual(tiny_models):
    """Granite multiplies each sublayer write by residual_multiplier: the residual after attention
    must change by delta itself (what the bake's o_proj bias = delta / multiplier gives), not by
    delta times the multiplier."""
    m = load_model(tiny_models("granite"))
    assert m.config.residual_multiplier != 1.0
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    d = torch.randn(32, generator=torch.Generator().manual_seed(1))
    captured = []
    norm = m.model.layers[1].post_attention_layernorm
    h = norm.register_forward_pre_hook(lambda mod, a: captured.append(a[0].clone()))
    with torch.no_grad():
        m(input_ids=ids)
        with AttnOutSteering(m, [(1, d)]):
            m(input_ids=ids)
    h.remove()
    assert torch.allclose(captured[1] - captured[0], d.expand_as(captured[0]), atol=1e-5)


def test_attn_out_steering_on_a_gated_deltanet_block_is_refused(tiny_models):
    """Qwen3.5: only full-attention blocks have self_attn.o_proj; a linear-attention block has no
    attn-out site, and the error names the blocks that do."""
    m = load_model(tiny_models("qwen3_5_text"))
    d = torch.ones(32)
    with pytest.raises(SiteError, match=r"block 1 .* linear_attention block.*layers 3\b"):
        AttnOutSteering(m, [(1, d)])
    captured = []  # block 3 (full attention): the residual after attention moves by d
    norm = m.model.layers[3].post_attention_layernorm
    h = norm.register_forward_pre_hook(lambda mod, a: captured.append(a[0].clone()))
    with torch.no_grad():
        m(input_ids=torch.tensor([[5, 17, 42]]))
        with AttnOutSteering(m, [(3, d)]):
            m(input_ids=torch.tensor([[5, 17, 42]]))
    h.remove()
    assert torch.allclose(captured[1] - captured[0], d.expand_as(captured[0]), atol=1e-5)
