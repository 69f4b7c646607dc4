"""Train TinyClassifier under FSDP2 and under DDP (2 CPU processes, gloo), probes attached.

FSDP2 is ``ModelParallelStrategy`` with ``fully_shard`` on every Linear and on the module in
``configure_model`` (the last layer, 3 rows on 2 ranks, is sharded unevenly). Three fits in one
launch, from the same seed: FSDP2 with the probes of ``ddp_probes.<spec>``; FSDP2 without
probes for as many steps (the probes must not change training); DDP with the same probes (the
values to match). Each rank writes ``<out>/<run>_rank<r>.json``: ``callback_metrics``, every probe's
``state_dict`` and the final whole weights.

Usage: python fsdp2_fit.py OUT_DIR PROBES_SPEC
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import ddp_probes  # noqa: E402
from conftest import TinyClassifier, make_loader  # noqa: E402
from ddp_fit import as_plain  # noqa: E402


class ShardedClassifier(TinyClassifier):
    """TinyClassifier sharded by FSDP2 (``fully_shard``) once the device mesh exists."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)  # the LightningModule itself: the replica must log


def fit(out: Path, run: str, spec: str | None, max_steps: int | None = None) -> int:
    pl.seed_everything(0, verbose=False)
    probes, steps = getattr(ddp_probes, spec or "all_probes")()
    probes, max_steps = (probes, steps) if spec else ([], max_steps)
    fsdp2 = run.startswith("fsdp2")
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    model = ShardedClassifier() if fsdp2 else TinyClassifier()
    trainer = pl.Trainer(
        default_root_dir=str(out / run),
        strategy=strategy if fsdp2 else "ddp",
        accelerator="cpu",
        devices=2,
        max_steps=max_steps,
        logger=TensorBoardLogger(str(out / run), name="tb"),
        callbacks=probes,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, make_loader(n=128, batch_size=16))
    weights = {
        k: p.full_tensor() if hasattr(p, "full_tensor") else p for k, p in model.named_parameters()
    }
    record = {
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "states": {type(p).__name__: as_plain(p.state_dict()) for p in probes},
        "weights": as_plain(weights),
        "global_step": trainer.global_step,
    }
    (out / f"{run}_rank{trainer.global_rank}.json").write_text(json.dumps(record))
    return trainer.global_step


def main() -> None:
    out, spec = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    from lightning_probes.callbacks.base import ProbeCallback

    ProbeCallback.default_max_overhead = None  # exact schedules
    steps = fit(out, "fsdp2", spec)
    fit(out, "fsdp2_no_probes", None, max_steps=steps)  # as many steps (early stopping)
    fit(out, "ddp", spec)


if __name__ == "__main__":
    main()
