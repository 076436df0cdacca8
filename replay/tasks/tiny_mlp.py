"""A tiny classification task (an MLP on Gaussian blobs) for tests, examples and benchmarks.

Small enough that a brute-force float64 LCA over every parameter is cheap, yet a real Task:
a model with weights and biases in several layers, three splits, a sum-reduced loss.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyMLP:
    """``TinyMLP(seed=0, features=8, hidden=16, classes=4, train_size=256, test_size=64)``."""

    eval_batch_size = 64

    def __init__(self, seed: int = 0, features: int = 8, hidden: int = 16, classes: int = 4,
                 train_size: int = 256, test_size: int = 64, depth: int = 2):
        self.seed, self.features, self.hidden = seed, features, hidden
        self.classes, self.depth = classes, depth
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(classes, features, generator=g) * 2.0
        self._splits = {}
        for name, size in (("train", train_size), ("valid", test_size), ("test", test_size)):
            y = torch.randint(0, classes, (size,), generator=g)
            x = centers[y] + torch.randn(size, features, generator=g) * 1.5
            self._splits[name] = [(x[i], int(y[i])) for i in range(size)]

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng():  # deterministic init without touching the caller's RNG
            torch.manual_seed(self.seed)
            layers, width = [], self.features
            for _ in range(self.depth):
                layers += [nn.Linear(width, self.hidden), nn.Tanh()]
                width = self.hidden
            layers.append(nn.Linear(width, self.classes))
            return nn.Sequential(*layers)

    def datasets(self):
        return self._splits

    def collate(self, items):
        x = torch.stack([item[0] for item in items])  # (B, features)
        y = torch.tensor([item[1] for item in items])  # (B,)
        return x, y

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)  # (B, classes)
        return nn.functional.cross_entropy(logits, y, reduction="sum"), y.numel()
