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
per mask (:mod:`lightning_probes.core.interventions.contributions`): the ``Linear``/``Conv`` that
consumes the first point is not re-run per mask (each unit's contribution is computed once and
subtracted), and a later point's own layer computes only the outputs kept at its point from
the inputs kept at the previous point.

A model that mixes the prefix with the expanded batch (a skip connection around the first
point) falls back to expanding the inputs instead (with a warning).

Index letters: ``M`` masks, ``n`` samples, ``u`` units of a point.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.evaluation import OutputFn, as_logits
from lightning_probes.core.hooks import replace_output
from lightning_probes.core.interventions.contributions import (
    CONV_TYPES as CONV_TYPES,  # re-exported
)
from lightning_probes.core.interventions.contributions import (
    _Call,
    _find_shortcut,
    _find_sparse_consumers,
    _shortcut,
    _sparse_layer,
)
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
            (:func:`~lightning_probes.core.interventions.ablation.default_ablation_layers`).
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
    from lightning_probes.core.interventions.ablation import default_ablation_layers

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


def build_masks(
    model: nn.Module, inputs: Tensor, trace: Trace, keep: Tensor, value: str = "zero"
) -> Masks:
    """:class:`Masks` from one ``[M, U]`` keep matrix over all units of ``trace``'s points.

    Args:
        model: The network (for the unit means when ``value="mean"``).
        inputs: The probe inputs ``[n, ...]``.
        trace: The traced ablation points (their units, in order, make the ``U`` columns).
        keep: ``[M, U]`` bool, ``True`` where a unit is kept in mask ``m``.
        value: ``"zero"`` clamps ablated units to 0, ``"mean"`` to their mean on ``inputs``.
    """
    sizes = [p.num_units for p in trace.points]
    values: list[Tensor | None] = [None] * len(sizes)
    if value == "mean":
        values = list(point_statistics(model, inputs, trace)[0])
    return Masks(
        [k.to(inputs.device) for k in keep.split(sizes, dim=1)],
        values,
        [p.unit_dim for p in trace.points],
    )


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
