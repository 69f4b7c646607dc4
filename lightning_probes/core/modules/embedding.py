r"""Embeddings ``nn.Embedding``: a lookup :math:`z_{it} = W_{x_{it}}`.

Not an affine map of a floating-point input.

The probes need nothing of it beyond the defaults: its tangent kernel comes from per-sample
gradients with :mod:`torch.func` (:mod:`lightning_probes.core.kernels.func`), it is no
ablation shortcut (its units keep the default axis 1, as for any layer not declared
otherwise), and the landscape planes and the NAD shortcuts run it in the full forward pass.
The entry exists so that the registry names every layer family the probes meet.
"""

from __future__ import annotations

from lightning_probes.core.modules.ops import LayerOps


class EmbeddingOps(LayerOps):
    """``nn.Embedding``: the general paths of every probe."""
