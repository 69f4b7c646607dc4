import pytest
import torch
from conftest import TinyClassifier, make_loader, make_trainer

import lightning_probes as lp
from lightning_probes.core.data import ProbeSet


@pytest.mark.parametrize("probe", ["ablation", "cka"])
def test_a_nan_probe_sample_stops_fit_at_start_naming_it(tmp_path, probe):
    """One NaN sample used to give finite, contaminated AUCs (ablation) or a misleading
    `eigh` error (CKA); now fit stops before the first step and names the sample."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    x[7, 2] = float("nan")
    make = {"ablation": lp.AblationAUCCallback, "cka": lp.LayerCKACallback}[probe]
    trainer = make_trainer(tmp_path, [make(probe_data=(x, y), every_n_steps=1)], max_steps=2)
    with pytest.raises(ValueError, match=r"1 probe sample\(s\) hold NaN .*indices 7 "):
        trainer.fit(TinyClassifier(), make_loader())
    assert trainer.global_step == 0


def test_nonfinite_samples_of_structured_inputs():
    from lightning_probes.callbacks.checks import nonfinite_samples

    ids = torch.zeros(4, 3, dtype=torch.long)
    emb = torch.zeros(4, 2)
    emb[2, 1] = float("inf")
    targets = torch.zeros(4)
    targets[0] = float("nan")
    assert nonfinite_samples(ProbeSet({"ids": ids, "emb": emb}, targets)) == [0, 2]
    assert nonfinite_samples(ProbeSet((ids,), None)) == []
