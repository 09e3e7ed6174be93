"""The distillation loss applies the head itself, a chunk of rows at a time
(bakery/bakers/distill/head.py, losses.chunked_kl): the same logits and the same KL and gradients
as the model's own forward, without a whole [tokens, vocab] tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bakery.bakers.distill.head import head_function, hidden_as_logits, rows_per_chunk
from bakery.bakers.distill.losses import chunked_kl, kl_per_token, kl_topk
from bakery.models import load_model
from tiny import MULTIMODAL_TYPES, make_tiny_multimodal


def _inputs(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return ids, mask


def _check_head(model) -> None:
    ids, mask = _inputs(model.config.get_text_config().vocab_size)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, logits_to_keep=5).logits
        with hidden_as_logits(model):
            hidden = model(input_ids=ids, attention_mask=mask, logits_to_keep=5).logits
        got = head_function(model)(hidden)
    assert hidden.shape == (*want.shape[:2], model.config.get_text_config().hidden_size)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_the_head_applied_to_the_caught_hidden_states_is_the_models_own(tiny_models, arch_type):
    """For every architecture: head(final hidden) equals the forward's logits, with the scaling
    some apply after the head (gemma2's soft-capping, granite's logits_scaling)."""
    model = load_model(tiny_models(arch_type)).eval()
    _check_head(model)


@pytest.mark.parametrize("model_type", MULTIMODAL_TYPES)
def test_the_head_of_a_multimodal_wrapper(model_type, tmp_path):
    _check_head(load_model(make_tiny_multimodal(model_type, tmp_path / model_type)).eval())


def test_soft_capping_is_applied(tiny_models):
    """The capped model's logits stay inside the cap; the head alone would exceed it."""
    model = load_model(tiny_models("gemma2", final_logit_softcapping=0.02)).eval()
    _check_head(model)
    ids, _ = _inputs(model.config.vocab_size)
    with torch.no_grad(), hidden_as_logits(model):
        hidden = model(input_ids=ids).logits
    assert head_function(model)(hidden).abs().max() <= 0.02
    assert model.get_output_embeddings()(hidden).abs().max() > 0.02


def _rows(n=13, hidden=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    return head, torch.randn(n, hidden, generator=g), torch.randn(n, hidden, generator=g)


@pytest.mark.parametrize("rows", [1, 4, 13, 100])
def test_chunked_kl_equals_the_whole_kl_and_its_gradient(rows):
    head, s, t = _rows()
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    whole = kl_per_token(F.log_softmax(head(t), -1), F.log_softmax(head(s1), -1)).sum()
    whole.backward()
    got = chunked_kl(head, s2, rows, teacher_h=t)
    got.backward()
    assert torch.allclose(got, whole, rtol=1e-5)
    assert torch.allclose(s2.grad, s1.grad, atol=1e-6)


def test_chunked_kl_from_the_kept_top_k():
    head, s, t = _rows()
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    lp = F.log_softmax(head(t), -1).detach()
    kept = lp.topk(6, -1)
    whole = kl_topk(kept.indices, kept.values, F.log_softmax(head(s1), -1)).sum()
    whole.backward()
    got = chunked_kl(head, s2, 5, topk=(kept.indices, kept.values))
    got.backward()
    assert torch.allclose(got, whole, rtol=1e-5)
    assert torch.allclose(s2.grad, s1.grad, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        chunked_kl(head, s, 5)


def test_no_whole_logits_are_kept_for_the_backward_pass():
    """What autograd saves for the backward: the chunked loss keeps no [rows, vocab] tensor; the
    whole-logits loss does."""
    head, s, t = _rows(n=64, vocab=1000)
    head.weight.requires_grad_(False)
    s = s.requires_grad_()

    def saved_sizes(fn) -> list[int]:
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
            fn()
        return sizes

    whole = saved_sizes(lambda: kl_per_token(F.log_softmax(head(t), -1), F.log_softmax(head(s), -1)).sum())
    chunked = saved_sizes(lambda: chunked_kl(head, s, 8, teacher_h=t))
    assert max(whole) >= 64 * 1000
    assert max(chunked) < 8 * 1000


def test_rows_per_chunk_follows_the_vocabulary(tiny_models):
    model = load_model(tiny_models("llama"))
    vocab = model.get_output_embeddings().weight.shape[0]
    assert rows_per_chunk(model) * vocab <= 1 << 22 < (rows_per_chunk(model) + 1) * vocab
