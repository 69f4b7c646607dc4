"""Every probe under ``precision="bf16-true"``, ``"16-true"``, ``"64-true"`` and ``"bf16-mixed"``.

One fit per precision with all six probes attached (each runs at step 2, the landscape probe
at steps 1 and 2); every logged value is compared with a float64 reference written here and
computed from the recorded weights *as trained* (bf16/fp16 values upcast): the probes compute
in float32 or wider whatever the training precision. Under ``"bf16-mixed"`` the weights are
float32 and autocast must be off inside the probes. A second test checks that training is the
same, bit for bit, with and without the probes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyClassifier, make_loader, make_trainer, parameters_and_optimizer_state
from probe_zoo import ZOO
from reference import reference_kernels
from torch import nn
from torch.func import functional_call, grad, jacrev

import lightning_probes as lp
from lightning_probes.callbacks import landscape as landscape_module
from lightning_probes.core.nad import fresh_network_factory, neural_anisotropy_directions

PRECISIONS = ("bf16-true", "16-true", "64-true", "bf16-mixed")
WEIGHTS = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
N, SPLITS, TOP = 24, 4, 2


class Weights(pl.Callback):
    """The weights as trained: at the start, before each optimizer step, after each step."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def snap(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in module.named_parameters()}

    def on_train_start(self, trainer, pl_module):
        self.start = self.snap(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before[trainer.global_step + 1] = self.snap(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = self.snap(pl_module)


def probes() -> dict[str, pl.Callback]:
    common = {"probe_size": N, "on_error": "raise", "max_overhead": None}
    return {
        "lca": lp.LossContributionCallback(
            every_n_steps=2, method="simpson", splits=SPLITS, **common
        ),
        "cka": lp.LayerCKACallback(every_n_steps=2, **common),
        "ablation": lp.AblationAUCCallback(
            every_n_steps=2, num_orderings=3, num_points=5, **common
        ),
        "selectivity": lp.SelectivityCallback(every_n_steps=2, **common),
        "nad": lp.NADCallback(every_n_steps=2, num_networks=16, top_k=TOP, **common),
        "landscape": lp.LandscapeCallback(
            every_n_steps=1, plane_resolution=3, keep_checkpoints=1, segment_points=3, **common
        ),
    }


def fit(tmp_path, precision, callbacks):
    pl.seed_everything(0, verbose=False)
    module = TinyClassifier()
    trainer = make_trainer(tmp_path, callbacks, max_steps=2, precision=precision)
    trainer.fit(module, make_loader())
    return trainer, module


@pytest.fixture(scope="module", params=PRECISIONS)
def run(request, tmp_path_factory):
    """One fit with every probe (the planes the landscape probe draws are kept too)."""
    planes = []
    record, cbs = Weights(), probes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            landscape_module,
            "log_plane",
            lambda tr, key, kind, plane, **kw: planes.append((tr.global_step, kind, plane)),
        )
        trainer, _ = fit(tmp_path_factory.mktemp("fit"), request.param, [record, *cbs.values()])
    return request.param, trainer.logger, record, cbs, planes


def net_at(weights):
    """A float64 TinyClassifier in eval mode holding ``weights`` (upcast)."""
    net = TinyClassifier().double().eval()
    with torch.no_grad():
        for k, p in net.named_parameters():
            p.copy_(weights[k].double())
    return net


def one(logger, key):
    values = logger.values_of(key)
    assert len(values) == 1, key
    return values[0]


def data_of(cb, precision):
    return cb.probe_set.inputs.double(), cb.probe_set.targets


def test_weights_trained_in_the_precision_and_probe_inputs_in_the_computation_dtype(run):
    precision, _, record, cbs, _ = run
    assert {v.dtype for v in record.after[2].values()} == {WEIGHTS.get(precision, torch.float32)}
    computation = torch.float64 if precision == "64-true" else torch.float32
    assert {cb.probe_set.inputs.dtype for cb in cbs.values()} == {computation}


def test_lca_sums_to_the_float64_loss_change_of_the_trained_weights(run):
    precision, logger, record, cbs, _ = run
    x, y = data_of(cbs["lca"], precision)
    net = net_at(record.after[2])
    before = {k: v.double() for k, v in record.before[2].items()}
    after = {k: v.double() for k, v in record.after[2].items()}

    def loss(p):
        return nn.functional.cross_entropy(functional_call(net, p, (x,)), y)

    simpson = [1.0] + [4.0 if j % 2 else 2.0 for j in range(1, SPLITS)] + [1.0]
    lc = {k: torch.zeros_like(v) for k, v in before.items()}
    for j, w in enumerate(simpson):
        g = grad(loss)({k: before[k] + j / SPLITS * (after[k] - before[k]) for k in before})
        for k in lc:
            lc[k] += w / (3 * SPLITS) * g[k] * (after[k] - before[k])
    true = float(loss(after) - loss(before))
    assert abs(true) > 1e-4  # a real step, far above float32 rounding of the loss
    key = "probes/lca/"
    assert one(logger, key + "true_delta_loss") == pytest.approx(true, abs=1e-6)
    assert one(logger, key + "lc") == pytest.approx(
        sum(float(v.sum()) for v in lc.values()), abs=1e-6
    )
    for layer in ("net.0", "net.3", "net.5"):
        want = sum(float(v.sum()) for k, v in lc.items() if k.startswith(layer + "."))
        assert one(logger, f"{key}{layer}/lc") == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_cka_matches_float64_kernels_of_the_trained_weights(run):
    precision, logger, record, cbs, _ = run
    x, y = data_of(cbs["cka"], precision)
    net = net_at(record.after[2])
    kernels = reference_kernels(net, x, ["net.0", "net.3", "net.5"])
    n, o = len(y), 3
    center = torch.kron(torch.eye(n) - 1.0 / n, torch.eye(o)).double()
    onehot = nn.functional.one_hot(y, o).double()
    labels = (onehot - onehot.mean(0)).reshape(-1)
    for name, k in kernels.items():
        kc = center @ k @ center
        alignment = labels @ kc @ labels / (kc.norm() * labels.dot(labels))
        rank = kc.square().sum() / torch.linalg.eigvalsh(kc).abs().max() ** 2
        got = {
            q: one(logger, f"probes/cka/{name}/{q}") for q in ("alignment", "trace", "stable_rank")
        }
        assert got["alignment"] == pytest.approx(float(alignment), rel=1e-4)
        assert got["trace"] == pytest.approx(float(k.trace()), rel=1e-5)
        assert got["stable_rank"] == pytest.approx(float(rank), rel=2e-4)


def hidden(net, x):
    """The two ReLU layers' outputs of a TinyClassifier, by hand."""
    h1 = torch.relu(net.net[0](x))
    return h1, torch.relu(net.net[3](h1))


def test_ablation_matches_a_hand_written_float64_forward(run):
    precision, logger, record, cbs, _ = run
    x, y = data_of(cbs["ablation"], precision)
    net, curve = net_at(record.after[2]), cbs["ablation"].last_curve
    acc = torch.zeros(curve.accuracy.shape, dtype=torch.float64)
    with torch.no_grad():
        for r, order in enumerate(curve.orderings):
            for i, m in enumerate(curve.counts):
                keep = torch.ones(32, dtype=torch.float64)
                keep[order[: int(m)]] = 0.0
                h1 = torch.relu(net.net[0](x)) * keep[:16]
                h2 = torch.relu(net.net[3](h1)) * keep[16:]
                acc[r, i] = (net.net[5](h2).argmax(-1) == y).double().mean()
    assert torch.equal(curve.accuracy.double(), acc)
    mean = acc.mean(0).numpy()
    auc = np.trapezoid(mean, curve.counts.double().numpy() / 32)
    assert one(logger, "probes/ablation/auc") == pytest.approx(auc, abs=1e-12)
    assert one(logger, "probes/ablation/accuracy") == pytest.approx(mean[0], abs=1e-12)


def test_selectivity_matches_float64_class_means(run):
    precision, logger, record, cbs, _ = run
    x, y = data_of(cbs["selectivity"], precision)
    with torch.no_grad():
        activity = dict(zip(("net.0", "net.3"), hidden(net_at(record.after[2]), x)))
    for layer, a in activity.items():
        means = torch.stack([a[y == c].mean(0) for c in range(3)])  # every class is present
        top = means.max(0).values
        rest = (means.sum(0) - top) / 2
        si = torch.where(top + rest > 0, (top - rest) / (top + rest), torch.zeros_like(top))
        torch.testing.assert_close(
            cbs["selectivity"].last_selectivity[layer].double(), si, rtol=1e-5, atol=1e-6
        )
        got = one(logger, f"probes/selectivity/{layer}/mean")
        assert got == pytest.approx(float(si.mean()), rel=1e-5)


def test_nad_basis_is_the_architectures_and_energies_match_float64(run):
    precision, logger, record, cbs, _ = run
    cb = cbs["nad"]
    x, _ = data_of(cb, precision)
    # the basis: NADs of fresh networks of the architecture in the probes' dtype
    dtype = torch.float64 if precision == "64-true" else torch.float32
    ref = neural_anisotropy_directions(
        fresh_network_factory(TinyClassifier().to(dtype)),
        (8,),
        num_networks=16,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(cb.nads.singular_values, ref.singular_values)
    torch.testing.assert_close(cb.nads.directions, ref.directions)
    u = cb.nads.directions.double()
    net = net_at(record.after[2])
    jac = torch.stack([jacrev(lambda z: net(z[None])[0])(xi) for xi in x])  # [n, o, d]
    grad_e = torch.stack([(jac @ ui).square().sum(-1).mean() for ui in u])
    data_e = torch.stack([(x @ ui).square().mean() for ui in u])
    share = grad_e[:TOP].sum() / jac.square().sum((1, 2)).mean()
    assert one(logger, "probes/nad/grad_energy_share_top") == pytest.approx(float(share), rel=1e-5)
    data_share = data_e[:TOP].sum() / x.square().sum(1).mean()
    assert one(logger, "probes/nad/data_energy_share_top") == pytest.approx(
        float(data_share), rel=1e-6
    )


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_landscape_matches_float64_geometry_losses_and_planes(run):
    precision, logger, record, cbs, planes = run
    x, y = data_of(cbs["landscape"], precision)

    def flat(weights):
        return torch.cat([v.double().reshape(-1) for v in weights.values()])

    def loss(weights):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(net_at(weights)(x), y))

    now, init, before = flat(record.after[2]), flat(record.start), flat(record.before[2])
    key = "probes/landscape/"
    got = {
        k: logger.values_of(key + k)[-1]
        for k in (
            "radius",
            "distance_from_init",
            "angle_from_init",
            "init_radial_cosine",
            "update_radial_cosine",
            "loss",
        )
    }
    assert got["radius"] == pytest.approx(float(now.norm()), rel=1e-6)
    assert got["distance_from_init"] == pytest.approx(float((now - init).norm()), rel=1e-5)
    angle = math.degrees(math.acos(min(1.0, cosine(now, init))))
    assert got["angle_from_init"] == pytest.approx(angle, rel=1e-4)
    assert got["init_radial_cosine"] == pytest.approx(cosine(now - init, init), abs=1e-5)
    assert got["update_radial_cosine"] == pytest.approx(cosine(now - before, before), abs=1e-5)
    assert got["loss"] == pytest.approx(loss(record.after[2]), rel=1e-6)
    # the segment from the weights kept at step 1 (in the training dtype) to those of step 2
    mid = loss(
        {k: (record.after[1][k].double() + v.double()) / 2 for k, v in record.after[2].items()}
    )
    assert logger.values_of(key + "segment_midpoint_loss_lag1")[-1] == pytest.approx(mid, rel=1e-6)
    kept = cbs["landscape"].state_dict()["kept"][-1]
    assert {v.dtype for v in kept.values()} == {record.after[2]["net.0.weight"].dtype}
    # planes at step 2: the centre is the current loss, the radial plane reaches the origin
    # (zero weights: zero logits, loss ln 3)
    drawn = {kind: plane for step, kind, plane in planes if step == 2}
    for kind, plane in drawn.items():
        assert float(plane.losses[1, 1]) == pytest.approx(got["loss"], rel=1e-6), kind
    assert float(drawn["radial"].losses[1, 0]) == pytest.approx(math.log(3), rel=1e-6)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_training_is_bit_identical_with_and_without_the_probes(tmp_path, precision):
    trainer_a, module_a = fit(tmp_path / "a", precision, [])
    trainer_b, module_b = fit(tmp_path / "b", precision, list(probes().values()))
    a = parameters_and_optimizer_state(trainer_a, module_a)
    b = parameters_and_optimizer_state(trainer_b, module_b)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert {p.dtype for p in module_b.parameters()} == {WEIGHTS[precision]}
    assert all(p.grad is None or p.grad.dtype == WEIGHTS[precision] for p in module_b.parameters())


class SelfCasting(TinyClassifier):
    """Trains in float32, but its forward computes in bfloat16 itself."""

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x)


@pytest.mark.parametrize("name", list(ZOO))
def test_a_forward_that_computes_in_bf16_itself_is_refused_at_fit_start(tmp_path, name):
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [ZOO[name](max_overhead=None)], max_steps=2)
    with pytest.raises(ValueError, match=r"precision='32-true' the model returns torch.bfloat16"):
        trainer.fit(SelfCasting(), make_loader())
    assert trainer.global_step == 0
