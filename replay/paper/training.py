"""The recorded training run of ``lca paper``, set up as fairseq trains ``transformer_iwslt_de_en``.

Adam with betas (0.9, 0.98) and decoupled weight decay, learning rate warmed up linearly over
``warmup`` updates then decayed as 1/√step (fairseq's ``inverse_sqrt``; ``warmup: 0`` keeps it
constant), optional gradient-norm clipping, the task's loss in train mode (dropout, label
smoothing) averaged per target token. Every update is recorded by :class:`replay.Recorder`,
with the task's :meth:`record_args` as the trajectory's task arguments when it has them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from replay.errors import LCAError
from replay.paper.settings import PaperTrain
from replay.task import recorded_args


def lr_at(step: int, cfg: PaperTrain) -> float:
    """Learning rate of update ``step`` (1-based): linear warmup, then cfg.lr·√(warmup/step)."""
    if cfg.warmup == 0:
        return cfg.lr
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    return cfg.lr * math.sqrt(cfg.warmup / step)


def train_recorded(task, ref: str, args: dict, cfg: PaperTrain, store: str, keyframe_every: int,
                   log: Callable[[str], None]) -> dict:
    """Train ``task`` (built from ``ref`` and ``args``) for ``cfg.steps`` updates, recording
    into the new trajectory store ``store``. Returns {"steps", "parameters", "train_loss" (of
    the last log window), "tokens_per_s" (source + target tokens), "seconds"}."""
    from replay import Recorder

    torch.manual_seed(cfg.seed)  # dropout masks
    model = task.build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr_at(1, cfg), betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay)
    batches = task.training_batches(cfg.batch_size, cfg.seed)
    log(f"training {ref} ({n_params:,} parameters) for {cfg.steps} updates of {cfg.batch_size} "
        f"pairs, lr {cfg.lr:g}" + (f" (warmup {cfg.warmup}, inverse sqrt)" if cfg.warmup else ""))
    model.train()
    start = time.perf_counter()
    tokens, window, window_n, last = 0, 0.0, 0, float("nan")
    with Recorder(model, store, task=ref, task_args=recorded_args(task, args),
                  keyframe_every=keyframe_every) as rec:
        for step in range(1, cfg.steps + 1):
            batch = next(batches)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss_sum, count = task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            (loss_sum / count).backward()
            if cfg.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            opt.step()
            value = float(loss_sum.detach()) / int(count)
            if not np.isfinite(value):
                raise LCAError(f"training diverged: loss {value} at update {step}; lower "
                               "train.lr (or raise train.warmup) in the config")
            rec.step(loss=value, lr=opt.param_groups[0]["lr"])
            tokens += int(count) + int((batch["src"] != 0).sum())
            window += float(loss_sum.detach())
            window_n += int(count)
            if step % cfg.log_every == 0 or step == cfg.steps:
                last, window, window_n = window / window_n, 0.0, 0
                elapsed = time.perf_counter() - start
                log(f"  update {step:>{len(str(cfg.steps))}}/{cfg.steps}  loss {last:.4f}  "
                    f"{tokens / elapsed:,.0f} tokens/s  ({elapsed:.0f} s)")
    seconds = time.perf_counter() - start
    return {"steps": cfg.steps, "parameters": n_params, "train_loss": last,
            "tokens_per_s": tokens / seconds, "seconds": seconds}


def final_model(task, store: str):
    """The task's model holding the last recorded parameters of trajectory ``store``."""
    from replay import open_trajectory

    traj = open_trajectory(store)
    model = task.build_model()
    every = {**dict(model.named_parameters(remove_duplicate=False)),
             **dict(model.named_buffers(remove_duplicate=False))}
    last = traj.steps[-1]
    with torch.no_grad():
        for name, value in {**traj.params(last), **traj.state(last)}.items():
            every[name].copy_(value)
    model.eval()
    return model
