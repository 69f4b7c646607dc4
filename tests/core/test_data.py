import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_probes.core.data import (
    ProbeSet,
    default_batch_to_inputs_targets,
    draw_probe_set,
    probe_set_from_tensors,
)


def test_batch_shapes():
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert default_batch_to_inputs_targets(x) == (x, None)
    assert default_batch_to_inputs_targets((x, y)) == (x, y)
    assert default_batch_to_inputs_targets([x]) == (x, None)
    assert default_batch_to_inputs_targets({"input_ids": x, "labels": y}) == (x, y)
    with pytest.raises(
        TypeError, match=r"Expected a dict batch with one of the keys .* got keys \['foo'\]"
    ):
        default_batch_to_inputs_targets({"foo": x})
    with pytest.raises(TypeError, match="got int. Pass `batch_to_inputs_targets=`"):
        default_batch_to_inputs_targets(3)


def test_draw_is_seeded_and_does_not_touch_global_rng():
    ds = TensorDataset(torch.arange(100.0)[:, None], torch.arange(100))
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    a = draw_probe_set(DataLoader(ds, batch_size=7, shuffle=True), 10, seed=5)
    assert torch.equal(torch.rand(2), expected)
    b = draw_probe_set(DataLoader(ds, batch_size=50), 10, seed=5)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.inputs[:, 0].long(), a.targets)
    assert len(a) == 10 and len(set(a.targets.tolist())) == 10
    assert len(draw_probe_set(DataLoader(ds), None)) == 100
    assert len(draw_probe_set(DataLoader(ds), 1000)) == 100


def test_draw_from_iterable_dataset_takes_first_samples():
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(30):
                yield torch.tensor([float(i)]), torch.tensor(i)

    data = draw_probe_set(DataLoader(Stream(), batch_size=4), 10)
    assert data.targets.tolist() == list(range(10))


def test_probe_set_from_dataset_and_device_move():
    ds = TensorDataset(torch.randn(9, 2), torch.arange(9))
    data = probe_set_from_tensors(ds)
    assert torch.equal(data.inputs, ds.tensors[0]) and len(data) == 9
    moved = ProbeSet({"a": data.inputs}, data.targets).to(torch.device("cpu"))
    assert torch.equal(moved.inputs["a"], data.inputs)


def test_empty_probe_data_is_rejected():
    with pytest.raises(ValueError, match="at least one sample, got 0"):
        probe_set_from_tensors(torch.zeros(0, 3))


def test_dict_batches_keep_every_input_key_and_call_with_keywords():
    from lightning_probes.core.data import model_arguments

    ids, mask, y = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5), torch.zeros(2)
    inputs, targets = default_batch_to_inputs_targets(
        {"input_ids": ids, "attention_mask": mask, "labels": y}
    )
    assert set(inputs) == {"input_ids", "attention_mask"} and targets is y
    assert inputs["attention_mask"] is mask
    assert model_arguments(inputs) == ((), {"input_ids": ids, "attention_mask": mask})
    assert model_arguments((ids, mask)) == ((ids, mask), {})
    assert model_arguments(ids)[0][0] is ids
    unlabelled, none = default_batch_to_inputs_targets({"input_ids": ids, "attention_mask": mask})
    assert set(unlabelled) == {"input_ids", "attention_mask"} and none is None


def test_map_tensors_and_tensors_of_walk_nested_structures():
    from lightning_probes.core.data import map_tensors, tensors_of

    a, b = torch.arange(3), torch.ones(3, 2)
    value = {"a": a, "pair": (b, [a]), "n": 7}
    doubled = map_tensors(value, lambda t: t * 2)
    assert doubled["n"] == 7 and isinstance(doubled["pair"][1], list)
    assert torch.equal(doubled["pair"][1][0], a * 2) and torch.equal(doubled["pair"][0], b * 2)
    assert [t.shape for t in tensors_of(value)] == [a.shape, b.shape, a.shape]
    assert tensors_of(3) == []
