"""Real models from real packages, tiny and built from configs (no download), as LightningModules.

- :func:`gpt2_lm`: HF ``GPT2LMHeadModel`` (``Conv1D`` layers, tied ``lm_head``/``wte``), logits
  ``[n, L, V]`` and token targets ``[n, L]``.
- :func:`bert_classifier`: HF ``BertForSequenceClassification`` fed dict batches with an
  ``attention_mask`` (padding that matters).
- :func:`resnet18`: a torchvision-style ResNet-18 for 3x32x32 inputs (BatchNorm, downsample
  branches, ``ReLU(inplace=True)``), written here as torchvision's ``BasicBlock``.
- :func:`seq_encoder`: ``nn.TransformerEncoder`` in either layout (``batch_first=False`` is
  PyTorch's default, sequence-first), mean-pooled into a classifier.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

VOCAB, SEQ = 48, 12


class _Module(pl.LightningModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class GPT2LM(_Module):
    """``forward(input_ids) -> logits [n, L, V]``; next-token loss on ``labels`` ``[n, L]``."""

    def __init__(self, **config: Any) -> None:
        """``config``: ``GPT2Config`` fields over the tiny defaults (the benchmarks' larger one)."""
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(**{
            "vocab_size": VOCAB, "n_positions": SEQ, "n_embd": 32, "n_layer": 2, "n_head": 2,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **config,
        })  # fmt: skip
        self.model = GPT2LMHeadModel(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


class BertClassifier(_Module):
    """``forward(input_ids, attention_mask) -> logits [n, 3]``, trained on dict batches."""

    def __init__(self, **config: Any) -> None:
        """``config``: ``BertConfig`` fields over the tiny defaults (the benchmarks' larger one)."""
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(**{
            "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": SEQ,
            "num_labels": 3, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            **config,
        })  # fmt: skip
        self.model = BertForSequenceClassification(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits, batch["labels"])


class _DictData(Dataset):
    def __init__(self, items: dict[str, torch.Tensor]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(next(iter(self.items.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.items.items()}


def token_data(
    n: int = 64, seed: int = 0, *, classes: int | None = None
) -> dict[str, torch.Tensor]:
    """Token ids with right padding (lengths 4..SEQ); LM labels or class labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    ids = ids * mask
    if classes is None:
        return {"input_ids": ids, "labels": ids.roll(-1, 1)}
    labels = (ids[:, 0] + ids[:, 1]) % classes
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def dict_loader(items: dict[str, torch.Tensor], batch_size: int = 16) -> DataLoader:
    return DataLoader(_DictData(items), batch_size=batch_size, shuffle=True)


class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock`` (conv-bn-relu-conv-bn, identity or 1x1 downsample)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(_Module):
    """ResNet-18 (2-2-2-2 basic blocks) for 3x32x32 inputs, CIFAR stem; ``width`` scales it."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], w
        for i, cout in enumerate([w, 2 * w, 4 * w, 8 * w]):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def image_loader(n: int = 64, classes: int = 10, batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


class SeqEncoder(_Module):
    """Embedding -> ``nn.TransformerEncoder`` (2 layers) -> mean over positions -> Linear.

    Inputs are token ids ``[n, L]``; with ``batch_first=False`` the encoder sees ``[L, n, d]``.
    """

    def __init__(self, batch_first: bool = False, d: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, d)
        layer = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=batch_first
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h)
        return self.head(h.mean(1 if self.batch_first else 0))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def seq_loader(n: int = 64, classes: int = 3, batch_size: int = 16, seed: int = 0) -> DataLoader:
    data = token_data(n, seed, classes=classes)
    return DataLoader(
        TensorDataset(data["input_ids"], data["labels"]), batch_size=batch_size, shuffle=True
    )
