"""The stable rank of a narrow layer (P < n·o) from its P x P Gram, past the exact-spectrum size."""

from __future__ import annotations

import torch
from reference import reference_kernels
from torch import nn

from lightning_probes.core.kernels.stats import layer_alignments
from lightning_probes.functional.alignment import center_kernel


def test_narrow_layers_stable_rank_matches_the_full_kernels_spectrum():
    torch.manual_seed(0)
    # fc1: P = 8·40 + 40 = 360 > 128 (block Lanczos on its Gram), n·o = 160·3 = 480 > P
    net = nn.Sequential(nn.Linear(8, 40), nn.Tanh(), nn.Linear(40, 3)).double()
    x = torch.randn(160, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (160,))
    got = layer_alignments(net, x, y, layers=["0"])["0"].stable_rank
    (kernel,) = reference_kernels(net, x, ["0"]).values()
    kc = center_kernel(kernel, 3)
    want = kc.square().sum() / torch.linalg.eigvalsh(kc).abs().max() ** 2
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
