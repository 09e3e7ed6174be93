"""Run under ``python -m torch.distributed.run --nproc_per_node 2 tests/sharded_worker.py MODEL OUT``
(gloo, CPU): build a kl-lora student the sharded way, check every process's shard against the
checkpoint's rows, give the LoRA non-zero ``B`` matrices, and write the export from the shards.
The main process also writes what the unsharded path computes for the same adapter, for the test
to compare."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bakery.bakers.distill.sharded_export import stage_sharded
from bakery.bakers.distill.sharded_load import build_sharded_student, checkpoint_name
from bakery.bakers.distill.sharding import local_rows
from bakery.bakers.distill.sharding import local
from bakery.bakers.distill.train_config import TrainConfig
from bakery.io.checkpoint import CheckpointReader


def b_value(name: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(name))
    return torch.randn(shape, generator=g) * 0.1


def main(model_dir: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig(rank=4, seed=5, activation_checkpointing=True)
    model, targets = build_sharded_student(model_dir, cfg, device=torch.device("cpu"))
    ckpt = CheckpointReader(model_dir)
    report = {"rows_held": 0, "rows_total": 0, "params": 0, "max_local_fraction": 0.0, "whole_outside": []}
    with torch.no_grad():
        for n, p in model.named_parameters():
            mine = local(p)
            if ".lora_B." in n:
                mine.copy_(local_rows(b_value(n, tuple(p.shape)), p))
            elif ".lora_" not in n:
                full = ckpt.get(checkpoint_name(n)).float()
                assert torch.equal(mine, local_rows(full, p)), n
                if ".layers." not in n:  # embeddings, final norm, head: not sharded
                    report["whole_outside"].append([n, mine.shape == full.shape])
                    continue
                report["rows_held"] += mine.shape[0]
                report["rows_total"] += full.shape[0]
                report["params"] += 1
                report["max_local_fraction"] = max(report["max_local_fraction"], mine.numel() / full.numel())
    base = model.get_base_model()
    report["tied"] = base.get_output_embeddings().weight is base.get_input_embeddings().weight
    stage_sharded(model, method="lora", dtype=torch.float32, staging=out / "staged", is_main=rank == 0)
    (out / f"rank{rank}.json").write_text(json.dumps({**report, "world": world, "targets": targets}))
    if rank == 0:  # the unsharded path, for the same adapter: peft's own merge
        from bakery.bakers.distill.lora import add_lora
        from bakery.models import load_model

        plain = add_lora(load_model(model_dir), TrainConfig(rank=4, seed=5))
        with torch.no_grad():
            for n, p in plain.named_parameters():
                if ".lora_B." in n:
                    p.copy_(b_value(n, tuple(p.shape)))
            lora_a = {n: p.detach().clone() for n, p in plain.named_parameters() if ".lora_A." in n}
        plain.merge_and_unload().save_pretrained(out / "plain")
        torch.save(lora_a, out / "plain_lora_a.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
