"""LCA per use of a tied weight: against a brute force that unties the model by hand, and the
uses adding up to the joint LCA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import analysis  # noqa: F401  (the .lca accessor)
import replay
from replay.engine.tied import tensor_uses, untie
from replay.errors import CubeError

VOCAB, DIM = 11, 6
ENC, DEC, HEAD = "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"


class TiedNet(nn.Module):
    """One embedding matrix used three times: the encoder's and the decoder's embedding (one
    shared ``nn.Embedding`` module, as T5 shares ``shared``) and the softmax (one shared
    ``nn.Parameter``, as GPT-2 ties ``lm_head`` to ``wte``)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.decoder = nn.Module()
        self.decoder.embed_tokens = self.encoder.embed_tokens
        self.mix = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.encoder.embed_tokens.weight

    def forward(self, x):  # x (B, T) -> logits (B, T, V)
        h = torch.tanh(self.mix(self.encoder.embed_tokens(x)))
        return self.lm_head(h + 0.5 * self.decoder.embed_tokens(x.flip(1)))


class TiedTask:
    eval_batch_size = 16

    def __init__(self, seed: int = 0):
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        items = [torch.randint(0, VOCAB, (6,), generator=g) for _ in range(40)]
        self._splits = {"train": items[:28], "test": items[28:]}

    def build_model(self):
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            return TiedNet()

    def datasets(self):
        return self._splits

    def collate(self, items):
        return torch.stack(items)  # (B, 6)

    def loss(self, model, batch):
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1),
                               reduction="sum"), batch[:, 1:].numel()


def untied_loss(theta, batch):
    """The same network written with one tensor per use (the brute force's own untying)."""
    x, y = batch[:, :-1], batch[:, 1:]
    h = torch.tanh(F.linear(F.embedding(x, theta[ENC]), theta["mix.weight"], theta["mix.bias"]))
    logits = F.linear(h + 0.5 * F.embedding(x.flip(1), theta[DEC]), theta[HEAD])
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    task = TiedTask()
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    data = task.datasets()["train"]
    path = str(tmp_path_factory.mktemp("tied") / "traj")
    with replay.Recorder(model, path, keyframe_every=3) as rec:
        for step in range(6):
            loss, n = task.loss(model, task.collate(data[(step * 7) % 21:][:7]))
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss.item() / n)
    return path


def replay_cube(store, out, tied, **kw):
    return replay.run(store, task=TiedTask(), out=str(out), tied=tied, scheduler="sync",
                      quadrature="simpson", precision="float64", groups=["tensor"],
                      progress=False, **kw)


def test_the_manifest_records_the_tie_once(store):
    traj = replay.open_trajectory(store)
    assert traj.names == [ENC, "mix.weight", "mix.bias"]
    assert traj.aliases == {DEC: ENC, HEAD: ENC}
    assert list(tensor_uses(traj.names, traj.aliases, "split")) == [
        ENC, DEC, HEAD, "mix.weight", "mix.bias"]
    assert list(tensor_uses(traj.names, traj.aliases, "joint")) == traj.names


def test_untie_gives_each_use_its_own_parameter_and_module():
    model = TiedTask().build_model()
    uses = {ENC: ENC, DEC: ENC, HEAD: ENC, "mix.weight": "mix.weight", "mix.bias": "mix.bias"}
    before = model.encoder.embed_tokens.weight.detach().clone()
    untie(model, uses)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert len({id(params[n]) for n in uses}) == 5
    assert model.decoder.embed_tokens is not model.encoder.embed_tokens
    assert model.encoder.embed_tokens.weight is params[ENC]
    for name in (ENC, DEC, HEAD):
        assert torch.equal(params[name], before)


def test_split_matches_a_brute_force_that_unties_by_hand(store, tmp_path):
    cube = replay_cube(store, tmp_path / "split.zarr", "split")
    labels = [str(g) for g in cube["group"].values]
    assert labels == [f"tensor/{n}" for n in (ENC, DEC, HEAD, "mix.weight", "mix.bias")]
    traj = replay.open_trajectory(store)
    task = TiedTask()
    batch = task.collate(task.datasets()["train"])
    nodes, weights = (0.0, 0.5, 1.0), (1 / 6, 4 / 6, 1 / 6)
    for k, (t0, t1) in enumerate(zip(traj.steps[:-1], traj.steps[1:])):
        a = {n: v.double() for n, v in traj.params(t0).items()}
        b = {n: v.double() for n, v in traj.params(t1).items()}
        uses = {ENC: ENC, DEC: ENC, HEAD: ENC, "mix.weight": "mix.weight", "mix.bias": "mix.bias"}
        gbar = {u: torch.zeros_like(a[c]) for u, c in uses.items()}
        for s, w in zip(nodes, weights):
            theta = {u: (a[c] + s * (b[c] - a[c])).requires_grad_(True) for u, c in uses.items()}
            grads = torch.autograd.grad(untied_loss(theta, batch), list(theta.values()))
            for u, g in zip(theta, grads):
                gbar[u] += w * g
        expected = [float(((b[c] - a[c]) * gbar[u]).sum()) for u, c in uses.items()]
        got = cube["lca"].sel(dataset="train").values[k]
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-14)


def test_uses_add_up_to_the_joint_lca(store, tmp_path):
    split = replay_cube(store, tmp_path / "split.zarr", "split", datasets=["train", "test"])
    joint = replay_cube(store, tmp_path / "joint.zarr", "joint", datasets=["train", "test"])
    assert [str(g) for g in joint["group"].values] == [f"tensor/{n}" for n in
                                                         (ENC, "mix.weight", "mix.bias")]
    s, j = split["lca"].values, joint["lca"].values  # (step, group, dataset)
    np.testing.assert_allclose(s[:, :3].sum(axis=1), j[:, 0], rtol=0, atol=1e-10)
    np.testing.assert_array_equal(s[:, 3:], j[:, 1:])  # untied tensors: the same numbers
    np.testing.assert_allclose(split["loss"].values, joint["loss"].values, rtol=0, atol=1e-12)
    # per-parameter LCA per use, adding up to the joint tensor's, element by element
    ps, pj = replay.load_param_lca(str(tmp_path / "split.zarr")), \
        replay.load_param_lca(str(tmp_path / "joint.zarr"))
    for d in ("train", "test"):
        assert sorted(ps[d]) == sorted([ENC, DEC, HEAD, "mix.weight", "mix.bias"])
        total = ps[d][ENC] + ps[d][DEC] + ps[d][HEAD]
        torch.testing.assert_close(total, pj[d][ENC], rtol=0, atol=1e-10)
    assert json.loads(split.attrs["settings"])["tied"] == "split"
    assert "tied" not in json.loads(joint.attrs["settings"])  # the numbers cubes had before


def test_a_cube_resumes_only_with_the_same_tied_setting(store, tmp_path):
    replay_cube(store, tmp_path / "c.zarr", "split", steps="0:2")
    with pytest.raises(CubeError, match=r"made with other settings \(tied differ; e\.g\. tied: "
                                        r"cube has 'split', this run None\)"):
        replay_cube(store, tmp_path / "c.zarr", "joint")


def test_transformer_preset_sees_every_use(store, tmp_path):
    cube = replay.run(store, task=TiedTask(), out=str(tmp_path / "t.zarr"), scheduler="sync",
                      groups=["transformer"], progress=False, steps="0:2")
    t = cube.lca.grouping("transformer")
    sizes = dict(zip((str(g) for g in t["group"].values), t["group_size"].values.tolist()))
    assert sizes["en_emb"] == VOCAB * DIM and sizes["de_emb"] == VOCAB * DIM
    assert sizes["de_softmax"] == VOCAB * DIM


class SharedFirstNet(TiedNet):
    """As Marian and BART: the tied tensor is registered first under a module the forward pass
    never calls (``shared``), so its recorded name is no use at all."""

    def __init__(self):
        nn.Module.__init__(self)
        self.shared = nn.Embedding(VOCAB, DIM)
        self.encoder = nn.Module()
        self.encoder.embed_tokens = self.shared
        self.decoder = nn.Module()
        self.decoder.embed_tokens = self.shared
        self.mix = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.shared.weight


class SharedFirstTask(TiedTask):
    def build_model(self):
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            return SharedFirstNet()


def test_a_use_the_loss_never_reaches_is_left_out(tmp_path):
    task = SharedFirstTask()
    model = task.build_model()
    assert next(iter(dict(model.named_parameters(remove_duplicate=False)))) == "shared.weight"
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = task.datasets()["train"]
    store = str(tmp_path / "traj")
    with replay.Recorder(model, store) as rec:
        for step in range(3):
            loss, n = task.loss(model, task.collate(data[step * 7:][:7]))
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            rec.step()
    assert replay.open_trajectory(store).names[0] == "shared.weight"
    common = dict(task=task, scheduler="sync", precision="float64", groups=["tensor"],
                  progress=False)
    split = replay.run(store, out=str(tmp_path / "s.zarr"), **common)
    joint = replay.run(store, out=str(tmp_path / "j.zarr"), tied="joint", **common)
    assert [str(g) for g in split["group"].values] == [
        f"tensor/{n}" for n in (ENC, DEC, HEAD, "mix.weight", "mix.bias")]
    np.testing.assert_allclose(split["lca"].values[:, :3].sum(axis=1), joint["lca"].values[:, 0],
                               rtol=0, atol=1e-10)
