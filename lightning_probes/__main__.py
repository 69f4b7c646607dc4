"""``python -m lightning_probes replay ...``: see :mod:`lightning_probes.replay.cli`."""

from __future__ import annotations

from lightning_probes.replay.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
