"""Configure probes from YAML with LightningCLI.

    python examples/cli.py fit --config examples/cli_config.yaml

Probes are ordinary callbacks under ``trainer.callbacks`` (``class_path`` + ``init_args``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pytorch_lightning.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsDataModule, DigitsMLP


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` for programmatic use, e.g. in tests)."""
    return LightningCLI(
        DigitsMLP, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True}
    )


if __name__ == "__main__":
    main()
