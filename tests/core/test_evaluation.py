import pytest
import torch
from torch import nn

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import probe_loss, probe_loss_and_grad


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(23, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (23,))
    return model, ProbeSet(x, y)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 23, 100])
def test_loss_and_grad_match_full_batch_autograd(chunk_size):
    model, data = _setup()
    params = {k: v.detach() * 1.5 for k, v in model.named_parameters()}
    # independent reference: a copy of the model with the weights written in, one full batch
    ref = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    ref.load_state_dict(params)
    ref_loss = nn.functional.cross_entropy(ref(data.inputs), data.targets)
    ref_grads = torch.autograd.grad(ref_loss, list(ref.parameters()))
    loss = probe_loss(model, data, params, chunk_size=chunk_size)
    loss2, grads = probe_loss_and_grad(model, data, params, chunk_size=chunk_size)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss2, ref_loss, rtol=1e-12, atol=1e-12)
    for (name, _), g in zip(ref.named_parameters(), ref_grads):
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-12)
    # the model's own weights and .grad are untouched
    assert not torch.equal(model[0].weight, params["0.weight"])
    assert all(p.grad is None for p in model.parameters())
    # and so are the tensors handed in
    assert all(v.grad is None and not v.requires_grad for v in params.values())


def test_mse_for_float_targets_and_output_fn():
    model, data = _setup()
    targets = torch.randn(23, 3, dtype=torch.float64)
    data = ProbeSet(data.inputs, targets)
    loss = probe_loss(model, data, output_fn=lambda out: out * 2)
    torch.testing.assert_close(loss, ((model(data.inputs) * 2 - targets) ** 2).mean())


def test_errors():
    model, data = _setup()
    with pytest.raises(ValueError, match="with targets"):
        probe_loss(model, ProbeSet(data.inputs, None))
    with pytest.raises(TypeError, match="Pass `output_fn=`"):
        probe_loss(model, data, output_fn=lambda out: {"logits": out})


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_loss_and_grad_accumulate_weighted_into_given_buffers(chunk_size):
    model, data = _setup()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ref = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    ref.load_state_dict(params)
    ref_loss = nn.functional.cross_entropy(ref(data.inputs), data.targets)
    ref_grads = dict(zip(params, torch.autograd.grad(ref_loss, list(ref.parameters()))))
    start = {k: torch.full_like(v, 0.5) for k, v in params.items()}
    # matching buffers are fed in place by autograd; a float32 one (other dtype) by add_
    out = {k: v.clone() for k, v in start.items()}
    out["2.bias"] = out["2.bias"].float()
    kept = {k: v for k, v in out.items()}
    loss, grads = probe_loss_and_grad(
        model, data, params, chunk_size=chunk_size, out=out, weight=4.0
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)  # L, not 4 L
    for k in params:
        assert grads[k] is kept[k]  # the very buffers, no copies
        want = start[k] + 4.0 * ref_grads[k]
        tol = 1e-6 if k == "2.bias" else 1e-10
        torch.testing.assert_close(grads[k], want.to(grads[k].dtype), rtol=tol, atol=tol)


def test_default_loss_token_level_for_sequence_logits():
    """Logits [n, L, V] with targets [n, L]: the mean cross-entropy over every token, written
    out as a loop over tokens in float64 (ignored tokens, -100, excluded)."""
    import math

    from lightning_probes.core.evaluation import default_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 7, (3, 5), generator=g)
    targets[0, 4] = -100
    total, count = 0.0, 0
    for i in range(3):
        for t in range(5):
            if targets[i, t] == -100:
                continue
            row = logits[i, t]
            total += -(row[targets[i, t]] - torch.logsumexp(row, 0)).item()
            count += 1
    assert math.isclose(default_loss(logits, targets).item(), total / count, rel_tol=1e-12)
    # dense prediction keeps classes on axis 1
    dense, labels = (
        torch.randn(2, 4, 3, 6, generator=g),
        torch.randint(0, 4, (2, 3, 6), generator=g),
    )
    want = torch.nn.functional.cross_entropy(dense, labels)
    assert torch.equal(default_loss(dense, labels), want)
    with pytest.raises(ValueError, match="loss_fn="):
        default_loss(torch.randn(2, 6, 6), torch.randint(0, 6, (2, 6)))
