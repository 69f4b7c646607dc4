"""Which Lightning strategies the probes support, and the model a probe runs on under each.

- DDP (and single-device): the probes run on the model itself.
- FSDP2 (``ModelParallelStrategy`` with ``torch.distributed.fsdp.fully_shard`` in
  ``configure_model``): the parameters are ``DTensor`` shards; each probe runs on an unsharded
  replica with the weights gathered whole
  (:func:`~lightning_probes.core.sharding.unsharded_replica`) and logs the values DDP would.
- FSDP1 (``FSDPStrategy``) and DeepSpeed (``DeepSpeedStrategy``) are refused at ``setup``:
  outside ``forward`` their parameters are flattened local shards (or partitioned, ZeRO-3), so
  a norm, a loss at other weights or a copy of the model would be computed from one rank's
  shard: a silently wrong number. The strategies are recognised by class name (subclasses
  included), so DeepSpeed need not be installed for the check.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning import LightningModule

from lightning_probes.core.sharding import unsharded_replica

__all__ = ["REFUSED_STRATEGIES", "check_strategy", "probe_model"]

REFUSED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")
"""Class names of the strategies whose models no probe can read correctly."""


def check_strategy(trainer: Any, owner: str) -> None:
    """Refuse a Trainer whose strategy keeps local parameter shards outside ``forward``.

    Args:
        trainer: The Trainer (its ``strategy``).
        owner: The probe's class name, for the message.

    Raises:
        ValueError: For ``FSDPStrategy`` (FSDP1) and ``DeepSpeedStrategy`` (and subclasses),
            naming the probe, the strategy and what to use instead.
    """
    strategy = getattr(trainer, "strategy", None)
    names = {cls.__name__ for cls in type(strategy).__mro__}
    refused = next((n for n in REFUSED_STRATEGIES if n in names), None)
    if refused is None:
        return
    raise ValueError(
        f"{owner} does not support `{type(strategy).__name__}` ({refused}): outside the forward "
        "pass its parameters are this rank's local shards, so the probe's norms, losses at "
        "other weights and copies of the model would be computed from one shard (silently "
        'wrong). Train with `strategy="ddp"`, or with FSDP2: '
        "`pytorch_lightning.strategies.ModelParallelStrategy` and "
        "`torch.distributed.fsdp.fully_shard` in `configure_model`, whose sharded parameters "
        "the probes gather whole."
    )


def probe_model(pl_module: LightningModule, owner: Any) -> LightningModule:
    """The model a probe runs on: ``pl_module``, or its unsharded replica under FSDP2.

    The replica is built at each call (the weights gathered whole on every rank: call it at
    points every rank reaches together) and lives as long as the caller holds it; it shares
    ``pl_module``'s attributes (Trainer, device, logging state) and buffers, so the probe logs
    through it as through ``pl_module``.

    Args:
        pl_module: The trained model.
        owner: The probe (or its class name), for the message.

    Returns:
        ``pl_module`` itself when it is not sharded, else the replica.

    Raises:
        ValueError: For tensor-parallel parameters, naming the probe
            (:func:`~lightning_probes.core.sharding.check_unshardable`).
    """
    try:
        return unsharded_replica(pl_module)  # type: ignore[return-value]
    except ValueError as err:
        name = owner if isinstance(owner, str) else type(owner).__name__
        raise ValueError(f"{name}: {err}") from None
