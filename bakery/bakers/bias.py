"""The ``bias`` baker: ``coef * v[L]`` at the output of block ``L-1`` as a constant bias.

Routes:
- exact bias (default): the bias of the block's last residual writer (MLP down-projection), with
  the config flag that makes stock code build it and explicit zeros for every sibling bias the
  flag creates. Qwen2 and Mistral are re-hosted as ``LlamaForCausalLM`` (only without sliding
  windows); GPT-2 and GPT-NeoX use their native biases.
- ``site="attn-out"``: the attention output bias of block ``L`` (after attention, before the MLP).
- ``route="rank1"``: ``W_down + coef * v u^T`` with ``u`` fitted so that ``u . a ~= 1`` on
  calibration activations: approximate, no new parameters, any architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bakery.arch import BiasRoute, cfg_get, is_parallel_residual, num_layers_of, text_config_of
from bakery.bakers.registry import register
from bakery.bakers.base import ClosedFormBaker
from bakery.bakers.checks import check_engines
from bakery.bakers.request import ENGINE_CHOICES
from bakery.bakers.errors import BakeError
from bakery.bakers.plan import BakePlan
from bakery.bakers.rehost import arch_name, rehost_config
from bakery.bakers.request import BakeRequest
from bakery.bakers.config import BakerConfig, option
from bakery.io.checkpoint import CheckpointReader
from bakery.steering.hooks import POSITIONS

TARGET_ENGINE_HELP = ("comma-separated engines the export must keep the edit in: "
                      f"{', '.join(ENGINE_CHOICES)} (default: transformers,vllm,sglang); sglang-native "
                      "refuses a route that needs an sglang launch flag")
_RANK1 = {"route": "rank1"}


@dataclass
class BiasConfig(BakerConfig):
    """``--method bias``: a constant ``coef * v[L]`` as a bias (exact) or a rank-one update."""

    route: str | None = option(None, "bias: an exact bias (default); rank1: an approximate rank-one "
                               "update of the down-projection, any architecture",
                               flag="--route", choices=("bias", "rank1"))
    site: str | None = option(None, "resid-out: the output of block L-1 (default); attn-out: after the "
                              "attention of block L", flag="--site", choices=("resid-out", "attn-out"))
    target_engines: str | None = option(None, TARGET_ENGINE_HELP, flag="--target-engine", kind=str)
    calibration: str | None = option(None, "rank1: fit on steered sample answers (generate, default) or "
                                     "on the prompts only (faster)", flag="--calibration",
                                     choices=("generate", "prompts"), requires=_RANK1)
    positions: str | None = option(None, "rank1 (default all) and kl-lora/kl-full (default response): "
                                   "the positions the steering being baked applies to",
                                   flag="--positions", choices=POSITIONS, requires=_RANK1)
    ridge: float | None = option(None, "rank1: ridge of the least-squares fit of u (default 0.01)",
                                 kind=float, requires=_RANK1)
    calibration_tokens: int | None = option(None, "rank1: answer tokens sampled per calibration prompt "
                                            "(default 32)", kind=int, requires=_RANK1)
    calibration_prompts: list | None = option(None, "rank1: the calibration prompts (default: built-in)",
                                              kind=list, requires=_RANK1)

    def check(self) -> None:
        super().check()
        if self.route == "rank1" and self.site == "attn-out":
            raise BakeError("--route rank1 edits the MLP down-projection (site resid-out); "
                            "--site attn-out needs the bias route")
        if self.route == "rank1" and self.target_engines is not None:
            raise BakeError("--target-engine checks where a new bias survives; --route rank1 adds no "
                            "parameter and loads in every engine, so it takes no --target-engine")

_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def resolve_route(req: BakeRequest, site: str) -> BiasRoute:
    """The exact bias route for ``site``, or a clear error naming the alternatives."""
    spec = req.spec
    arch = arch_name(req.config)
    if spec.sandwich:
        raise BakeError(
            f"{arch} puts a norm after each sublayer (sandwich norm): no exact bias route exists. "
            f"Alternatives: {spec.alternatives}")
    route = spec.routes.get(site)
    if route is None:
        have = ", ".join(f"--site {s}" for s in spec.routes) or "none"
        raise BakeError(f"{arch} has no exact bias route at site {site} (available: {have}). "
                        f"Alternatives: {spec.alternatives}")
    if site == "attn-out" and is_parallel_residual(spec, req.config):
        raise BakeError(
            f"{arch} uses a parallel residual (attention and MLP read the same input), so there is "
            "no point between attention and MLP: --site attn-out does not exist here. Use the "
            "default --site resid-out.")
    return route


def _is_llama_hosted(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "llama"


def plan_bias_terms(req: BakeRequest, reader: CheckpointReader, plan: BakePlan, site: str,
                    deltas: dict[int, torch.Tensor]) -> None:
    """Write the summed constant ``deltas[block]`` through the exact bias route at ``site``.

    Shared by ``bias`` and ``ortho --add``: turns the flags on, re-hosts if needed, writes zeros
    for sibling biases and refuses what a target engine would drop.
    """
    spec = req.spec
    route = resolve_route(req, site)
    n = num_layers_of(req.config)
    text = text_config_of(req.config)
    typed = [i for i in range(n) if route.layer_type is None
             or spec.layer_type(req.config, i) == route.layer_type]
    for block in deltas:
        if site == "attn-out" and block >= n:
            raise BakeError(f"--site attn-out at layer {block} needs block {block}, but the model "
                            f"has blocks 0..{n - 1}")
        if block not in typed:
            where = (f"layers {', '.join(str(i + 1 if site == 'resid-out' else i) for i in typed)}"
                     if typed else "no layer")
            raise BakeError(
                f"block {block} of {arch_name(req.config)} is a {spec.layer_type(req.config, block)} "
                f"block: {route.tensor} exists only in {route.layer_type} blocks ({where} at --site "
                f"{site}). Alternatives: another --layer, or {spec.alternatives}")
    verdicts = check_engines(route, req.target_engines, site=site, arch=arch_name(req.config),
                             alternatives=spec.alternatives)
    plan.config = rehost_config(plan.config, route)
    for block, delta in deltas.items():
        scale = float(cfg_get(text, route.scale_key, 1.0)) if route.scale_key else 1.0
        tensor = f"{spec.block(block)}.{route.tensor}"
        weight = f"{tensor[:-len('.bias')]}.weight" if tensor.endswith(".bias") else tensor
        plan.add_bias(tensor, delta / scale, weight, conv1d=spec.conv1d)
    if _is_llama_hosted(plan.config):
        groups = []
        if plan.config.get("attention_bias"):
            groups.append(_LLAMA_ATTN)
        if plan.config.get("mlp_bias"):
            groups.append(_LLAMA_MLP)
        for i in range(n):
            for group in groups:
                for mod in group:
                    plan.zero_bias(f"{spec.block(i)}.{mod}.bias", f"{spec.block(i)}.{mod}.weight")
    for i in typed:  # every bias the route's flags create, in every block that has the route
        for sib in route.siblings:
            mod = sib[: -len(".bias")]
            plan.zero_bias(f"{spec.block(i)}.{sib}", f"{spec.block(i)}.{mod}.weight")
    if route.scale_key:
        plan.notes.append(f"the bias is coef * v divided by {route.scale_key} "
                          f"({cfg_get(text, route.scale_key)}), which scales every sublayer write")
    if route.per_expert:
        plan.notes.append(f"the constant is added to every expert's row of {route.tensor}: the "
                          "router's top-k weights sum to one, so the block adds exactly the constant")
    plan.engines = dict(verdicts)
    plan.site = site
    if route.rehost_as:
        plan.notes.append(f"re-hosted as LlamaForCausalLM ({route.note}); the tokenizer is unchanged")
    for engine, v in verdicts.items():
        if v not in ("ok", "drop"):
            plan.notes.append(f"{engine} needs the launch flag `{v}` to keep this bias "
                              f"({route.note or 'its native implementation has no such bias'})")
        elif v == "drop":
            plan.notes.append((route.engine_notes.get(engine) or f"{engine} silently drops this bias")
                              + ": do not serve this export there")


@register("bias")
class BiasBaker(ClosedFormBaker):
    """Constant steering as a bias (exact) or a rank-one weight update (approximate)."""

    config_class = BiasConfig

    def name_tags(self, req: BakeRequest) -> tuple[list[str], list[str]]:
        before = (["rank1"] if req.route == "rank1" else []) + (["attn"] if req.site == "attn-out" else [])
        return before, ["c" + "+".join(f"{t.coef:g}" for t in req.terms)]

    def plan(self, req: BakeRequest, reader: CheckpointReader) -> BakePlan:
        plan = BakePlan(reader=reader, config=dict(req.config))
        if req.route == "rank1":
            from bakery.bakers.rank1 import plan_rank1

            plan_rank1(req, reader, plan)
            return plan
        deltas: dict[int, torch.Tensor] = {}
        for t in req.terms:
            block = t.layer if req.site == "attn-out" else t.block
            deltas[block] = deltas.get(block, 0) + t.coef * t.row()
        plan_bias_terms(req, reader, plan, req.site, deltas)
        plan.route = "attn-bias" if req.site == "attn-out" else "mlp-bias"
        plan.exact = True
        if req.site == "attn-out":
            plan.notes.append("site attn-out: the constant is added after the attention of block L "
                              "(before its MLP), not at the output of block L-1; it is exact against "
                              "steering at that point")
        return plan
