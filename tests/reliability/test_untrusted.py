"""Stores and cubes are data: nothing in them is executed or unpickled, and the task a manifest
names is imported only when the user names it or confirms with --trust-task."""

from __future__ import annotations

import io
import os
import sys
import tokenize

import pytest
import torch

import replay
from tests.reliability.helpers import ARGS, COMMON, ROOT, lca, one_line_error, tree

PACKAGES = ("replay", "analysis")
# Module names whose presence alone is a finding (deserialisers that run code).
MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
# Attribute calls that unpickle or evaluate: torch.load, yaml's unsafe loaders, numpy pickles.
ATTRIBUTES = {("torch", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
              ("yaml", "UnsafeLoader"), ("yaml", "FullLoader"), ("yaml", "Loader")}
BUILTINS = {"eval", "exec", "compile", "__import__"}


def findings(source: str) -> list[str]:
    """Code (not comments or strings) that unpickles or evaluates, one line per finding."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type in (tokenize.NAME, tokenize.OP)]
    found = []
    for i, tok in enumerate(tokens):
        prev = tokens[i - 1].string if i else ""
        nxt = tokens[i + 1].string if i + 1 < len(tokens) else ""
        where = f"line {tok.start[0]}: "
        if tok.type != tokenize.NAME:
            continue
        if tok.string in MODULES:
            found.append(where + tok.string)
        elif tok.string in BUILTINS and prev != "." and nxt == "(":
            found.append(where + tok.string + "(")
        elif prev in (".", "import") and i >= 2 \
                and (tokens[i - 2].string, tok.string) in ATTRIBUTES \
                and (i < 3 or tokens[i - 3].string != "."):   # not safetensors.torch.load
            found.append(where + f"{tokens[i - 2].string}.{tok.string}")
        elif tok.string == "allow_pickle":
            found.append(where + "allow_pickle")
    return found


def test_the_scanner_finds_what_it_should_and_only_that():
    bad = ("import pickle\nx = torch.load(f)\ny = eval('1')\nexec(code)\n"
           "np.load(p, allow_pickle=True)\nyaml.load(s, Loader=yaml.Loader)\n"
           "from torch import load\n")
    assert [f.split(": ")[1] for f in findings(bad)] == [
        "pickle", "torch.load", "eval(", "exec(", "allow_pickle", "yaml.Loader", "torch.load"]
    fine = ('"""never torch.load or pickle; no eval(."""\n# torch.load(x), pickle, exec(\n'
            "model.eval()\nsafetensors.torch.load(data)\ns = 'eval(1)'\n")
    assert findings(fine) == []


def test_package_source_never_unpickles_or_evaluates():
    bad = {}
    for package in PACKAGES:
        for here, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(here, name)
                    with open(path, encoding="utf-8") as f:
                        hits = findings(f.read())
                    if hits:
                        bad[os.path.relpath(path, ROOT)] = hits
    assert not bad, f"code that unpickles or evaluates: {bad}"


EVIL = '''
import os
from replay.tasks.tiny_mlp import TinyMLP

# Importing this module is the attack: it leaves a mark, as real code could do anything.
with open(os.environ["LCA_TEST_MARK"], "a") as f:
    f.write("imported\\n")


class Task(TinyMLP):
    pass
'''


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A store whose manifest names a task module that leaves a mark when imported."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "lca_untrusted_task.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(code))
    mark = tmp_path / "mark"
    monkeypatch.setenv("LCA_TEST_MARK", str(mark))
    monkeypatch.delitem(sys.modules, "lca_untrusted_task", raising=False)
    from replay.tasks.tiny_mlp import TinyMLP

    task = TinyMLP(**ARGS)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = task.datasets()["train"]
    store = tmp_path / "traj"
    with replay.Recorder(model, store, task="lca_untrusted_task:Task", task_args=ARGS) as rec:
        for _ in range(3):
            loss, n = task.loss(model, task.collate(data[:16]))
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss.item() / n)
    yield str(store), mark
    sys.modules.pop("lca_untrusted_task", None)


def test_the_task_named_in_a_manifest_needs_consent(evil, tmp_path, capsys):
    store, mark = evil
    before = tree(tmp_path)
    code, _, err = lca(capsys, "replay", store, *COMMON)
    assert code == 1
    assert one_line_error(err).endswith(
        "names task 'lca_untrusted_task:Task'; importing it runs its code, so pass "
        "task='lca_untrusted_task:Task' (CLI: --task lca_untrusted_task:Task) or trust_task=True "
        "(CLI: --trust-task)")
    for command in (["info", store], ["verify", store]):
        assert lca(capsys, *command)[0] == 0
    assert not mark.exists(), "the task module was imported without consent"
    assert tree(tmp_path) == before
    with pytest.raises(replay.errors.TaskError, match="importing it runs its code"):
        replay.run(store, out=str(tmp_path / "c.zarr"), scheduler="sync", progress=False)
    assert not mark.exists()
    code, _, err = lca(capsys, "replay", store, "--trust-task", "--cube", tmp_path / "c.zarr",
                       *COMMON)
    assert code == 0, err
    assert mark.read_text() == "imported\n"


def test_a_safetensors_header_is_only_parsed(tmp_path, capsys):
    """A data file whose JSON header is hostile (huge length, deep nesting) fails to load
    with the file named, after its hash was checked — nothing in it is evaluated."""
    from tests.test_engine import record

    store = record(str(tmp_path / "traj"), steps=3)
    path = os.path.join(store, "keyframes", "step-00000000.safetensors")
    hostile = (2 ** 40).to_bytes(8, "little") + b"[" * 5000
    with open(path, "wb") as f:
        f.write(hostile)
    # Re-hash in the manifest: the attacker controls the whole store.
    import json

    from replay.store.files import hexdigest
    from replay.store.manifest import file_digest

    mpath = os.path.join(store, "manifest.json")
    m = json.load(open(mpath))
    rel = "keyframes/step-00000000.safetensors"
    name, _ = file_digest(m["steps"][0], rel)
    m["steps"][0][name][rel] = hexdigest(name, hostile)
    m["steps"][0]["bytes"][rel] = len(hostile)
    json.dump(m, open(mpath, "w"))
    code, _, err = lca(capsys, "replay", store, "--task", "replay.tasks.tiny_mlp:TinyMLP",
                       "--cube", tmp_path / "c.zarr", *COMMON)
    assert code == 1
    assert "keyframes/step-00000000.safetensors: not a readable safetensors file (" in \
        one_line_error(err)
    assert not (tmp_path / "c.zarr").exists()
