"""Draw what TensorBoard shows for a run's probe scalars, as one PNG for the README.

Reads the event files of a TensorBoard log folder (the quickstart's by default) with
TensorBoard's own ``EventAccumulator`` and draws a grid of scalar cards the way TensorBoard's
Scalars dashboard does: one card per tag, the raw series faint and the smoothed one (TensorBoard's
exponential moving average, weight 0.6) solid, per-layer tags of one quantity in one card;
series of fewer than 30 points (a probe's runs) are drawn as their points, unsmoothed.

    python examples/quickstart.py --logdir /tmp/qs
    python examples/tensorboard_picture.py /tmp/qs/quickstart --out docs/quickstart_tensorboard.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# (card title, regex of the tags drawn in it; a group names the series)
CARDS = [
    ("lca: cumulative LC per layer (negative: helped)", r"probes/lca/(net\.\d+)/cumulative_lc"),
    ("lca: ΣLC vs the true loss change per step", r"probes/lca/(lc|true_delta_loss)"),
    ("ablation: AUC of the cumulative ablation curve", r"probes/ablation/(auc)"),
    ("selectivity: mean class selectivity per layer", r"probes/selectivity/(net\.\d+)/mean"),
    ("cka: tangent-kernel alignment per layer", r"probes/cka/(net\.\d+)/alignment"),
    (
        "nad: share of input-gradient energy in the first NADs",
        r"probes/nad/(grad_energy_share_top)",
    ),
    ("landscape: distance from the initial weights", r"probes/landscape/(distance_from_init)"),
    ("training and validation loss", r"(train_loss|val_loss)"),
]


def smooth(values: np.ndarray, weight: float = 0.6) -> np.ndarray:
    """TensorBoard's smoothing: a debiased exponential moving average."""
    out, last = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        last = last * weight + (1 - weight) * v
        out[i] = last / (1 - weight ** (i + 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("logdir", type=Path, help="a TensorBoard run folder (event files)")
    parser.add_argument("--out", type=Path, default=Path("docs/quickstart_tensorboard.png"))
    args = parser.parse_args()
    runs = sorted({p.parent for p in args.logdir.rglob("events.out.tfevents.*")})
    if not runs:
        raise SystemExit(f"no TensorBoard event files under {args.logdir}")
    acc = EventAccumulator(str(runs[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.6), layout="constrained")
    for ax, (title, pattern) in zip(axes.ravel(), CARDS, strict=True):
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        for i, tag in enumerate(t for t in tags if re.fullmatch(pattern, t)):
            events = acc.Scalars(tag)
            steps = np.array([e.step for e in events])
            values = np.array([e.value for e in events])
            colour = f"C{i % 10}"
            label = re.fullmatch(pattern, tag).group(1)  # type: ignore[union-attr]
            if len(values) < 30:  # sparse (a probe's runs): the points themselves, unsmoothed
                ax.plot(steps, values, color=colour, marker="o", markersize=3, label=label)
                continue
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
            ax.plot(steps, smooth(values), color=colour, linewidth=1.6, label=label)
        if ax.lines:
            ax.legend(fontsize=7, loc="best", frameon=False)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", transform=ax.transAxes, color="grey")
    fig.suptitle(
        "TensorBoard scalars of the quickstart (`make demo`); losses: raw faint, smoothed (0.6)",
        fontsize=11,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
