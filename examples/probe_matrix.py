"""Every probe on every real test model for three steps: what it logs, or why it refuses.

    python examples/probe_matrix.py [gpt2 bert resnet seqfirst batchfirst]

One line per (model, probe): ``OK`` with the number of keys logged and a few values, or
``ERR`` with the message (refusals happen at fit start and say what to pass). Models are the
tiny real ones of ``tests/real_models.py`` (needs ``transformers``).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

import lightning_probes as lp
from lightning_probes.callbacks.base import ProbeCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import RecordingLogger, make_trainer
from real_models import (
    GPT2LM,
    BertClassifier,
    ResNet18,
    SeqEncoder,
    dict_loader,
    image_loader,
    seq_loader,
    token_data,
)

PROBES = {
    "cka": lambda: lp.LayerCKACallback(probe_size=16, every_n_steps=1, on_error="raise"),
    "lca": lambda: lp.LossContributionCallback(
        probe_size=16, method="simpson", every_n_steps=1, on_error="raise"
    ),
    "ablation": lambda: lp.AblationAUCCallback(
        probe_size=16, num_orderings=2, num_points=4, every_n_steps=1, on_error="raise"
    ),
    "selectivity": lambda: lp.SelectivityCallback(probe_size=16, every_n_steps=1, on_error="raise"),
    "landscape": lambda: lp.LandscapeCallback(
        probe_size=8, plane_resolution=3, every_n_steps=1, on_error="raise"
    ),
}
MODELS = {
    "gpt2": (GPT2LM, lambda: dict_loader(token_data(32))),
    "bert": (BertClassifier, lambda: dict_loader(token_data(32, classes=3))),
    "resnet": (ResNet18, lambda: image_loader(32)),
    "seqfirst": (lambda: SeqEncoder(False), lambda: seq_loader(32)),
    "batchfirst": (lambda: SeqEncoder(True), lambda: seq_loader(32)),
}


def main(models: list[str]) -> None:
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    ProbeCallback.default_max_overhead = None  # every scheduled run happens
    for m in models:
        for name, make in PROBES.items():
            pl.seed_everything(0, verbose=False)
            model, loader = MODELS[m][0](), MODELS[m][1]()
            log, start = RecordingLogger(), time.time()
            try:
                trainer = make_trainer(Path("lightning_logs") / "matrix", [make()], max_steps=3,
                                       logger=log)  # fmt: skip
                trainer.fit(model, loader)
                keys = sorted({k for _, d in log.records for k in d if k.startswith("probes/")})
                vals = {k: round(log.values_of(k)[-1], 4) for k in keys[:3]}
                print(f"{m:10s} {name:12s} OK  {time.time() - start:5.1f}s {len(keys)} keys {vals}")
            except Exception as err:  # a refusal: print it and go on
                print(f"{m:10s} {name:12s} ERR {type(err).__name__}: {str(err)[:240]}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
