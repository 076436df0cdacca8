"""`lca paper` end to end at tiny sizes: every stage, findings.json, reports, and a resumed run."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from analysis.claims import CLAIMS
from replay.cli import main
from replay.errors import ConfigError
from replay.paper.settings import load_paper_config

needs_catalogs = pytest.mark.skipif(not os.path.isdir("/usr/share/locale/fr/LC_MESSAGES"),
                                    reason="no French gettext catalogs installed")

TINY = {
    "task": {"ref": "replay.tasks.catalog_nmt:CatalogNMT",
             "args": {"language": "fr", "train_size": 120, "valid_size": 0, "test_size": 20,
                      "vocab_size": 300, "d_model": 16, "heads": 2, "ffn_dim": 32,
                      "encoder_layers": 3, "decoder_layers": 3, "normalize_before": True,
                      "dropout": 0.1, "label_smoothing": 0.1}},
    "train": {"steps": 16, "batch_size": 16, "lr": 3e-3, "warmup": 4, "log_every": 8},
    "record": {"keyframe_every": 8},
    "replay": {"datasets": ["train", "test"], "gradient": "sampled", "batches": 1,
               "batch_size": 8, "quadrature": "first-order",
               "groups": ["transformer", "sparse-dense", "frequency:25"], "scheduler": "sync"},
    "simulation": {"task_args": {"train_size": 24}, "steps": 6, "batch_size": 8,
                   "quadrature": "adaptive", "max_splits": 2, "alongside": True},
    "analysis": {"smooth": 15, "bleu_sentences": 10},
}


def write(tmp_path, data) -> str:
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@needs_catalogs
@pytest.mark.slow
def test_lca_paper_end_to_end_and_resumed(tmp_path):
    config, out = write(tmp_path, TINY), tmp_path / "run"
    assert main(["paper", config, "--out", str(out)]) == 0
    findings = json.loads((out / "findings.json").read_text())
    assert list(findings) == ["language", "direction", "pairs", "bleu", "tau", "claims"]
    assert (findings["language"], findings["direction"]) == ("fr", "to_en")
    assert findings["pairs"] == {"train": 120, "valid": 0, "test": 20}
    assert set(findings["bleu"]) == {"test", "copy_baseline"} and findings["bleu"]["copy_baseline"] > 0
    assert "transformer/train" in findings["tau"] and -1 <= findings["tau"]["transformer/train"] <= 1
    assert [c["id"] for c in findings["claims"]] == [c.id for c in CLAIMS]
    for claim in findings["claims"]:
        assert set(claim) == {"id", "claim", "paper", "measured", "holds"}
        assert isinstance(claim["holds"], bool) and claim["measured"]["summary"]
    for cube in ("lca-paper.zarr", "simulation/lca-exact.zarr", "simulation/lca-sampled.zarr",
                 "simulation/lca-exact-adaptive.zarr"):
        assert (out / cube).is_dir(), cube
    summary = (out / "report" / "summary.md").read_text()
    assert "## Findings: Zhu et al.'s claims judged on this run" in summary
    assert summary.index("## Groups by total LCA") < summary.index("## Findings: Zhu")
    assert "embeddings_softmax_little" in (out / "report" / "index.html").read_text()
    assert (out / "report-simulation" / "fig-occupation-transformer.png").exists()  # Figure 1
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert {"corpus_tokenizer", "train", "bleu", "paper_replay", "simulation_alongside",
            "findings_report"} <= set(stages)

    first = (out / "trajectory" / "manifest.json").read_bytes()
    assert main(["paper", config, "--out", str(out)]) == 0  # resumes: every stage is reused
    assert (out / "trajectory" / "manifest.json").read_bytes() == first
    again = json.loads((out / "findings.json").read_text())
    assert again == findings
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert all(stages[k]["reused"] for k in ("corpus_tokenizer", "train", "bleu", "paper_replay",
                                             "simulation_alongside"))

    changed = {**TINY, "train": {**TINY["train"], "lr": 1e-3}}
    changed["task"] = {**TINY["task"], "args": {**TINY["task"]["args"], "dropout": 0.0}}
    assert main(["paper", write(tmp_path, changed), "--out", str(out)]) == 1  # refused, kept
    assert (out / "trajectory" / "manifest.json").read_bytes() == first


@pytest.mark.parametrize("section, key, value, message", [
    ("replay", "gradient", "exact", r"key 'gradient' in section 'replay' of .* must be 'sampled'"),
    ("replay", "datasets", ["train"], r"key 'datasets' .* must include test"),
    ("replay", "groups", ["transformer"], r"must include sparse-dense, frequency:25"),
    ("replay", "cube", "x.zarr", r"key 'cube' in section 'replay' .* is set by lca paper"),
    ("train", "betas", [0.9], r"key 'betas' in section 'train' .* must be two numbers"),
    ("simulation", "quadrature", "first-order", r"key 'quadrature' in section 'simulation'"),
    ("analysis", "colour", 1, r"unknown key 'colour' in section 'analysis'"),
])
def test_paper_config_errors_name_the_key(tmp_path, section, key, value, message):
    data = json.loads(json.dumps(TINY))
    data[section][key] = value
    with pytest.raises(ConfigError, match=message):
        load_paper_config(write(tmp_path, data))


def test_the_shipped_configs_load():
    for name in ("configs/paper.yaml", "configs/paper-large.yaml"):
        config = load_paper_config(name)
        assert config.task.ref == "replay.tasks.catalog_nmt:CatalogNMT"
        assert config.replay.quadrature == "first-order" and config.replay.batches == 1
