r"""Ablation and noise interventions on units, vectorised (Morcos et al., ICLR 2018, sec. 2.2).

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
(batch ``m * n``, mask-major) and the remainder runs once on the expanded batch. When the first
point is consumed by a single ``Linear``/``Conv`` (checked on the autograd graph), that map is
not re-run per mask: :math:`W(h \odot k + v \odot (1-k)) + b = z - W((h - v) \odot (1-k))`, and
masks that ablate a superset of the previous mask's units (successive points of one cumulative
ordering) add only the newly ablated units' columns. Masks and samples are chunked to a memory
budget. A model that mixes the prefix with the expanded batch (a skip connection around the
first point) falls back to expanding the inputs instead (with a warning).

Index letters: ``M`` masks, ``n`` samples, ``u`` units of a point.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_probes.core.evaluation import OutputFn, as_logits
from lightning_probes.core.hooks import replace_output
from lightning_probes.core.layers import select_layers

AblationValue = Literal["zero", "mean"]
Layers = str | Sequence[str] | None
_PASS_THROUGH = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
)
_NOT_ACTIVATIONS = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.MultiheadAttention)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
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
class _Trace:
    points: list[AblationPoint]  # in selection (definition) order
    order: list[int]  # indices into points, in execution order
    per_sample_elements: int  # largest per-sample output of any module (memory estimate)
    shortcut: tuple[str, nn.Module] | None  # single Linear/Conv consuming the first point


def default_ablation_layers(model: nn.Module) -> list[str]:
    """The paper's default: conv nets the last three conv layers, MLPs all hidden layers.

    Raises:
        ValueError: If the model has neither conv layers nor at least two ``Linear`` layers.
    """
    convs = list(select_layers(model, types=_CONV)) if _has(model, _CONV) else []
    if convs:
        return convs[-3:]
    linears = list(select_layers(model, types=nn.Linear)) if _has(model, (nn.Linear,)) else []
    if len(linears) < 2:
        raise ValueError(
            f"Expected {type(model).__name__} to have conv layers or at least two Linear layers "
            "(hidden + output) to choose default ablation layers, got none. Pass `layers=`."
        )
    return linears[:-1]


def ablation_points(
    model: nn.Module, inputs: Tensor, layers: Layers = None, *, follow_activation: bool = True
) -> dict[str, AblationPoint]:
    """Resolve the intervention point of each selected layer (see the module docstring).

    Args:
        model: The network (in eval mode).
        inputs: ``[n, ...]`` a few inputs (only the first two are run).
        layers: Names or globs of modules; ``None``: :func:`default_ablation_layers`.
        follow_activation: Move from a layer to the activation module after it.

    Returns:
        ``{layer name: AblationPoint}`` in definition order.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> p = ablation_points(net, torch.zeros(2, 4))["0"]
        >>> p.name, p.num_units
        ('1', 8)
    """
    return {p.layer: p for p in trace_model(model, inputs, layers, follow_activation).points}


def trace_model(
    model: nn.Module,
    inputs: Tensor,
    layers: Layers,
    follow_activation: bool,
    output_fn: OutputFn | None = None,
) -> _Trace:
    """One forward pass on two samples that reveals points, their order and the shortcut."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"Expected `inputs` to be a Tensor [n, ...], got {type(inputs).__name__}.")
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
    elements = max(
        (o[0].numel() for _, _, _, o in calls if isinstance(o, Tensor) and o.ndim > 0), default=1
    )
    shortcut = _find_shortcut(calls, positions[order[0]], points[order[0]], logits, where)
    if shortcut is not None and shortcut[0] in {p.name for p in points}:
        shortcut = None
    return _Trace(points, order, max(elements, logits[0].numel()), shortcut)


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
    conv_ok = isinstance(module, _CONV) and module.groups == 1 and point.unit_dim == 1
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


def _has(model: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
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
        fill = torch.zeros((), dtype=h.dtype, device=h.device) if value is None else value
        return torch.where(keep.unsqueeze(1), h, fill)


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
    trace: _Trace,
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
    per_sample = 4 * trace.per_sample_elements * inputs.element_size()
    n_c = max(1, min(n, memory_budget // per_sample))
    m_c = max(1, min(num_masks, memory_budget // (n_c * per_sample)))
    correct = torch.zeros(num_masks, dtype=torch.float64)
    loss = torch.zeros(num_masks, dtype=torch.float64)
    state = {"expand_inputs": False}
    for s0 in range(0, n, n_c):
        x, y = inputs[s0 : s0 + n_c], targets[s0 : s0 + n_c]
        for m0 in range(0, num_masks, m_c):
            sl = slice(m0, min(num_masks, m0 + m_c))
            logits = _forward_masks(model, x, trace, apply, sl, masks, state, output_fn)
            m = sl.stop - sl.start
            logits = logits.reshape(m, x.shape[0], -1)
            correct[sl] += (logits.argmax(-1) == y).sum(1).to("cpu", torch.float64)
            if with_loss:
                ce = nn.functional.cross_entropy(
                    logits.flatten(0, 1).double(), y.repeat(m), reduction="none"
                )
                loss[sl] += ce.view(m, -1).sum(1).to("cpu", torch.float64)
    return correct / n, (loss / n if with_loss else None)


def _forward_masks(
    model: nn.Module,
    x: Tensor,
    trace: _Trace,
    apply: Apply,
    sl: slice,
    masks: Masks | None,
    state: dict[str, bool],
    output_fn: OutputFn | None,
) -> Tensor:
    m = sl.stop - sl.start
    if not state["expand_inputs"] and m > 1:
        try:
            return _run(model, x, trace, apply, sl, masks, expand_inputs=False, output_fn=output_fn)
        except (RuntimeError, _BatchMismatchError) as err:
            state["expand_inputs"] = True
            warnings.warn(
                "The model mixes activations from before the first ablation point with the "
                f"expanded batch ({type(err).__name__}: {str(err)[:200]}); evaluating masks by "
                "repeating the inputs instead (no shared prefix, slower).",
                stacklevel=3,
            )
    return _run(model, x, trace, apply, sl, masks, expand_inputs=m > 1, output_fn=output_fn)


def _run(
    model: nn.Module,
    x: Tensor,
    trace: _Trace,
    apply: Apply,
    sl: slice,
    masks: Masks | None,
    *,
    expand_inputs: bool,
    output_fn: OutputFn | None,
) -> Tensor:
    m, n = sl.stop - sl.start, x.shape[0]
    first = trace.points[trace.order[0]]
    shortcut = trace.shortcut if (masks is not None and not expand_inputs and m > 1) else None
    index = {p.name: j for j, p in enumerate(trace.points)}
    held: dict[str, Tensor] = {}

    def intervene(name: str, out: Tensor) -> Tensor:
        if shortcut is not None and name == shortcut[0]:
            assert masks is not None
            z = _shortcut(shortcut[1], out, held["h"], masks, index[first.name], first, sl)
            return z.flatten(0, 1)
        if shortcut is not None and name == first.name:
            held["h"] = out
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
    inputs = x.repeat(m, *([1] * (x.ndim - 1))) if expand_inputs else x
    with torch.no_grad(), replace_output(modules, intervene):
        logits = as_logits(model(inputs), output_fn)
    if logits.shape[0] != m * n:
        raise _BatchMismatchError(f"the model returned batch {logits.shape[0]}, not {m * n}")
    return logits


def _shortcut(
    layer: nn.Module, z: Tensor, h: Tensor, masks: Masks, j: int, point: AblationPoint, sl: slice
) -> Tensor:
    r"""``[m, n, ...]`` outputs of ``layer`` for each mask: :math:`z - W((h - v) \odot (1-k))`.

    Successive masks whose ablated set grows reuse the previous correction and add only the
    columns of the newly ablated units, so a whole cumulative ordering costs one pass of
    ``layer``.
    """
    value = masks.values[j]
    d = h if value is None else h - value
    dim = 1 if point.unit_dim == 1 else h.ndim - 1
    keep = masks.keep[j][sl].cpu()
    out, previous, delta = [], None, None
    for row in keep:
        ablated = ~row
        if previous is not None and not bool((previous & row).any()):
            new = ablated & ~previous
        else:
            new, delta = ablated, None
        idx = new.nonzero().squeeze(1).to(h.device)
        if idx.numel():
            part = _partial_map(layer, d.index_select(dim, idx), idx)
            delta = part if delta is None else delta + part
        out.append(z if delta is None else z - delta)
        previous = ablated
    return torch.stack(out)


def _partial_map(layer: nn.Module, d: Tensor, idx: Tensor) -> Tensor:
    """``layer``'s linear part (no bias) applied to the input columns/channels ``idx``."""
    weight = layer.weight.index_select(1, idx)  # type: ignore[operator]
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(d, weight)
    return layer._conv_forward(d, weight, None)  # type: ignore[operator]


def point_statistics(
    model: nn.Module, inputs: Tensor, trace: _Trace, *, chunk_size: int = 1024
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


# ---------------------------------------------------------------------------- curves
@dataclass
class AblationCurve:
    """A cumulative ablation curve (Morcos et al., 2018, Fig. 1).

    Attributes:
        fractions: ``[k]`` fraction of all units ablated at each point, :math:`m_k / U`.
        counts: ``[k]`` number of units ablated, :math:`m_k`.
        accuracy: ``[r, k]`` accuracy on the probe set, per ordering and point.
        mean: ``[k]`` mean over orderings.
        std: ``[k]`` standard deviation over orderings (Bessel-corrected).
        auc: Area under the mean curve over ``fractions`` (0-d, float64; at most 1).
        normalized_auc: ``auc`` divided by the unablated accuracy.
        orderings: ``[r, U]`` the orders units were ablated in (global unit indices).
        num_units: ``{layer: u}``; global unit indices run over layers in this order.
    """

    fractions: Tensor
    counts: Tensor
    accuracy: Tensor
    mean: Tensor
    std: Tensor
    auc: Tensor
    normalized_auc: Tensor
    orderings: Tensor
    num_units: dict[str, int]


@dataclass
class NoiseCurve:
    """Accuracy under Gaussian noise added to all units (Morcos et al., 2018, Fig. 2).

    Attributes:
        scales: ``[s]`` noise std in units of each unit's std on the probe set.
        accuracy: ``[repeats, s]`` accuracy per noise draw and scale.
        mean: ``[s]`` mean over draws.
        std: ``[s]`` standard deviation over draws.
    """

    scales: Tensor
    accuracy: Tensor
    mean: Tensor
    std: Tensor


def ablation_curve(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    layers: Layers,
    num_orderings: int = 10,
    fractions: Tensor | None = None,
    value: AblationValue = "zero",
    generator: torch.Generator | None = None,
    follow_activation: bool = True,
    output_fn: OutputFn | None = None,
    memory_budget: int = 2**25,
) -> AblationCurve:
    r"""Accuracy as units of ``layers`` are ablated cumulatively in random orders.

    Each of ``num_orderings`` random permutations of all :math:`U` units of the selected layers
    (pooled across layers) ablates its first :math:`m_k = \mathrm{round}(f_k U)` units at point
    :math:`k`; the accuracy on ``(inputs, targets)`` — in the paper the **training** set,
    corrupted labels included — is measured at each point, and

    .. math:: \mathrm{AUC} = \int_0^1 \overline{\mathrm{acc}}(f)\, df \quad(\text{trapezoid})

    Args:
        model: The classifier, in eval mode; its weights are not modified.
        inputs: ``[n, ...]`` probe inputs.
        targets: ``[n]`` class indices.
        layers: Names/globs of layers (see the module docstring); ``None``: the paper's
            default (:func:`default_ablation_layers`).
        num_orderings: Number of random orderings ``r``.
        fractions: ``[k]`` non-decreasing, from 0 to 1; default ``linspace(0, 1, 21)``.
        value: ``"zero"`` (the paper) or ``"mean"`` (each element's mean on the probe set).
        generator: Source of the orderings (default: the global RNG).
        follow_activation: Ablate the activation after each named layer.
        output_fn: Maps the model output to logits ``[n, o]``.
        memory_budget: Approximate bytes of activations per forward pass.

    Returns:
        An :class:`AblationCurve`.

    Raises:
        ValueError: On invalid arguments (the message names the argument).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> curve = ablation_curve(net, x, y, layers=None, num_orderings=3)
        >>> curve.accuracy.shape, float(curve.fractions[-1])
        (torch.Size([3, 21]), 1.0)
    """
    from lightning_probes.functional.ablation import (
        ablation_counts,
        cumulative_keep_masks,
        curve_area,
        summarize_curves,
    )

    if not isinstance(num_orderings, int) or num_orderings < 1:
        raise ValueError(f"Expected `num_orderings` to be a positive int, got {num_orderings!r}.")
    if value not in ("zero", "mean"):
        raise ValueError(f"`value` can be 'zero' or 'mean', got {value!r}.")
    _warn_if_training(model)
    trace = trace_model(model, inputs, layers, follow_activation, output_fn)
    sizes = [p.num_units for p in trace.points]
    total = sum(sizes)
    fractions = torch.linspace(0, 1, 21) if fractions is None else fractions
    counts = ablation_counts(fractions, total)
    if counts[0] != 0 or counts[-1] != total:
        raise ValueError(
            f"Expected `fractions` to run from 0 to 1 (the AUC is over [0, 1]), got "
            f"{fractions.tolist()}."
        )
    orderings = torch.stack(
        [torch.randperm(total, generator=generator) for _ in range(num_orderings)]
    )
    keep = cumulative_keep_masks(orderings, counts).flatten(0, 1)  # [r*k, U], ordering-major
    unique, inverse = _dedupe(keep)
    values: list[Tensor | None] = [None] * len(sizes)
    if value == "mean":
        values = list(point_statistics(model, inputs, trace)[0])
    masks = Masks(
        [u.to(inputs.device) for u in unique.split(sizes, dim=1)],
        values,
        [p.unit_dim for p in trace.points],
    )
    acc, _ = evaluate_interventions(
        model,
        inputs,
        targets,
        trace,
        unique.shape[0],
        masks,
        masks=masks,
        output_fn=output_fn,
        memory_budget=memory_budget,
    )
    accuracy = acc[inverse].view(num_orderings, -1)
    mean, std = summarize_curves(accuracy)
    x = counts.to(torch.float64) / total
    auc = curve_area(x, mean)
    return AblationCurve(
        fractions=x,
        counts=counts,
        accuracy=accuracy,
        mean=mean,
        std=std,
        auc=auc,
        normalized_auc=auc / mean[0] if mean[0] > 0 else torch.tensor(float("nan")),
        orderings=orderings,
        num_units={p.layer: p.num_units for p in trace.points},
    )


def noise_curve(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    layers: Layers,
    scales: Tensor | None = None,
    num_repeats: int = 5,
    generator: torch.Generator | None = None,
    follow_activation: bool = True,
    output_fn: OutputFn | None = None,
    memory_budget: int = 2**25,
) -> NoiseCurve:
    r"""Accuracy with Gaussian noise on every unit of ``layers`` (Morcos et al., 2018, sec. 2.2).

    .. math:: \tilde h_{j} = h_{j} + s\, \sigma_j\, \varepsilon, \quad \varepsilon \sim N(0, 1)

    independently per sample and element, where :math:`\sigma_j` is unit :math:`j`'s std on
    the probe set (pooled over positions for feature maps) and :math:`s` the scale.

    Args:
        model: The classifier, in eval mode.
        inputs: ``[n, ...]`` probe inputs.
        targets: ``[n]`` class indices.
        layers: As in :func:`ablation_curve`.
        scales: ``[s]`` noise scales; default ``logspace(-2, 1, 7)`` (0.01 to 10).
        num_repeats: Noise draws per scale.
        generator: Source of the noise (a CPU generator; default: the global RNG).
        follow_activation: As in :func:`ablation_curve`.
        output_fn: Maps the model output to logits.
        memory_budget: Approximate bytes of activations per forward pass.

    Returns:
        A :class:`NoiseCurve`.
    """
    from lightning_probes.functional.ablation import summarize_curves

    if not isinstance(num_repeats, int) or num_repeats < 1:
        raise ValueError(f"Expected `num_repeats` to be a positive int, got {num_repeats!r}.")
    scales = torch.logspace(-2, 1, 7) if scales is None else scales.detach().flatten().cpu()
    if scales.numel() == 0 or bool((scales < 0).any()):
        raise ValueError(f"Expected `scales` to be non-negative values, got {scales.tolist()}.")
    _warn_if_training(model)
    trace = trace_model(model, inputs, layers, follow_activation, output_fn)
    _, stds = point_statistics(model, inputs, trace)
    per_mask = scales.repeat(num_repeats).to(inputs.device, inputs.dtype)  # [repeats*s]

    def add_noise(j: int, h: Tensor, sl: slice) -> Tensor:
        p = trace.points[j]
        sigma = unit_view(stds[j], h.ndim - 2, p.unit_dim)
        noise = torch.randn(h.shape, generator=generator, dtype=h.dtype).to(h.device)
        scale = per_mask[sl].view(-1, *([1] * (h.ndim - 1)))
        return h + scale * sigma * noise

    acc, _ = evaluate_interventions(
        model,
        inputs,
        targets,
        trace,
        per_mask.numel(),
        add_noise,
        output_fn=output_fn,
        memory_budget=memory_budget,
    )
    accuracy = acc.view(num_repeats, -1)
    mean, std = summarize_curves(accuracy)
    return NoiseCurve(scales=scales.to(torch.float64), accuracy=accuracy, mean=mean, std=std)


def _dedupe(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Unique rows in first-occurrence order (keeps each ordering's nesting) and the inverse."""
    seen: dict[bytes, int] = {}
    inverse: list[int] = []
    rows: list[Tensor] = []
    for row in keep:
        key = row.numpy().tobytes()
        if key not in seen:
            seen[key] = len(rows)
            rows.append(row)
        inverse.append(seen[key])
    return torch.stack(rows), torch.tensor(inverse)


def _warn_if_training(model: nn.Module) -> None:
    if model.training:
        warnings.warn(
            f"{type(model).__name__} is in training mode, so dropout and batch statistics make "
            "the ablation results noisy and batch-dependent. Call `model.eval()` first.",
            stacklevel=3,
        )
