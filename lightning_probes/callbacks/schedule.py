"""When a probe runs: every n optimizer steps, every n epochs, or at an explicit list of steps."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProbeSchedule:
    """A probe's schedule; exactly one of ``every_n_steps``, ``every_n_epochs``, ``at_steps``.

    Steps are counted as ``trainer.global_step`` *after* the optimizer step (1 after the first
    step). A step-based probe runs when ``step >= start_step`` and
    ``(step - start_step) % every_n_steps == 0``, or when ``step`` is in ``at_steps``. An
    epoch-based probe runs at the end of epoch ``e`` (0-based) when ``(e + 1) % every_n_epochs
    == 0`` and ``global_step >= start_step``.

    Example:
        >>> s = ProbeSchedule(every_n_steps=10, start_step=5)
        >>> [step for step in range(1, 40) if s.runs_at_step(step)]
        [5, 15, 25, 35]
        >>> ProbeSchedule(at_steps=(1, 10, 100)).runs_at_step(10)
        True
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_steps: tuple[int, ...] | None = None
    start_step: int = 0

    @classmethod
    def create(
        cls,
        every_n_steps: int | None,
        every_n_epochs: int | None,
        at_steps: Iterable[int] | None,
        start_step: int,
        default: dict[str, int],
    ) -> ProbeSchedule:
        """Validate the user's arguments; none given means ``default`` (one of the three)."""
        given = {
            name: value
            for name, value in (
                ("every_n_steps", every_n_steps),
                ("every_n_epochs", every_n_epochs),
                ("at_steps", at_steps),
            )
            if value is not None
        }
        if len(given) > 1:
            raise ValueError(
                "Expected exactly one of `every_n_steps`, `every_n_epochs`, `at_steps`, got "
                + ", ".join(f"{k}={v!r}" for k, v in given.items())
                + "."
            )
        if not given:
            given = dict(default)
        for name in ("every_n_steps", "every_n_epochs"):
            value = given.get(name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}.")
        steps = given.get("at_steps")
        if steps is not None:
            steps = tuple(sorted({int(s) for s in steps}))  # type: ignore[union-attr]
            if not steps or steps[0] < 1:
                raise ValueError(
                    f"Expected `at_steps` to be a non-empty list of steps >= 1, got {at_steps!r}."
                )
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise ValueError(f"Expected `start_step` to be an int >= 0, got {start_step!r}.")
        return cls(
            every_n_steps=given.get("every_n_steps"),  # type: ignore[arg-type]
            every_n_epochs=given.get("every_n_epochs"),  # type: ignore[arg-type]
            at_steps=steps,  # type: ignore[arg-type]
            start_step=start_step,
        )

    @property
    def step_based(self) -> bool:
        """Whether the probe runs after optimizer steps (else at epoch ends)."""
        return self.every_n_epochs is None

    def runs_at_step(self, step: int) -> bool:
        """Whether a step-based probe runs after optimizer step ``step``."""
        if self.at_steps is not None:
            return step in self.at_steps
        if self.every_n_steps is None or step < self.start_step:
            return False
        return (step - self.start_step) % self.every_n_steps == 0

    def runs_at_epoch_end(self, epoch: int, step: int) -> bool:
        """Whether an epoch-based probe runs at the end of 0-based epoch ``epoch``."""
        if self.every_n_epochs is None or step < self.start_step:
            return False
        return (epoch + 1) % self.every_n_epochs == 0


def is_last_step(trainer: Any) -> bool:
    """Whether fitting stops after this optimizer step (max_steps or the last epoch's end).

    Args:
        trainer: A Lightning ``Trainer`` (its ``max_steps``, ``global_step``, ``max_epochs``,
            ``current_epoch`` and ``is_last_batch``).
    """
    if 0 <= trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.max_epochs
    return bool(
        trainer.is_last_batch and max_epochs is not None and trainer.current_epoch + 1 >= max_epochs
    )
