r"""The intervention engine: where units live, and many interventions in one forward pass.

Used by :mod:`lightning_probes.core.ablation` (cumulative ablation and noise curves) and
:mod:`lightning_probes.core.selectivity` (single-unit ablation impact), after Morcos et al.
(ICLR 2018), sec. 2.2.

A *unit* is one feature of a fully connected layer's output or one whole feature map (channel)
of a convolutional layer's output. Ablating a unit clamps its **post-nonlinearity** activity to
a fixed value (0 by default; the unit's mean over the probe set with ``value="mean"``, the
paper's appendix A.1 comparison) through a scoped forward hook
(:func:`~lightning_probes.core.hooks.replace_output`); weights are never touched.

**Where a layer is ablated.** For each selected layer (a ``Linear``/``Conv`` by name) the
intervention point is the activation module that consumes its output (skipping normalisation,
dropout and identity modules in between, e.g. ``Conv -> BatchNorm -> ReLU``), found by tracing
one forward pass; without one, the end of that chain (or the layer itself). To pick a point
explicitly, name that module (e.g. the ``ReLU``) in ``layers``, or pass
``follow_activation=False`` to intervene on exactly the named modules' outputs.

**Vectorisation.** Many masks are evaluated in one forward pass: the network runs on the probe
samples once up to the first intervention point, whose output is expanded to ``m`` copies
(batch ``m * n``, mask-major) and the remainder runs once on the expanded batch. Each pass
takes as many masks as fit the memory budget (all of them if possible, fewer samples instead),
since every pass re-runs the prefix. Two shortcuts, exact up to float rounding, avoid work
per mask:

- When the first point is consumed by a single ``Linear``/``Conv`` (checked on the autograd
  graph), that map is not re-run per mask:
  :math:`W(h \odot k + v \odot (1-k)) + b = z - W((h - v) \odot (1-k))`. The contribution of
  each unit, :math:`P_c = W_{\cdot c} (h - v)_c`, is computed once (one grouped convolution)
  and a mask that ablates a superset of the previous mask's units (the next point of one
  cumulative ordering) adds only the new units' :math:`P_c`: a cumulative sum along the
  ordering. (If the :math:`P_c` do not fit in half the budget, ``W`` is applied to the new
  units' columns instead.)
- When a later point's own layer reads exactly the previous point's output and reaches its
  point only through channel-wise modules (``BatchNorm``, dropout, identity, an elementwise
  activation), that layer runs on an empty batch and is computed per mask for the units kept
  at its point only, from the inputs kept at the previous point (zero ablation); the outputs
  it skips are overwritten by the point's ablation anyway. Masks that keep most of the work
  run as one dense batch.

A model that mixes the prefix with the expanded batch (a skip connection around the first
point) falls back to expanding the inputs instead (with a warning).

Index letters: ``M`` masks, ``n`` samples, ``u`` units of a point.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.evaluation import OutputFn, as_logits
from lightning_probes.core.hooks import replace_output
from lightning_probes.core.layers import select_layers

Layers = str | Sequence[str] | None
_PASS_THROUGH = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
)
_NOT_ACTIVATIONS = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.MultiheadAttention)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink, nn.Threshold,
)  # fmt: skip
_CHANNELWISE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.Identity)
_Call = tuple[str, nn.Module, Any, Any]  # (name, module, first input, output) of one call


@dataclass(frozen=True)
class AblationPoint:
    """Where a selected layer's units are intervened on.

    Attributes:
        layer: The selected layer's name (the key used in results).
        name: Name of the module whose output is replaced (the activation after ``layer``).
        module: That module.
        unit_dim: Dimension of the output that indexes units: 1 (channels, or the features of
            a ``[n, u]`` output) or -1 (features of a ``Linear`` applied to ``[n, ..., u]``).
        num_units: Number of units.
    """

    layer: str
    name: str
    module: nn.Module
    unit_dim: int
    num_units: int


@dataclass
class Trace:
    """What :func:`trace_model` learned from one forward pass (see its docstring)."""

    points: list[AblationPoint]  # in selection (definition) order
    order: list[int]  # indices into points, in execution order
    prefix_elements: int  # largest per-sample output up to the first point (memory estimate)
    suffix_elements: int  # largest per-sample output from the first point on, logits included
    shortcut: tuple[str, nn.Module] | None  # single Linear/Conv consuming the first point
    sparse: dict[str, tuple[nn.Module, int, int]]  # layer -> (module, input point, point)


def trace_model(
    model: nn.Module,
    inputs: Tensor,
    layers: Layers,
    follow_activation: bool,
    output_fn: OutputFn | None = None,
) -> Trace:
    """Trace one forward pass on two samples: the points, their order and the shortcut.

    Args:
        model: The network (eval mode).
        inputs: ``[n, ...]`` inputs (only the first two are run).
        layers: Names or globs of modules; ``None``: the paper's default
            (:func:`~lightning_probes.core.ablation.default_ablation_layers`).
        follow_activation: Move from a layer to the activation module after it.
        output_fn: Maps the model output to logits ``[n, o]``.

    Returns:
        A :class:`Trace`.

    Raises:
        ValueError: If a layer does not run exactly once, or two layers share a point.
        TypeError: If ``inputs`` or a point's output is not a tensor.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"Expected `inputs` to be a Tensor [n, ...], got {type(inputs).__name__}.")
    # the paper's default selection is a policy of the curves module (imported lazily: it
    # imports this module)
    from lightning_probes.core.ablation import default_ablation_layers

    names = default_ablation_layers(model) if layers is None else list(select_layers(model, layers))
    named = dict(model.named_modules())
    watched = {n: m for n, m in named.items() if n and (not list(m.children()) or n in names)}
    calls: list[_Call] = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            calls.append((name, module, args[0] if args else None, out))

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in watched.items()]
    try:
        with torch.enable_grad():
            logits = as_logits(model(inputs[:2]), output_fn)
    finally:
        for handle in handles:
            handle.remove()
    where: dict[str, list[int]] = {}
    for i, (name, _, _, _) in enumerate(calls):
        where.setdefault(name, []).append(i)
    points, positions = [], []
    for layer in names:
        if len(where.get(layer, [])) != 1:
            raise ValueError(
                f"Expected layer {layer!r} to run exactly once per forward pass, got "
                f"{len(where.get(layer, []))} calls. Select layers that are used once."
            )
        idx = where[layer][0]
        if follow_activation:
            idx = _follow(calls, idx, where)
        name, _, _, out = calls[idx]
        if not isinstance(out, Tensor) or out.ndim < 2:
            raise TypeError(
                f"Expected module {name!r} to return a Tensor [n, u, ...], got {out!r}."
            )
        unit_dim = -1 if isinstance(named[layer], nn.Linear) else 1
        points.append(AblationPoint(layer, name, named[name], unit_dim, int(out.shape[unit_dim])))
        positions.append(idx)
    if len({p.name for p in points}) < len(points):
        raise ValueError(
            f"Expected the layers {names} to resolve to distinct intervention points, got "
            f"{[p.name for p in points]}. Pass `follow_activation=False` or fewer layers."
        )
    order = sorted(range(len(points)), key=lambda i: positions[i])
    first = positions[order[0]]
    sizes = [o[0].numel() if isinstance(o, Tensor) and o.ndim > 0 else 1 for *_, o in calls]
    shortcut = _find_shortcut(calls, first, points[order[0]], logits, where)
    if shortcut is not None and shortcut[0] in {p.name for p in points}:
        shortcut = None
    suffix = max([*sizes[first:], logits[0].numel()])
    sparse = _find_sparse_consumers(calls, points, positions, order, logits, where, shortcut)
    return Trace(points, order, max(sizes[: first + 1]), suffix, shortcut, sparse)


def _find_sparse_consumers(
    calls: list[_Call],
    points: list[AblationPoint],
    positions: list[int],
    order: list[int],
    logits: Tensor,
    where: dict[str, list[int]],
    shortcut: tuple[str, nn.Module] | None,
) -> dict[str, tuple[nn.Module, int, int]]:
    """Points whose own layer reads exactly the previous point's output, channel-wise after.

    For such a point ``j`` (layer ``L``, previous point ``i``), ``L`` only needs the units kept
    at ``j`` (its other outputs reach nothing but ``j``, which overwrites them), computed from
    the units kept at ``i`` (the others are 0 when ablated to 0).
    """
    found: dict[str, tuple[nn.Module, int, int]] = {}
    if logits.grad_fn is None:
        return found
    for i, j in itertools.pairwise(order):
        layer = points[j].layer
        idx = where[layer][0]
        _, module, arg, out = calls[idx]
        source = calls[positions[i]][3]
        if arg is not source or (shortcut is not None and layer == shortcut[0]):
            continue
        linear_ok = isinstance(module, nn.Linear) and (points[i].unit_dim == -1 or source.ndim == 2)
        conv_ok = isinstance(module, CONV_TYPES) and module.groups == 1 and points[i].unit_dim == 1
        if not (linear_ok or conv_ok):
            continue
        chain_ok, current = True, out
        for k in range(idx + 1, positions[j] + 1):  # L -> (BatchNorm, ...) -> activation
            _, mod, a, o = calls[k]
            if a is not current:
                continue
            last = k == positions[j]
            allowed = _ELEMENTWISE + _CHANNELWISE if last else _CHANNELWISE
            uses = _graph_uses(logits.grad_fn, current.grad_fn) if current.grad_fn else 0
            if not isinstance(mod, allowed) or uses != 1:
                chain_ok = False
                break
            current = o
        if chain_ok and current is calls[positions[j]][3]:
            found[layer] = (module, i, j)
    return found


def _follow(calls: list[_Call], idx: int, where: dict[str, list[int]]) -> int:
    """From a layer's call, walk to the activation that consumes its output (if any)."""
    current = calls[idx][3]
    for j in range(idx + 1, len(calls)):
        name, module, arg, out = calls[j]
        if arg is not current:
            continue
        module_type = type(module)
        if len(where[name]) != 1:
            return idx
        if issubclass(module_type, _PASS_THROUGH):
            idx, current = j, out
            continue
        is_activation = module_type.__module__ == "torch.nn.modules.activation"
        if is_activation and not issubclass(module_type, _NOT_ACTIVATIONS):
            return j
        return idx
    return idx


def _find_shortcut(
    calls: list[_Call],
    idx: int,
    point: AblationPoint,
    logits: Tensor,
    where: dict[str, list[int]],
) -> tuple[str, nn.Module] | None:
    """The single ``Linear``/``Conv`` (groups=1) whose input is the first point's output."""
    h = calls[idx][3]
    if not isinstance(h, Tensor) or h.grad_fn is None or logits.grad_fn is None:
        return None
    consumers = [j for j in range(idx + 1, len(calls)) if calls[j][2] is h]
    if len(consumers) != 1 or len(where[calls[consumers[0]][0]]) != 1:
        return None
    name, module = calls[consumers[0]][0], calls[consumers[0]][1]
    linear_ok = isinstance(module, nn.Linear) and (point.unit_dim == -1 or h.ndim == 2)
    conv_ok = isinstance(module, CONV_TYPES) and module.groups == 1 and point.unit_dim == 1
    if not (linear_ok or conv_ok) or _graph_uses(logits.grad_fn, h.grad_fn) != 1:
        return None
    return name, module


def _graph_uses(root: Any, target: Any) -> int:
    """Number of autograd edges into ``target`` reachable from ``root`` (its consumers)."""
    uses, seen, stack = 0, set(), [root]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            uses += nxt is target
            stack.append(nxt)
    return uses


def has_module_of_type(model: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    """Whether any submodule of ``model`` (itself included) is an instance of ``types``."""
    return any(isinstance(m, types) for m in model.modules())


# ---------------------------------------------------------------------------- the engine
Apply = Callable[[int, Tensor, slice], Tensor]
"""``(point index, h [m, n, ...], mask slice) -> intervened h``."""


@dataclass
class Masks:
    """Ablation masks for :func:`evaluate_interventions`.

    Attributes:
        keep: One ``[M, u]`` bool tensor per point (``True``: the unit is kept).
        values: One tensor per point shaped like one sample's output (the value ablated units
            are clamped to), or ``None`` for 0.
        unit_dims: Each point's :attr:`AblationPoint.unit_dim`.
    """

    keep: list[Tensor]
    values: list[Tensor | None]
    unit_dims: list[int]

    def __call__(self, j: int, h: Tensor, masks: slice) -> Tensor:
        """Clamp point ``j``'s ablated units in ``h`` ``[m, n, ...]`` for masks ``masks``."""
        keep = unit_view(self.keep[j][masks], h.ndim - 2, self.unit_dims[j], leading=1)
        value = self.values[j]
        if _all_finite(h) and (value is None or _all_finite(value)):
            # h * 1 = h and h * 0 = 0 exactly (up to the sign of 0); faster than `where`
            k = keep.unsqueeze(1).to(h.dtype)
            return h * k if value is None else h * k + value * (1 - k)
        return torch.where(keep.unsqueeze(1), h, 0.0 if value is None else value)


def _all_finite(t: Tensor) -> bool:
    """Whether every element is finite, in one pass without a boolean copy.

    A finite sum implies it; a sum that overflows only sends the caller to its exact path.
    """
    return bool(t.sum().isfinite())


def unit_view(vec: Tensor, sample_ndim: int, unit_dim: int, leading: int = 0) -> Tensor:
    """Reshape ``[..., u]`` (``leading`` dims kept) to broadcast against ``[..., *sample]``."""
    pos = unit_dim - 1 if unit_dim > 0 else sample_ndim + unit_dim
    shape = [1] * sample_ndim
    shape[pos] = vec.shape[-1]
    return vec.reshape(*vec.shape[:leading], *shape)


class _BatchMismatchError(RuntimeError):
    pass


def evaluate_interventions(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    trace: Trace,
    num_masks: int,
    apply: Apply,
    *,
    masks: Masks | None = None,
    with_loss: bool = False,
    output_fn: OutputFn | None = None,
    memory_budget: int = 2**25,
) -> tuple[Tensor, Tensor | None]:
    """Accuracy (and summed cross-entropy) of ``model`` under ``num_masks`` interventions.

    Args:
        model: The network (eval mode).
        inputs: ``[n, ...]`` probe inputs.
        targets: ``[n]`` class indices.
        trace: From :func:`trace_model`.
        num_masks: ``M``, the number of interventions.
        apply: Applies intervention(s) ``masks`` to point ``j``'s output ``[m, n, ...]``.
        masks: The ablation masks behind ``apply``, if it ablates: enables the linear shortcut.
        with_loss: Also return the mean cross-entropy under each intervention.
        output_fn: Maps the model output to logits ``[n, o]``.
        memory_budget: Approximate bytes of activations per forward pass.

    Returns:
        ``(accuracy [M], loss [M] or None)`` in float64.
    """
    if targets.ndim != 1 or torch.is_floating_point(targets):
        raise ValueError(
            f"Expected `targets` to be [n] class indices, got {targets.dtype} of shape "
            f"{tuple(targets.shape)}."
        )
    n = inputs.shape[0]
    expand = num_masks > 1 and not _shares_prefix(model, inputs, trace, output_fn)
    n_c, m_c = _chunk_sizes(n, num_masks, trace, inputs.element_size(), memory_budget, expand)
    correct = torch.zeros(num_masks, dtype=torch.float64)
    loss = torch.zeros(num_masks, dtype=torch.float64)
    for s0 in range(0, n, n_c):
        x, y = inputs[s0 : s0 + n_c], targets[s0 : s0 + n_c]
        cache: dict[str, Tensor | None] = {}  # per sample chunk: the shortcut's unit contributions
        for m0 in range(0, num_masks, m_c):
            sl = slice(m0, min(num_masks, m0 + m_c))
            m = sl.stop - sl.start
            logits = _run(
                model,
                x,
                trace,
                apply,
                sl,
                masks,
                expand_inputs=expand and m > 1,
                output_fn=output_fn,
                memory_budget=memory_budget,
                cache=cache,
            )
            logits = logits.reshape(m, x.shape[0], -1)
            correct[sl] += (logits.argmax(-1) == y).sum(1).to("cpu", torch.float64)
            if with_loss:
                ce = nn.functional.cross_entropy(
                    logits.flatten(0, 1).double(), y.repeat(m), reduction="none"
                )
                loss[sl] += ce.view(m, -1).sum(1).to("cpu", torch.float64)
    return correct / n, (loss / n if with_loss else None)


def _chunk_sizes(
    n: int, num_masks: int, trace: Trace, element_size: int, budget: int, expand: bool
) -> tuple[int, int]:
    """Samples and masks per forward pass, so that activations stay within ``budget`` bytes.

    Every forward pass re-runs the shared prefix, so passes evaluate as many masks as fit
    (all of them if at least ``min(n, 32)`` samples then fit), taking fewer samples instead.
    """
    prefix = 4 * element_size * trace.prefix_elements  # ~4 live tensors of the largest output
    suffix = 4 * element_size * trace.suffix_elements
    if expand:  # the whole network runs on the expanded batch
        prefix, suffix = 0, max(prefix, suffix)
    all_masks = budget // (prefix + num_masks * suffix)
    if all_masks >= min(n, 32):
        return min(n, all_masks), num_masks
    n_c = max(1, min(n, 32, budget // (prefix + 8 * suffix)))  # room for 8 masks if possible
    return n_c, max(1, min(num_masks, (budget - n_c * prefix) // (n_c * suffix)))


def _shares_prefix(
    model: nn.Module, inputs: Tensor, trace: Trace, output_fn: OutputFn | None
) -> bool:
    """Whether the model runs with the first point's output expanded to several copies.

    A model that mixes activations from before the first point with the expanded batch (a skip
    connection around it) does not; masks are then evaluated by repeating the inputs.
    """
    x = inputs[:2]
    try:
        _run(
            model,
            x,
            trace,
            lambda j, h, sl: h,
            slice(0, 2),
            None,
            expand_inputs=False,
            output_fn=output_fn,
        )
    except (RuntimeError, _BatchMismatchError) as err:
        warnings.warn(
            "The model mixes activations from before the first ablation point with the "
            f"expanded batch ({type(err).__name__}: {str(err)[:200]}); evaluating masks by "
            "repeating the inputs instead (no shared prefix, slower).",
            stacklevel=4,
        )
        return False
    return True


def _run(
    model: nn.Module,
    x: Tensor,
    trace: Trace,
    apply: Apply,
    sl: slice,
    masks: Masks | None,
    *,
    expand_inputs: bool,
    output_fn: OutputFn | None,
    memory_budget: int = 2**25,
    cache: dict[str, Tensor | None] | None = None,
) -> Tensor:
    m, n = sl.stop - sl.start, x.shape[0]
    first = trace.points[trace.order[0]]
    shortcut = trace.shortcut if (masks is not None and not expand_inputs and m > 1) else None
    index = {p.name: j for j, p in enumerate(trace.points)}
    held: dict[str, Tensor] = {}
    sparse = trace.sparse if masks is not None and m > 1 else {}

    def intervene(name: str, out: Tensor) -> Tensor:
        if name in sparse:  # ran on an empty batch; compute the kept units only
            assert masks is not None
            module, i, j = sparse[name]
            out = _sparse_layer(module, held[name], out.shape[1:], masks, i, j, sl)
            if name not in index:
                return out
        if shortcut is not None and name == shortcut[0]:
            if "h" not in held:  # the first point was ablated on the expanded batch
                return out
            assert masks is not None
            j = index[first.name]
            z = _shortcut(shortcut[1], out, held["h"], masks, j, first, sl, memory_budget, cache)
            return z.flatten(0, 1)
        if shortcut is not None and name == first.name and _all_finite(out):
            held["h"] = out  # (with non-finite values, z - W(h - v)(1 - k) is not exact)
            return out
        if out.shape[0] == m * n:
            h = out.reshape(m, n, *out.shape[1:])
        elif out.shape[0] == n:
            h = out.unsqueeze(0).expand(m, *out.shape)
        else:
            raise _BatchMismatchError(f"module {name!r} returned batch {out.shape[0]}")
        return apply(index[name], h, sl).flatten(0, 1)

    modules = {p.name: p.module for p in trace.points}
    if shortcut is not None:
        modules[shortcut[0]] = shortcut[1]
    modules.update({name: module for name, (module, _, _) in sparse.items()})
    inputs = x.repeat(m, *([1] * (x.ndim - 1))) if expand_inputs else x

    def make_stash(name: str) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def stash(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            held[name] = args[0]
            return (args[0][:0], *args[1:])  # the layer itself runs on no samples

        return stash

    handles = [mod.register_forward_pre_hook(make_stash(nm)) for nm, (mod, _, _) in sparse.items()]
    try:
        with torch.no_grad(), replace_output(modules, intervene):
            logits = as_logits(model(inputs), output_fn)
    finally:
        for handle in handles:
            handle.remove()
    if logits.shape[0] != m * n:
        raise _BatchMismatchError(f"the model returned batch {logits.shape[0]}, not {m * n}")
    return logits


def _sparse_layer(
    layer: nn.Module,
    x: Tensor,
    sample_shape: torch.Size,
    masks: Masks,
    i: int,
    j: int,
    sl: slice,
    density: float = 0.5,
) -> Tensor:
    """``layer`` on ``x`` ``[m * n, ...]`` for outputs kept at point ``j``; others are 0.

    Input units ablated to 0 at point ``i`` are left out of the sum. Masks that keep more than
    ``density`` of the work run together as one batch on all units instead.
    """
    weight: Tensor = layer.weight  # type: ignore[assignment]
    bias: Tensor | None = layer.bias  # type: ignore[assignment]
    linear = isinstance(layer, nn.Linear)
    m = sl.stop - sl.start
    xs = x.view(m, -1, *x.shape[1:])
    out = x.new_zeros(m, xs.shape[1], *sample_shape)
    keep_out = masks.keep[j][sl]
    keep_in = masks.keep[i][sl] if masks.values[i] is None else None
    share = keep_out.sum(1) / keep_out.shape[1]
    if keep_in is not None:
        share = share * keep_in.sum(1) / keep_in.shape[1]

    def run(inputs: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if linear:
            return nn.functional.linear(inputs, w, b)
        return layer._conv_forward(inputs, w, b)  # type: ignore[operator]

    dense = (share > density).cpu()
    if bool(dense.any()):
        rows = dense.nonzero().squeeze(1).to(x.device)
        full = run(xs.index_select(0, rows).flatten(0, 1), weight, bias)
        out.index_copy_(0, rows, full.view(rows.numel(), *out.shape[1:]))
    out_dim, in_dim = (out.ndim - 2, x.ndim - 1) if linear else (1, 1)
    for t in (~dense).nonzero().squeeze(1).tolist():
        kept = keep_out[t].nonzero().squeeze(1)
        if kept.numel() == 0:
            continue
        w, b = weight.index_select(0, kept), None if bias is None else bias.index_select(0, kept)
        inputs = xs[t]
        if keep_in is not None:
            used = keep_in[t].nonzero().squeeze(1)
            if used.numel() == 0:  # all inputs are 0: the output is the bias
                if b is not None:
                    shape, view = list(out[t].shape), [1] * (out.ndim - 1)
                    shape[out_dim], view[out_dim] = kept.numel(), -1
                    out[t].index_copy_(out_dim, kept, b.view(view).expand(shape).contiguous())
                continue
            inputs, w = inputs.index_select(in_dim, used), w.index_select(1, used)
        out[t].index_copy_(out_dim, kept, run(inputs, w, b))
    return out.flatten(0, 1)


def _shortcut(
    layer: nn.Module,
    z: Tensor,
    h: Tensor,
    masks: Masks,
    j: int,
    point: AblationPoint,
    sl: slice,
    memory_budget: int,
    cache: dict[str, Tensor | None] | None = None,
) -> Tensor:
    r"""``[m, n, ...]`` outputs of ``layer`` for each mask: :math:`z - W((h - v) \odot (1-k))`.

    Successive masks whose ablated set grows reuse the previous correction and add only the
    contributions of the newly ablated units, so a whole cumulative ordering costs one pass of
    ``layer``. When they fit in half the memory budget, the contributions of all units are
    computed once (one grouped convolution) and each mask only sums rows of them (the
    cumulative sum along an ordering); otherwise ``layer`` is applied to the new units' columns.
    """
    value = masks.values[j]
    d = h if value is None else h - value
    dim = 1 if point.unit_dim == 1 else h.ndim - 1
    keep = masks.keep[j][sl].cpu()
    cache = {} if cache is None else cache  # the same samples for every chunk of masks
    if "per_unit" not in cache:
        fits = keep.shape[1] * z.numel() * z.element_size() <= memory_budget // 2
        cache["per_unit"] = _unit_contributions(layer, d, z.shape[2:]) if fits else None
    per_unit = cache["per_unit"]
    out = z.new_empty(keep.shape[0], *z.shape)
    previous, delta = None, None
    for i, row in enumerate(keep):
        ablated = ~row
        if previous is not None and not bool((previous & row).any()):
            new = ablated & ~previous
        else:
            new, delta = ablated, None
        idx = new.nonzero().squeeze(1).to(h.device)
        if idx.numel():
            if per_unit is not None:
                part = per_unit.index_select(0, idx).sum(0)
            else:
                part = _partial_map(layer, d.index_select(dim, idx), idx)
            delta = part if delta is None else delta + part
        if delta is None:
            out[i] = z
        else:
            torch.sub(z, delta, out=out[i])
        previous = ablated
    return out


def _unit_contributions(layer: nn.Module, d: Tensor, out_shape: torch.Size) -> Tensor:
    r"""``[u, n, ...]``: ``layer``'s linear part (no bias) applied to each input unit alone.

    For a ``Linear`` :math:`P_c = d_{\cdot c} W_{\cdot c}^\top`; for a convolution
    :math:`P_c = W_{\cdot c} * d_c`, all channels in one convolution with ``groups = u``
    (or, for ``Conv2d``, one batched matmul over the unfolded input). ``out_shape``: the
    spatial shape of the layer's output.
    """
    weight: Tensor = layer.weight  # type: ignore[assignment]
    if isinstance(layer, nn.Linear):
        u, o = weight.shape[1], weight.shape[0]
        w = weight.t().reshape(u, *([1] * (d.ndim - 1)), o)
        return d.movedim(-1, 0).unsqueeze(-1) * w
    assert isinstance(layer, CONV_TYPES)
    c_out, u = weight.shape[:2]
    pad = layer.padding
    if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and isinstance(pad, tuple):
        # im2col and one batched matmul: faster than the grouped convolution below
        kernel, n = weight.shape[2:], d.shape[0]
        cols = nn.functional.unfold(d, kernel, layer.dilation, pad, layer.stride)
        cols = cols.view(n, u, kernel.numel(), -1).transpose(0, 1)  # [u, n, k, L]
        p = torch.matmul(weight.transpose(0, 1).reshape(u, 1, c_out, -1), cols)
        return p.view(u, n, c_out, *out_shape)
    grouped = weight.transpose(0, 1).reshape(u * c_out, 1, *weight.shape[2:])
    conv = (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d)[d.ndim - 3]
    padding: Any = layer.padding
    if layer.padding_mode != "zeros":
        d = nn.functional.pad(d, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    out = conv(d, grouped, None, layer.stride, padding, layer.dilation, u)
    return out.view(out.shape[0], u, c_out, *out.shape[2:]).movedim(1, 0).contiguous()


def _partial_map(layer: nn.Module, d: Tensor, idx: Tensor) -> Tensor:
    """``layer``'s linear part (no bias) applied to the input columns/channels ``idx``."""
    weight = layer.weight.index_select(1, idx)  # type: ignore[operator]
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(d, weight)
    return layer._conv_forward(d, weight, None)  # type: ignore[operator]


def point_statistics(
    model: nn.Module, inputs: Tensor, trace: Trace, *, chunk_size: int = 1024
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-element mean (one sample's shape) and per-unit std of each point's output.

    The std pools samples and, for feature maps, positions (the unit's std over the probe set).
    Accumulated in float64; returned in the inputs' dtype.
    """
    k = len(trace.points)
    sums: list[Tensor] = [torch.zeros(())] * k
    moments: list[Tensor] = [torch.zeros(())] * k  # [2, u]: sum and sum of squares per unit
    index = {p.name: j for j, p in enumerate(trace.points)}

    def record(name: str, out: Tensor) -> Tensor:
        j = index[name]
        o = out.detach().to(torch.float64)
        sums[j] = sums[j].to(o.device) + o.sum(0)
        dim = 1 if trace.points[j].unit_dim == 1 else o.ndim - 1
        flat = o.movedim(dim, 0).flatten(1)
        moments[j] = moments[j].to(o.device) + torch.stack([flat.sum(1), (flat * flat).sum(1)])
        return out

    n = inputs.shape[0]
    with torch.no_grad(), replace_output({p.name: p.module for p in trace.points}, record):
        for s0 in range(0, n, chunk_size):
            model(inputs[s0 : s0 + chunk_size])
    means, stds = [], []
    for j, p in enumerate(trace.points):
        count = n * (sums[j].numel() // p.num_units)
        mu = moments[j][0] / count
        var = (moments[j][1] / count - mu * mu).clamp_min(0.0)
        means.append((sums[j] / n).to(inputs.dtype))
        stds.append(var.sqrt().to(inputs.dtype))
    return means, stds
