"""The YAML config: strict keys and types, exact messages, the demo config documented."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from replay.config import Config, TrainConfig, load_config
from replay.settings import ReplaySettings
from replay.validation import from_mapping
from replay.errors import ConfigError

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

MINIMAL = """\
task:
  ref: replay.tasks.toy_nmt:ToyNMT
train:
  steps: 10
  lr: 1e-3
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def raises(message: str):
    return pytest.raises(ConfigError, match="^" + re.escape(message) + "$")


def test_demo_config_loads():
    config = load_config(DEMO)
    assert config.task.ref == "replay.tasks.toy_nmt:ToyNMT"
    assert config.train.optimizer == "adam" and config.train.steps > 0
    assert config.record.path == "runs/demo/trajectory"
    assert config.replay.cube is None  # the replay names it beside the trajectory
    assert config.source == str(DEMO)


def test_every_key_of_the_demo_config_is_commented():
    lines = DEMO.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z_]+:", line):
            previous = lines[i - 1].strip() if i else ""
            assert "#" in line or previous.startswith("#"), f"line {i + 1} has no comment: {line}"


def test_minimal_config_takes_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.train == TrainConfig(steps=10, lr=1e-3)
    assert config.replay == ReplaySettings()
    assert config.replay.groups is None and config.replay.tolerance == 1e-3
    assert config.record.path is None


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads "1e-3" as a string; the config dialect reads it as the number it looks like.
    config = load_config(write(tmp_path, MINIMAL.replace("1e-3", "2e-3")))
    assert config.train.lr == 0.002


def test_int_widens_to_float_but_bool_is_not_an_int(tmp_path):
    assert load_config(write(tmp_path, MINIMAL.replace("1e-3", "1"))).train.lr == 1.0
    path = write(tmp_path, MINIMAL.replace("steps: 10", "steps: true"))
    with raises(f"key 'steps' in section 'train' of {path} must be an integer, got True (boolean)"):
        load_config(path)


def test_unknown_key_lists_valid_keys(tmp_path):
    path = write(tmp_path, MINIMAL + "  lr_rate: 0.1\n")
    with raises(f"unknown key 'lr_rate' in section 'train' of {path}; valid keys: batch_size, "
                "log_every, lr, momentum, optimizer, seed, steps, weight_decay"):
        load_config(path)


def test_unknown_section_lists_valid_sections(tmp_path):
    path = write(tmp_path, MINIMAL + "trian: {}\n")
    with raises(f"unknown section 'trian' in {path}; valid sections: record, replay, task, train"):
        load_config(path)


def test_wrong_type(tmp_path):
    path = write(tmp_path, MINIMAL.replace("steps: 10", "steps: many"))
    with raises(f"key 'steps' in section 'train' of {path} must be an integer, "
                "got 'many' (string)"):
        load_config(path)


def test_wrong_choice(tmp_path):
    path = write(tmp_path, MINIMAL + "  optimizer: adamw\n")
    with raises(f"key 'optimizer' in section 'train' of {path} must be one of 'adam', 'sgd', "
                "got 'adamw' (string)"):
        load_config(path)


def test_wrong_list_item(tmp_path):
    path = write(tmp_path, MINIMAL + "replay:\n  groups: [tensor, 3]\n")
    with raises(f"key 'groups' in section 'replay' of {path} must be a list of strings or "
                "mappings or null, got ['tensor', 3] (list)"):
        load_config(path)


def test_section_must_be_a_mapping(tmp_path):
    path = write(tmp_path, MINIMAL + "record: [a]\n")
    with raises(f"section 'record' of {path} must be a mapping of keys to values, "
                "got ['a'] (list)"):
        load_config(path)


def test_missing_key_and_section(tmp_path):
    path = write(tmp_path, MINIMAL.replace("  steps: 10\n", ""))
    with raises(f"missing key 'steps' in section 'train' of {path}"):
        load_config(path)
    path = write(tmp_path, "train: {steps: 1, lr: 1}\n")
    with raises(f"missing section 'task' in {path}"):
        load_config(path)


def test_value_ranges(tmp_path):
    path = write(tmp_path, MINIMAL.replace("steps: 10", "steps: 0"))
    with raises(f"key 'steps' in section 'train' of {path} must be >= 1, got 0"):
        load_config(path)
    path = write(tmp_path, MINIMAL.replace("1e-3", "0"))
    with raises(f"key 'lr' in section 'train' of {path} must be > 0, got 0.0"):
        load_config(path)
    path = write(tmp_path, MINIMAL + "  momentum: 0.9\n")
    with raises(f"key 'momentum' in section 'train' of {path} applies to optimizer 'sgd' only; "
                "remove it or set optimizer: sgd"):
        load_config(path)


def test_replay_section_checks(tmp_path):
    path = write(tmp_path, MINIMAL + "replay:\n  gradient: sampled\n  batches: 4\n")
    with raises(f"key 'gradient' in section 'replay' of {path} is 'sampled', which needs key "
                "'batch_size' too (mini-batches per step and their size); set it"):
        load_config(path)
    path = write(tmp_path, MINIMAL + "replay:\n  steps: 3-9\n")
    with raises(f"key 'steps' in section 'replay' of {path} must look like 'A:B', 'A:' or ':B' "
                "(recorded step numbers), got '3-9'"):
        load_config(path)
    text = MINIMAL + "replay:\n  gradient: sampled\n  batches: 4\n  batch_size: 8\n  steps: '2:'\n"
    replay = load_config(write(tmp_path, text)).replay
    assert (replay.gradient, replay.batches, replay.batch_size, replay.steps) == (
        "sampled", 4, 8, "2:")


def test_parse_errors(tmp_path):
    path = write(tmp_path, MINIMAL + "  lr: 2\n")
    with raises(f"cannot parse {path} at line 6: duplicate key 'lr'"):
        load_config(path)
    path = write(tmp_path, "task: [\n")
    with pytest.raises(ConfigError, match=f"^cannot parse {re.escape(path)} at line 2: "):
        load_config(path)
    path = write(tmp_path, "")
    with raises(f"missing section 'task' in {path}"):
        load_config(path)
    with raises(f"config file {tmp_path}/nope.yaml not found; pass the path of a YAML file "
                "such as configs/demo.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen_and_round_trips(tmp_path):
    config = load_config(DEMO)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 1.0  # type: ignore[misc]
    again = from_mapping(Config, config.to_dict(), "round trip")
    assert again == config


@dataclass(frozen=True)
class Inner:
    name: str
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Outer:
    inner: Inner
    size: int | None = None
    kind: Literal["a", "b"] = "a"
    tags: list[int] = field(default_factory=list)
    extra: Any = None


def test_from_mapping_is_generic():
    got = from_mapping(Outer, {"inner": {"name": "x", "weights": {"w": 1}}, "tags": [1, 2],
                               "extra": {"anything": [1]}}, "here")
    assert got == Outer(inner=Inner("x", {"w": 1.0}), tags=[1, 2], extra={"anything": [1]})
    assert isinstance(got.inner.weights["w"], float)
    with raises("key 'tags' in here must be a list of integers, got [1, 'x'] (list)"):
        from_mapping(Outer, {"inner": {"name": "x"}, "tags": [1, "x"]}, "here")
    with raises("key 'weights' in section 'inner' of here must be a mapping, got 3 (integer)"):
        from_mapping(Outer, {"inner": {"name": "x", "weights": 3}}, "here")
    with raises("key 'size' in here must be an integer or null, got 1.5 (number)"):
        from_mapping(Outer, {"inner": {"name": "x"}, "size": 1.5}, "here")
    with raises("unknown key 'nme' in section 'inner' of here; valid keys: name, weights"):
        from_mapping(Outer, {"inner": {"nme": "x"}}, "here")
