r"""The intervention engine: many interventions in one forward pass.

Used by :mod:`lightning_probes.core.interventions.ablation` (cumulative ablation and noise
curves) and :mod:`lightning_probes.core.interventions.selectivity` (single-unit ablation
impact), after Morcos et al. (ICLR 2018), sec. 2.2. Ablating a unit clamps its
**post-nonlinearity** activity to a fixed value (:mod:`~lightning_probes.core.interventions.
masks`) through a scoped forward hook (:func:`~lightning_probes.core.hooks.replace_output`) at
the points found by :func:`~lightning_probes.core.interventions.trace.trace_model`; weights are
never touched.

**Vectorisation.** Many masks are evaluated in one forward pass: the network runs on the probe
samples once up to the first intervention point, whose output is expanded to ``m`` copies
(batch ``m * n``, mask-major) and the remainder runs once on the expanded batch. Each pass
takes as many masks as fit the memory budget (all of them if possible, fewer samples instead),
since every pass re-runs the prefix. Two shortcuts, exact up to float rounding, avoid work
per mask (:mod:`lightning_probes.core.interventions.shortcuts`): the ``Linear``/``Conv`` that
consumes the first point is not re-run per mask (each unit's contribution is computed once and
subtracted), and a later point's own layer computes only the outputs kept at its point from
the inputs kept at the previous point.

A model that mixes the prefix with the expanded batch first gets the per-sample arguments of
the modules called after the point repeated with the batch (:mod:`~lightning_probes.core.
interventions.repair`: BERT's attention mask and the residual ``BertOutput`` adds back), if
that gives each mask's own logits (checked on two samples and two masks). Otherwise (a skip
connection added inline around the point, e.g. a ResNet block's ``out += identity``) it expands
the input of the innermost module enclosing the first point whose remainder runs on the
expanded batch and gives the same logits as the plain model (checked on two samples): the
block, so only the block and what follows it run per mask. Without such a module the model's
inputs are expanded (a warning).

Index letters: ``M`` masks, ``n`` samples, ``u`` units of a point.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.evaluation import OutputFn, as_logits
from lightning_probes.core.hooks import replace_output
from lightning_probes.core.interventions.accuracy import (
    check_targets,
    correct_and_loss,
    count_targets,
)
from lightning_probes.core.interventions.inputs import num_samples, repeat_samples, run, take
from lightning_probes.core.interventions.masks import Masks, sum_is_finite
from lightning_probes.core.interventions.repair import (
    PerSampleArguments,
    per_sample_arguments,
    repeated_arguments,
)
from lightning_probes.core.interventions.shortcuts import (
    ShortcutPath,
    shortcut_outputs,
    sparse_layer,
)
from lightning_probes.core.interventions.trace import Trace
from lightning_probes.core.interventions.trace import (
    trace_model as trace_model,  # re-exported (callbacks import it from here)
)

Apply = Callable[[int, Tensor, slice], Tensor]
"""``(point index, h [m, n, ...], mask slice) -> intervened h``."""


class BatchMismatchError(RuntimeError):
    """A module returned a batch that is neither ``n`` nor ``m * n`` samples."""


def evaluate_interventions(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    trace: Trace,
    num_masks: int,
    apply: Apply,
    *,
    masks: Masks | None = None,
    with_loss: bool = False,
    output_fn: OutputFn | None = None,
    memory_budget: int = 2**25,
    shortcut_path: ShortcutPath = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Accuracy (and summed cross-entropy) of ``model`` under ``num_masks`` interventions.

    Args:
        model: The network (eval mode).
        inputs: ``[n, ...]`` probe inputs: a tensor, or a tuple/dict of tensors sharing axis 0
            (``model(*args)`` / ``model(**kwargs)``); every path slices and repeats all of them.
        targets: ``[n]`` class indices, or ``[n, L]`` token ids of a language model (logits
            ``[n, L, V]``; accuracy and loss per token, ``-100`` ignored: see
            :mod:`~lightning_probes.core.interventions.accuracy`).
        trace: From :func:`trace_model`.
        num_masks: ``M``, the number of interventions.
        apply: Applies intervention(s) ``masks`` to point ``j``'s output ``[m, n, ...]``.
        masks: The ablation masks behind ``apply``, if it ablates: enables the linear shortcut.
        with_loss: Also return the mean cross-entropy under each intervention.
        output_fn: Maps the model output to logits ``[n, o]``.
        memory_budget: Approximate bytes of activations per forward pass.
        shortcut_path: How the layer after the first point subtracts the ablated units
            (:data:`~lightning_probes.core.interventions.shortcuts.ShortcutPath`); the paths
            taken are counted in ``trace.paths``.

    Returns:
        ``(accuracy [M], loss [M] or None)`` in float64.
    """
    if targets.ndim not in (1, 2) or torch.is_floating_point(targets):
        raise ValueError(
            f"Expected `targets` to be [n] class indices (or [n, L] token ids), got "
            f"{targets.dtype} of shape {tuple(targets.shape)}."
        )
    n = num_samples(inputs)
    error = _prefix_error(model, inputs, trace, output_fn) if num_masks > 1 else None
    repair = None
    if error is not None:
        repair = _working_repair(model, inputs, trace, apply, masks, output_fn, shortcut_path)
        error = None if repair else error
    expand = error is not None
    at = expansion_point(model, inputs, trace, output_fn) if expand else None
    if expand:
        where = (
            "repeating the inputs instead (no shared prefix, slower)"
            if at is None
            else f"expanding the input of the enclosing {type(at[0]).__name__} instead"
        )
        warnings.warn(
            "The model mixes activations from before the first ablation point with the "
            f"expanded batch ({error}); evaluating masks by {where}.",
            stacklevel=3,
        )
    n_c, m_c = _chunk_sizes(n, num_masks, trace, trace.element_size, memory_budget, expand, at)
    # on the CPU: `correct_and_loss` returns each chunk's sums there
    correct = torch.zeros(num_masks, dtype=torch.float64, device="cpu")
    loss = torch.zeros(num_masks, dtype=torch.float64, device="cpu")
    for s0 in range(0, n, n_c):
        x, y = take(inputs, s0, s0 + n_c), targets[s0 : s0 + n_c]
        rows = y.shape[0]
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
                expand_at=None if at is None else at[0],
                output_fn=output_fn,
                memory_budget=memory_budget,
                cache=cache,
                shortcut_path=shortcut_path,
                repair=repair,
            )
            if s0 == 0 and m0 == 0:
                check_targets(logits[:rows], y)
            logits = logits.reshape(m, rows, *logits.shape[1:])
            hits, ce = correct_and_loss(logits, y, with_loss)
            correct[sl] += hits
            if ce is not None:
                loss[sl] += ce
    total = count_targets(targets)
    return correct / total, (loss / total if with_loss else None)


def _chunk_sizes(
    n: int,
    num_masks: int,
    trace: Trace,
    element_size: int,
    budget: int,
    expand: bool,
    at: tuple[nn.Module, int] | None = None,
) -> tuple[int, int]:
    """Samples and masks per forward pass, so that activations stay within ``budget`` bytes.

    Every forward pass re-runs the shared prefix, so passes evaluate as many masks as fit
    (all of them if at least ``min(n, 8)`` samples then fit: the prefix then runs once per
    sample), taking fewer samples instead.
    """
    prefix = 4 * element_size * trace.prefix_elements  # ~4 live tensors of the largest output
    suffix = 4 * element_size * trace.suffix_elements
    if expand and at is not None:  # the network runs on the expanded batch from `at` on
        suffix = max(suffix, 4 * element_size * at[1])
    elif expand:  # the whole network runs on the expanded batch
        prefix, suffix = 0, max(prefix, suffix)
    all_masks = budget // (prefix + num_masks * suffix)
    if all_masks >= min(n, 8):
        return min(n, all_masks), num_masks
    n_c = max(1, min(n, 32, budget // (prefix + 8 * suffix)))  # room for 8 masks if possible
    return n_c, max(1, min(num_masks, (budget - n_c * prefix) // (n_c * suffix)))


def _prefix_error(
    model: nn.Module, inputs: Any, trace: Trace, output_fn: OutputFn | None
) -> str | None:
    """Why the model cannot run with the first point's output expanded, or ``None`` if it can.

    A model that mixes activations from before the first point with the expanded batch (a skip
    connection around it) cannot; masks are then evaluated by expanding an enclosing module's
    input (:func:`expansion_point`) or the model's inputs.
    """
    x = take(inputs, 0, 2)
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
    except (RuntimeError, BatchMismatchError) as err:
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None


def _working_repair(
    model: nn.Module,
    inputs: Any,
    trace: Trace,
    apply: Apply,
    masks: Masks | None,
    output_fn: OutputFn | None,
    shortcut_path: ShortcutPath,
) -> PerSampleArguments | None:
    """The per-sample arguments to repeat, if the expanded pass then gives each mask's logits.

    Checked on two samples with the first two masks (the shortcut included) against one pass
    per mask, which expands nothing.
    """
    arguments = per_sample_arguments(model, inputs)
    if not arguments:
        return None
    x = take(inputs, 0, 2)
    call = partial(_run, model, x, trace, apply, masks=masks, expand_inputs=False,
                   output_fn=output_fn, shortcut_path=shortcut_path)  # fmt: skip
    try:
        expanded = call(slice(0, 2), repair=arguments)
        one_by_one = torch.cat([call(slice(k, k + 1)) for k in (0, 1)])
    except (RuntimeError, BatchMismatchError):
        return None
    return arguments if torch.allclose(expanded, one_by_one, 1e-4, 1e-5) else None


def _record_input_size(seen: list[int], module: nn.Module, args: tuple[Any, ...]) -> None:
    if args and isinstance(args[0], Tensor):
        seen.append(args[0][0].numel())


def expansion_point(
    model: nn.Module, inputs: Any, trace: Trace, output_fn: OutputFn | None
) -> tuple[nn.Module, int] | None:
    """The innermost module enclosing the first point whose input can be expanded, or ``None``.

    For each ancestor of the first point (by name, innermost first), two probe samples run with
    that ancestor's inputs repeated twice (identity interventions); the first whose logits equal
    the plain model's, copy by copy, is returned with its input's elements per sample.

    Args:
        model: The network (eval mode).
        inputs: ``[n, ...]`` probe inputs.
        trace: From :func:`trace_model`.
        output_fn: Maps the model output to logits.

    Returns:
        ``(module, elements per sample of its first input)`` or ``None`` (expand the inputs).
    """
    first = trace.points[trace.order[0]]
    x = take(inputs, 0, 2)
    with torch.no_grad():
        reference = as_logits(run(model, x), output_fn)
    named = dict(model.named_modules())
    parts = first.name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        module = named.get(".".join(parts[:k]))
        if module is None:
            continue
        seen: list[int] = []
        handle = module.register_forward_pre_hook(partial(_record_input_size, seen))
        try:
            logits = _run(
                model, x, trace, lambda j, h, sl: h, slice(0, 2), None,
                expand_inputs=True, expand_at=module, output_fn=output_fn,
            )  # fmt: skip
        except (RuntimeError, BatchMismatchError):
            continue
        finally:
            handle.remove()
        same = logits.reshape(2, *reference.shape)
        if len(seen) == 1 and torch.allclose(same, reference.expand_as(same), 1e-4, 1e-5):
            return module, seen[0]
    return None


def _run(
    model: nn.Module,
    x: Any,
    trace: Trace,
    apply: Apply,
    sl: slice,
    masks: Masks | None,
    *,
    expand_inputs: bool,
    output_fn: OutputFn | None,
    expand_at: nn.Module | None = None,
    memory_budget: int = 2**25,
    cache: dict[str, Tensor | None] | None = None,
    shortcut_path: ShortcutPath = "auto",
    repair: PerSampleArguments | None = None,
) -> Tensor:
    m, n = sl.stop - sl.start, num_samples(x)
    first = trace.points[trace.order[0]]
    shortcut = trace.shortcut if (masks is not None and not expand_inputs and m > 1) else None
    index = {p.name: j for j, p in enumerate(trace.points)}
    held: dict[str, Tensor] = {}
    sparse = trace.sparse if masks is not None and m > 1 else {}
    per_unit = {} if cache is None else cache  # the shortcut's unit contributions

    started = [False]  # the first point has run: `repair` repeats arguments from here on

    def intervene(name: str, out: Tensor) -> Tensor:
        started[0] = started[0] or name == first.name
        if name in sparse:  # ran on an empty batch; compute the kept units only
            assert masks is not None
            module, i, j = sparse[name]
            out = sparse_layer(module, held[name], out.shape[1:], masks, i, j, sl)
            trace.record("sparse")
            if name not in index:
                return out
        if shortcut is not None and name == shortcut[0]:
            if "h" not in held:  # the first point was ablated on the expanded batch
                return out
            assert masks is not None
            j = index[first.name]
            layer, budget, path = shortcut[1], memory_budget, shortcut_path
            z = shortcut_outputs(layer, out, held["h"], masks, j, first, sl, budget, per_unit, path)
            trace.record("columns" if per_unit.get("per_unit") is None else "contributions")
            return z.flatten(0, 1)
        if shortcut is not None and name == first.name and sum_is_finite(out):
            held["h"] = out  # (with non-finite values, z - W(h - v)(1 - k) is not exact)
            return out
        if out.shape[0] == m * n:
            h = out.reshape(m, n, *out.shape[1:])
        elif out.shape[0] == n:
            h = out.unsqueeze(0).expand(m, *out.shape)
        else:
            raise BatchMismatchError(f"module {name!r} returned batch {out.shape[0]}")
        return apply(index[name], h, sl).flatten(0, 1)

    modules = {p.name: p.module for p in trace.points}
    if shortcut is not None:
        modules[shortcut[0]] = shortcut[1]
    modules.update({name: module for name, (module, _, _) in sparse.items()})
    inputs = repeat_samples(x, m) if expand_inputs and expand_at is None else x

    def expand(module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
        return repeat_samples(args, m), repeat_samples(kwargs, m)

    def make_stash(name: str) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def stash(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            held[name] = args[0]
            return (args[0][:0], *args[1:])  # the layer itself runs on no samples

        return stash

    handles = [mod.register_forward_pre_hook(make_stash(nm)) for nm, (mod, _, _) in sparse.items()]
    if expand_inputs and expand_at is not None:
        handles.append(expand_at.register_forward_pre_hook(expand, with_kwargs=True))
    repeats = repeated_arguments(
        model, repair or {}, m, n, lambda: started[0], lambda t: t is held.get("h")
    )
    try:
        with torch.no_grad(), replace_output(modules, intervene), repeats:
            logits = as_logits(run(model, inputs), output_fn)
    finally:
        for handle in handles:
            handle.remove()
    if logits.shape[0] != m * n:
        raise BatchMismatchError(f"the model returned batch {logits.shape[0]}, not {m * n}")
    return logits
