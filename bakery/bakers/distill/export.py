"""The export side of the distilled bakers: the trained student as :class:`~bakery.bakers.plan.Weights`
(merged weights, the peft adapter, the card section), and, for a multimodal wrapper, the source
checkpoint with the trained text tower in place."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import torch

from bakery.arch import spec_for
from bakery.bakers.plan import BakeFacts, Weights
from bakery.bakers.plan import write_overlay
from bakery.naming import slug
from bakery.naming import describe_layer
from bakery.bakers.distill.targets import unwrap_peft


def merged_copy(student, method: str):
    """A plain transformers model with the trained weights (LoRA merged); the student is untouched."""
    m = copy.deepcopy(student)
    if method == "lora":
        m = m.merge_and_unload()
    return m


class DistilledWeights(Weights):
    """The trained student, ready to be written: merged weights (LoRA merged into the base, or the
    fine-tuned weights), and for LoRA the peft adapter in ``adapter/``.

    A multimodal wrapper's export is its source checkpoint with the trained text-tower tensors in
    place (:func:`~bakery.bakers.plan.write_overlay`): the vision tower, projector and config stay
    byte for byte, and the folder loads as the wrapper class again."""

    def __init__(self, student, *, method: str, dtype: torch.dtype, source: dict, term: dict,
                 positions: str, info: dict, model_dir: Path | None = None, config: dict | None = None):
        self.student, self.method, self.dtype, self.source = student, method, dtype, source
        self.term, self.positions, self.info = term, positions, info
        self.model_dir, self.config = model_dir, config or {}

    def write(self, folder: Path, *, progress: bool, max_shard_bytes: int | None) -> BakeFacts:
        info = dict(self.info)
        self.write_weights(folder, info, progress=progress, max_shard_bytes=max_shard_bytes)
        if self.method == "lora":
            _fix_adapter_base(folder / "adapter", self.source)
        notes = info.pop("notes", [])
        return BakeFacts(route="lora-merged" if self.method == "lora" else "full", positions=self.positions,
                         exact=False, engines={"transformers": "ok", "vllm": "ok", "sglang": "ok"},
                         notes=notes, extra=info,
                         card_section=("distill", card_body(self.method, self.term, self.positions,
                                                            self.source, info)))

    def write_weights(self, folder: Path, info: dict, *, progress: bool, max_shard_bytes: int | None) -> None:
        """The weights, ``config.json`` and, for LoRA, ``adapter/``."""
        merged = merged_copy(self.student, self.method).to(self.dtype)
        wrapper = is_wrapper(self.config)
        if wrapper:
            scratch = folder / ".trained"
            merged.save_pretrained(scratch)
            del merged
            rename = text_tower_rename(self.config, self.student)
            replaced = write_overlay(folder, self.model_dir, self.config, scratch, rename=rename,
                                     progress=progress, max_shard_bytes=max_shard_bytes)
            shutil.rmtree(scratch)
            info["tensors_replaced"] = len(replaced)
            info.setdefault("notes", []).append(
                f"multimodal wrapper: the text tower was trained and {len(replaced)} of its tensors replaced "
                "in the source checkpoint; every other tensor (vision tower, projector) and config.json "
                "are the source's, byte for byte")
        else:
            merged.save_pretrained(folder, **({"max_shard_size": max_shard_bytes} if max_shard_bytes else {}))
            del merged
        if self.method == "lora":
            self.student.save_pretrained(folder / "adapter")
            if wrapper:
                _adapter_to_wrapper(folder / "adapter", self.config, self.student)


class StagedWeights(DistilledWeights):
    """A sharded student's export, already written from its shards into ``staging``
    (:func:`~bakery.bakers.distill.sharded_export.stage_sharded`): moved into the folder."""

    def __init__(self, staging: Path, **kw):
        super().__init__(None, **kw)
        self.staging = staging

    def write_weights(self, folder: Path, info: dict, *, progress: bool, max_shard_bytes: int | None) -> None:
        for p in sorted(self.staging.iterdir()):
            shutil.move(str(p), str(folder / p.name))
        self.staging.rmdir()


def is_wrapper(config: dict) -> bool:
    """A multimodal ``...ForConditionalGeneration`` checkpoint (its text tower is what trains)."""
    return spec_for(config).text_prefix is not None


def _student_blocks(student) -> str:
    return spec_for(unwrap_peft(student).config).blocks


def text_tower_rename(config: dict, student):
    """Model-side names of a student loaded as the text-only class (Qwen3.5's wrapper loads as
    ``Qwen3_5ForCausalLM``: ``model.layers...``) -> the wrapper's (``model.language_model.layers...``)."""
    spec, own = spec_for(config), _student_blocks(student)
    old, new = own.rsplit(".", 1)[0], spec.blocks.rsplit(".", 1)[0]  # "model" -> "model.language_model"
    if old == new:
        return lambda n: n
    return lambda n: new + n[len(old):] if n.startswith(old + ".") else n


def _adapter_to_wrapper(adapter_dir: Path, config: dict, student) -> None:
    """Make ``adapter/`` load onto the wrapper class: its LoRA tensors renamed into the wrapper's
    module tree, and ``target_modules`` a pattern that matches the text tower's blocks only (the
    vision tower has linears of the same names)."""
    from safetensors.torch import load_file, save_file

    from bakery.bakers.distill.targets import blocks_regex

    rename = text_tower_rename(config, student)
    f = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(f))
    prefix = "base_model.model."
    save_file({prefix + rename(k[len(prefix):]) if k.startswith(prefix) else k: v for k, v in tensors.items()},
              str(f), metadata={"format": "pt"})
    p = adapter_dir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    leaves = cfg.get("target_modules")
    if isinstance(leaves, list) and leaves:
        cfg["target_modules"] = blocks_regex(spec_for(config).blocks, leaves)
    elif isinstance(leaves, str):  # a regex over the student's blocks (first_block): the same over the wrapper's
        own, theirs = re.escape(_student_blocks(student)), re.escape(spec_for(config).blocks)
        if leaves.startswith(own + "\\."):
            cfg["target_modules"] = theirs + leaves[len(own):]
    p.write_text(json.dumps(cfg, indent=2))


def _fix_adapter_base(adapter_dir: Path, source: dict) -> None:
    """Point the adapter (config and peft's card) at the source's Hub id, else the name the user
    gave: peft records the local folder it loaded, a cache path that means nothing elsewhere."""
    p = adapter_dir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    local = cfg.get("base_model_name_or_path")
    base = source.get("hub_id") or source.get("model") or local
    cfg["base_model_name_or_path"] = base
    p.write_text(json.dumps(cfg, indent=2))
    card = adapter_dir / "README.md"
    if local and base != local and card.is_file():
        card.write_text(card.read_text().replace(local, base))


def card_body(method: str, term: dict, positions: str, source: dict, info: dict) -> str:
    """The card's ``distill`` section: how the weights were trained and what the folder holds."""
    lines = [
        "## Distillation", "",
        f"Runtime steering `{term['coef']:g} * v[{term['layer']}]` ({describe_layer(term['layer'])}), "
        f"positions `{positions}`, distilled into the weights by minimising KL(steered || model) on "
        f"{info.get('train_trajectories')} sampled trajectories ({info.get('train_tokens')} response tokens).",
        "", "| setting | value |", "| --- | --- |",
    ]
    for k in ("rank", "alpha", "rslora", "target_modules", "target_parameters", "lr", "steps", "best_step",
              "best_val_kl", "val_kl_base", "val_R", "wall_s"):
        if k in info and (k != "target_parameters" or info[k]):
            lines.append(f"| {k} | {info[k]} |")
    if info.get("target_parameters"):
        lines += ["", "Mixture-of-experts blocks: the experts' fused weights "
                  f"({', '.join(f'`{p}`' for p in info['target_parameters'])}) trained in every expert"
                  + (" (peft `target_parameters`: a rank-r LoRA per expert)" if method == "lora" else "") + "."]
    if info.get("not_trained"):
        lines += ["", "Not trained (per block): " + ", ".join(f"`{p}`" for p in info["not_trained"])
                  + "; nor the embeddings, final norm and output head."]
    if method == "lora":
        base = source.get("hub_id") or source.get("model")
        lines += ["", "The weights are a plain checkpoint: the trained LoRA is merged into the base weights "
                  "(stock architecture, no new parameters), so it loads like the base model in "
                  "transformers, vLLM or sglang.", "",
                  "The unmerged peft adapter is in `adapter/` (paths below relative to this folder): "
                  "`PeftModel.from_pretrained(base_model, 'adapter')`, or in vLLM "
                  f"`vllm serve {base} --enable-lora --lora-modules {slug(term['trait'])}=adapter "
                  f"--max-lora-rank {info.get('rank')}`."]
        if info.get("target_parameters"):
            lines += ["", "The adapter's expert LoRA is peft's `target_parameters` format; whether an "
                      "engine serves it as a LoRA was not checked. The merged weights above need no LoRA "
                      "support."]
    else:
        first = info.get("first_block")
        which = f"blocks {first} and later" if first is not None else "the target linears"
        lines += ["", f"The weights are a plain checkpoint: full fine-tuning of {which} (no LoRA, no "
                  "adapter, no new parameters), so it loads like the base model in transformers, vLLM "
                  "or sglang."]
    return "\n".join(lines)
