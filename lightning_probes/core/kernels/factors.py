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
``"gram"`` contracts the forward Gram :math:`F_{ip,jq} = a_{ip} \cdot a_{jq}` with the output
gradients (no per-sample gradient is ever formed; best when there are few positions, e.g.
every Linear on flat inputs and a ResNet's last stage), ``"jacobian"`` forms per-sample
gradients :math:`J_{ic} = \sum_p \delta^c_{ip} a_{ip}^T` and returns :math:`J_R J_S^T` (best
for convolutions with many output pixels).

With positions, ``"gram"`` takes the cheapest order we know,
:math:`H_{j,ip,md} = \sum_q F_{ip,jq} \delta^d_{jqm}` then
:math:`K_{ic,jd} = \sum_{p,m} \delta^c_{ipm} H_{j,ip,md}`: :math:`n^2 t (t k + t o m + o^2 m)`
multiply-adds against :math:`(n o)^2 k m` for ``J J^T``. Its contractions over positions are
thin (inner dimension ``t``), so they run in tiles of a few samples whose ``H`` stays in the
cache, and a diagonal block computes each off-diagonal tile once (``bench_conv_routes.py``:
ResNet-18's widest conv, t = 16, 0.35 s against 1.32-1.48 s for ``J J^T``).
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
"""Time per multiply-add of the ``"gram"`` route relative to the dense GEMM of the
per-sample-gradient route, an upper bound for choosing between them: its contractions over
positions are thin (inner dimension ``t``). ``benchmarks/bench_conv_routes.py`` measured
2.2-2.4 on ResNet-18's widest conv (t = 16, 0.35 s against 1.32-1.48 s); the earlier
position-loop form of the route was slower still (the 4-conv CIFAR-shaped CNN of
``bench_kernels.py``, n = 64, took 0.62 s against 0.29 s when its last conv went that way)."""


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
        """Multiply-adds of the full kernel by the forward-Gram contraction (module docstring)."""
        n, t, g, i = self.features.shape
        o, m = self.grads.shape[0], self.grads.shape[-1]
        if t == 1:  # forward and backward Grams, then their Hadamard product
            return float(n) ** 2 * g * (i + o**2 * (m + 1))
        return float(n) ** 2 * t * g * (t * i + t * o * m + o**2 * m)

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
        same = (rows.start, rows.stop) == (cols.start, cols.stop)
        out = torch.zeros(r, o, s, o, dtype=ar.dtype, device=ar.device)
        for group in range(g):
            _add_position_pairs(out, ar[:, :, group], as_[:, :, group], dr[:, :, :, group],
                                ds[:, :, :, group], one, same)  # fmt: skip
        return out.view(r * o, s * o)


TILE_ELEMENTS = 2**20
"""Elements of one tile's ``H`` (4 MiB in float32, kept in the cache between its two products;
for ResNet-18's ``layer4`` on the 2-core CPU, tiles of 8 to 14 samples a side ran within 4%
of each other, 3 samples 1.6x slower)."""


F_ELEMENTS = 2**24
"""Elements of one product ``F`` of a tile's rows with a range of columns (64 MiB in float32)."""


def _add_position_pairs(
    out: Tensor, ar: Tensor, as_: Tensor, dr: Tensor, ds: Tensor, one: float, same: bool
) -> None:
    r"""``out[i,c,j,d] += Σ_pq (a_ip·a_jq + one)(δ^c_ip·δ^d_jq)`` for one group, tile by tile.

    ``ar`` ``[r, t, k]``, ``as_`` ``[s, t, k]``, ``dr`` ``[o, r, t, m]``, ``ds`` ``[o, s, t, m]``;
    with ``same`` (rows are columns) each off-diagonal tile is computed once and mirrored.
    """
    r, t, k = ar.shape
    s, (o, m) = as_.shape[0], (dr.shape[0], dr.shape[-1])
    side = max(1, int((TILE_ELEMENTS / (t * m * o)) ** 0.5))
    cols_q = ds.permute(1, 2, 3, 0).reshape(s, t, m * o)  # δ[j, q, (m d)]
    rows_p = dr.permute(1, 0, 2, 3).reshape(r, o, t * m)  # δ[i, c, (p m)]
    cols_a = as_.reshape(s * t, k)
    # column samples per product F = a_ip · a_jq, so that F holds at most F_ELEMENTS
    span = max(1, F_ELEMENTS // (side * t * t) // side) * side
    for i0 in range(0, r, side):
        i1 = min(r, i0 + side)
        for b0 in range(i0 if same else 0, s, span):
            b1 = min(s, b0 + span)
            f = (ar[i0:i1].reshape(-1, k) @ cols_a[b0 * t : b1 * t].T).view(i1 - i0, t, -1, t)
            if one:
                f = f + one
            for j0 in range(b0, b1, side):
                j1 = min(b1, j0 + side)
                fj = f[:, :, j0 - b0 : j1 - b0].permute(2, 0, 1, 3).reshape(j1 - j0, -1, t)
                h = torch.bmm(fj, cols_q[j0:j1]).view(j1 - j0, i1 - i0, t * m, o)  # H[j,i,(p m),d]
                blk = torch.matmul(rows_p[i0:i1].unsqueeze(0), h)  # [j, i, c, d]
                out[i0:i1, :, j0:j1] += blk.permute(1, 2, 0, 3)
                if same and j0 != i0:
                    out[j0:j1, :, i0:i1] += blk.permute(0, 3, 1, 2)


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
