"""LCA memory: the number of parameter-sized buffers alive at every gradient evaluation.

Counted independently of the implementation: at each forward pass on the LCA set, every live
tensor the garbage collector can see (plus the ``.grad`` of leaves) with exactly the element
count of one big, distinctively sized weight is found, and its storages are counted, leaving out
the storages the caller owns (the model's weights, their ``.grad``, the optimizer state and the
caller's own θ_t). A buffer added back (a separate gradient copy, a per-step LC buffer next to the
accumulator, a second evaluation point) raises the count.
"""

from __future__ import annotations

import gc

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_probes.callbacks.lca import LossContributionCallback
from lightning_probes.core.data import ProbeSet
from lightning_probes.core.lca import loss_change_allocation, model_loss_and_grad

IN, OUT = 53, 37  # the big weight has 1961 elements; no other tensor here has that many
NUMEL = IN * OUT


_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, OUT), nn.Tanh(), nn.Linear(OUT, 3))


def _storages(numel: int) -> set[int]:
    """Data pointers of every live tensor (and leaf ``.grad``) with ``numel`` elements."""
    # type(): no attribute access on foreign objects (some warn when asked for __class__)
    tensors = [o for o in gc.get_objects() if type(o) in _TENSOR_TYPES]
    tensors += [t.grad for t in tensors if t.is_leaf and t.grad is not None]
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel() == numel}


class _Counter:
    """Forward pre-hook: the most parameter-sized buffers alive beyond ``owned()``."""

    def __init__(self, owned) -> None:
        gc.collect()  # tensors of earlier tests still waiting in reference cycles
        self.owned = owned
        self.counts: list[int] = []

    def __call__(self, module, args) -> None:
        self.counts.append(len(_storages(NUMEL) - self.owned()))


def _problem(seed=0):
    torch.manual_seed(seed)
    net = _net().double()
    data = ProbeSet(torch.randn(20, IN, dtype=torch.float64), torch.randint(0, 3, (20,)))
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    after = {k: v.detach() for k, v in net.named_parameters()}
    return net, data, before, after


def _peak(method, scale=1.0, **kwargs):
    net, data, before, after = _problem()
    if scale != 1.0:
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.copy_(before[k] + scale * (p - before[k]))
    grad_fn = model_loss_and_grad(net, data, chunk_size=10)  # 2 chunks: grads alive between
    start = grad_fn(dict(before))
    owned = {before["0.weight"].data_ptr(), after["0.weight"].data_ptr()}
    counter = _Counter(lambda: owned)
    handle = net.register_forward_pre_hook(counter)
    try:
        res = loss_change_allocation(
            None, before, after, method=method, loss_and_grad=grad_fn, start=start, **kwargs
        )
    finally:
        handle.remove()
    assert len(counter.counts) == 2 * res.grad_evals  # every chunk of every evaluation seen
    return max(counter.counts), res.splits


def test_simpson_holds_two_buffers_besides_its_inputs():
    # accumulator (= the handed-over start gradient) + evaluation point; then accumulator +
    # the kept gradient at θ_{t+1}. A separate gradient copy would make it 3.
    assert _peak("simpson", splits=2) == (2, 2)
    assert _peak("simpson", splits=4) == (2, 4)


def test_first_order_and_adaptive_buffers():
    assert _peak("first_order") == (2, 1)  # accumulator + the kept gradient
    assert _peak("adaptive", tolerance=1.0) == (3, 2)  # + the odd-point accumulator
    # refining: + the kept end gradient next to the evaluation point
    assert _peak("adaptive", scale=8.0, tolerance=1e-9, max_splits=8) == (4, 8)


def test_the_counter_sees_a_fresh_gradient_copy():
    # the same allocation through a loss_and_grad without ``accumulate`` (one copy more): the
    # count must notice it, or the tests above could not fail
    net, data, before, after = _problem()
    base = model_loss_and_grad(net, data, chunk_size=10)

    def plain(params):
        return base(params)

    owned = {before["0.weight"].data_ptr(), after["0.weight"].data_ptr()}
    counter = _Counter(lambda: owned)
    handle = net.register_forward_pre_hook(counter)
    try:
        loss_change_allocation(
            None, before, after, method="simpson", loss_and_grad=plain, start=base(dict(before))
        )
    finally:
        handle.remove()
    assert max(counter.counts) == 3


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class _TrainingGrads(pl.Callback):
    """The storages of the model's ``.grad`` after the step (the probe stashes them away)."""

    def __init__(self) -> None:
        self.ptrs: set[int] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, idx) -> None:
        self.ptrs = set()  # freed by zero_grad: their addresses may be reused

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, idx) -> None:
        self.ptrs = {p.grad.data_ptr() for p in pl_module.parameters() if p.grad is not None}


@pytest.mark.parametrize(("method", "expected"), [("simpson", 4), ("adaptive", 5)])
def test_callback_holds_at_most_four_parameter_copies_with_simpson(tmp_path, method, expected):
    # θ_t + cumulative LC + accumulator (the kept gradient) + evaluation point (adaptive: + the
    # odd-point accumulator); the model's weight, its .grad and the optimizer's momentum are
    # the model's own, not counted
    torch.manual_seed(0)
    module = _Module()
    x, y = torch.randn(64, IN), torch.randint(0, 3, (64,))
    cb = LossContributionCallback(
        method=method, probe_size=20, chunk_size=7, tolerance=1.0, max_overhead=None
    )
    grads = _TrainingGrads()  # runs before the LCA callback's on_train_batch_end
    trainer = make_trainer(tmp_path, [grads, cb], max_steps=3)

    weights = list(module.parameters())  # inside functional_call the module shows other ones

    def owned() -> set[int]:
        ptrs = set(grads.ptrs)
        for p in weights:
            ptrs.add(p.data_ptr())
            if p.grad is not None:
                ptrs.add(p.grad.data_ptr())
        for opt in trainer.optimizers:
            for state in opt.state.values():
                ptrs.update(v.data_ptr() for v in state.values() if isinstance(v, torch.Tensor))
        return ptrs

    counter = _Counter(owned)
    module.net.register_forward_pre_hook(counter)
    log_step = cb._log_step

    def counted_log_step(*args):  # after the allocation: θ_{t+1}, kept gradient, cumulative, LC
        counter(None, None)
        log_step(*args)

    cb._log_step = counted_log_step
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    # steady state: the gradient at θ_{t+1} is reused as the next step's start
    assert cb.history.shape[0] == 3 and cb.grad_evals == 3 + 2 * 2
    assert max(counter.counts) == expected
