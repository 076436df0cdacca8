"""Trajectory store (format v1): bit-exact reading, integrity checks, `lca info` / `lca verify`."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import safetensors.torch
import torch
from tests.helpers_record import make_model, train

from replay.cli import main
from replay.store.codec import DTYPE_NAMES, apply_delta, bits, encode_delta, header_metadata
from replay.record.encoder import to_safetensors
from replay.errors import TrajectoryError
from replay.record.recorder import Recorder
from replay.store.files import default_digest, hexdigest
from replay.store.manifest import file_digest
from replay.store.trajectory import FORMAT_VERSION, open_trajectory

DIGEST = default_digest()        # the hash the Recorder writes into the manifest


def record(path, steps=40, model=None, **kw):
    """Record ``steps`` updates of a tiny model; returns the reference θ_t for every t."""
    model = model if model is not None else make_model()
    snaps: dict = {}
    with Recorder(model, path, **kw) as rec:
        train(model, steps, [rec], snapshots=snaps)
    return snaps


def assert_same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


def fix_counts(path) -> dict[str, int]:
    """Parameter name -> number of corrected elements over all delta files of a store."""
    traj, counts = open_trajectory(path), {}
    for t in traj.steps:
        if "delta" not in traj.plan.files[t]:
            continue
        for key, idx in traj.load(t, "delta").items():   # decoded: cut per parameter
            if key.endswith("::fix_idx"):
                name = key.removesuffix("::fix_idx")
                counts[name] = counts.get(name, 0) + idx.numel()
    return counts


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A 30-step delta-mode store with keyframes every 8 steps, and its reference θ_t."""
    path = tmp_path_factory.mktemp("store") / "traj"
    return str(path), record(path, steps=30, keyframe_every=8)


def test_round_trip_is_bit_exact_across_keyframes_with_corrections(tmp_path):
    path = tmp_path / "traj"
    snaps = record(path, steps=300, keyframe_every=64)
    traj = open_trajectory(path)
    assert traj.steps == list(range(301))
    assert traj.keyframe_steps == [0, 64, 128, 192, 256]
    assert sum(fix_counts(path).values()) > 0, "no correction was needed: the test does not exercise them"
    seen = []
    for t, params, state in traj.walk():
        assert_same_bits(params, snaps[t])
        assert state == {}
        seen.append(t)
    assert seen == traj.steps
    for t in (0, 63, 64, 65, 200, 300):       # random access, on and off keyframes
        assert_same_bits(traj.params(t), snaps[t])
    d = traj.delta(100)
    for name, v in d.items():
        assert v.dtype == torch.float64
        assert torch.equal(v, snaps[101][name].double() - snaps[100][name].double())
    traj.verify()


def test_codec_handles_nan_signed_zero_and_overflow():
    prev = {"w": torch.tensor([1.0, 0.0, 3e38, float("nan"), 1e-30, -2.0])}
    nxt = {"w": torch.tensor([-0.0, float("nan"), -3e38, 1.0, 1.0, float("inf")])}
    out = apply_delta(prev, encode_delta(prev, nxt))
    assert torch.equal(bits(out["w"]), bits(nxt["w"]))


def test_own_safetensors_writer_is_read_by_safetensors():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "f64": torch.randn(4, generator=g).double(),
        "f16": torch.randn(2, 2, generator=g).half(), "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32),
        "u8": torch.arange(3, dtype=torch.uint8), "b": torch.tensor([True, False, True]),
        "scalar": torch.tensor(42), "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6, generator=g).t(),
    }
    # The writer process's serialiser works on numpy arrays (bfloat16 as raw 16 bits).
    arrays = {k: (v.view(torch.int16).numpy() if v.dtype == torch.bfloat16 else v.numpy(),
                  DTYPE_NAMES[v.dtype], list(v.shape)) for k, v in tensors.items()}
    data = b"".join(to_safetensors(arrays, {"step": "7"}))
    loaded = safetensors.torch.load(data)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert header_metadata(data) == {"step": "7"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_double_precision_round_trip(tmp_path, dtype):
    model = make_model(dtype=dtype, scale=1e-2)
    snaps = record(tmp_path / "traj", steps=25, model=model, keyframe_every=10)
    traj = open_trajectory(tmp_path / "traj")
    assert set(traj.dtypes.values()) == {dtype}
    for t, params, _ in traj.walk():
        assert_same_bits(params, snaps[t])
    traj.verify()


def test_mixed_dtypes_in_one_model_round_trip_with_corrections(tmp_path):
    # One flat buffer per dtype inside the recorder: corrections must land in the right tensor.
    model = torch.nn.ParameterDict({
        "a": torch.nn.Parameter(torch.zeros(3, 4)),
        "b": torch.nn.Parameter(torch.zeros(5, dtype=torch.float16)),
        "c": torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64)),
        "d": torch.nn.Parameter(torch.zeros(6)),
    })
    g = torch.Generator().manual_seed(0)
    snaps = {}
    with Recorder(model, tmp_path / "traj", keyframe_every=9) as rec:
        for t in range(0, 30):
            if t:
                with torch.no_grad():     # decay then step: two roundings, as in AdamW
                    for p in model.values():
                        p.mul_(0.9).add_(torch.randn(p.shape, generator=g).to(p.dtype) * 1e-3)
                rec.step()
            snaps[t] = {k: v.detach().clone() for k, v in model.items()}
    # float32 "a" and "d" share a buffer: both corrected shows the indices were cut right.
    assert {"a", "d"} <= set(fix_counts(tmp_path / "traj"))
    traj = open_trajectory(tmp_path / "traj")
    for t, params, _ in traj.walk():
        assert_same_bits(params, snaps[t])
    traj.verify()


def test_full_and_delta_modes_agree_bit_for_bit(tmp_path):
    model = make_model()
    with Recorder(model, tmp_path / "d", keyframe_every=7) as rd, \
            Recorder(model, tmp_path / "f", mode="full") as rf:
        train(model, 30, [rd, rf])
    d, f = open_trajectory(tmp_path / "d"), open_trajectory(tmp_path / "f")
    assert (d.mode, f.mode) == ("delta", "full")
    assert f.keyframe_steps == f.steps == d.steps
    assert not os.listdir(tmp_path / "f" / "deltas")
    for (t1, p1, _), (t2, p2, _) in zip(d.walk(), f.walk(), strict=True):
        assert t1 == t2
        assert_same_bits(p1, p2)
    for t in (0, 13, 29):
        assert_same_bits(d.delta(t), f.delta(t))
    assert d.losses() == f.losses()
    f.verify()


def test_walk_range_and_unrecorded_step(store):
    path, snaps = store
    traj = open_trajectory(path)
    got = [t for t, _, _ in traj.walk(start=10, stop=17)]
    assert got == list(range(10, 18))
    assert traj.next_step(29) == 30 and traj.next_step(30) is None
    with pytest.raises(TrajectoryError, match=r"step 31 is not recorded .*nearest recorded "
                                              r"steps: 30 \(recorded: 31 steps 0\.\.30"):
        traj.params(31)
    with pytest.raises(TrajectoryError, match="step 30 is the last recorded step"):
        traj.delta(30)


def test_returned_tensors_are_owned_by_the_caller(store):
    path, snaps = store
    traj = open_trajectory(path)
    for _, params, _ in traj.walk(0, 3):
        for v in params.values():
            v.fill_(7.0)           # must not leak into the next step of the walk
    assert_same_bits(traj.params(4), snaps[4])


def test_fsspec_url_reads_the_same(store):
    fsspec = pytest.importorskip("fsspec")
    path, snaps = store
    fs = fsspec.filesystem("memory")
    for root, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), path)
            with open(os.path.join(root, name), "rb") as f:
                fs.pipe_file(f"/traj-copy/{rel}", f.read())
    traj = open_trajectory("memory://traj-copy")
    assert_same_bits(traj.params(17), snaps[17])
    assert traj.manifest_sha256 == open_trajectory(path).manifest_sha256
    traj.verify()


def test_verify_and_info_cli_on_a_sound_store(store, capsys):
    path, _ = store
    assert main(["verify", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {path}: 31 steps") and "3 of 4 keyframes rebuilt" in out
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "31 recorded, 0..30, every 1" in out and "bytes/param/step" in out
    assert main(["info", "--json", path]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["elements"] == 8 * 16 + 16 + 16 * 4 + 4
    assert info["bytes_per_param_step"] == pytest.approx(
        open_trajectory(path).nbytes() / (info["elements"] * 31))


def copy_store(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_verify_names_a_truncated_file(store, tmp_path, capsys):
    path = copy_store(store[0], tmp_path / "t")
    target = os.path.join(path, "deltas", "step-00000012.safetensors")
    with open(target, "r+b") as f:
        f.truncate(100)
    assert main(["verify", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lca verify: error: deltas/step-00000012.safetensors: 100 bytes, "
                          "manifest says")
    assert "re-record or restore the file" in err
    with pytest.raises(TrajectoryError, match=r"deltas/step-00000012\.safetensors: 100 bytes"):
        open_trajectory(path).params(13)
    open_trajectory(path).params(12)        # steps before the bad delta still read


def test_verify_names_an_altered_file_and_lists_all_problems(store, tmp_path, capsys):
    path = copy_store(store[0], tmp_path / "a")
    for rel in ("keyframes/step-00000016.safetensors", "deltas/step-00000003.safetensors"):
        target = os.path.join(path, rel)
        data = bytearray(open(target, "rb").read())
        data[-1] ^= 0x01                     # same size, one bit changed
        open(target, "wb").write(bytes(data))
    assert main(["verify", path]) == 1
    out, err = capsys.readouterr()
    assert err.startswith(f"lca verify: error: deltas/step-00000003.safetensors: {DIGEST} ")
    assert "(corrupted)" in err and "1 more problem(s) listed above" in err
    assert f"also: keyframes/step-00000016.safetensors: {DIGEST}" in out


def test_verify_catches_a_delta_that_does_not_rebuild_the_keyframe(store, tmp_path, capsys):
    # A consistent-looking file (hash updated) with wrong content: only the rebuild finds it.
    path = copy_store(store[0], tmp_path / "c")
    rel = "deltas/step-00000010.safetensors"
    tensors = safetensors.torch.load(open(os.path.join(path, rel), "rb").read())
    tensors["delta.float32"][0] += 1e-3       # the first element of 0.weight
    data = safetensors.torch.save(tensors, metadata={"step": "10"})
    open(os.path.join(path, rel), "wb").write(data)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    entry = manifest["steps"][10]
    name, _ = file_digest(entry, rel)
    entry[name][rel], entry["bytes"][rel] = hexdigest(name, data), len(data)
    json.dump(manifest, open(os.path.join(path, "manifest.json"), "w"))
    assert main(["verify", path]) == 1
    assert ("keyframes/step-00000016.safetensors: walking the deltas from keyframe 8 does not "
            "rebuild step 16 bit for bit ('0.weight': 1 element(s) differ)"
            ) in capsys.readouterr().err


def test_missing_file_and_bad_manifests_are_one_line_errors(store, tmp_path):
    path = copy_store(store[0], tmp_path / "m")
    os.remove(os.path.join(path, "keyframes", "step-00000024.safetensors"))
    with pytest.raises(TrajectoryError, match=r"^keyframes/step-00000024\.safetensors: file is "
                                              r"missing; re-record or restore the file"):
        open_trajectory(path).params(25)
    mpath = os.path.join(path, "manifest.json")
    manifest = json.load(open(mpath))
    manifest["format_version"] = FORMAT_VERSION + 1
    json.dump(manifest, open(mpath, "w"))
    with pytest.raises(TrajectoryError, match=rf"manifest\.json: format_version {FORMAT_VERSION + 1} "
                                              r"is not supported by lca-replay .* reads formats 1, 2, 3"):
        open_trajectory(path)
    open(mpath, "w").write('{"format_version": 1, "params": [')
    with pytest.raises(TrajectoryError, match=r"manifest\.json is not valid JSON \(.*line 1"):
        open_trajectory(path)
    manifest["format_version"] = FORMAT_VERSION
    manifest["steps"][3]["files"]["delta"] = "../../etc/passwd"
    json.dump(manifest, open(mpath, "w"))
    with pytest.raises(TrajectoryError, match=r"step 3: bad delta entry '\.\./\.\./etc/passwd'"):
        open_trajectory(path)
    with pytest.raises(TrajectoryError, match=r"no trajectory at .*nowhere: manifest\.json "
                                              r"not found"):
        open_trajectory(tmp_path / "nowhere")


def test_format_1_stores_are_still_read_bit_exact():
    # tests/data/store-v1 was recorded by lca-replay 0.1 (one Δ tensor per parameter, float32
    # and float64 parameters, a buffer, corrections); the live parameters of that run are in
    # store-v1-params.safetensors as "step/name".
    data = os.path.join(os.path.dirname(__file__), "data")
    traj = open_trajectory(os.path.join(data, "store-v1"))
    assert traj.format_version == 1 and traj.manifest["lca_replay_version"] == "0.1.0"
    traj.verify()
    assert sum(fix_counts(os.path.join(data, "store-v1")).values()) > 0
    expected = safetensors.torch.load_file(os.path.join(data, "store-v1-params.safetensors"))
    for t, params, _ in traj.walk(1):
        assert_same_bits(params, {n: expected[f"{t}/{n}"] for n in traj.names})


def test_dtype_tables_agree():
    # manifest.py (torch-free, read by the writer process) and codec.py name the same dtypes.
    from replay.store import codec, manifest

    assert tuple(codec.PARAM_DTYPES) == manifest.PARAM_DTYPES
    assert tuple(codec.STATE_DTYPES) == manifest.STATE_DTYPES


def test_format_2_delta_files_are_checked_before_use():
    from replay.store.flat_layout import FlatLayout

    layout = FlatLayout([("a", (2, 3), torch.float32), ("b", (4,), torch.float32),
                         ("c", (2,), torch.float64)])
    good = {"delta.float32": torch.zeros(10), "delta.float64": torch.zeros(2, dtype=torch.float64),
            "fix_idx.float32": torch.tensor([1, 7]), "fix_val.float32": torch.tensor([5.0, 6.0])}
    decoded = layout.decode_delta(good)
    assert decoded["a"].shape == (2, 3) and decoded["c"].dtype == torch.float64
    assert decoded["a::fix_idx"].tolist() == [1] and decoded["b::fix_idx"].tolist() == [1]
    assert decoded["b::fix_val"].tolist() == [6.0]
    bad = [
        ({**good, "extra": torch.zeros(1)}, "holds unexpected tensor(s) 'extra'"),
        ({k: v for k, v in good.items() if k != "delta.float64"},
         "has no tensor 'delta.float64' for its float64 parameters"),
        ({**good, "delta.float32": torch.zeros(9)},
         "tensor 'delta.float32' has shape (9,), expected (10,)"),
        ({k: v for k, v in good.items() if k != "fix_val.float32"},
         "has only one of 'fix_idx.float32' and 'fix_val.float32'"),
        ({**good, "fix_idx.float32": torch.tensor([7, 1])}, "is not ascending"),
        ({**good, "fix_idx.float32": torch.tensor([1, 10])}, "is not ascending within their 10"),
    ]
    for payload, message in bad:
        problem = layout.decode_delta(payload)
        assert isinstance(problem, str) and message in problem, (message, problem)
    for payload, _ in bad:                 # the flat path refuses them all; load() explains
        assert layout.flat_delta(payload) is None
    assert layout.flat_delta({**good, "delta.float32": torch.zeros(10, dtype=torch.float64)}) \
        is None                            # Δ of float32 parameters is float32


def test_the_flat_delta_path_rebuilds_what_the_per_parameter_path_does():
    """θ_next from one operation per dtype group equals codec.reconstruct parameter by
    parameter, bit for bit: corrections cut at tensor boundaries, Δ in float32 for 16-bit
    parameters, NaN and ±Inf in θ_t."""
    from replay.store.flat_layout import FlatLayout

    specs = [("a", (2, 3), torch.float32), ("h", (5,), torch.bfloat16), ("b", (4,), torch.float32),
             ("c", (3,), torch.float64), ("e", (0,), torch.float32), ("f", (7,), torch.float16)]
    layout = FlatLayout(specs)
    g = torch.Generator().manual_seed(0)
    prev = {d: (torch.randn(layout.size(d), generator=g, dtype=torch.float64) * 3).to(d)
            for d in layout.groups}
    prev[torch.float32][3], prev[torch.float16][0] = float("nan"), float("inf")
    payload = {}
    for d in layout.groups:
        tag, n = DTYPE_NAMES[d], layout.size(d)
        payload[f"delta.{tag}"] = (torch.randn(n, generator=g) * 1e-3).to(
            torch.float64 if d == torch.float64 else torch.float32)
        idx = torch.tensor([i for i in (0, 5, 6, 9) if i < n], dtype=torch.int64)
        payload[f"fix_idx.{tag}"] = idx
        payload[f"fix_val.{tag}"] = torch.randn(len(idx), generator=g).to(d)
    parts = layout.flat_delta(payload)
    assert parts is not None
    fast = layout.apply_flat(prev, parts)
    slow = layout.apply_delta(prev, layout.decode_delta(payload))
    for d in layout.groups:
        assert torch.equal(bits(fast[d]), bits(slow[d])), d
