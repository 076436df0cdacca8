"""A small image classifier (two convolutions on synthetic images) for tests and benchmarks.

Fast enough that a whole-split gradient evaluation takes milliseconds, which is where the
replay engine's own per-step and per-run costs show: the benchmarks of target 1 and 2 use it.
Images are class prototypes plus noise, drawn from a seeded generator, so the task is a pure
function of its arguments.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN:
    """``TinyCNN(seed=0, size=16, channels=8, classes=10, train_size=512, test_size=128)``.

    Model: Conv(3→c, 3×3) → ReLU → MaxPool 2 → Conv(c→2c, 3×3) → ReLU → global mean → Linear
    (2c → classes); images (3, size, size).
    """

    eval_batch_size = 256

    def __init__(self, seed: int = 0, size: int = 16, channels: int = 8, classes: int = 10,
                 train_size: int = 512, test_size: int = 128):
        self.seed, self.size, self.channels, self.classes = seed, size, channels, classes
        g = torch.Generator().manual_seed(seed)
        protos = torch.randn(classes, 3, size, size, generator=g)
        self._splits = {}
        for name, n in (("train", train_size), ("valid", test_size), ("test", test_size)):
            y = torch.randint(0, classes, (n,), generator=g)
            x = protos[y] + torch.randn(n, 3, size, size, generator=g) * 2.0
            self._splits[name] = [(x[i], int(y[i])) for i in range(n)]

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng():   # deterministic init without touching the caller's RNG
            torch.manual_seed(self.seed)
            c = self.channels
            return nn.Sequential(
                nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, self.classes))

    def datasets(self):
        return self._splits

    def collate(self, items):
        x = torch.stack([item[0] for item in items])    # (B, 3, size, size)
        y = torch.tensor([item[1] for item in items])   # (B,)
        return x, y

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="sum"), y.numel()
