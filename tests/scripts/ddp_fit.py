"""Train TinyClassifier under DDP (2 CPU processes, gloo) with the given probes attached.

Run as a script: ``strategy="ddp"`` re-launches this file once per extra rank. Each rank writes
``<out>/rank<r>.json`` with its ``callback_metrics`` and every probe's ``state_dict`` (tensors
as lists), so the test can check that both ranks agree and that artefacts were written once.

Usage: python ddp_fit.py OUT_DIR PROBES_SPEC [PRECISION]
PROBES_SPEC is the name of a factory in ``ddp_probes.py``; PRECISION the Trainer's (default
"32-true"). The record also holds every trained weight (and its dtype).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import ddp_probes  # noqa: E402
from conftest import TinyClassifier, make_loader  # noqa: E402


def as_plain(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().flatten().tolist()
    if isinstance(value, dict):
        return {str(k): as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    return value


def main() -> None:
    out, spec = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    # exact schedules, as in the test process (tests/conftest.py); budgets are opted into
    from lightning_probes.callbacks.base import ProbeCallback

    ProbeCallback.default_max_overhead = None
    probes, max_steps = getattr(ddp_probes, spec)()
    trainer = pl.Trainer(
        default_root_dir=str(out),
        strategy="ddp",
        precision=sys.argv[3] if len(sys.argv) > 3 else "32-true",
        accelerator="cpu",
        devices=2,
        max_steps=max_steps,
        logger=TensorBoardLogger(str(out), name="tb"),
        callbacks=probes,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    module = TinyClassifier()
    trainer.fit(module, make_loader(n=128, batch_size=16))
    record = {
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "states": {type(p).__name__: as_plain(p.state_dict()) for p in probes},
        "global_step": trainer.global_step,
        "weights": {k: [*as_plain(v), str(v.dtype)] for k, v in module.state_dict().items()},
        "should_stop": bool(trainer.should_stop),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
