"""A replay's batches: whole datasets (exact) or pooled samples (sampled), sorted by the task's
``item_size``, and the numbers unchanged."""

from __future__ import annotations

import os

import numpy as np
import pytest

import replay
from replay.commands.train import train
from replay.config import Config, from_mapping
from replay.errors import CubeError, TaskError
from replay.engine.gradients import plan_batches
from replay.tasks.toy_nmt import ToyNMT

REF = "replay.tasks.toy_nmt:ToyNMT"
SMALL = {"vocab_size": 16, "train_size": 120, "valid_size": 30, "test_size": 4, "min_len": 2,
         "max_len": 9, "d_model": 16, "heads": 2, "ffn_dim": 16, "encoder_layers": 1,
         "decoder_layers": 1, "eval_batch_size": 16}


class Sized:
    """Items are their own sizes."""

    def item_size(self, item):
        return item


class InDatasetOrder(ToyNMT):
    """The demo task without ``item_size``: what every task without the method gets."""

    item_size = None


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    config = from_mapping(Config, {"task": {"ref": REF, "args": SMALL},
                                   "train": {"steps": 6, "lr": 1e-2, "batch_size": 8}}, "test")
    path = str(tmp_path_factory.mktemp("batching") / "traj")
    train(config, path, log=lambda _: None)
    return path


def test_items_are_batched_by_size_ties_in_dataset_order():
    items = [5, 2, 9, 2, 5, 1, 9]
    batches = plan_batches(Sized(), "train", items, 3)
    assert [b.tolist() for b in batches] == [[5, 1, 3], [0, 4, 2], [6]]
    plain = plan_batches(object(), "train", items, 3)
    assert [b.tolist() for b in plain] == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("bad", [None, float("nan"), True, "7"])
def test_a_bad_item_size_names_the_item_and_dataset(bad):
    items = [3, bad, 1]
    with pytest.raises(TaskError, match=r"^task item_size\(\) returned .* for item 1 of dataset "
                                        r"'valid'; it must return a finite number"):
        plan_batches(Sized(), "valid", items, 2)


def test_toy_nmt_batches_hold_pairs_of_similar_length():
    task = ToyNMT(**SMALL)
    items = task.datasets()["train"]
    widths = [task.collate([items[i] for i in idx])["src"].shape[1]
              for idx in plan_batches(task, "train", items, 16)]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    natural = [task.collate(items[i:i + 16])["src"].shape[1] for i in range(0, len(items), 16)]
    assert sum(widths) < sum(natural)  # less padding: the point of sorting


def test_sorted_replay_equals_the_dataset_order_replay(store, tmp_path):
    kw = dict(quadrature="simpson", precision="float64", scheduler="sync", progress=False,
              groups=["tensor"], datasets=["train", "valid"])
    by_size = replay.run(store, task=ToyNMT(**SMALL), out=str(tmp_path / "a.zarr"), **kw)
    in_order = replay.run(store, task=InDatasetOrder(**SMALL), out=str(tmp_path / "b.zarr"),
                          **kw)
    # Same sums in another order: equal up to float64 rounding, and not bit for bit (so the
    # sorted batches were really used).
    a, b = by_size["lca"].values, in_order["lca"].values
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(by_size["loss"].values, in_order["loss"].values, rtol=1e-12)
    assert not np.array_equal(a, b)
    assert '"batch_order": "size"' in by_size.attrs["settings"]
    assert "batch_order" not in in_order.attrs["settings"]


def test_a_cube_is_resumed_only_with_the_same_batch_order(store, tmp_path):
    out = str(tmp_path / "c.zarr")
    kw = dict(quadrature="trapezoid", scheduler="sync", progress=False, datasets=["valid"])
    replay.run(store, task=ToyNMT(**SMALL), out=out, steps="0:2", **kw)
    with pytest.raises(CubeError, match=r"other settings \(batch_order, task differ; e\.g\. "
                                        r"batch_order: cube has 'size', this run None\)"):
        replay.run(store, task=InDatasetOrder(**SMALL), out=out, **kw)
    done = replay.run(store, task=ToyNMT(**SMALL), out=out, **kw)
    assert bool(done["done"].all())


def test_a_bad_item_size_stops_the_replay_before_the_cube_exists(store, tmp_path):
    class Broken(ToyNMT):
        def item_size(self, item):
            return float("inf") if len(item[0]) > 5 else len(item[0])

    out = tmp_path / "d.zarr"
    with pytest.raises(TaskError, match=r"returned inf for item \d+ of dataset 'train'"):
        replay.run(store, task=Broken(**SMALL), out=str(out), scheduler="sync", progress=False)
    assert not os.path.exists(out)
    # sampled mode sorts its samples by the same item_size, so it is refused the same way
    with pytest.raises(TaskError, match=r"returned inf for item \d+ of dataset 'train'"):
        replay.run(store, task=Broken(**SMALL), out=str(out), scheduler="sync", progress=False,
                   gradient=replay.Sampled(batches=1, batch_size=4), quadrature="first-order")
    assert not os.path.exists(out)


def test_sorted_batches_do_not_depend_on_chunking_or_workers(store, tmp_path):
    kw = dict(quadrature="simpson", scheduler="sync", progress=False, groups=["tensor"],
              datasets=["train"])
    one = replay.run(store, task=ToyNMT(**SMALL), out=str(tmp_path / "e.zarr"), chunk_size=6,
                     **kw)
    two = replay.run(store, task=ToyNMT(**SMALL), out=str(tmp_path / "f.zarr"), chunk_size=2,
                     **{**kw, "scheduler": "threads:2"})
    assert np.array_equal(one["lca"].values, two["lca"].values)


def test_a_sample_is_pooled_into_sorted_batches_of_the_batch_size(store, tmp_path):
    """Sampled mode: the m mini-batches of a step are evaluated pooled (one batch here), which
    gives the pooled mean of the m batches' losses, as evaluating them one by one does."""
    from replay.engine.gradients import sample_indices

    mode = replay.Sampled(batches=3, batch_size=8, seed=5)
    task = ToyNMT(**SMALL)
    items = task.datasets()["train"]
    sample = sample_indices(mode, "train", len(items), 2)
    pooled = plan_batches(task, "train", items, 16, np.concatenate(sample))
    assert [len(b) for b in pooled] == [16, 8]
    assert sorted(np.concatenate(pooled).tolist()) == sorted(np.concatenate(sample).tolist())
    sizes = [task.item_size(items[i]) for i in np.concatenate(pooled)]
    assert sizes == sorted(sizes)

    kw = dict(quadrature="trapezoid", precision="float64", scheduler="sync", progress=False,
              groups=["tensor"], datasets=["train"], gradient=mode)
    cube = replay.run(store, task=task, out=str(tmp_path / "s.zarr"), **kw)
    assert '"sample_batches": "pooled"' in cube.attrs["settings"]
    # the step-2 loss, by hand: Σ loss / Σ count over the three mini-batches, one at a time
    import torch

    model = task.build_model().double().eval()
    model.load_state_dict({k: v.double() for k, v in replay.open_trajectory(store)
                           .params(2).items()})
    total = count = 0.0
    with torch.no_grad():
        for idx in sample:
            batch = task.collate([items[i] for i in idx])
            loss_sum, n = task.loss(model, batch)
            total, count = total + float(loss_sum), count + n
    np.testing.assert_allclose(float(cube["loss"].sel(step=2, dataset="train")), total / count,
                               rtol=1e-12)
