"""NADs: ``max_memory_bytes`` bounds the networks a chunk holds (the chunk is sized from it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_probes.core.nad import evaluator as evaluator_module
from lightning_probes.core.nad import network_gradients


def _factory() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1)).double()


NETWORK_BYTES = (10 * 16 + 16 + 16 + 1) * 8  # parameters of one network, float64


def _run(monkeypatch: pytest.MonkeyPatch, **kwargs) -> tuple[torch.Tensor, list[int]]:
    held: list[int] = []  # bytes of the stacked networks of each evaluated chunk
    call = evaluator_module.ChunkEvaluator.__call__

    def recording(self, states):  # type: ignore[no-untyped-def]
        held.append(sum(t.numel() * t.element_size() for s in states for t in s[0].values()))
        return call(self, states)

    monkeypatch.setattr(evaluator_module.ChunkEvaluator, "__call__", recording)
    grads, _ = network_gradients(
        _factory, (10,), num_networks=20, generator=torch.Generator().manual_seed(0), **kwargs
    )
    monkeypatch.undo()
    return grads, held


@pytest.mark.parametrize("networks_in_cap", [1, 3, 7])
def test_memory_cap_sets_the_chunk_and_leaves_the_values(monkeypatch, networks_in_cap):
    """The cap counts each chunk twice (the networks' copies and their stack): a cap of
    ``2 * k`` networks' bytes gives chunks of ``k`` networks, and the same gradients."""
    cap = 2 * networks_in_cap * NETWORK_BYTES
    reference, uncapped = _run(monkeypatch, chunk_size=20)
    assert uncapped == [20 * NETWORK_BYTES]  # the whole chunk at once without a cap
    grads, held = _run(monkeypatch, chunk_size=20, max_memory_bytes=cap)
    assert max(held) <= cap // 2 and max(held) == networks_in_cap * NETWORK_BYTES
    assert sum(held) == 20 * NETWORK_BYTES
    torch.testing.assert_close(grads, reference)  # vmap vs loop: rounding only


def test_a_cap_below_one_network_still_evaluates_one_at_a_time(monkeypatch):
    grads, held = _run(monkeypatch, chunk_size=8, max_memory_bytes=1)
    assert held == [NETWORK_BYTES] * 20
    reference, _ = _run(monkeypatch, chunk_size=1)
    torch.testing.assert_close(grads, reference)  # vmap vs loop: rounding only
