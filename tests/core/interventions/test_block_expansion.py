"""A skip connection around the first point inside a block: only the block runs per mask.

ResNet's downsample branch reads the block input before the first ablation point and adds it
after: the first point's output cannot be expanded alone, but the block's input can, so the
stem runs once per sample (not once per mask) and the numbers stay those of a naive loop.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lightning_probes.core.ablation import ablation_curve
from lightning_probes.core.interventions.selectivity import unit_ablation_impact


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 1, 2), nn.ReLU())
        self.conv = nn.Conv2d(c, 2 * c, 3, 2, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.down(x)  # runs first: the first ablation point
        return self.act(self.conv(x)) + identity


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.block = Block(3)
        self.post = nn.Conv2d(6, 6, 1)
        self.post_act = nn.ReLU()
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(torch.relu(self.stem(x)))
        return self.head(self.post_act(self.post(h)).mean((2, 3)))


LAYERS = ["block.down.0", "post"]  # the block's main branch has no point (as in ResNet)


def naive_accuracy(net: Net, x: torch.Tensor, y: torch.Tensor, ablated: set[int]) -> float:
    """Accuracy with units ``ablated`` (block.down.1's channels, then post_act's) zeroed."""
    handles = []
    for offset, module in ((0, net.block.down[1]), (6, net.post_act)):
        units = [u - offset for u in ablated if offset <= u < offset + 6]

        def hook(mod: nn.Module, a: tuple, o: torch.Tensor, units: list[int] = units):
            o = o.clone()
            o[:, units] = 0.0
            return o

        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        correct = (net(x).argmax(-1) == y).double().mean()
    for h in handles:
        h.remove()
    return float(correct)


def setup() -> tuple[Net, torch.Tensor, torch.Tensor, list[int]]:
    torch.manual_seed(0)
    net = Net().double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (12,))
    seen: list[int] = []
    net.stem.register_forward_hook(lambda m, a, o: seen.append(o.shape[0]))
    return net, x, y, seen


def test_curve_expands_the_block_input_and_equals_a_naive_loop():
    net, x, y, seen = setup()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*repeating the inputs")  # no fallback
        curve = ablation_curve(
            net, x, y, layers=LAYERS, num_orderings=3, fractions=torch.linspace(0, 1, 5),
            generator=torch.Generator().manual_seed(2),
        )  # fmt: skip
    assert max(seen) <= len(x)  # the stem never ran on the expanded batch
    for r, order in enumerate(curve.orderings):
        for k, count in enumerate(curve.counts):
            expected = naive_accuracy(net, x, y, set(order[: int(count)].tolist()))
            assert float(curve.accuracy[r, k]) == expected


def test_single_unit_importance_expands_the_block_input():
    net, x, y, seen = setup()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*repeating the inputs")
        impact = unit_ablation_impact(net, x, y, layers=LAYERS)
    assert max(seen) <= len(x)
    with torch.no_grad():
        base = nn.functional.cross_entropy(net(x), y)
    for layer, module in ((LAYERS[0], net.block.down[1]), (LAYERS[1], net.post_act)):
        for u in range(6):
            h = module.register_forward_hook(
                lambda m, a, o, u=u: o.index_fill(1, torch.tensor([u]), 0.0)
            )
            with torch.no_grad():
                loss = nn.functional.cross_entropy(net(x), y)
            h.remove()
            torch.testing.assert_close(
                impact[layer][u], (loss - base).double(), rtol=1e-9, atol=1e-12
            )
