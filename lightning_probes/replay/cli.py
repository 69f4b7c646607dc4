r"""``python -m lightning_probes replay``: the probes over a folder of checkpoints.

Example::

    python -m lightning_probes replay \
        --model mypackage.models:Classifier \
        --checkpoints lightning_logs/version_0/checkpoints \
        --data mypackage.data:probe_set \
        --probes lca,ablation,landscape \
        --logger tensorboard --save-dir replay_logs

``--model`` names a ``LightningModule`` class (built with the checkpoint's hyper-parameters)
or a function returning a model, as ``module:name`` or ``path/to/file.py:name``. ``--data``
names a function returning the probe set (a tensor, ``(inputs, targets)`` or a ``Dataset``) or
the run's train ``DataLoader`` (each probe then draws its samples as it did live).
``--probe-args`` passes keyword arguments per probe as JSON, e.g.
``'{"lca": {"method": "simpson", "splits": 8}}'``. ``--config replay.yaml`` reads the same
options from YAML (keys as the long options, ``save_dir`` for ``--save-dir``; ``probes`` may
map each probe to its arguments); options on the command line override it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from lightning_probes.replay.checkpoints import ReplayCheckpoint
from lightning_probes.replay.driver import replay_checkpoints

__all__ = ["PROBES", "build_parser", "load_object", "main"]

# probe name -> (class path, replay defaults)
PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "lca": ("lightning_probes.callbacks.lca:LossContributionCallback", {}),
    "ablation": ("lightning_probes.callbacks.ablation:AblationAUCCallback", {}),
    "selectivity": ("lightning_probes.callbacks.selectivity:SelectivityCallback", {}),
    "cka": ("lightning_probes.callbacks.cka:LayerCKACallback", {}),
    "nad": ("lightning_probes.callbacks.nad:NADCallback", {}),
    # the segment from the previous checkpoint to the current one
    "landscape": (
        "lightning_probes.callbacks.landscape:LandscapeCallback",
        {"keep_checkpoints": 1},
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lightning_probes`` parser (one subcommand, ``replay``)."""
    parser = argparse.ArgumentParser(prog="python -m lightning_probes")
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser(
        "replay",
        help="run probes over saved checkpoints",
        description="Run probes over the checkpoints of a ModelCheckpoint folder, logging each "
        "probe at its checkpoint's global step (the same keys as live).",
    )
    replay.add_argument("--config", help="YAML file with these options (overridden by flags)")
    replay.add_argument("--model", help="module:Class (a LightningModule) or module:function")
    replay.add_argument("--checkpoints", nargs="+", help="a ModelCheckpoint folder or files")
    replay.add_argument("--data", help="module:function returning the probe set or a DataLoader")
    replay.add_argument(
        "--probes", help=f"comma-separated, from {', '.join(PROBES)} (default: all but nad)"
    )
    replay.add_argument("--probe-args", help="JSON: {probe: {argument: value}}")
    replay.add_argument("--logger", choices=("tensorboard", "csv"), help="default tensorboard")
    replay.add_argument("--save-dir", help="the logger's folder (default: replay_logs)")
    replay.add_argument("--name", help="the logger's run name (default: replay)")
    replay.add_argument("--version", help="the logger's version (default: the next free one)")
    replay.add_argument("--accelerator", help="cpu (default), gpu or auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the replay; errors in the input end it with a message.

    Returns:
        The exit status (0).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    options = _with_config(parser, args)
    try:
        result = _replay(options)
    except (ValueError, TypeError, ImportError) as err:
        parser.error(str(err))  # exits with status 2 and the message, no traceback
    print(result.summary())
    for lg in result.trainer.loggers:
        print(f"logged to {lg.log_dir}")
    return 0


def load_object(spec: str, what: str) -> Any:
    """The object named by ``module:name`` or ``path/to/file.py:name``.

    Raises:
        ValueError: If ``spec`` has no ``:``, or the module or the name does not exist.
    """
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"Expected `{what}` as module:name or file.py:name, got {spec!r}.")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            if loaded is None or loaded.loader is None or not path.is_file():
                raise ImportError(f"no Python file {str(path)!r}")
            module = importlib.util.module_from_spec(loaded)
            sys.modules[path.stem] = module  # pickling and dataclasses look modules up
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Could not import {module_name!r} for `{what}`: {err}") from err
    if not hasattr(module, name):
        raise ValueError(f"Expected {module_name!r} to define {name!r} for `{what}`.")
    return getattr(module, name)


def _with_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.config:
        import yaml

        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(loaded, dict):
            parser.error(f"Expected --config to hold a mapping of options, got {loaded!r}.")
        options = {k.replace("-", "_"): v for k, v in loaded.items()}
    options.update({k: v for k, v in vars(args).items() if v is not None})
    for required in ("model", "checkpoints", "data"):
        if required not in options:
            parser.error(f"the following option is required: --{required}")
    return options


def _replay(options: dict[str, Any]) -> Any:
    model = load_object(options["model"], "--model")
    if not isinstance(model, type) and callable(model):
        model = model()
    data = load_object(options["data"], "--data")
    data = data() if callable(data) else data
    checkpoints = options["checkpoints"]
    if isinstance(checkpoints, (list, tuple)) and len(checkpoints) == 1:
        checkpoints = checkpoints[0]
    loader = data if isinstance(data, DataLoader) else None
    return replay_checkpoints(
        model,
        checkpoints,
        _probes(options.get("probes"), options.get("probe_args")),
        probe_data=None if loader is not None else data,
        train_dataloader=loader,
        logger=_logger(options),
        accelerator=options.get("accelerator", "cpu"),
        default_root_dir=options.get("save_dir", "replay_logs"),
        progress=_progress,
    )


def _probes(probes: Any, probe_args: Any) -> list[Any]:
    kwargs: dict[str, Any] = {}
    if isinstance(probes, dict):  # YAML: {probe: {argument: value}}
        kwargs = {k: dict(v or {}) for k, v in probes.items()}
        names = list(probes)
    elif isinstance(probes, (list, tuple)):
        names = list(probes)
    else:
        names = [p.strip() for p in (probes or "lca,ablation,selectivity,cka,landscape").split(",")]
    if isinstance(probe_args, str):
        try:
            probe_args = json.loads(probe_args)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"Expected --probe-args to be JSON, got {probe_args!r}: {err}"
            ) from err
    if probe_args is not None and not isinstance(probe_args, dict):
        raise ValueError(f"Expected --probe-args to map probes to arguments, got {probe_args!r}.")
    for name, given in (probe_args or {}).items():
        kwargs.setdefault(name, {}).update(given)
    unknown = sorted(set(names) - set(PROBES) | set(kwargs) - set(names))
    if unknown:
        raise ValueError(
            f"Unknown or unselected probe(s) {unknown}: --probes can name {', '.join(PROBES)}."
        )
    built = []
    for name in names:
        path, defaults = PROBES[name]
        cls = load_object(path, "--probes")
        built.append(cls(**{**defaults, **kwargs.get(name, {})}))
    return built


def _logger(options: dict[str, Any]) -> Any:
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    kind = options.get("logger", "tensorboard")
    cls: Callable[..., Any] = {"tensorboard": TensorBoardLogger, "csv": CSVLogger}[kind]
    version = options.get("version")
    return cls(
        save_dir=options.get("save_dir", "replay_logs"),
        name=options.get("name", "replay"),
        # "3" is version_3, as Lightning names an int version; another string is the folder
        version=None if version is None else int(version) if str(version).isdigit() else version,
    )


def _progress(index: int, total: int, ckpt: ReplayCheckpoint) -> None:
    print(f"[{index + 1}/{total}] global step {ckpt.global_step}: {ckpt.path.name}", flush=True)
