"""Backends inside a probe's scope: TF32 off, cuDNN off for RNNs, the SDPA math kernel, restored.

The flags exist on CPU builds too, so what ``isolated`` sets and restores is checked here; that
the kernels then run (eval-mode RNN backward, Hessians through attention) is checked on CPU where
it applies and on a GPU by tests/test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_probes.core.backends import probe_backends
from lightning_probes.core.isolation import isolated


def _flags() -> dict[str, object]:
    return {
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "precision": torch.get_float32_matmul_precision(),
        "cudnn": torch.backends.cudnn.enabled,
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "math": torch.backends.cuda.math_sdp_enabled(),
    }


@pytest.fixture
def fast_user_settings():
    """A user who allowed TF32 everywhere (what a GPU speed guide suggests); undone after."""
    before = _flags()
    strings = [(o, o.fp32_precision) for o in _precision_objects()]
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision(str(before["precision"]))
    torch.backends.cuda.matmul.allow_tf32 = bool(before["matmul_tf32"])
    torch.backends.cudnn.allow_tf32 = bool(before["cudnn_tf32"])
    for obj, value in strings:
        obj.fp32_precision = value


def _precision_objects() -> list[object]:
    return [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]


def test_isolated_turns_tf32_off_and_restores_the_users_flags(fast_user_settings):
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    before = _flags()
    assert before["matmul_tf32"] and before["cudnn_tf32"] and before["precision"] == "high"
    with isolated(net):
        inside = _flags()
    assert not inside["matmul_tf32"] and not inside["cudnn_tf32"]
    assert inside["precision"] == "highest"
    assert inside["cudnn"] == before["cudnn"]  # no RNN: cuDNN left as it is (convs stay fast)
    assert inside["math"] and not inside["flash"] and not inside["mem_efficient"]
    assert _flags() == before


def test_isolated_disables_cudnn_for_models_with_an_rnn_and_restores_it():
    net = nn.LSTM(3, 4)
    before = _flags()
    with isolated(net):
        assert torch.backends.cudnn.enabled is False
    assert _flags() == before


def test_flags_are_restored_after_an_error(fast_user_settings):
    before = _flags()
    with pytest.raises(RuntimeError, match="boom"), isolated(nn.GRU(2, 2)):
        raise RuntimeError("boom")
    assert _flags() == before


def test_new_api_settings_are_kept_in_the_new_api():
    """A process that set TF32 with PyTorch >= 2.9's strings (its legacy flags then read as an
    error): the probe writes the strings and restores exactly them, never a legacy flag."""
    saved = [(o, o.fp32_precision) for o in _precision_objects()]
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        with pytest.raises(RuntimeError):
            torch.get_float32_matmul_precision()  # mixed: legacy reads refuse
        with probe_backends(rnn=False):
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")
        for obj, value in saved:
            obj.fp32_precision = value
    assert torch.get_float32_matmul_precision() == "highest"


def test_default_settings_read_the_same_through_both_apis_afterwards():
    strings = [o.fp32_precision for o in _precision_objects()]
    with probe_backends(rnn=True):
        pass
    assert [o.fp32_precision for o in _precision_objects()] == strings
    assert torch.get_float32_matmul_precision() == "highest"  # legacy reads still consistent
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_hessian_vector_product_through_attention_works_on_cpu():
    """The CPU's flash kernel has no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); inside
    ``isolated`` the math kernel runs, and gives the math kernel's values."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 24)
    x = torch.randn(2, 5, 8)

    def hvp() -> torch.Tensor:
        q, k, v = lin(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)  # [batch, heads, L, E]
        loss = nn.functional.scaled_dot_product_attention(q, k, v).square().sum()
        (g,) = torch.autograd.grad(loss, lin.weight, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), lin.weight)
        return h

    with isolated(lin):
        got = hvp()
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        expected = hvp()  # the reference: the math kernel, asked for explicitly
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
