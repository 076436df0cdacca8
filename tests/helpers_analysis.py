"""Real recordings and replays for the analysis tests: any Task, a few SGD steps, sync replay."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import replay


def record(task, path, *, steps: int = 8, lr: float = 0.2, batch: int = 16, ref: str | None = None,
           args: dict | None = None) -> str:
    """Train ``task``'s model for ``steps`` SGD steps on its train split, recording every step."""
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    data = task.datasets()["train"]
    kw = {"task": ref, "task_args": args or {}} if ref else {}
    with replay.Recorder(model, str(path), **kw) as rec:
        for step in range(steps):
            lo = (step * batch) % len(data)
            loss, n = task.loss(model, task.collate(data[lo:lo + batch]))
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss.item() / n)
    return str(path)


def replay_sync(trajectory, task, out, **kw):
    return replay.run(trajectory, task=task, out=str(out), scheduler="sync", progress=False, **kw)


def figure_titles(report: Path) -> list[str]:
    """Figure titles in summary.md order (each ``### title`` followed by its image)."""
    md = (report / "summary.md").read_text()
    return re.findall(r"^### (.+)\n\n!\[\1\]\(fig-[\w-]+\.png\)$", md, flags=re.M)


def figure_files(report: Path) -> list[str]:
    """The PNGs index.html shows, in page order."""
    return re.findall(r'<img src="(fig-[\w-]+\.png)"', (report / "index.html").read_text())
