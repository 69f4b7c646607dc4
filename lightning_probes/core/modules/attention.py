r"""``nn.MultiheadAttention`` as one layer: its parameters, its output tensor, its sample axis.

The attention computes with ``out_proj``'s weight functionally (``out_proj`` never runs as a
module), so the layer is the whole block: its parameters are everything it owns, recursively
(``in_proj_weight``/``in_proj_bias`` or ``q/k/v_proj_weight``, ``out_proj.weight``,
``out_proj.bias``, ``bias_k``/``bias_v``), and its output is the attention output
``output[0]`` (``[n, L, E]`` with ``batch_first=True``, ``[L, n, E]`` by default). A sample's
output depends on that sample's query, key, value and masks only, so the sample axis of the
sequence-first layout (1) may be moved first.

Its tangent kernel takes the general :mod:`torch.func` path
(:mod:`lightning_probes.core.kernels.func`). The recorded call is rewritten sample-first:

- ``query``, ``key``, ``value``: ``[n, L, E]``, ``[n, S, E_k]``, ``[n, S, E_v]``;
- ``key_padding_mask``: ``[n, S]`` or ``None``;
- ``attn_mask``: ``[n, L, S]`` (a shared ``[L, S]`` mask, expanded) or ``[n, H, L, S]`` (the
  per-sample ``[n·H, L, S]`` mask, heads split off), or ``None``.

:meth:`AttentionOps.functional_forward` calls the module back in its own layout with
``need_weights=True``: that path computes the softmax explicitly, which ``vmap`` batches (the
fused ``scaled_dot_product_attention`` used with ``need_weights=False`` has no batching rule on
CPU and falls back to a slow loop), and it reads ``attn_mask`` as given, so ``is_causal`` (a
hint that ``attn_mask`` is causal) is not needed.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from lightning_probes.core.modules.ops import LayerOps


class AttentionOps(LayerOps):
    """``nn.MultiheadAttention``: one kernel layer with all its parameters; output ``[0]``."""

    unit_dim = -1  # the embedding features of the attention output
    default_layer = True
    output_index = 0

    def per_sample(self, module: nn.Module) -> bool:
        """Deterministic per sample unless attention dropout is active (train mode)."""
        return not (module.training and float(module.dropout) > 0)  # type: ignore[arg-type]

    def moves_samples(self, module: nn.Module, axis: int, ndim: int) -> bool:
        """The batch axis of the module's layout: 0 with ``batch_first``, else 1."""
        return ndim == 3 and axis == _batch_axis(module)

    def layer_parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """Every parameter of the block, ``out_proj``'s included (``out_proj.weight``, ...)."""
        return dict(module.named_parameters())

    def sample_first_inputs(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        axis: int,
        num_samples: int,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(query, key, value, key_padding_mask, attn_mask)``, samples first (module doc).

        Raises:
            ValueError: If query/key/value are not batched ``3``-dim tensors with the
                ``num_samples`` samples on the module's batch axis, or a mask's shape does not
                match them.
        """
        call = inspect.signature(module.forward).bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        b = _batch_axis(module)
        qkv = [given["query"], given["key"], given["value"]]
        if axis != b or any(
            not isinstance(t, Tensor) or t.ndim != 3 or t.shape[b] != num_samples for t in qkv
        ):
            shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in qkv]
            raise ValueError(
                f"Expected query, key and value with the {num_samples} samples on axis {b} "
                f"(batch_first={module.batch_first}), got shapes {shapes} and the samples on "
                f"axis {axis} of the output."
            )
        q, k, v = (t.movedim(b, 0) for t in qkv)
        n, length, source = num_samples, q.shape[1], k.shape[1]
        pad = given["key_padding_mask"]
        if pad is not None and tuple(pad.shape) != (n, source):
            raise ValueError(
                f"Expected a key_padding_mask of shape [n, S] = {[n, source]}, got "
                f"{tuple(pad.shape)}."
            )
        mask = given["attn_mask"]
        heads = int(module.num_heads)  # type: ignore[arg-type]
        if mask is not None:
            if tuple(mask.shape) == (length, source):
                mask = mask.expand(n, length, source)
            elif tuple(mask.shape) == (n * heads, length, source):
                mask = mask.reshape(n, heads, length, source)
            else:
                raise ValueError(
                    f"Expected an attn_mask of shape [L, S] = {[length, source]} or "
                    f"[n·num_heads, L, S] = {[n * heads, length, source]}, got "
                    f"{tuple(mask.shape)}."
                )
        return (q, k, v, pad, mask), {}

    def functional_forward(
        self,
        module: nn.Module,
        params: dict[str, Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Tensor:
        """The attention output ``[b, L, E]`` on sample-first inputs, with ``params``."""
        q, k, v, pad, mask = args
        if mask is not None:  # back to the [b·H, L, S] the module takes
            heads = int(module.num_heads)  # type: ignore[arg-type]
            mask = (
                mask.reshape(-1, *mask.shape[-2:])
                if mask.ndim == 4
                else mask.repeat_interleave(heads, 0)
            )
        b = _batch_axis(module)
        q, k, v = (t.movedim(0, b) for t in (q, k, v))
        out = functional_call(
            module, params, (q, k, v),
            {"key_padding_mask": pad, "attn_mask": mask, "need_weights": True},
        )[0]  # fmt: skip
        result: Tensor = out.movedim(b, 0)
        return result


def _batch_axis(module: nn.Module) -> int:
    return 0 if module.batch_first else 1
