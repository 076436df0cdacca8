"""``lca train CONFIG``: train the task of a config and record its trajectory.

The training loop is deliberately plain (one optimizer, constant learning rate, no clipping)
so that the recorded trajectory is the whole story: a replay rebuilds the same model from the
task reference and integrates the loss along the recorded parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from replay.config import Config, TrainConfig, load_config
from replay.errors import ConfigError, LCAError, TaskError
from replay.task import Task, load_task, recorded_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the task of a config and record its trajectory",
        description="Train the task of CONFIG with its train settings and record every "
        "step into a new trajectory store (its record settings).",
    )
    parser.add_argument("config", metavar="CONFIG", help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("--out", metavar="STORE",
                        help="trajectory store to create (default: record.path of CONFIG)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="optimizer updates (default: train.steps of CONFIG)")
    parser.set_defaults(func=main)


def main(args) -> int:
    config = load_config(args.config)
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {args.steps}")
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, steps=args.steps))
    train(config, args.out)
    return 0


def train(config: Config, store_path: str | None = None, *, record: bool = True,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``config.task`` for ``config.train.steps`` updates, recording to ``store_path``
    (default ``config.record.path``; ``record=False`` trains without recording).

    Returns ``{"steps", "parameters", "train_loss" (mean over the last log window),
    "valid_loss", "unigram_baseline" (None where the task has no valid split or baseline),
    "wall_time_s", "trajectory" (path or None)}``.
    """
    where = config.source or "the config"
    path = store_path if store_path is not None else config.record.path
    if record and path is None:
        raise ConfigError(f"no trajectory path: set record.path in {where} or pass --out STORE")
    cfg = config.train
    task = load_task(config.task.ref, config.task.args)
    torch.manual_seed(cfg.seed)  # for tasks whose models draw random numbers (dropout)
    model = task.build_model()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(model, cfg)
    batches = training_batches(task, cfg.batch_size, cfg.seed)
    if record:
        from replay.record.recorder import Recorder

        rec = Recorder(model, path, task=config.task.ref,
                       task_args=recorded_args(task, config.task.args),
                       keyframe_every=config.record.keyframe_every, every=config.record.every,
                       mode=config.record.mode)
    else:
        rec = contextlib.nullcontext()
    log(f"training {config.task.ref} ({n_params:,} parameters) for {cfg.steps} steps, "
        f"batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr:g}"
        + (f"; recording to {path}" if record else ""))
    start = time.perf_counter()
    window_sum, window_count, train_loss = 0.0, 0, float("nan")
    model.train()
    with rec:
        for step in range(1, cfg.steps + 1):
            loss_sum, count = task.loss(model, next(batches))
            loss = loss_sum / count
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not np.isfinite(value):
                raise LCAError(f"training diverged: loss {value} at step {step}; "
                               f"lower train.lr in {where}")
            lr = optimizer.param_groups[0]["lr"]
            if record:
                rec.step(loss=value, lr=lr)
            window_sum += float(loss_sum.detach())
            window_count += int(count)
            if step % cfg.log_every == 0 or step == cfg.steps:
                train_loss = window_sum / window_count
                window_sum, window_count = 0.0, 0
                log(f"step {step:>{len(str(cfg.steps))}}/{cfg.steps}  loss {train_loss:.4f}  "
                    f"({time.perf_counter() - start:.1f} s)")
    wall = time.perf_counter() - start

    sets = task.datasets()
    valid = mean_loss(task, model, sets["valid"]) if "valid" in sets else None
    baseline = task.unigram_entropy() if callable(getattr(task, "unigram_entropy", None)) else None
    if valid is not None:
        versus = (f" vs unigram baseline {baseline:.4f} (entropy of the train targets)"
                  if baseline is not None else "")
        log(f"valid loss {valid:.4f}{versus}")
    summary = f"trained {cfg.steps} steps in {wall:.1f} s"
    if record:
        summary += "; " + _describe_store(path)
    log(summary)
    return {"steps": cfg.steps, "parameters": n_params, "train_loss": train_loss,
            "valid_loss": valid, "unigram_baseline": baseline, "wall_time_s": wall,
            "trajectory": path if record else None}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def training_batches(task: Task, batch_size: int, seed: int) -> Iterator[Any]:
    """Endless training batches: the task's own ``training_batches(batch_size, seed)`` if it
    has one, else its ``train`` split reshuffled every epoch from ``(seed, epoch)``."""
    own = getattr(task, "training_batches", None)
    if callable(own):
        return iter(own(batch_size, seed))
    items = task.datasets().get("train")
    if not items:
        raise TaskError("the task has no non-empty 'train' dataset to train on; "
                        "return one from datasets()")
    return _shuffled(task, items, batch_size, seed)


def _shuffled(task: Task, items, batch_size: int, seed: int) -> Iterator[Any]:
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(items))
        for i in range(0, len(items), batch_size):
            yield task.collate([items[j] for j in order[i : i + batch_size]])
        epoch += 1


@torch.no_grad()
def mean_loss(task: Task, model: torch.nn.Module, items) -> float:
    """L(θ; items) = Σ loss_sum / Σ count, in eval mode, batches of ``task.eval_batch_size``."""
    was_training = model.training
    model.eval()
    size = int(getattr(task, "eval_batch_size", 256))
    total, count = 0.0, 0
    for i in range(0, len(items), size):
        batch = task.collate([items[j] for j in range(i, min(i + size, len(items)))])
        loss_sum, n = task.loss(model, batch)
        total += float(loss_sum)
        count += int(n)
    model.train(was_training)
    return total / count


def _describe_store(path: str) -> str:
    from replay.store.trajectory import open_trajectory

    trajectory = open_trajectory(path)
    size = trajectory.nbytes() / 1e6
    return f"trajectory: {path} ({len(trajectory.steps)} recorded steps, {size:.1f} MB)"
