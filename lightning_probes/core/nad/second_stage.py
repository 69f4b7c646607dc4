r"""NADs, secant method: a second ``conv -> act -> max_pool`` evaluated only where it changes.

Ortiz-Jiménez, Modas, Moosavi-Dezfooli, Frossard, "Neural Anisotropy Directions",
NeurIPS 2020. After :class:`~lightning_probes.core.nad.local.LocalPrefix`, the pooled map
:math:`P` of a secant input differs from the base point's :math:`P_0` in a small box
:math:`\Delta P`; a linear ``conv2`` gives

.. math:: \text{conv2}(P_0 + \Delta P) = \text{conv2}(P_0)
    + \text{conv2}_{\text{no bias}}(\Delta P),

the second term a full-padding convolution of the box, so only the pooling windows it reaches
are recomputed (:class:`SecondStage`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SecondStage:
    r"""``conv2 -> act* -> max_pool2d -> act*`` after a ``LocalPrefix``, evaluated locally.

    The prefix changes its output map :math:`P` only at a few positions (a box per pixel);
    ``conv2`` is linear, so :math:`\text{conv2}(P_0 + \Delta P) = \text{conv2}(P_0) +
    \text{conv2}_{\text{no bias}}(\Delta P)`, the second term a full-padding convolution of the
    small :math:`\Delta P` box. Only the pooling windows it reaches are recomputed (base values
    plus the change, activations, max); the other pooled values are the base point's.
    Requires ``conv2`` with stride 1, dilation 1, one group, zero padding and a pooling with
    kernel = stride, no padding.
    """

    def __init__(
        self,
        name: str,
        module: nn.Conv2d,
        before: list[Callable[[Tensor], Tensor]],
        pool: tuple[tuple[int, int], tuple[int, int]],
        after: list[Callable[[Tensor], Tensor]],
        in_shape: tuple[int, int, int],
        qidx: Tensor,
    ) -> None:
        self.name, self.module, self.before, self.after = name, module, before, after
        (kh, kw), _ = pool
        self.pool = (kh, kw)
        _, h1, w1 = in_shape
        ph, pw = int_pair(module.padding) or (0, 0)
        ch, cw = module.kernel_size
        h2, w2 = h1 + 2 * ph - ch + 1, w1 + 2 * pw - cw + 1
        hp, wp = h2 // kh, w2 // kw
        self.out_shape = (module.out_channels, hp, wp)
        d = qidx.shape[0]
        qr, qc = qidx // w1, qidx % w1  # (d, Q)
        o_r, o_c = qr.min(1).values, qc.min(1).values  # box origin per pixel
        bh = int((qr.max(1).values - o_r).max()) + 1
        bw = int((qc.max(1).values - o_c).max()) + 1
        self.box = (bh, bw)
        self.slot_idx = (qr - o_r[:, None]) * bw + (qc - o_c[:, None])  # (d, Q) in the box
        # change of conv2 at rows lo .. lo + dh - 1 (full-padding convolution of the box)
        dh, dw = bh + ch - 1, bw + cw - 1
        lo_r, lo_c = o_r + ph - (ch - 1), o_c + pw - (cw - 1)
        win_r0 = torch.div(lo_r, kh, rounding_mode="floor")
        win_c0 = torch.div(lo_c, kw, rounding_mode="floor")
        nh = int((torch.div(lo_r + dh - 1, kh, rounding_mode="floor") - win_r0).max()) + 1
        nw = int((torch.div(lo_c + dw - 1, kw, rounding_mode="floor") - win_c0).max()) + 1
        self.windows = (nh, nw)
        ah, aw = nh * kh, nw * kw  # conv2 box of the windows, from row win_r0 * kh
        y = torch.arange(ah, device="cpu")[None, :, None]
        x = torch.arange(aw, device="cpu")[None, None, :]
        rows2 = win_r0[:, None, None] * kh + y  # (d, ah, 1) conv2 rows
        cols2 = win_c0[:, None, None] * kw + x
        # conv2 canvas with margins so every box fits; values outside feed only dropped windows
        self.margin2 = (
            max(0, -int(rows2.min()), int(rows2.max()) - h2 + 1),
            max(0, -int(cols2.min()), int(cols2.max()) - w2 + 1),
        )
        m2r, m2c = self.margin2
        canvas_w2 = w2 + 2 * m2c
        self.base_idx = ((rows2 + m2r) * canvas_w2 + (cols2 + m2c)).reshape(d, -1)
        jr, jc = rows2 - lo_r[:, None, None], cols2 - lo_c[:, None, None]
        inside = (jr >= 0) & (jr < dh) & (jc >= 0) & (jc < dw)
        self.delta_idx = torch.where(inside, jr * dw + jc, torch.full_like(jr * jc, dh * dw))
        self.delta_idx = self.delta_idx.reshape(d, -1)
        self.delta_shape = (dh, dw)
        # pooled windows: canvas with margins, cropped to the valid ones afterwards
        pr = win_r0[:, None, None] + torch.arange(nh, device="cpu")[None, :, None]
        pc = win_c0[:, None, None] + torch.arange(nw, device="cpu")[None, None, :]
        self.margin_p = (
            max(0, -int(pr.min()), int(pr.max()) - hp + 1),
            max(0, -int(pc.min()), int(pc.max()) - wp + 1),
        )
        mpr, mpc = self.margin_p
        self.pool_idx = ((pr + mpr) * (wp + 2 * mpc) + (pc + mpc)).reshape(d, -1)

    def to(self, device: torch.device) -> SecondStage:
        """Move the index tensors to ``device``."""
        for attr in ("slot_idx", "base_idx", "delta_idx", "pool_idx"):
            setattr(self, attr, getattr(self, attr).to(device))
        return self

    def outputs(
        self,
        params: dict[str, Tensor],
        p0: Tensor,
        changed: Tensor,
        qidx: Tensor,
        i0: int,
        i1: int,
    ) -> Tensor:
        """Outputs ``(2b, *out_shape)`` from the prefix's base map and changed values.

        Args:
            params: The network's parameters.
            p0: ``(C1, H1, W1)`` the prefix's output at :math:`x_0`.
            changed: ``(C1, 2b, Q)`` its values at the changed positions ``qidx``.
            qidx: ``(b, Q)`` the changed positions (flat) of the block's pixels.
            i0: First basis vector of the block.
            i1: End of the block.
        """
        m = self.module
        weight = params[self.name + ".weight"]
        bias = params.get(self.name + ".bias")
        c1 = p0.shape[0]
        b2 = changed.shape[1]
        b = b2 // 2
        base_p = p0.reshape(c1, -1)[:, qidx]  # (C1, b, Q)
        dp = (changed.reshape(c1, 2, b, -1) - base_p[:, None]).permute(1, 2, 0, 3)  # (2, b, C1, Q)
        bh, bw = self.box
        slots = self.slot_idx[i0:i1][None, :, None, :].expand(2, -1, c1, -1)
        box = torch.zeros(2, b, c1, bh * bw, dtype=dp.dtype, device=dp.device)
        box = box.scatter(3, slots, dp)  # a repeated slot writes the same value again
        ch, cw = m.kernel_size
        delta = F.conv2d(box.view(b2, c1, bh, bw), weight, None, 1, (ch - 1, cw - 1))
        o = weight.shape[0]
        delta = F.pad(delta.reshape(2, b, o, -1), (0, 1))  # last entry: no change
        base2 = F.conv2d(p0[None], weight, bias, 1, m.padding)[0]  # type: ignore[arg-type]
        m2r, m2c = self.margin2
        canvas = F.pad(base2, (m2c, m2c, m2r, m2r)).reshape(o, -1)
        around = canvas[:, self.base_idx[i0:i1]].permute(1, 0, 2)  # (b, O, A)
        di = self.delta_idx[i0:i1][None, :, None, :].expand(2, -1, o, -1)
        vals = torch.gather(delta, 3, di).add_(around).view(b2, o, -1)
        for fn in self.before:
            vals = fn(vals)
        (kh, kw), (nh, nw) = self.pool, self.windows
        pooled = max_over(vals.reshape(b2, o, nh, kh, nw * kw), 3)  # (2b, O, nh, nw * kw)
        pooled = max_over(pooled.reshape(b2, o, nh, nw, kw), 4).reshape(2, b, o, -1)
        for fn in self.after:
            pooled = fn(pooled)
        base_pool = F.max_pool2d(apply_all(self.before, base2[None]), self.pool)
        base_pool = apply_all(self.after, base_pool)[0]
        mpr, mpc = self.margin_p
        out = F.pad(base_pool, (mpc, mpc, mpr, mpr))
        hpc, wpc = out.shape[1:]
        out = out.reshape(1, 1, o, -1).expand(2, b, -1, -1).contiguous()
        pi = self.pool_idx[i0:i1][None, :, None, :].expand(2, -1, o, -1)
        out = out.scatter(3, pi, pooled)
        _, hp, wp = self.out_shape
        out = out.view(b2, o, hpc, wpc)[:, :, mpr : mpr + hp, mpc : mpc + wp]
        return out.contiguous()


def max_over(t: Tensor, dim: int) -> Tensor:
    """``t.amax(dim)`` by elementwise maxima of its slices (faster for a short ``dim``)."""
    out = t.select(dim, 0)
    for j in range(1, t.shape[dim]):
        out = torch.maximum(out, t.select(dim, j))
    return out


def apply_all(fns: list[Callable[[Tensor], Tensor]], t: Tensor) -> Tensor:
    """``fns[-1](...fns[0](t))``."""
    for fn in fns:
        t = fn(t)
    return t


def int_pair(value: Any) -> tuple[int, int] | None:
    """``(v, v)`` for an int, the pair for a 2-sequence of ints, else ``None``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return int(value[0]), int(value[1])
    return None
