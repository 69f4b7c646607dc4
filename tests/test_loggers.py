"""Histograms, images, figures and text reach W&B (offline), MLflow (file store) and CSV.

Real packages, no network: W&B in offline mode (its run file is read back record by record),
MLflow on a local file store, CSV in ``tmp_path``. One short fit each, with a NAD probe (its
basis at fit start: histogram, images, a figure; energy figures at steps 2 and 4) and a probe
that logs a weight matrix as histogram, image, figure and text at steps 2 and 4.
"""

from __future__ import annotations

import glob
import json
import re
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from conftest import RecordingLogger, TinyClassifier, make_loader, make_trainer
from PIL import Image

from lightning_probes import NADCallback
from lightning_probes import logging as plog
from lightning_probes.callbacks.base import ProbeCallback


class ArtefactProbe(ProbeCallback):
    probe_name = "art"
    default_schedule = {"every_n_steps": 2}

    def __init__(self, **kwargs):
        super().__init__(max_overhead=None, **kwargs)
        self.weights: dict[int, np.ndarray] = {}

    def probe(self, trainer, pl_module, data):
        w = pl_module.net[0].weight
        self.weights[trainer.global_step] = w.detach().double().numpy().copy()
        plog.log_histogram(trainer, self.key("weights", "net.0"), w)
        plog.log_image(trainer, self.key("weights_image", "net.0"), w)
        plog.log_text(trainer, self.key("note"), f"step {trainer.global_step}")
        fig = plog.new_figure()
        fig.add_subplot().plot([0, 1], [1, 0])
        plog.log_figure(trainer, self.key("figure"), fig)


def fit(tmp_path, logger):
    pl.seed_everything(0, verbose=False)
    art = ArtefactProbe(probe_size=8)
    nad = NADCallback(num_networks=16, every_n_steps=2, probe_size=16, max_overhead=None)
    trainer = make_trainer(tmp_path, [nad, art], max_steps=4, logger=logger)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyClassifier(dropout=0.0), make_loader(shuffle=False))
    assert nad.runs == 2 and art.runs == 2
    return art, [str(w.message) for w in caught]


def expected_pixels(w: np.ndarray) -> np.ndarray:
    """Min-max scaled to 0..255, in float64 (the image of a weight matrix)."""
    return np.round((w - w.min()) / (w.max() - w.min()) * 255.0)


def assert_weight_image(path: Path, w: np.ndarray) -> None:
    pixels = np.asarray(Image.open(path), dtype=np.float64)
    assert pixels.shape == w.shape
    assert np.abs(pixels - expected_pixels(w)).max() <= 1.0  # float32 rounding at .5


def assert_figure_png(path: Path) -> None:
    image = Image.open(path)
    assert image.mode == "RGB" and min(image.size) > 100


def test_csv_logger_gets_png_files_beside_its_metrics_at_each_probe_step(tmp_path):
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    art, messages = fit(tmp_path, logger)
    root = Path(logger.log_dir)
    assert (root / "metrics.csv").is_file()
    probes = root / "probes"
    assert sorted(p.name for p in (probes / "nad" / "directions").iterdir()) == ["step_0.png"]
    assert_figure_png(probes / "nad" / "spectrum" / "step_0.png")
    assert sorted(p.name for p in (probes / "nad" / "energy").iterdir()) == [
        "step_2.png",
        "step_4.png",
    ]
    for step in (2, 4):
        assert_weight_image(probes / "art" / "net.0" / "weights_image" / f"step_{step}.png",
                            art.weights[step])  # fmt: skip
        assert_figure_png(probes / "art" / "figure" / f"step_{step}.png")
        assert (probes / "art" / "note" / f"step_{step}.txt").read_text() == f"step {step}"
    assert not (probes / "art" / "net.0" / "weights").exists()  # no histograms in CSV
    assert any(m.startswith("NADCallback: histograms are not logged") for m in messages)


def test_mlflow_logger_gets_time_stepped_images_in_its_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3: file store opt-in
    logger = pl.loggers.MLFlowLogger(tracking_uri=f"file:{tmp_path}/mlruns")
    art, _ = fit(tmp_path, logger)
    artifacts = tmp_path / "mlruns" / logger.experiment_id / logger.run_id / "artifacts"

    def files_of(key: str) -> dict[int, Path]:  # MLflow names them <key>+step+<n>+...png
        pattern = re.escape(key).replace("/", "[~#]") + r"[+%]step[+%](\d+)[+%].*[0-9a-f]\.png"
        found = ((re.fullmatch(pattern, p.name), p) for p in (artifacts / "images").iterdir())
        return {int(m.group(1)): p for m, p in found if m}

    assert sorted(files_of("probes/nad/directions")) == [0]
    assert sorted(files_of("probes/nad/spectrum")) == [0]
    assert sorted(files_of("probes/nad/energy")) == [2, 4]
    assert sorted(files_of("probes/art/figure")) == [2, 4]
    images = files_of("probes/art/net.0/weights_image")
    assert sorted(images) == [2, 4]
    for step, path in images.items():
        assert_weight_image(path, art.weights[step])
        note = artifacts / "probes" / "art" / "note" / f"step_{step}.txt"
        assert note.read_text() == f"step {step}"


def wandb_records(path: Path) -> list:
    """Records of a ``.wandb`` file (LevelDB log format: a 7-byte header, 32 KiB blocks of
    chunks with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunks, records = path.read_bytes(), 7, 32768, [], []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            records.append(pb.Record())
            records[-1].ParseFromString(b"".join(chunks))
            chunks = []
    return records


def wandb_history(run_dir: Path, timeout: float = 60.0) -> list[dict]:
    """History rows of an offline W&B run, once its file holds the run's exit record (W&B's
    service process may still be writing it when ``wandb.finish()`` returns)."""
    (path,) = glob.glob(str(run_dir / "*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(Path(path))
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert "exit" in kinds, f"the W&B run file was not complete after {timeout} s"
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r, kind in zip(records, kinds)
        if kind == "history"
    ]


def test_wandb_offline_run_gets_histograms_images_figures_and_text(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    settings = wandb.Settings(x_disable_stats=True, x_disable_meta=True, console="off")
    logger = pl.loggers.WandbLogger(
        offline=True, save_dir=str(tmp_path), project="probes", settings=settings
    )
    try:
        art, _ = fit(tmp_path, logger)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    rows = wandb_history(run_dir)

    def logged(key: str, kind: str) -> list[int]:
        rows_of = [r for r in rows if r.get(f"{key}/_type") == kind]
        for r in rows_of:
            if kind.endswith("-file"):
                assert (run_dir / "files" / r[f"{key}/path"]).is_file()
        return [r["trainer/global_step"] for r in rows_of]

    assert logged("probes/nad/singular_values", "histogram") == [0]
    assert logged("probes/nad/directions", "image-file") == [0]
    assert logged("probes/nad/spectrum", "image-file") == [0]
    assert logged("probes/nad/energy", "image-file") == [2, 4]
    assert logged("probes/art/net.0/weights", "histogram") == [2, 4]
    assert logged("probes/art/figure", "image-file") == [2, 4]
    assert logged("probes/art/note", "table-file") == [2, 4]
    assert logged("probes/art/net.0/weights_image", "image-file") == [2, 4]
    for row in rows:
        if row.get("probes/art/net.0/weights_image/_type"):
            step = row["trainer/global_step"]
            assert_weight_image(run_dir / "files" / row["probes/art/net.0/weights_image/path"],
                                art.weights[step])  # fmt: skip
        if row.get("probes/art/net.0/weights/_type"):  # the histogram holds every weight
            w = art.weights[row["trainer/global_step"]]
            assert sum(row["probes/art/net.0/weights/values"]) == w.size
            bins = row["probes/art/net.0/weights/bins"]
            assert len(bins) == 65 and bins[0] == pytest.approx(w.min(), rel=1e-6)
            assert bins[-1] == pytest.approx(w.max(), rel=1e-6)
    scalar_steps = [
        r["trainer/global_step"] for r in rows if "probes/nad/grad_energy_centroid" in r
    ]
    assert scalar_steps == [2, 4]  # scalars and media on the same step axis


class BrokenWriter:
    """A TensorBoard-like writer whose every call fails (a full disk)."""

    def add_histogram(self, *args, **kwargs):
        raise OSError("disk full")

    add_image = add_text = add_histogram_raw = add_histogram


class BrokenLogger(RecordingLogger):
    @property
    def experiment(self):
        return BrokenWriter()

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("probes/") for k in metrics):
            raise OSError("disk full")
        super().log_metrics(metrics, step)


def test_a_failing_logger_is_skipped_with_one_warning_per_kind(tmp_path):
    csv = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    art, messages = fit(tmp_path, [BrokenLogger(), csv])  # both probes ran, none failed
    failed = [m for m in messages if m.startswith("lightning_probes: BrokenLogger failed")]
    kinds = sorted(re.match(r".* failed to log the (\w+) ", m).group(1) for m in failed)
    assert kinds == ["figure", "histogram", "histogram_raw", "image", "scalars", "text"]
    assert all("OSError: disk full" in m for m in failed)
    probes = Path(csv.log_dir) / "probes"  # the other logger still gets everything
    for step in (2, 4):
        assert_weight_image(probes / "art" / "net.0" / "weights_image" / f"step_{step}.png",
                            art.weights[step])  # fmt: skip
    assert "probes/nad/grad_energy_centroid" in (Path(csv.log_dir) / "metrics.csv").read_text()


def test_path_safe_key_never_leaves_the_folder():
    assert plog.path_safe_key("probes/cka/net.0/kernel") == "probes/cka/net.0/kernel"
    assert plog.path_safe_key("probes/x/enc.layer[0]:a b/q") == "probes/x/enc.layer_0__a_b/q"
    assert plog.path_safe_key("../../etc//passwd") == "_/_/etc/_/passwd"
    assert plog.path_safe_key("/abs/.") == "_/abs/_"
