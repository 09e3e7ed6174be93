"""Runtime steering after the attention of a block (bakery.steering.sites): the reference of
``bias --site attn-out`` bakes."""

import torch

from bakery.models import load_model
from bakery.steering.sites import AttnOutSteering


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
