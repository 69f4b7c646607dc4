r"""Neural Anisotropy Directions of an architecture, from many random initialisations.

Ortiz-Jiménez, Modas, Moosavi-Dezfooli, Frossard, "Neural Anisotropy Directions",
NeurIPS 2020. The authors' procedure (their public code): ``num_networks`` freshly
initialised networks with one scalar output, in ``eval()`` mode; one fixed evaluation point
:math:`x_0 \sim \mathcal N(0, I)`; for each network the "gradient" of :math:`f = -\text{net}`
by central differences with a large step :math:`h = 100` along every input basis vector,

.. math:: g_i = \frac{f(x_0 + h e_i) - f(x_0 - h e_i)}{2h},

then a mean-centred PCA of the ``(m, d)`` matrix of gradients: the NADs are its principal
axes and the spectrum its singular values. (Local autograd gradients at :math:`x_0` are kept
as ``method="autograd"``; they give a noisier basis that does not reproduce the published
NADs.)

Speed: the authors evaluate one network at a time on the batch of all ``2d`` perturbed
inputs. Here the inputs come in blocks sized so one call's activations stay within
``memory_budget`` — cache-sized on CPU, where this is what pays off (the big batch spills the
first layer's activations to memory) — and on GPU the networks of a chunk are stacked
(``{name: (g, ...)}``) and evaluated together by :func:`torch.func.vmap` over
:func:`torch.func.functional_call`, many small kernels becoming a few large ones
(:mod:`lightning_probes.core.nad.evaluator`). For the secant method, a linear first layer applied
to the input alone is not evaluated: :math:`A(x_0 \pm h e_i) + b = (A x_0 + b) \pm h A e_i`,
built from its weights (:mod:`lightning_probes.core.nad.first_layer`); and a
``conv -> act -> max_pool2d`` start (and a second one after it) is evaluated only in the few
pooling windows each :math:`e_i` reaches (:mod:`lightning_probes.core.nad.local`). Both are
used only where a check shows them exact; otherwise the whole network is evaluated.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_probes.core.nad.evaluator import ChunkEvaluator, GradientEstimator, network_state
from lightning_probes.core.nad.evaluator import (  # re-exported: `core.nad` is its public home
    input_gradient_energy as input_gradient_energy,
)
from lightning_probes.functional.nad import SVDMethod, principal_axes

ProgressFn = Callable[[int, int], None]
"""``(networks done, total) -> None``, called after each chunk of networks."""

ModelFactory = Callable[[], nn.Module]


@dataclass
class NADResult:
    """NADs of an architecture (:func:`neural_anisotropy_directions`).

    Attributes:
        directions: ``(k, *input_shape)`` orthonormal NADs, by decreasing singular value.
        singular_values: ``(k,)`` the NAD spectrum (singular values of the centred gradients).
        explained_variance: ``(k,)`` ``singular_values**2 / (num_networks - 1)``.
        explained_variance_ratio: ``(k,)`` share of the gradients' total variance.
        eval_point: ``(*input_shape)`` the evaluation point :math:`x_0`.
        num_networks: Number of random networks ``m``.
        method: ``"secant"`` or ``"autograd"``.
    """

    directions: Tensor
    singular_values: Tensor
    explained_variance: Tensor
    explained_variance_ratio: Tensor
    eval_point: Tensor
    num_networks: int
    method: str


def neural_anisotropy_directions(
    model_factory: ModelFactory,
    input_shape: Sequence[int],
    *,
    num_networks: int,
    method: GradientEstimator = "secant",
    step: float = 100.0,
    eval_point: Tensor | None = None,
    k: int | None = None,
    generator: torch.Generator | None = None,
    svd: SVDMethod = "auto",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    max_memory_bytes: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | ProgressFn = False,
) -> NADResult:
    r"""NADs of the architecture that ``model_factory`` builds (Ortiz-Jiménez et al., 2020).

    Computes the ``(m, d)`` gradients with :func:`network_gradients` and their mean-centred
    PCA with :func:`~lightning_probes.functional.nad.principal_axes`.

    Args:
        model_factory: ``() -> nn.Module``, a freshly initialised network on each call (its
            parameters and buffers are copied at once, so it may return the same module
            re-initialised). Its forward takes ``(batch, *input_shape)``.
        input_shape: Shape of one input, e.g. ``(1, 32, 32)`` or ``(64,)``.
        num_networks: Number of random networks ``m`` (the paper: 10,000).
        method: ``"secant"`` (the authors' central differences) or ``"autograd"``.
        step: Step :math:`h` of the central differences (the authors': 100).
        eval_point: :math:`x_0` of shape ``input_shape``; default a standard-normal draw.
        k: Number of NADs to return (default ``min(m - 1, d)``: mean-centring leaves rank
            ``m - 1``, so with ``m <= d`` a further axis would be arbitrary).
        generator: Makes the result reproducible: :math:`x_0`, the output projection and the
            seed of the networks' initialisation are drawn from it, and the factory runs under
            a forked, re-seeded global RNG, which is restored afterwards. ``None`` draws one
            seed from the global RNG.
        svd: PCA solver, see :func:`~lightning_probes.functional.nad.principal_axes`.
        chunk_size: Networks evaluated together by one vmapped call (default 1 on CPU, where
            cache-sized input blocks are what pays off, and 128 on GPU).
        memory_budget: Bytes of activations per call (default 32 MiB on CPU, 64 MiB there
            with the secant shortcut of :mod:`~lightning_probes.core.nad.local`, 1 GiB on GPU).
        max_memory_bytes: Cap on the bytes the networks of one chunk hold, which lowers
            ``chunk_size`` (see :func:`network_gradients`).
        device: Where to evaluate (default: where the factory's networks live).
        progress: Show a progress bar on stderr, or a ``(done, total) -> None`` callable
            called after each chunk of networks (e.g. a Lightning-friendly reporter).

    Returns:
        The :class:`NADResult`.

    Raises:
        ValueError: For invalid arguments (see :func:`network_gradients`) or ``k`` out of range.

    Example:
        >>> nads = neural_anisotropy_directions(
        ...     lambda: nn.Linear(4, 1), (4,), num_networks=100,
        ...     generator=torch.Generator().manual_seed(0))
        >>> nads.directions.shape, nads.singular_values.shape
        (torch.Size([4, 4]), torch.Size([4]))
    """
    generator = generator if generator is not None else _generator_from_global_rng()
    grads, x0 = network_gradients(
        model_factory,
        input_shape,
        num_networks=num_networks,
        method=method,
        step=step,
        eval_point=eval_point,
        generator=generator,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        max_memory_bytes=max_memory_bytes,
        device=device,
        progress=progress,
    )
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device="cpu"))
    # centring leaves rank m - 1: with m <= d the m-th axis would be arbitrary
    k = min(grads.shape[0] - 1, grads.shape[1]) if k is None else k
    axes = principal_axes(grads, k, svd=svd, seed=seed)
    return NADResult(
        directions=axes.directions.reshape(-1, *x0.shape),
        singular_values=axes.singular_values,
        explained_variance=axes.explained_variance,
        explained_variance_ratio=axes.explained_variance_ratio,
        eval_point=x0,
        num_networks=num_networks,
        method=method,
    )


def network_gradients(
    model_factory: ModelFactory,
    input_shape: Sequence[int],
    *,
    num_networks: int,
    method: GradientEstimator = "secant",
    step: float = 100.0,
    eval_point: Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    max_memory_bytes: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | ProgressFn = False,
) -> tuple[Tensor, Tensor]:
    r"""Input gradients of ``num_networks`` random networks at one point: the rows NADs come from.

    Network ``j`` is the ``j``-th call of ``model_factory`` after the global RNG was seeded
    from ``generator``, so the result does not depend on ``chunk_size`` or
    ``memory_budget``. A network with several outputs is reduced to one scalar by a fixed
    random unit vector :math:`u` (drawn once from ``generator``): for a last layer
    :math:`W h + b` with i.i.d. zero-mean entries, :math:`u^\top(Wh + b) = (W^\top u)^\top h +
    u^\top b` is a single-output head whose weights are zero-mean, uncorrelated and of the same
    variance (:math:`\lVert u\rVert = 1`) and independent of :math:`h`, so the gradients'
    covariance :math:`\mathbb E[J_h^\top w w^\top J_h] = \sigma^2\,\mathbb E[J_h^\top J_h]`, and
    with it the NADs, are those of the architecture with one output (the authors' setting).

    Args:
        model_factory: ``() -> nn.Module``, see :func:`neural_anisotropy_directions`.
        input_shape: Shape of one input.
        num_networks: Number of random networks ``m``.
        method: ``"secant"`` (central differences) or ``"autograd"``.
        step: Step of the central differences.
        eval_point: :math:`x_0` (default: standard normal from ``generator``).
        generator: Source of :math:`x_0`, :math:`u` and the initialisation seed.
        chunk_size: Networks evaluated together.
        memory_budget: Bytes of activations per vmapped call.
        max_memory_bytes: Cap on the bytes the networks of one chunk hold: their parameters
            and buffers counted twice (each network's copy, then the chunk's stack), so a
            chunk has at most ``max_memory_bytes // (2 * network bytes)`` networks (at least
            one). Default: on a CUDA device a quarter of its free memory when the evaluation
            starts (``chunk_size=128`` of a 100 MB network would otherwise hold about 26 GB);
            elsewhere no cap. The activations (``memory_budget``) come on top.
        device: Where to evaluate.
        progress: Show a progress bar, or a ``(done, total) -> None`` callable called
            after each chunk of networks.

    Returns:
        ``(gradients (m, d), eval_point (*input_shape))``, in the networks' dtype and device.

    Raises:
        ValueError: If ``num_networks < 2``, ``step <= 0``, ``method`` is unknown or
            ``eval_point`` does not have ``input_shape``.
    """
    shape = tuple(int(s) for s in input_shape)
    if not isinstance(num_networks, int) or isinstance(num_networks, bool) or num_networks < 2:
        raise ValueError(f"Expected `num_networks` to be an int >= 2, got {num_networks!r}.")
    if method not in ("secant", "autograd"):
        raise ValueError(f"`method` can be 'secant' or 'autograd', got {method!r}.")
    if not step > 0:
        raise ValueError(f"Expected `step` to be a positive float, got {step!r}.")
    if eval_point is not None and tuple(eval_point.shape) != shape:
        raise ValueError(
            f"Expected `eval_point` to have `input_shape` {shape}, got {tuple(eval_point.shape)}."
        )
    generator = generator if generator is not None else _generator_from_global_rng()
    x0 = (
        torch.randn(shape, generator=generator, device="cpu")
        if eval_point is None
        else eval_point.detach()
    )
    proj_seed, init_seed = (
        int(torch.randint(0, 2**62, (1,), generator=generator, device="cpu")) for _ in "ab"
    )
    out: Tensor | None = None  # (m, d), filled chunk by chunk: no list + concatenation
    filled = 0
    with _seeded_global_rng(init_seed), _progress(num_networks, progress) as advance:
        template = model_factory()
        pending = [network_state(template)]
        evaluator = ChunkEvaluator(template, x0, method, step, proj_seed, device)
        chunk = chunk_size or evaluator.default_chunk_size
        cap = max_memory_bytes if max_memory_bytes is not None else _default_cap(evaluator.device)
        if cap is not None:
            chunk = max(1, min(chunk, cap // max(1, 2 * _state_bytes(pending[0]))))
        evaluator.plan(chunk, memory_budget)
        made = 1
        while pending:
            while len(pending) < chunk and made < num_networks:
                pending.append(network_state(model_factory()))
                made += 1
            rows = evaluator(pending)
            if out is None:
                out = rows.new_empty((num_networks, *rows.shape[1:]))
            out[filled : filled + rows.shape[0]] = rows
            filled += rows.shape[0]
            advance(len(pending))
            pending = [network_state(model_factory())] if made < num_networks else []
            made += len(pending)
    assert out is not None and filled == num_networks
    return out, evaluator.x0


def fresh_network_factory(model: nn.Module) -> ModelFactory:
    """A factory of freshly initialised copies of ``model``'s architecture.

    ``model`` is deep-copied once (it is never modified); each call re-initialises the copy by
    calling ``reset_parameters()`` on every submodule that has one (in ``modules()`` order,
    drawing from the global RNG, which :func:`network_gradients` seeds and restores) and
    returns it. Parameters owned by modules without ``reset_parameters`` keep their values in
    every network (a warning names them).

    Args:
        model: The network whose architecture to sample (e.g. the model being trained).

    Returns:
        ``() -> nn.Module`` for :func:`neural_anisotropy_directions` (always the same module,
        re-initialised; its parameters are copied at each call).

    Raises:
        ValueError: If no submodule of ``model`` has ``reset_parameters()``.
    """
    template = copy.deepcopy(model)
    resettable = [m for m in template.modules() if callable(getattr(m, "reset_parameters", None))]
    if not resettable:
        raise ValueError(
            f"Expected `{type(model).__name__}` to have submodules with `reset_parameters()` "
            "to draw random networks from, got none. Pass `model_factory=` instead."
        )
    covered = {id(p) for m in resettable for p in m.parameters(recurse=False)}
    fixed = [name for name, p in template.named_parameters() if id(p) not in covered]
    if fixed:
        warnings.warn(
            f"{len(fixed)} parameters ({', '.join(fixed[:5])}{', ...' if len(fixed) > 5 else ''}) "
            "belong to modules without `reset_parameters()` and keep their current values in "
            "every random network. Pass `model_factory=` to re-initialise them too.",
            stacklevel=2,
        )

    def factory() -> nn.Module:
        for module in resettable:
            module.reset_parameters()  # type: ignore[operator]
        return template

    return factory


def _state_bytes(state: tuple[dict[str, Tensor], dict[str, Tensor]]) -> int:
    """Bytes of one network's parameters and buffers."""
    return sum(t.numel() * t.element_size() for part in state for t in part.values())


def _default_cap(device: torch.device) -> int | None:
    """A quarter of the free memory of a CUDA ``device``; ``None`` (no cap) elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free) // 4


def _generator_from_global_rng() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), device="cpu")))


@contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def _progress(total: int, enabled: bool | ProgressFn) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    if callable(enabled):
        done = [0]

        def call(n: int) -> None:
            done[0] += n
            enabled(done[0], total)

        yield call
        return
    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def report(n: int) -> None:
            done[0] += n
            print(f"NADs: {done[0]}/{total} networks", file=sys.stderr, flush=True)

        yield report
        return
    bar = tqdm(total=total, desc="NADs", unit="net", file=sys.stderr)
    try:
        yield bar.update
    finally:
        bar.close()
