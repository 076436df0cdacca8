"""A tiny convolutional classifier (torchvision-style ``features`` / ``classifier``) on synthetic
images, for tests, examples, the report's layer-stack figures and the benchmarks of fast
models (a whole-split gradient evaluation takes milliseconds).

Each class is a fixed random 1 × size × size template, smoothed so that convolutions have
structure to find; items are the template plus Gaussian noise, deterministic from ``seed``.
Parameter names follow torchvision's ``Sequential`` models: ``features.0.weight`` (first
convolution), ``features.3.weight`` (second), ``classifier.1.weight`` (the linear head).
"""

from __future__ import annotations

import torch
from torch import nn

from replay.errors import TaskError


class ConvNet(nn.Module):
    """conv(1→c1) → ReLU → max-pool 2 → conv(c1→c2) → ReLU → max-pool 2 → flatten → linear."""

    def __init__(self, size: int, channels: tuple[int, int], classes: int):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2 * (size // 4) ** 2, classes))

    def forward(self, x):  # (B, 1, size, size) -> (B, classes)
        return self.classifier(self.features(x))


class TinyCNN:
    """``TinyCNN(seed=0, size=8, channels=(4, 8), classes=3, train_size=96, test_size=32)``.

    ``channels``: the two convolutions' widths, or one width c for (c, 2c).
    """

    eval_batch_size = 64

    def __init__(self, seed: int = 0, size: int = 8, channels=(4, 8), classes: int = 3,
                 train_size: int = 96, test_size: int = 32, noise: float = 0.8):
        if size % 4:
            raise TaskError(f"TinyCNN: size must be a multiple of 4 (two 2x2 poolings), got {size}")
        self.seed, self.size, self.classes = seed, size, classes
        if isinstance(channels, int):
            channels = (channels, 2 * channels)
        self.channels = (int(channels[0]), int(channels[1]))
        g = torch.Generator().manual_seed(seed)
        raw = torch.randn(classes, 1, size, size, generator=g)
        blur = torch.ones(1, 1, 3, 3) / 9.0
        templates = nn.functional.conv2d(raw, blur, padding=1) * 3.0  # (classes, 1, size, size)
        self._splits = {}
        for name, n in (("train", train_size), ("valid", test_size), ("test", test_size)):
            y = torch.randint(0, classes, (n,), generator=g)
            x = templates[y] + noise * torch.randn(n, 1, size, size, generator=g)
            self._splits[name] = [(x[i], int(y[i])) for i in range(n)]

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng():  # deterministic init without touching the caller's RNG
            torch.manual_seed(self.seed)
            return ConvNet(self.size, self.channels, self.classes)

    def datasets(self):
        return self._splits

    def collate(self, items):
        x = torch.stack([item[0] for item in items])  # (B, 1, size, size)
        y = torch.tensor([item[1] for item in items])  # (B,)
        return x, y

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="sum"), y.numel()
