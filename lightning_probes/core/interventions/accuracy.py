r"""Accuracy and cross-entropy under many interventions: classifiers and language models.

Two pairings of logits and targets are understood:

- a classifier: logits ``[n, o]``, targets ``[n]`` class indices; accuracy is the fraction of
  samples whose arg-max is the target;
- a language model: logits ``[n, L, V]``, targets ``[n, L]`` token ids; accuracy is the
  fraction of **tokens** predicted correctly over the whole probe set, and the loss the mean
  token-level cross-entropy, both ignoring targets equal to ``-100`` (as ``torch`` and HF
  ``transformers`` do).

Index letters: ``m`` interventions, ``n`` samples, ``L`` positions, ``o``/``V`` classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100
"""Targets with this value are left out of token accuracy and loss."""


def check_targets(logits: Tensor, targets: Tensor) -> None:
    """Refuse a pairing of ``logits`` and ``targets`` the probes do not understand.

    Args:
        logits: The model's logits on the first samples, ``[k, o]`` or ``[k, L, V]``.
        targets: The targets of the same samples, ``[k]`` or ``[k, L]`` integer indices.

    Raises:
        ValueError: Naming ``output_fn=`` (or the targets to pass), with the shapes received.
    """
    if targets.ndim not in (1, 2) or torch.is_floating_point(targets):
        raise ValueError(
            f"Expected `targets` to be [n] class indices (or [n, L] token ids of a language "
            f"model), got {targets.dtype} of shape {tuple(targets.shape)}."
        )
    want = "[n, o]" if targets.ndim == 1 else "[n, L, V]"
    ok = logits.ndim == targets.ndim + 1 and logits.shape[:-1] == targets.shape
    if not ok:
        raise ValueError(
            f"Expected logits {want} for targets {tuple(targets.shape)}, got logits "
            f"{tuple(logits.shape)}. Pass `output_fn=` mapping the model output to logits "
            "(e.g. `output_fn=lambda out: out.logits` for a HF model, or "
            "`lambda out: out[:, -1]` to score only the last position)."
        )


def count_targets(targets: Tensor) -> int:
    """The number of scored targets: samples, or tokens that are not ``-100``."""
    if targets.ndim == 1:
        return int(targets.shape[0])
    return int((targets != IGNORE_INDEX).sum())


def correct_and_loss(
    logits: Tensor, targets: Tensor, with_loss: bool
) -> tuple[Tensor, Tensor | None]:
    """Per intervention: the number of correct predictions and the summed cross-entropy.

    Args:
        logits: ``[m, n, o]`` or ``[m, n, L, V]``.
        targets: ``[n]`` or ``[n, L]`` (``-100``: ignored).
        with_loss: Also sum the cross-entropy.

    Returns:
        ``(correct [m], loss sum [m] or None)`` in float64 on the CPU; divide both by
        :func:`count_targets` over the whole probe set.
    """
    m = logits.shape[0]
    y = targets.expand(m, *targets.shape)
    valid = y != IGNORE_INDEX
    hits = (logits.argmax(-1) == y) & valid
    correct = hits.reshape(m, -1).sum(1).to("cpu", torch.float64)
    if not with_loss:
        return correct, None
    ce = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).double(),
        y.reshape(-1),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    )
    return correct, ce.view(m, -1).sum(1).to("cpu", torch.float64)
