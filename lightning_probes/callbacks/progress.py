"""A probe's long work, shown inside Lightning's own progress bar (no second bar).

While a probe runs, the training loop waits; with Lightning's ``TQDMProgressBar`` the training
bar's postfix says which probe is running (and, for work that reports it, how far it is), so a
pause of the bar is explained where the user is looking. Other progress bars, or none, are left
alone; nothing is printed outside the bar.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["shown_in_progress_bar", "training_bar"]


def training_bar(trainer: Any) -> tuple[Callable[[], str], Callable[[str], None]] | None:
    """``(read, write)`` of the training bar's status text, or ``None`` without such a bar.

    Lightning's ``TQDMProgressBar``: the bar's postfix; ``RichProgressBar``: the training
    task's description. Any other progress bar, a disabled one, or none: ``None``.
    """
    callback = getattr(trainer, "progress_bar_callback", None)
    if callback is None or not getattr(callback, "is_enabled", False):
        return None
    progress, task = (
        getattr(callback, "progress", None),
        getattr(callback, "train_progress_bar_id", None),
    )
    if progress is not None and task is not None:  # RichProgressBar

        def read_rich() -> str:
            return str(next((t.description for t in progress.tasks if t.id == task), ""))

        def write_rich(text: str) -> None:
            progress.update(task, description=text)
            progress.refresh()

        return read_rich, write_rich
    try:
        bar = callback.train_progress_bar  # TQDMProgressBar; raises before the bar exists
    except (AttributeError, TypeError):
        return None
    if not hasattr(bar, "set_postfix_str") or getattr(bar, "disable", False):
        return None
    return (lambda: bar.postfix or ""), (lambda text: bar.set_postfix_str(text, refresh=True))


@contextmanager
def shown_in_progress_bar(trainer: Any, owner: str) -> Iterator[Callable[[str], None]]:
    """Show ``"<owner>: running"`` in the training bar while the block runs, then restore it.

    Yields:
        ``update(text)``, to show how far the work is (e.g. ``"12/64 networks"``).
    """
    bar = training_bar(trainer)
    if bar is None:
        yield lambda text: None
        return
    read, write = bar
    before = read()
    prefix = f"{before} · " if before else ""

    def update(text: str) -> None:
        write(f"{prefix}{owner}: {text}")

    update("running")
    try:
        yield update
    finally:
        write(before)
