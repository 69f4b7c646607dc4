"""Adaptive LCA's default cap: at most 8 splits (9 gradient evaluations) per step."""

from __future__ import annotations

import pytorch_lightning as pl
from conftest import TinyClassifier, make_loader, make_trainer

from lightning_probes import LossContributionCallback


def test_adaptive_stops_at_eight_splits_and_logs_its_error(tmp_path):
    lca = LossContributionCallback(every_n_steps=1, probe_size=32, tolerance=1e-14)
    pl.seed_everything(0, verbose=False)
    make_trainer(tmp_path, [lca], max_steps=3).fit(TinyClassifier(), make_loader())
    rows = lca.history  # (step, L_t, L_t+1, sum LC, error, splits, fraction helped)
    assert rows[:, 5].tolist() == [8.0] * 3  # the authors' rule would refine to 32
    assert lca.grad_evals <= 3 * 9
    true_delta = rows[:, 2] - rows[:, 1]
    assert (rows[:, 4] - (true_delta - rows[:, 3]).abs()).abs().max() < 1e-6
