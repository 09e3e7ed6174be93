"""``bias --route rank1``: ``W_down <- W_down + coef * v u^T`` with ``u . a ~= 1``.

``a`` is the input of the block's MLP down-projection. ``u`` is the ridge least-squares solution
of ``A u = 1`` over calibration activations, so the edit adds about ``coef * v`` at every token
with no new parameters. Calibration (default ``generate``) samples short answers to built-in
prompts under runtime steering and fits on prompt + answer tokens; ``prompts`` fits on the prompts
alone through the model truncated to the blocks it needs (faster; on SmolLM2 it recovered R 0.90
against 0.99 for ``generate``, because answer tokens are what the baked model mostly sees).
Earlier terms steer at runtime while a later block is fitted. Approximate: the manifest gives
the fit (mean and spread of ``u . a``).

``positions="response"`` (``--route rank1 --positions response``) fits a gate instead: ``u . a ~= 1``
on answer tokens and ``~= 0`` on prompt tokens, so the edit stands for steering that spares the
prompt, which no bias can express (on SmolLM2's pirate vector at layer 17 the gate is about 0.98
on answers and 0.01 on prompts). Calibration must then generate answers.

Sandwich-norm blocks (Gemma-2/3, OLMo-2) renormalise the MLP output, so there the target of
``u . a`` is the RMS of the down-projection output and the direction is divided by the norm's gain:
a first-order approximation, reported as such.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

from bakery.arch import spec_for
from bakery.models import partial_load
from bakery.placement import default_placement, input_device, parse_device_map, resolve_device, resolve_dtype
from bakery.bakers.errors import BakeError
from bakery.bakers.plan import BakePlan
from bakery.bakers.request import BakeRequest
from bakery.bakers.gate_fit import GateFit, StopForward, forward_until_stopped, steered_positions, summarize
from bakery.steering.hooks import POSITIONS

CALIBRATION_PROMPTS = (
    "Tell me about the history of the Roman Empire.",
    "How do I bake a loaf of sourdough bread?",
    "What is the best way to learn a new language?",
    "Explain how a car engine works.",
    "Write a short poem about the ocean.",
    "What should I pack for a week-long hiking trip?",
    "Why is the sky blue?",
    "Give me three tips for a job interview.",
    "Describe your ideal weekend.",
    "How do vaccines work?",
    "What are the pros and cons of electric cars?",
    "Summarise the plot of Romeo and Juliet.",
    "How can I improve my sleep?",
    "What is machine learning?",
    "Recommend a good book for a long flight.",
    "How do I fix a leaking tap?",
    "What makes a good friend?",
    "Explain photosynthesis to a ten-year-old.",
    "Plan a birthday party for my grandmother.",
    "What is the difference between weather and climate?",
    "How should I start running if I have never exercised?",
    "Tell me a story about a lost dog who finds its way home.",
    "What are black holes?",
    "How do I write a cover letter?",
    "Describe the city of Tokyo.",
    "What is inflation and why does it matter?",
    "Give me a recipe for a vegetable soup.",
    "How does the internet work?",
    "What would you do with a free afternoon?",
    "Explain the rules of chess briefly.",
    "How can I save money on groceries?",
    "What was the Industrial Revolution?",
    "Write a thank-you note to a teacher.",
    "What are some good habits for studying?",
    "Describe a thunderstorm.",
    "How do bees make honey?",
    "What is your opinion on pineapple on pizza?",
    "How do I care for a houseplant?",
    "Explain what a budget is and how to make one.",
    "Tell me about the planets in our solar system.",
    "How do I apologise to a friend I upset?",
    "What is the meaning of life?",
    "Describe how to make a paper airplane.",
    "What is the tallest mountain in the world?",
    "How do trains stay on their tracks?",
    "Give me advice for my first day at a new job.",
    "What do you know about the deep sea?",
    "Write a short message inviting friends to dinner.",
)


def _render(tok, prompts: Sequence[str]) -> list[str]:
    from bakery.steering.generation import render_chat

    if prompts and all("<|im_start|>" in p or "[INST]" in p for p in prompts):
        return list(prompts)  # already rendered (with answers): used as they are
    if getattr(tok, "chat_template", None):
        return [render_chat(tok, p) for p in prompts]
    return list(prompts)


CALIBRATIONS = ("generate", "prompts")


def experts_of(spec, block: torch.nn.Module) -> torch.nn.Module | None:
    """The block's experts module (fused 3-D parameters), or None for a dense MLP block."""
    if spec.experts is None:
        return None
    try:
        return block.get_submodule(spec.experts.module)
    except AttributeError:
        return None


def down_module(spec, block: torch.nn.Module) -> str:
    """The dense down-projection of a block (a MoE model's plain-MLP blocks included)."""
    if spec.experts is not None and spec.experts.dense:
        return spec.experts.dense[: -len(".weight")]
    return spec.mlp_out


def expert_count(module: torch.nn.Module) -> int:
    return int(module.down_proj.shape[0])


def expert_inputs(module: torch.nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """The input of expert ``e``'s down-projection for tokens ``x``, computed as transformers 5.24's
    experts compute it (the layout flags its ``use_experts_implementation`` sets: gate_up
    ``[E, 2I, H]`` split in halves, or gpt-oss's transposed, interleaved, biased, clamped one)."""
    if getattr(module, "has_post_expert_norm", False):
        raise BakeError("these experts normalise each expert's output: a rank-one update of the "
                        "down-projection is not additive there. Use --method kl-lora")
    gated = getattr(module, "has_gate", True)
    W = (module.gate_up_proj if gated else module.up_proj)[e].float()
    y = x @ W if getattr(module, "is_transposed", False) else torch.nn.functional.linear(x, W)
    if getattr(module, "has_bias", False):
        y = y + (module.gate_up_proj_bias if gated else module.up_proj_bias)[e].float()
    return module._apply_gate(y) if gated else module.act_fn(y)


def _solve_experts(fits: dict[int, GateFit], ridge: float) -> dict:
    """One ``u`` per expert that calibration routed tokens to; the statistics over all of them."""
    if not fits:
        raise BakeError("rank1 calibration routed no tokens to any expert: give calibration prompts")
    us = {e: f.solve(ridge) for e, f in sorted(fits.items())}
    vals = [f.values(us[e]) for e, f in fits.items()]
    st = summarize(torch.cat([v for v, _ in vals]), torch.cat([o for _, o in vals]))
    entry = {"u_experts": us, "rows": st["rows"], "fit_mean": st["on_mean"], "fit_std": st["on_std"],
             "experts_fitted": len(us)}
    if "off_mean" in st:
        entry.update(off_mean=st["off_mean"], off_std=st["off_std"])
    return entry


@torch.no_grad()
def fit_rank1(req: BakeRequest, blocks: Sequence[int], prompts: Sequence[str] | None = None,
              *, ridge: float = 1e-2, batch_size: int = 16, calibration: str = "generate",
              tokens: int = 32, positions: str = "all", device: str | None = None,
              dtype: str | torch.dtype | None = None) -> dict[int, dict]:
    """Per block: ``u`` (float32) and the fit statistics.

    ``calibration="generate"`` (default) loads the whole model once, samples ``tokens`` answer
    tokens per prompt under runtime steering, and fits on prompt + answer: the activations the
    baked model will see while answering. ``"prompts"`` fits on the prompts alone through a model
    truncated to the blocks it needs (faster, less faithful: answer tokens are not seen).
    ``positions="response"`` gates the write: the target of ``u . a`` is 1 on answer tokens and 0
    on prompt tokens, so the edit stands for steering that spares the prompt.

    ``device``/``dtype`` place the calibration model (default: the process-wide placement;
    ``dtype`` auto is float32 here on every device, for the fit's precision).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from bakery.steering.generation import encode_prompts, generate
    from bakery.models import load_tokenizer
    from bakery.steering.hooks import Steering, SteeringTerm

    if calibration not in CALIBRATIONS:
        raise BakeError(f"calibration must be one of {', '.join(CALIBRATIONS)}; got {calibration!r}")
    if positions not in POSITIONS:
        raise BakeError(f"--positions for --route rank1 must be one of {', '.join(POSITIONS)}; got {positions!r}")
    if positions == "response" and calibration != "generate":
        raise BakeError("--positions response fits the gate on answer tokens: use --calibration generate")
    spec = req.spec
    deepest = max(blocks)
    cfg = AutoConfig.from_pretrained(req.model_dir)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if calibration == "prompts":
        text_cfg.num_hidden_layers = deepest + 1  # only the blocks up to the edit are needed
        if getattr(text_cfg, "layer_types", None):
            text_cfg.layer_types = list(text_cfg.layer_types)[: deepest + 1]
    # a model truncated to the blocks up to the edit leaves the later ones' weights unread, on purpose
    with partial_load() if calibration == "prompts" else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(req.model_dir, config=cfg,
                                                     **_placement_kwargs(device, dtype)).eval()
    dev = input_device(model)
    # module paths of the class transformers loaded (a Qwen3.5 wrapper checkpoint loads as the
    # text-only Qwen3_5ForCausalLM); the plan names the checkpoint's tensors by block index
    spec = spec_for(model.config)
    tok = load_tokenizer(req.model_dir)
    texts = _render(tok, list(prompts or CALIBRATION_PROMPTS))
    batches: list[tuple[dict[str, torch.Tensor], int]] = []  # (inputs, prompt length)
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        if calibration == "generate":
            terms = [SteeringTerm(t.layer, t.row(), t.coef) for t in req.terms]
            with Steering(model, terms, positions=positions):
                g = generate(model, tok, chunk, max_new_tokens=tokens, temperature=1.0, seed=i)
            batches.append(({"input_ids": g.sequences, "attention_mask": g.attention_mask}, g.prompt_len))
        else:
            enc = {k: v.to(dev) for k, v in encode_prompts(tok, chunk).items()}
            batches.append((enc, enc["input_ids"].shape[1]))
    mods = model.get_submodule(spec.blocks)
    experts = {b: experts_of(spec, mods[b]) for b in blocks}
    fits: dict[int, Any] = {b: ({} if experts[b] is not None else GateFit()) for b in blocks}
    mask_now: dict[str, torch.Tensor] = {}

    def rows_now() -> tuple[torch.Tensor, torch.Tensor]:
        keep = mask_now["m"].reshape(-1).bool()
        return keep, mask_now["on"].reshape(-1)[keep]  # on: where the steering applies

    # a model spread over devices runs each block where it sits: masks follow the activations

    def capture(b: int):
        def hook(module, args):
            a = args[0].float()
            keep, on = rows_now()
            a = a.reshape(-1, a.shape[-1])[keep.to(a.device)].double()
            if spec.sandwich:  # target: the RMS of the down-projection output, per token
                y = torch.nn.functional.linear(a.float(), module.weight.float()).double()
                scale = y.pow(2).mean(-1).sqrt()
            else:
                scale = torch.ones(a.shape[0], dtype=torch.float64, device=a.device)
            fits[b].add(a, on, scale)
            if b == deepest:
                raise StopForward
        return hook

    def capture_experts(b: int):
        def hook(module, args):  # Experts.forward(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])
            x, index, weight = args[0], args[1], args[2]
            keep, on = rows_now()
            keep, on = keep.to(x.device), on.to(x.device)
            x, index, weight = x[keep].float(), index[keep], weight[keep].float()
            total = weight.sum(-1)  # the routing weight a token gives its experts (1 when normalised)
            for e in index.unique().tolist():
                if not 0 <= e < expert_count(module):
                    continue
                rows = (index == e).any(-1).nonzero().reshape(-1)
                a = expert_inputs(module, x[rows], e).double()
                fits[b].setdefault(e, GateFit()).add(a, on[rows], 1.0 / total[rows].double())
            if b == deepest:
                raise StopForward
        return hook

    handles = [mods[b].get_submodule(spec.experts.module).register_forward_pre_hook(capture_experts(b))
               if experts[b] is not None else
               mods[b].get_submodule(down_module(spec, mods[b])).register_forward_pre_hook(capture(b))
               for b in blocks]
    # earlier terms steer at runtime so a later block is fitted on the activations it will see
    steer_terms = [SteeringTerm(t.layer, t.row(), t.coef) for t in req.terms if t.block < deepest]
    try:
        for enc, P in batches:
            mask_now["m"] = enc["attention_mask"]
            mask_now["on"] = steered_positions(enc["attention_mask"], P, positions)
            ctx = (Steering(model, steer_terms, positions=positions, prompt_len=P) if steer_terms
                   else contextlib.nullcontext())
            with ctx:
                forward_until_stopped(model, **enc)
    finally:
        for h in handles:
            h.remove()
    out: dict[int, dict] = {}
    for b in blocks:
        if experts[b] is not None:
            out[b] = _solve_experts(fits[b], ridge)
            continue
        if not fits[b].rows:
            raise BakeError("rank1 calibration saw no tokens: give calibration prompts")
        u = fits[b].solve(ridge)
        st = fits[b].stats(u)
        entry = {"u": u, "rows": st["rows"], "fit_mean": st["on_mean"], "fit_std": st["on_std"]}
        if "off_mean" in st:  # the gate: about 0 where it should stay off
            entry.update(off_mean=st["off_mean"], off_std=st["off_std"])
        if spec.sandwich:
            norm = mods[b].get_submodule(spec.mlp_writer())
            w = next(norm.parameters(), None)
            ones = torch.ones(1, 1, int(text_cfg.hidden_size),
                              device=w.device if w is not None and w.device.type != "meta" else dev,
                              dtype=w.dtype if w is not None else torch.float32)
            entry["gain"] = (norm(ones)[0, 0]).float().cpu()  # RMSNorm(ones) = its effective gain
        out[b] = entry
    del model
    return out


def _plan_experts(plan: BakePlan, writers, us: dict[int, torch.Tensor], w: torch.Tensor) -> None:
    """``W_e + w u_e^T`` for every fitted expert, in per-expert or fused checkpoint tensors."""
    for x in writers:
        if x.kind != "expert":
            continue
        if x.expert is not None:  # one [hidden, inter] weight per expert
            if x.expert in us:
                plan.edit(x.name, lambda W, u=us[x.expert], w=w: W.addr_(w, u))
            continue

        def fused(W, axis=x.axis, w=w):  # [E, hidden, inter] or gpt-oss [E, inter, hidden]
            for e, u in us.items():
                W[e].addr_(w, u) if axis == 1 else W[e].addr_(u, w)
            return W
        plan.edit(x.name, fused)


def _placement_kwargs(device: str | None, dtype: str | torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained`` arguments for the calibration model (see :func:`fit_rank1`)."""
    pl = default_placement()
    dev = resolve_device(device if device is not None else pl.device)
    kw: dict[str, Any] = {"dtype": resolve_dtype(dtype if dtype is not None else pl.dtype, dev,
                                                accelerator_default=torch.float32)}
    if device is None and pl.device_map is not None:
        kw.update(device_map=parse_device_map(pl.device_map), max_memory=pl.max_memory)
        if pl.offload_folder:
            kw["offload_folder"] = pl.offload_folder
    elif dev.type != "cpu":
        kw["device_map"] = str(dev)
    return kw


def plan_rank1(req: BakeRequest, reader, plan: BakePlan) -> None:
    """Fill ``plan`` with one rank-one update per edited block."""
    spec = req.spec
    by_block: dict[int, torch.Tensor] = {}
    for t in req.terms:
        by_block[t.block] = by_block.get(t.block, 0) + t.coef * t.row()
    cfg = req.cfg
    calibration = cfg.calibration or "generate"
    positions = cfg.positions or "all"
    fits = fit_rank1(req, sorted(by_block), cfg.calibration_prompts,
                     ridge=1e-2 if cfg.ridge is None else cfg.ridge, calibration=calibration,
                     tokens=32 if cfg.calibration_tokens is None else cfg.calibration_tokens,
                     positions=positions)
    names = plan.names
    for b, delta in by_block.items():
        if "u_experts" in fits[b]:
            _plan_experts(plan, names.mlp_writers(b), fits[b]["u_experts"], delta)
            continue
        u = fits[b]["u"]
        w = delta / fits[b]["gain"] if "gain" in fits[b] else delta
        name = next(x.name for x in names.mlp_writers(b) if x.kind == "mlp")
        if spec.conv1d:  # Conv1D stores [in, out]
            plan.edit(name, lambda W, u=u, w=w: W.addr_(u, w))
        else:
            plan.edit(name, lambda W, u=u, w=w: W.addr_(w, u))
    plan.route = "rank1"
    plan.site = "resid-out"
    plan.positions = positions
    plan.exact = False
    plan.engines = {"transformers": "ok", "vllm": "ok", "sglang": "ok"}
    plan.extra["rank1_calibration"] = calibration
    plan.extra["rank1_fit"] = {str(b + 1): {k: v for k, v in f.items() if k not in ("u", "gain", "u_experts")}
                               for b, f in fits.items()}
    plan.notes.append(
        f"rank-one update of the MLP down-projection: approximate; calibration: {calibration}; "
        "u . a on the calibration tokens: "
        + ", ".join(f"layer {b + 1}: mean {f['fit_mean']:.3f}, std {f['fit_std']:.3f} ({f['rows']} tokens)"
                    + (f"; gated to {positions} tokens, elsewhere {f['off_mean']:.3f} (std {f['off_std']:.3f})"
                       if "off_mean" in f else "")
                    for b, f in sorted(fits.items())))
    if any("u_experts" in f for f in fits.values()):
        plan.notes.append(
            "mixture of experts: one rank-one update per expert's down-projection, each fitted on the "
            "tokens calibration routed to it so that the routing-weighted sum adds about coef * v; "
            "experts that saw no calibration token are left unedited ("
            + ", ".join(f"layer {b + 1}: {f['experts_fitted']} experts fitted" for b, f in sorted(fits.items())
                        if "u_experts" in f) + ")")
    if spec.sandwich:
        plan.notes.append("sandwich-norm block: the post-MLP norm rescales the edit; first-order "
                          "approximation (target u . a = RMS of the MLP output, direction divided by "
                          "the norm gain)")
