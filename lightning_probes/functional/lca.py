r"""Loss Change Allocation: the pure math (quadrature weights, allocation summaries).

Lan et al., "LCA: Loss Change Allocation for Neural Network Training", NeurIPS 2019. A
training step moves the parameters from :math:`\theta_t` to :math:`\theta_{t+1}`; the change
of the loss is the path integral of its gradient along the straight segment,

.. math::
    L(\theta_{t+1}) - L(\theta_t)
    = \sum_i \underbrace{(\theta_{t+1} - \theta_t)_i
      \int_0^1 \partial_i L\big(\theta_t + s(\theta_{t+1} - \theta_t)\big)\, ds}_{LC_i},

and :math:`LC_i` is the part of it allocated to parameter :math:`i` (negative: it helped).
The integral is computed with composite Simpson's rule on ``N`` intervals ("splits"); the
authors' code uses weights ``[1, 4, 1] / 6`` for 2 splits (their "RK4") and
``[1, 4, 2, 4, 1] / 12`` for 4. Nothing here imports Lightning or touches a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor


def simpson_weights(splits: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""Composite Simpson weights on ``splits`` equal intervals of :math:`[0, 1]`.

    .. math::
        \int_0^1 f(s)\, ds \approx \frac{1}{3N} \big(f_0 + 4 f_1 + 2 f_2 + 4 f_3 + \dots
        + 4 f_{N-1} + f_N\big), \qquad f_j = f(j / N).

    Exact for polynomials of degree 3 or less, so LCA is exact on quadratic losses.

    Args:
        splits: The number of intervals ``N``, even and at least 2.
        dtype: Dtype of the result.

    Returns:
        Weights ``[N + 1]`` for the points ``j / N``; they sum to 1.

    Raises:
        ValueError: If ``splits`` is not an even int >= 2.

    Example:
        >>> (simpson_weights(4) * 12).tolist()
        [1.0, 4.0, 2.0, 4.0, 1.0]
    """
    if not isinstance(splits, int) or isinstance(splits, bool) or splits < 2 or splits % 2:
        raise ValueError(f"Expected `splits` to be an even int >= 2, got {splits!r}.")
    w = torch.full((splits + 1,), 2.0, dtype=torch.float64)
    w[1::2] = 4.0
    w[0] = w[-1] = 1.0
    return (w / (3 * splits)).to(dtype)


def block_size(numel: int) -> int:
    """Elements per block of the blockwise reductions: at most 32 blocks, at least 2**16.

    Reducing a large tensor block by block bounds the temporaries (a float64 or int64 cast of
    one block) to a small fraction of the tensor.
    """
    return max(1 << 16, -(-numel // 32))


def sum64(values: Tensor) -> float:
    """Sum in float64, block by block (no float64 copy of the whole tensor).

    Example:
        >>> sum64(torch.tensor([0.1, 0.2], dtype=torch.float32))
        0.30000000447034836
    """
    return float(sum64_tensor(values))


def sum64_tensor(values: Tensor) -> Tensor:
    """:func:`sum64` as a 0-d float64 tensor on ``values``' device (no host synchronisation)."""
    flat = values.reshape(-1)
    size = block_size(flat.numel())
    if flat.numel() <= size:
        return flat.sum(dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for block in flat.split(size):
        total += block.sum(dtype=torch.float64)
    return total


def count_negative(values: Tensor) -> int:
    """Number of negative entries, block by block (no int64 copy of the whole mask).

    Example:
        >>> count_negative(torch.tensor([-1.0, 0.0, 2.0, -3.0]))
        2
    """
    return int(count_negative_tensor(values))


def count_negative_tensor(values: Tensor) -> Tensor:
    """:func:`count_negative` as a 0-d int64 tensor on ``values``' device (no synchronisation)."""
    flat = values.reshape(-1)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for block in flat.split(block_size(flat.numel())):
        total += (block < 0).sum()
    return total


def fraction_helped(lc: Tensor | Iterable[Tensor]) -> float:
    """Fraction of parameters whose loss contribution is negative (they helped).

    The paper's "barely over 50 % of parameters help" is this fraction over all trainable
    parameters; a parameter with exactly zero LC neither helped nor hurt and counts as not
    helping (as in the authors' ``mean(lc < 0)``).

    Args:
        lc: One tensor of LC values (any shape) or several (e.g. the parameters of a layer).

    Returns:
        A float in ``[0, 1]``; NaN when there are no values.

    Example:
        >>> fraction_helped(torch.tensor([-1.0, 2.0, -0.5, 0.0]))
        0.5
    """
    tensors = [lc] if isinstance(lc, Tensor) else list(lc)
    count = sum(t.numel() for t in tensors)
    if count == 0:
        return float("nan")
    counts = [count_negative_tensor(t) for t in tensors]  # one host synchronisation for all
    device = counts[0].device
    return int(torch.stack([c.to(device) for c in counts]).sum()) / count


def per_neuron_lc(weight_lc: Tensor, bias_lc: Tensor | None = None) -> Tensor:
    """LC summed per output neuron: the weight's LC over every axis but the output axis 0.

    For ``nn.Linear`` (weight ``[out, in]``) this sums each row; for convolutions
    (``[out, in, *kernel]``) each output channel's filter. The bias ``[out]`` is added.

    Args:
        weight_lc: LC of a weight, ``[out, ...]``.
        bias_lc: LC of the bias, ``[out]``, or ``None``.

    Returns:
        ``[out]``.

    Raises:
        ValueError: If the bias does not have one value per output neuron.

    Example:
        >>> per_neuron_lc(torch.ones(3, 2), torch.tensor([0.0, 1.0, -2.0])).tolist()
        [2.0, 3.0, 0.0]
    """
    out = weight_lc.reshape(weight_lc.shape[0], -1).sum(dim=1) if weight_lc.ndim else weight_lc
    if bias_lc is not None:
        if bias_lc.shape != out.shape:
            raise ValueError(
                f"Expected `bias_lc` to have shape {tuple(out.shape)} (one value per output "
                f"neuron), got {tuple(bias_lc.shape)}."
            )
        out = out + bias_lc
    return out


def relative_error(approx: Tensor | float, true: Tensor | float) -> float:
    r"""Relative error of the allocated loss change, as the authors report it.

    .. math:: \frac{|\Delta L_\text{approx} - \Delta L_\text{true}|}{|\Delta L_\text{true}|}

    Returns ``inf`` when the true change is exactly zero and the approximation is not (and 0
    when both are zero).

    Example:
        >>> relative_error(-0.99, -1.0)
        0.01...
    """
    a, t = float(approx), float(true)
    if t == 0.0:
        return 0.0 if a == 0.0 else float("inf")
    return abs(a - t) / abs(t)


def rebuild_loss_curve(initial_loss: float | Tensor, step_lc: Tensor) -> Tensor:
    r"""The loss curve rebuilt from allocations: :math:`L_0 + \sum_{s \le t} \sum_i LC_{i,s}`.

    Args:
        initial_loss: The measured loss before the first step.
        step_lc: ``[T]`` the total LC of each consecutive step.

    Returns:
        ``[T + 1]``: the rebuilt loss before the first step and after each step.

    Example:
        >>> rebuild_loss_curve(2.0, torch.tensor([-0.5, -0.25, 0.25])).tolist()
        [2.0, 1.5, 1.25, 1.5]
    """
    lc = step_lc.to(torch.float64).flatten()
    start = torch.as_tensor(initial_loss, dtype=torch.float64).reshape(1)
    return torch.cat([start, start + torch.cumsum(lc, 0)])


def layer_sums(lc: Mapping[str, Tensor], layer_of: Mapping[str, str]) -> dict[str, float]:
    """Sum per-parameter LC tensors per layer.

    Args:
        lc: ``{parameter name: LC tensor}``.
        layer_of: ``{parameter name: layer name}`` (a layer is the module owning the
            parameter); parameters missing from it are skipped.

    Returns:
        ``{layer name: Σ LC}`` (float64 sums), in order of first appearance.
    """
    named = [(layer_of[name], value) for name, value in lc.items() if name in layer_of]
    if not named:
        return {}
    sums = [sum64_tensor(value) for _, value in named]
    device = sums[0].device  # one host synchronisation for every parameter's sum
    out: dict[str, float] = {}
    for (layer, _), total in zip(named, torch.stack([s.to(device) for s in sums]).tolist()):
        out[layer] = out.get(layer, 0.0) + total
    return out


def layer_fraction_helped(
    lc: Mapping[str, Tensor], layer_of: Mapping[str, str]
) -> dict[str, float]:
    """:func:`fraction_helped` of each layer's parameters, with one host synchronisation.

    Args:
        lc: ``{parameter name: LC tensor}``.
        layer_of: ``{parameter name: layer name}``; parameters missing from it are skipped.

    Returns:
        ``{layer name: fraction helped}`` in order of first appearance (NaN for a layer whose
        tensors are all empty).

    Example:
        >>> lc = {"a.w": torch.tensor([-1.0, 1.0]), "a.b": torch.tensor([-1.0])}
        >>> lc["b.w"] = torch.ones(2)
        >>> layer_fraction_helped(lc, {"a.w": "a", "a.b": "a", "b.w": "b"})
        {'a': 0.6666666666666666, 'b': 0.0}
    """
    named = [(layer_of[name], value) for name, value in lc.items() if name in layer_of]
    if not named:
        return {}
    counts = [count_negative_tensor(value) for _, value in named]
    device = counts[0].device
    helped: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for (layer, value), n in zip(named, torch.stack([c.to(device) for c in counts]).tolist()):
        helped[layer] = helped.get(layer, 0) + n
        sizes[layer] = sizes.get(layer, 0) + value.numel()
    return {k: helped[k] / sizes[k] if sizes[k] else float("nan") for k in helped}


def weibull_fit(
    values: Tensor | Iterable[Tensor], *, max_samples: int = 20_000, seed: int = 0
) -> tuple[float, float]:
    r"""Maximum-likelihood Weibull fit (location 0) of the magnitudes ``|values|``.

    .. math:: p(x) = \frac{k}{\lambda} \Big(\frac{x}{\lambda}\Big)^{k-1} e^{-(x/\lambda)^k}

    A shape :math:`k < 1` is a heavy tail; Lan et al. report :math:`k \approx 0.53` for the
    distribution of LC over parameters. Zeros (frozen or dead parameters) are left out; at
    most ``max_samples`` values, drawn with a seeded generator, are fitted. Several tensors
    are treated as their concatenation (flattened, in order) without building it: the values
    are read block by block, so memory stays at ``max_samples`` plus one block.

    Args:
        values: LC values, one tensor of any shape or several (e.g. every parameter's).
        max_samples: Subsample size bound (the fit is ``O(n)`` per iteration).
        seed: Seed of the subsample.

    Returns:
        ``(k, λ)``: shape and scale; ``(nan, nan)`` with fewer than 3 non-zero values.

    Raises:
        ImportError: If scipy is not installed.
    """
    from scipy import stats

    tensors = [values] if isinstance(values, Tensor) else list(values)
    blocks = [
        b for t in tensors for b in t.detach().reshape(-1).split(block_size(t.numel())) if b.numel()
    ]

    def magnitudes(block: Tensor) -> Tensor:
        a = block.abs()
        return a[torch.isfinite(a) & (a > 0)]

    counts = [int(torch.count_nonzero(torch.isfinite(b) & (b != 0))) for b in blocks]
    total = sum(counts)
    if total < 3:
        return float("nan"), float("nan")
    if total <= max_samples:
        x = np.concatenate([_numpy64(magnitudes(b)) for b, c in zip(blocks, counts) if c])
    else:  # the same draw as choosing from the concatenated array of valid magnitudes
        idx = np.random.default_rng(seed).choice(total, size=max_samples, replace=False)
        order = np.argsort(idx, kind="stable")
        wanted, parts, offset = idx[order], [], 0
        for b, c in zip(blocks, counts):
            lo, hi = np.searchsorted(wanted, [offset, offset + c])
            if hi > lo:
                local = torch.as_tensor(wanted[lo:hi] - offset, device=b.device)
                parts.append(_numpy64(magnitudes(b)[local]))
            offset += c
        x = np.empty(max_samples, dtype=np.float64)
        x[order] = np.concatenate(parts)
    # Fit on a unit scale: the optimiser is poorly conditioned for tiny LC magnitudes.
    unit = float(np.median(x))
    shape, _, scale = stats.weibull_min.fit(x / unit, floc=0.0)
    return float(shape), float(scale * unit)


def _numpy64(values: Tensor) -> np.ndarray:
    return values.to("cpu", torch.float64).numpy()
