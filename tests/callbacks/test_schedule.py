import pytest

from lightning_probes.callbacks.schedule import ProbeSchedule

DEFAULT = {"every_n_steps": 7}


def test_steps_with_start():
    s = ProbeSchedule.create(10, None, None, 5, DEFAULT)
    assert [t for t in range(1, 40) if s.runs_at_step(t)] == [5, 15, 25, 35]


def test_at_steps_are_sorted_and_deduplicated():
    s = ProbeSchedule.create(None, None, [100, 1, 10, 10], 0, DEFAULT)
    assert s.at_steps == (1, 10, 100)
    assert [t for t in range(200) if s.runs_at_step(t)] == [1, 10, 100]


def test_default_used_when_nothing_given():
    s = ProbeSchedule.create(None, None, None, 0, DEFAULT)
    assert s.every_n_steps == 7 and s.step_based


def test_epochs():
    s = ProbeSchedule.create(None, 2, None, 0, DEFAULT)
    assert not s.step_based
    assert [e for e in range(6) if s.runs_at_epoch_end(e, step=100)] == [1, 3, 5]
    assert not ProbeSchedule.create(None, 1, None, 50, DEFAULT).runs_at_epoch_end(0, step=10)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1, 1, None, 0), "exactly one of `every_n_steps`, `every_n_epochs`, `at_steps`"),
        ((0, None, None, 0), "Expected `every_n_steps` to be a positive int, got 0"),
        ((None, -1, None, 0), "Expected `every_n_epochs` to be a positive int, got -1"),
        ((None, None, [], 0), "Expected `at_steps` to be a non-empty list"),
        ((None, None, [0], 0), "Expected `at_steps` to be a non-empty list of steps >= 1"),
        ((5, None, None, -1), "Expected `start_step` to be an int >= 0, got -1"),
        ((2.5, None, None, 0), "Expected `every_n_steps` to be a positive int, got 2.5"),
    ],
)
def test_invalid(args, match):
    with pytest.raises(ValueError, match=match):
        ProbeSchedule.create(*args, DEFAULT)
