"""The NAD basis at fit start: predicted before it starts, progress as log lines, no tqdm."""

from __future__ import annotations

import logging

import pytest
from conftest import TinyClassifier, make_loader, make_trainer

from lightning_probes import NADCallback
from lightning_probes.callbacks import nad_progress


def fit(tmp_path, cb):
    make_trainer(tmp_path, [cb], max_steps=1).fit(TinyClassifier(), make_loader())


def test_fit_start_says_the_predicted_time_then_reports_progress(tmp_path, caplog, capsys):
    cb = NADCallback(num_networks=16, every_n_steps=5, probe_size=16, max_overhead=None)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, cb)
    lines = [r.getMessage() for r in caplog.records if "NAD basis" in r.getMessage()]
    assert "predicted" in lines[0] and "16 networks" in lines[0]
    assert lines[-1].startswith("NADCallback: NAD basis 16/16 networks")
    assert "NADs" not in capsys.readouterr().err  # no second progress bar


def test_a_long_basis_warns_how_to_shorten_it(tmp_path, monkeypatch):
    monkeypatch.setattr(nad_progress, "LONG_SECONDS", 0.0)
    cb = NADCallback(num_networks=8, every_n_steps=5, probe_size=16, max_overhead=None)
    with pytest.warns(UserWarning, match=r"predicted .* To shorten it: fewer networks"):
        fit(tmp_path, cb)


def test_progress_lines_are_rate_limited(caplog):
    report = nad_progress.BasisProgress("X", interval=3600.0)
    with caplog.at_level(logging.INFO):
        for done in range(1, 11):
            report(done, 10)
    assert report.lines == 1  # only the last network reports within the interval
    assert "ETA 0 s" in caplog.records[-1].getMessage()
