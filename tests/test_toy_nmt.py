"""The demo task: corpus, model, loss, and a short training run through `lca train`."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from replay.cli import main as cli_main
from replay.commands.train import mean_loss, train
from replay.config import Config, from_mapping
from replay.errors import TaskError
from replay.task import Task, load_task
from replay.tasks.toy_corpus import BOS, EOS, PAD, make_grammar
from replay.tasks.toy_nmt import ToyNMT

REF = "replay.tasks.toy_nmt:ToyNMT"
SMALL = {"vocab_size": 16, "train_size": 300, "valid_size": 40, "test_size": 8, "max_len": 6,
         "d_model": 32, "heads": 2, "ffn_dim": 32, "encoder_layers": 1, "decoder_layers": 1}
NAME = re.compile(
    r"^(encoder|decoder)\.(embed_tokens\.weight|layers\.\d+\..+|layer_norm\.(weight|bias))$"
    r"|^decoder\.output_projection\.weight$"
)


def total_loss(task, model, items, batch_size):
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(0, len(items), batch_size):
        loss_sum, n = task.loss(model, task.collate(items[i : i + batch_size]))
        total += loss_sum.double()
        count += n
    return total / count


def test_corpus_is_a_function_of_the_seed():
    a, b, c = ToyNMT(seed=3, **SMALL), ToyNMT(seed=3, **SMALL), ToyNMT(seed=4, **SMALL)
    assert a.datasets() == b.datasets()
    assert a.datasets()["train"] != c.datasets()["train"]
    assert set(a.datasets()) == {"train", "valid", "test"}
    assert [len(v) for v in a.datasets().values()] == [300, 40, 8]


def test_model_init_is_a_function_of_the_seed_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    m1, m2 = ToyNMT(seed=1, **SMALL).build_model(), ToyNMT(seed=1, **SMALL).build_model()
    m3 = ToyNMT(seed=2, **SMALL).build_model()
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2), name
    assert not torch.equal(m1.decoder.output_projection.weight, m3.decoder.output_projection.weight)


def test_source_words_are_zipfian():
    task = ToyNMT()
    counts = task.token_counts()["encoder.embed_tokens.weight"].numpy()[3:]  # words only
    assert counts.min() > 0  # every word occurs in train: frequency buckets are all populated
    assert counts.max() > 20 * np.median(counts)


def test_grammar_maps_words_and_swaps_modifier_pairs():
    g = make_grammar(seed=0, vocab_size=10, modifier_fraction=0.5)
    mod = [w for w in range(3, 10) if g.modifier[w]]
    plain = [w for w in range(3, 10) if not g.modifier[w]]
    m, p, q = mod[0], plain[0], plain[1]
    t = g.translation
    assert g.translate([p, m, q]) == (t[p], t[q], t[m])  # modifier + word swap
    assert g.translate([m, mod[1], p]) == (t[m], t[p], t[mod[1]])  # left to right, once
    assert g.translate([p, m]) == (t[p], t[m])  # nothing to swap with
    assert sorted(t[3:]) == list(range(3, 10))  # a bijection on words


def test_collate_pads_and_frames():
    task = ToyNMT(**SMALL)
    items = [((5, 6, 7), (8, 9, 10)), ((4,), (11,))]
    batch = task.collate(items)
    assert batch["src"].tolist() == [[5, 6, 7, EOS], [4, EOS, PAD, PAD]]
    assert batch["tgt_in"].tolist() == [[BOS, 8, 9, 10], [BOS, 11, PAD, PAD]]
    assert batch["tgt_out"].tolist() == [[8, 9, 10, EOS], [11, EOS, PAD, PAD]]
    assert all(t.dtype == torch.int64 for t in batch.values())


def test_parameter_names_follow_the_contract():
    task = load_task(REF, SMALL)
    assert isinstance(task, Task)
    model = task.build_model()
    names = [n for n, _ in model.named_parameters()]
    assert all(NAME.match(n) for n in names), [n for n in names if not NAME.match(n)]
    for required in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                     "decoder.output_projection.weight", "encoder.layers.0.fc1.weight",
                     "decoder.layers.0.encoder_attn.q_proj.weight"):
        assert required in names
    assert list(model.buffers()) == []  # positions are computed, not stored
    assert model.decoder.output_projection.weight is not model.decoder.embed_tokens.weight
    counts = task.token_counts()
    for name, c in counts.items():
        assert c.shape == (model.get_parameter(name).shape[0],)


def test_default_size_is_small():
    n = sum(p.numel() for p in ToyNMT().build_model().parameters())
    assert 100_000 <= n <= 200_000


def test_loss_is_sum_reduced_over_tokens():
    task = ToyNMT(**SMALL)
    model = task.build_model().double()
    valid = task.datasets()["valid"]
    whole = total_loss(task, model, valid, len(valid))
    pieces = total_loss(task, model, valid, 7)
    assert abs(whole.item() - pieces.item()) < 1e-12
    _, n = task.loss(model, task.collate(valid))
    assert n == sum(len(t) + 1 for _, t in valid)
    assert n == int(task._counts("valid")[2].sum())
    model32 = task.build_model()
    assert total_loss(task, model32, valid, 7).item() == pytest.approx(whole.item(), rel=1e-5)


def test_float64_model_matches_float32_and_modes_agree():
    task = ToyNMT(**SMALL)
    batch = task.collate(task.datasets()["train"][:16])
    m32, m64 = task.build_model(), task.build_model().double()
    loss64, _ = task.loss(m64, batch)
    loss64.backward()
    assert loss64.dtype == torch.float64
    assert all(p.grad.dtype == torch.float64 for p in m64.parameters())
    assert m64.encoder.embed_tokens.weight.grad[PAD].abs().sum() == 0
    loss32, _ = task.loss(m32, batch)
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-5)
    # no dropout, no fast paths: eval mode and no_grad give the same function
    m32.eval()
    with torch.no_grad():
        assert task.loss(m32, batch)[0].item() == loss32.item()


def test_invalid_task_arguments():
    with pytest.raises(TaskError, match=r"^ToyNMT: d_model=30 must be divisible by heads=4$"):
        ToyNMT(d_model=30, heads=4)
    with pytest.raises(TaskError, match=r"^ToyNMT: d_model=33 must be even \(sine/cosine "):
        ToyNMT(d_model=33, heads=3)
    with pytest.raises(TaskError, match=r"^task 'replay.tasks.toy_nmt:ToyNMT' rejected its "
                       r"arguments \['vocab'\]: "):
        load_task(REF, {"vocab": 10})


def small_config(steps=150, **train):
    return from_mapping(Config, {
        "task": {"ref": REF, "args": SMALL},
        "train": {"steps": steps, "lr": 5e-3, "batch_size": 16, "log_every": 50, **train},
    }, "test config")


def test_short_training_beats_the_unigram_baseline():
    lines = []
    metrics = train(small_config(), record=False, log=lines.append)
    assert metrics["valid_loss"] < 0.5 * metrics["unigram_baseline"]
    assert metrics["steps"] == 150 and metrics["trajectory"] is None
    assert lines[-2].startswith("valid loss ") and "unigram baseline" in lines[-2]
    assert [line.split()[1] for line in lines[1:4]] == ["50/150", "100/150", "150/150"]


def test_training_is_deterministic_and_sgd_works():
    a = train(small_config(steps=20), record=False, log=lambda s: None)
    b = train(small_config(steps=20), record=False, log=lambda s: None)
    assert a["valid_loss"] == b["valid_loss"]
    c = train(small_config(steps=20, optimizer="sgd", momentum=0.9, lr=0.1), record=False,
              log=lambda s: None)
    assert np.isfinite(c["valid_loss"]) and c["valid_loss"] != a["valid_loss"]


def test_mean_loss_restores_the_training_mode():
    task = ToyNMT(**SMALL)
    model = task.build_model()
    mean_loss(task, model, task.datasets()["valid"])
    assert model.training


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(f"task: {{ref: '{REF}'}}\ntrain: {{steps: 1, lr: 1, lr_rate: 2}}\n")
    assert cli_main(["train", str(path), "--out", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lca train: error: unknown key 'lr_rate' in section 'train' of {path}")
    assert cli_main(["train", str(path).replace("bad", "none")]) == 1
    assert "not found" in capsys.readouterr().err


def test_train_records_a_replayable_trajectory(tmp_path):
    from replay.store.trajectory import open_trajectory

    config = small_config(steps=12)
    config = dataclasses.replace(config, record=dataclasses.replace(config.record, every=5))
    store = str(tmp_path / "traj")
    metrics = train(config, store, log=lambda s: None)
    assert metrics["trajectory"] == store
    trajectory = open_trajectory(store)
    assert trajectory.steps == [0, 5, 10, 12]
    assert (trajectory.task, trajectory.task_args) == (REF, SMALL)
    # the recorded θ_12 rebuilds the trained model exactly
    task = load_task(trajectory.task, trajectory.task_args)
    model = task.build_model()
    model.load_state_dict(trajectory.params(12))
    assert mean_loss(task, model, task.datasets()["valid"]) == metrics["valid_loss"]
    assert all(np.isfinite(v) for t, v in trajectory.losses().items() if t > 0)


def test_train_refuses_to_overwrite_a_store(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"task: {{ref: '{REF}', args: {SMALL}}}\ntrain: {{steps: 2, lr: 1.0e-3}}\n")
    store = tmp_path / "traj"
    assert cli_main(["train", str(path), "--out", str(store), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"trajectory: {store} (2 recorded steps" in out and "valid loss" in out
    assert cli_main(["train", str(path), "--out", str(store)]) == 1
    assert capsys.readouterr().err == (
        f"lca train: error: {store} already holds a trajectory; choose a new path or delete it "
        "(the Recorder never overwrites data)\n")
    assert cli_main(["train", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"lca train: error: no trajectory path: set record.path in {path} or pass --out STORE\n")
