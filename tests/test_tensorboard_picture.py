"""examples/tensorboard_picture.py draws the scalar cards of a TensorBoard run into one PNG."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "tensorboard_picture.py"


def test_the_picture_is_drawn_from_the_event_files(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run" / "version_0"))
    for step in range(40):
        writer.add_scalar("train_loss", 2.0 / (1 + step), step)
        if step % 10 == 0:
            writer.add_scalar("probes/ablation/auc", 0.5 + step / 100, step)
            writer.add_scalar("probes/cka/net.0/alignment", 0.1, step)
    writer.close()
    out = tmp_path / "picture.png"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "run"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "nothing")], capture_output=True, text=True
    )
    assert empty.returncode != 0 and "no TensorBoard event files" in empty.stderr
