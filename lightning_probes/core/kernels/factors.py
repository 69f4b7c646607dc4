r"""Per-layer factors of a tangent kernel, from which any block of the kernel is computed.

Index letters (used in every einsum here): ``i``/``j`` samples (rows / columns of a block),
``c``/``d`` outputs, ``p``/``q`` positions (sequence elements, conv output pixels), ``g`` conv
groups, ``k`` input features of one group (a conv patch), ``m`` output features of one group.

For an affine layer :math:`z_{ipg} = W_g a_{ipg} + b_g` applied at positions ``p`` (a Linear
over a sequence, or a convolution on its patches ``a``), with
:math:`\delta^c_{ipg} = \partial f_c(x_i) / \partial z_{ipg}`, the layer's tangent kernel is
(Lou et al. 2022, eq. (9): forward ∘ backward kernels; Conv layers sum over position pairs)

.. math::
    K[(i,c),(j,d)] = \sum_g \sum_{p,q} (a_{ipg} \cdot a_{jqg} + 1_{\text{bias}})
                     (\delta^c_{ipg} \cdot \delta^d_{jqg}).

Two exact ways to evaluate a block, chosen per layer by a flop count (:meth:`AffineFactors.method`):
``"gram"`` contracts position-pair Grams (no per-sample gradient is ever formed; best when
there are few positions, e.g. every Linear on flat inputs), ``"jacobian"`` forms per-sample
gradients :math:`J_{ic} = \sum_p \delta^c_{ip} a_{ip}^T` and returns :math:`J_R J_S^T` (best
for convolutions with many output pixels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lightning_probes.functional.linalg import self_gram

KernelPath = Literal["auto", "gram", "jacobian"]
"""How a layer's kernel blocks are evaluated: ``"gram"`` (position-pair Grams), ``"jacobian"``
(per-sample gradients) or ``"auto"`` (the cheaper by :meth:`AffineFactors` 's flop count)."""


GRAM_SLOWDOWN = 4.0
"""Time per multiply-add of the position-pair Gram einsum relative to the dense GEMM of the
per-sample-gradient path (measured on CPU: at equal counts the Gram contraction was ~2-4x
slower, e.g. the 4-conv CIFAR-shaped CNN of ``benchmarks/bench_kernels.py``, n=64: "auto"
without this factor chose Gram for its last conv and took 0.62 s, against 0.29 s)."""


@dataclass
class AffineFactors:
    """Factors of a Linear/Conv layer's kernel.

    Attributes:
        features: ``a`` ``[n, T, G, I]`` (layer inputs or conv patches).
        grads: ``δ`` ``[o, n, T, G, M]`` (gradients of each output w.r.t. the layer output).
        bias: Whether the layer has a bias.
        method: ``"gram"``, ``"jacobian"`` or ``"auto"`` (cost model).
    """

    features: Tensor
    grads: Tensor
    bias: bool
    method: KernelPath = "auto"
    _jac_cache: dict[tuple[int, int], Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.method == "auto":
            gram = GRAM_SLOWDOWN * self.gram_cost()
            self.method = "gram" if gram <= self.jacobian_cost() else "jacobian"

    @property
    def num_samples(self) -> int:
        """``n``."""
        return int(self.features.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """The kernel's dtype (that of the output gradients)."""
        return self.grads.dtype

    @property
    def num_outputs(self) -> int:
        """``o``."""
        return int(self.grads.shape[0])

    def gram_cost(self) -> float:
        """Multiply-adds of the full kernel by position-pair Gram contraction."""
        n, t, g, i = self.features.shape
        o, m = self.grads.shape[0], self.grads.shape[-1]
        return float(n) ** 2 * t**2 * g * (i + o**2 * (m + 1))

    @property
    def num_params(self) -> int:
        """``P``, the layer's parameters (weight and bias)."""
        _, _, g, i = self.features.shape
        return g * self.grads.shape[-1] * (i + int(self.bias))

    def jacobian_cost(self) -> float:
        """Multiply-adds of the full kernel through per-sample gradients."""
        n, t, g, i = self.features.shape
        o, m = self.grads.shape[0], self.grads.shape[-1]
        return float(n) * o * t * g * m * i + (float(n) * o) ** 2 * self.num_params

    def block(self, rows: slice, cols: slice) -> Tensor:
        """Kernel block ``[r·o, s·o]`` for samples ``rows`` × ``cols``."""
        if self.method == "jacobian":
            # blocks come row by row: keep the row block's Jacobian for the next column block
            key = (rows.start, rows.stop)
            if key not in self._jac_cache:
                self._jac_cache = {key: self.kernel_rows(rows)}
            jr = self._jac_cache[key]
            if key == (cols.start, cols.stop):
                return self_gram(jr)
            return jr @ self.kernel_rows(cols).T
        return self._gram_block(rows, cols)

    def kernel_rows(self, rows: slice) -> Tensor:
        r"""Per-sample gradient rows ``[r·o, P]`` with the columns in any fixed order.

        The kernel is invariant to permuting parameters, so the bias is folded in as one more
        input feature of value 1 (:math:`\partial f / \partial b = \sum_p \delta_p \cdot 1`):
        one contraction, no concatenation.
        """
        a, d = self.features[rows], self.grads[:, rows]
        r, o = a.shape[0], d.shape[0]
        if self.bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
        return torch.einsum("cipgm,ipgk->icgmk", d, a).reshape(r * o, -1)

    def _gram_block(self, rows: slice, cols: slice) -> Tensor:
        ar, as_ = self.features[rows], self.features[cols]
        dr, ds = self.grads[:, rows], self.grads[:, cols]
        r, s, t = ar.shape[0], as_.shape[0], ar.shape[1]
        o, g = dr.shape[0], ar.shape[2]
        one = 1.0 if self.bias else 0.0
        if t == 1 and g == 1:
            forward = ar[:, 0, 0] @ as_[:, 0, 0].T + one  # [r, s]
            back_r = dr[:, :, 0, 0].transpose(0, 1).reshape(r * o, -1)
            if (rows.start, rows.stop) == (cols.start, cols.stop):
                backward = self_gram(back_r).view(r, o, s, o)
            else:
                back_s = ds[:, :, 0, 0].transpose(0, 1).reshape(s * o, -1)
                backward = (back_r @ back_s.T).view(r, o, s, o)
            return (backward * forward[:, None, :, None]).view(r * o, s * o)
        out = torch.zeros(r, o, s, o, dtype=ar.dtype, device=ar.device)
        for p in range(t):  # one position of the rows against all positions of the columns
            forward = torch.einsum("igk,jqgk->gijq", ar[:, p], as_) + one
            backward = torch.einsum("cigm,djqgm->gicjdq", dr[:, :, p], ds)
            out += torch.einsum("gijq,gicjdq->icjd", forward, backward)
        return out.view(r * o, s * o)


@dataclass
class JacobianFactors:
    """Factors of any other layer: per-sample Jacobians computed by ``rows_fn`` on demand.

    Attributes:
        rows_fn: ``slice -> [r·o, P]`` per-sample Jacobian rows of those samples.
        num_samples: ``n``.
        num_outputs: ``o``.
        dtype: The kernel's dtype.
    """

    rows_fn: Callable[[slice], Tensor]
    num_samples: int
    num_outputs: int
    dtype: torch.dtype = torch.float32
    method: KernelPath = "jacobian"
    _cache: dict[tuple[int, int], Tensor] = field(default_factory=dict, repr=False)

    def block(self, rows: slice, cols: slice) -> Tensor:
        """Kernel block ``[r·o, s·o]`` for samples ``rows`` × ``cols``."""
        jr = self.rows(rows)
        if (rows.start, rows.stop) == (cols.start, cols.stop):
            return self_gram(jr)
        return jr @ self.rows_fn(cols).T

    def rows(self, rows: slice) -> Tensor:
        """Per-sample Jacobian rows ``[r·o, P]`` of samples ``rows`` (the last block cached)."""
        key = (rows.start, rows.stop)
        if key not in self._cache:
            self._cache = {key: self.rows_fn(rows)}
        return self._cache[key]


LayerFactors = AffineFactors | JacobianFactors


def full_kernel(factors: LayerFactors, chunk_size: int | None = None) -> Tensor:
    """Assemble the whole ``(n·o, n·o)`` kernel block by block (symmetric: upper blocks only)."""
    n, o = factors.num_samples, factors.num_outputs
    spans = sample_spans(n, chunk_size)
    if len(spans) == 1:
        return factors.block(spans[0], spans[0])
    first = factors.block(spans[0], spans[0])
    out = torch.empty(n * o, n * o, dtype=first.dtype, device=first.device)
    for a, rows in enumerate(spans):
        for cols in spans[a:]:
            blk = first if a == 0 and cols == spans[0] else factors.block(rows, cols)
            out[rows.start * o : rows.stop * o, cols.start * o : cols.stop * o] = blk
            if cols != rows:
                out[cols.start * o : cols.stop * o, rows.start * o : rows.stop * o] = blk.T
    return out


def sample_spans(n: int, chunk_size: int | None) -> list[slice]:
    """Contiguous sample ranges of at most ``chunk_size`` (one range when ``None``)."""
    size = n if chunk_size is None else max(1, int(chunk_size))
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]
