r"""Embeddings ``nn.Embedding``: a lookup :math:`z_{it} = W_{x_{it}}`.

Not an affine map of a floating-point input.

The probes need little of it beyond the defaults: it looks up each id alone, so its ids may
come sequence-first (:meth:`EmbeddingOps.moves_samples`); its tangent kernel comes from per-sample
gradients with :mod:`torch.func` (:mod:`lightning_probes.core.kernels.func`), it is no
ablation shortcut (its units keep the default axis 1, as for any layer not declared
otherwise), and the landscape planes and the NAD shortcuts run it in the full forward pass.
The entry exists so that the registry names every layer family the probes meet.
"""

from __future__ import annotations

from torch import nn

from lightning_probes.core.modules.ops import LayerOps


class EmbeddingOps(LayerOps):
    """``nn.Embedding``: the general paths of every probe."""

    def moves_samples(self, module: nn.Module, axis: int, ndim: int) -> bool:
        """Any axis of the ids (all but the output's last): each id is looked up alone."""
        return 0 <= axis < ndim - 1
