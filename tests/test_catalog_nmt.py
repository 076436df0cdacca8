"""CatalogNMT: the corpus from real gettext catalogs, its fingerprint, splits, tokenizer, model,
loss and BLEU. Real catalogs come from the machine (/usr/share/locale); edge cases from
hand-made ``.mo`` files (tests/catalog_helpers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from replay import Recorder, open_trajectory, run
from replay.errors import TaskError
from replay.task import load_task, recorded_args
from replay.tasks import catalog_corpus as corpus
from replay.tasks import subword
from replay.tasks.bleu import copy_baseline, corpus_bleu
from replay.tasks.catalog_nmt import CatalogNMT
from tests.catalog_helpers import make_locale, sentences, write_mo

REF = "replay.tasks.catalog_nmt:CatalogNMT"
TINY = {"d_model": 16, "heads": 2, "ffn_dim": 16, "encoder_layers": 1, "decoder_layers": 1,
        "vocab_size": 300, "dropout": 0.0}
REAL = os.path.isdir("/usr/share/locale/fr/LC_MESSAGES")
needs_catalogs = pytest.mark.skipif(not REAL, reason="no French gettext catalogs installed")


def tiny(tmp_path, **kw) -> CatalogNMT:
    """A small task on a hand-made corpus of 120 pairs."""
    args = {"language": "xx", "locale_dir": make_locale(str(tmp_path / "locale")),
            "valid_size": 10, "test_size": 10, **TINY, **kw}
    return CatalogNMT(**args)


# --- the corpus ---------------------------------------------------------------------------------


@needs_catalogs
def test_real_catalogs_give_the_same_corpus_every_time():
    pairs, stats = corpus.load_corpus("fr")
    again, _ = corpus.load_corpus("fr")
    assert pairs == again and corpus.fingerprint(pairs) == corpus.fingerprint(again)
    assert len(pairs) > 5000 and stats.pairs == len(pairs)
    assert pairs == sorted(pairs) and len({e for e, _ in pairs}) == len(pairs)  # one per message
    assert stats.excluded >= 1  # the iso-codes lists are left out
    assert all(2 <= len(e.split(" ")) <= 25 and "\n" not in e + t for e, t in pairs)
    assert "/usr/share/locale" in stats.directories


def test_filters_plural_context_accelerators_iso_lists_and_unreadable_catalogs(tmp_path):
    root = str(tmp_path)
    write_mo(f"{root}/xx/LC_MESSAGES/app.mo", {
        "Save _As": "Speichern _unter",
        "Copy _Location": "O_rt kopieren",
        "_Open the file": "開く(_O) ファイル",
        "&Quit the program": "Programm &beenden",
        "max_connections is too low": "max_connections ist zu klein",
        ("menu", "Print this page"): "Diese Seite drucken",
        ("%d file copied", "%d files copied"): ["%d Datei", "%d Dateien"],
        "Help": "Hilfe",  # one word: not a sentence
        "%s: %s": "%s: %s",  # no two words with letters
        "Read\nthe   manual": "Lies\tdas Handbuch",
        "Numbers only please": "12 34",  # translation without a letter
    })
    write_mo(f"{root}/xx/LC_MESSAGES/other.mo", {"Print this page": "Seite drucken",
                                                 "Open a folder": "Ordner öffnen"})
    write_mo(f"{root}/xx/LC_MESSAGES/zzz.mo", {"Open a folder": "Ordner öffnen"})
    write_mo(f"{root}/xx/LC_MESSAGES/iso_3166-1.mo", {"Federal Republic of Germany": "BRD"})
    with open(f"{root}/xx/LC_MESSAGES/broken.mo", "wb") as f:
        f.write(b"not a catalog at all")
    pairs, stats = corpus.load_corpus("xx", locale_dir=root)
    assert dict(pairs) == {
        "Save As": "Speichern unter",
        "Copy Location": "Ort kopieren",
        "Open the file": "開く ファイル",
        "Quit the program": "Programm beenden",
        "max_connections is too low": "max_connections ist zu klein",
        "Print this page": "Diese Seite drucken",  # tie of two translations: the smaller string
        "Open a folder": "Ordner öffnen",
        "Read the manual": "Lies das Handbuch",
    }
    assert stats.skipped == ["broken.mo"] and stats.excluded == 1 and stats.catalogs == 3
    assert (stats.plural, stats.not_sentence, stats.no_letter, stats.duplicates) == (1, 2, 1, 2)
    assert "1 skipped as unreadable (broken.mo)" in stats.describe()


def test_catalogs_of_several_directories_first_directory_wins(tmp_path, monkeypatch):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_mo(f"{a}/xx/LC_MESSAGES/app.mo", {"Open the door": "first"})
    write_mo(f"{b}/xx/LC_MESSAGES/app.mo", {"Open the door": "second"})
    write_mo(f"{b}/xx/LC_MESSAGES/more.mo", {"Close the door": "zu"})
    monkeypatch.setattr(corpus, "SEARCH_DIRS", (str(tmp_path / "missing"), a, b))
    pairs, stats = corpus.load_corpus("xx")
    assert pairs == [("Close the door", "zu"), ("Open the door", "first")]
    assert stats.directories == [a, b]


def test_no_catalogs_names_the_directories_searched(tmp_path, monkeypatch):
    make_locale(str(tmp_path), "yy")
    monkeypatch.setattr(corpus, "SEARCH_DIRS", (str(tmp_path / "none"), str(tmp_path)))
    with pytest.raises(TaskError, match=r"no gettext catalogs for language 'xx' in "
                       rf".*none, {tmp_path}; languages with the most catalogs there: yy \(1\)"):
        corpus.load_corpus("xx")
    with pytest.raises(TaskError, match=r"locale_dir '/nonexistent' is not a directory"):
        CatalogNMT(language="xx", locale_dir="/nonexistent")


def test_too_few_pairs_says_how_many_and_which_packages_ship_more(tmp_path):
    with pytest.raises(TaskError, match=r"give 120 sentence pairs, fewer than requested \(train "
                       r"200 \+ valid 10 \+ test 10\); .*Debian packages: gcc-12-locales"):
        tiny(tmp_path, train_size=200)


# --- the splits and the fingerprint -------------------------------------------------------------


def test_splits_are_disjoint_seeded_and_nested(tmp_path):
    task = tiny(tmp_path)
    english = {name: {e for e, _ in pairs} for name, pairs in task.texts.items()}
    assert [len(task.texts[s]) for s in ("train", "valid", "test")] == [100, 10, 10]
    assert not english["train"] & english["test"] and not english["train"] & english["valid"]
    assert not english["valid"] & english["test"]
    assert tiny(tmp_path).texts == task.texts
    other = tiny(tmp_path, seed=1)
    assert other.texts["test"] != task.texts["test"]
    small = tiny(tmp_path, train_size=30)
    assert small.texts["test"] == task.texts["test"]  # held-out splits do not move
    assert small.texts["train"] == task.texts["train"][:30]


def test_a_corpus_with_another_fingerprint_is_refused(tmp_path):
    task = tiny(tmp_path)
    args = {**TINY, "language": "xx", "locale_dir": str(tmp_path / "locale"),
            "valid_size": 10, "test_size": 10, "fingerprint": "f" * 64}
    with pytest.raises(TaskError, match=rf"give corpus sha256 {task.fingerprint[:16]}…, but the "
                       r"run was recorded on a corpus with sha256 ffffffffffffffff…; replay on a "
                       r"machine with the same catalog packages"):
        CatalogNMT(**args)


def test_replay_refuses_a_machine_whose_catalogs_changed(tmp_path):
    locale = make_locale(str(tmp_path / "locale"))
    args = {**TINY, "language": "xx", "locale_dir": locale, "valid_size": 10, "test_size": 10,
            "tokenizer": str(tmp_path / "tok.json")}
    task = CatalogNMT(**args)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = task.collate(task.datasets()["train"][:8])
    with Recorder(model, str(tmp_path / "traj"), task=REF, task_args=recorded_args(task, args)) as rec:
        for _ in range(2):
            loss, n = task.loss(model, batch)
            opt.zero_grad()
            (loss / n).backward()
            opt.step()
            rec.step(loss=loss.item() / n)
    recorded = open_trajectory(str(tmp_path / "traj")).task_args
    assert recorded["fingerprint"] == task.fingerprint
    assert recorded["tokenizer_sha256"] == subword.file_sha256(str(tmp_path / "tok.json"))
    write_mo(f"{locale}/xx/LC_MESSAGES/new.mo", sentences(3, offset=500))  # an update arrives
    with pytest.raises(TaskError, match=r"but the run was recorded on a corpus with sha256 "
                       rf"{task.fingerprint[:16]}…"):
        run(str(tmp_path / "traj"), task=REF, out=str(tmp_path / "cube.zarr"), scheduler="sync",
            progress=False)
    assert not os.path.exists(tmp_path / "cube.zarr")


# --- the tokenizer ------------------------------------------------------------------------------


@needs_catalogs
@pytest.mark.parametrize("language", ["ja", "ru"])
def test_tokenizer_round_trip_on_real_catalogs(language):
    if not os.path.isdir(f"/usr/share/locale/{language}/LC_MESSAGES"):
        pytest.skip(f"no {language} catalogs")
    pairs, _ = corpus.load_corpus(language)
    texts = [t for pair in pairs[:3000] for t in pair]
    tok = subword.train_tokenizer(texts[:2000], 600)
    ids = subword.encode(tok, texts)
    assert subword.decode(tok, ids) == texts
    assert tok.get_vocab_size() == 600 and min(min(s) for s in ids if s) >= 3  # no specials


_TRAIN = """
import sys
from replay.tasks import catalog_corpus, subword
pairs, _ = catalog_corpus.load_corpus("xx", locale_dir=sys.argv[1])
tok = subword.train_tokenizer([t for p in pairs for t in p], 400)
print(subword.save_tokenizer(tok, sys.argv[2]))
"""


def test_tokenizer_training_is_deterministic_across_processes(tmp_path):
    locale = make_locale(str(tmp_path / "locale"), n=400)
    digests = []
    for k in range(2):
        out = subprocess.run([sys.executable, "-c", _TRAIN, locale, str(tmp_path / f"t{k}.json")],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
        digests.append(out.stdout.strip())
    assert digests[0] == digests[1]
    assert (tmp_path / "t0.json").read_bytes() == (tmp_path / "t1.json").read_bytes()


def test_tokenizer_is_stored_loaded_and_checked(tmp_path):
    path = str(tmp_path / "tok.json")
    task = tiny(tmp_path, tokenizer=path)
    args = task.record_args()
    assert args["tokenizer"] == os.path.abspath(path)
    assert args["tokenizer_sha256"] == subword.file_sha256(path)
    mtime = os.stat(path).st_mtime_ns
    again = load_task(REF, args)  # loads, never retrains
    assert os.stat(path).st_mtime_ns == mtime and again.datasets() == task.datasets()
    with open(path, "a", encoding="utf-8") as f:
        f.write(" ")
    with pytest.raises(TaskError, match=r"tokenizer file .*tok.json has sha256 \w+…, but the run "
                       r"was trained with \w+…"):
        load_task(REF, args)
    os.remove(path)
    with pytest.raises(TaskError, match=r"tokenizer file .*tok.json not found"):
        load_task(REF, args)
    with pytest.raises(TaskError, match=r"a recorded run needs its tokenizer stored"):
        tiny(tmp_path).record_args()


# --- model, loss, counts ------------------------------------------------------------------------


def test_shared_embeddings_are_one_parameter_recorded_once(tmp_path):
    task = tiny(tmp_path, share_all_embeddings=True)
    model = task.build_model()
    every = dict(model.named_parameters(remove_duplicate=False))
    shared = [every[n] for n in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                 "decoder.output_projection.weight")]
    assert shared[0] is shared[1] is shared[2]
    with Recorder(model, str(tmp_path / "traj")):
        pass
    traj = open_trajectory(str(tmp_path / "traj"))
    assert traj.aliases == {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight",
                            "decoder.output_projection.weight": "encoder.embed_tokens.weight"}
    counts = task.token_counts()
    assert list(counts) == ["encoder.embed_tokens.weight"]
    separate = tiny(tmp_path).token_counts()
    assert torch.equal(counts["encoder.embed_tokens.weight"], sum(separate.values()))
    decoder_only = tiny(tmp_path, share_decoder_embeddings=True).build_model()
    assert decoder_only.decoder.output_projection.weight is decoder_only.decoder.embed_tokens.weight
    assert decoder_only.encoder.embed_tokens.weight is not decoder_only.decoder.embed_tokens.weight


@pytest.mark.parametrize("pre", [False, True])
def test_eval_loss_is_deterministic_plain_cross_entropy(tmp_path, pre):
    task = tiny(tmp_path, normalize_before=pre, dropout=0.3, label_smoothing=0.1)
    model = task.build_model()
    names = [n for n, _ in model.named_parameters()]
    assert ("encoder.layer_norm.weight" in names) == pre
    batch = task.collate(task.datasets()["test"])
    model.eval()
    a, n = task.loss(model, batch)
    b, _ = task.loss(model, batch)
    assert torch.equal(a, b) and n == int((batch["tgt_out"] != 0).sum())
    logits = model(batch["src"], batch["tgt_in"])
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten(),
                                            ignore_index=0, reduction="sum")
    assert torch.allclose(a, ref)
    model.train()
    torch.manual_seed(0)
    c, _ = task.loss(model, batch)
    assert not torch.allclose(a, c)  # dropout and label smoothing act in train mode only
    double = task.build_model().double().eval()
    d, _ = task.loss(double, batch)
    assert torch.allclose(d.float(), a, rtol=1e-4)


def test_batches_token_counts_and_item_size(tmp_path):
    task = tiny(tmp_path)
    items = task.datasets()["train"]
    batch = task.collate(items[:4])
    s, t = items[0]
    assert batch["src"][0, len(s)] == subword.EOS and batch["tgt_in"][0, 0] == subword.BOS
    assert task.item_size(items[0]) == len(s) + len(t)
    counts = task.token_counts()
    assert int(counts["encoder.embed_tokens.weight"].sum()) == sum(len(s) + 1 for s, _ in items)
    assert int(counts["decoder.output_projection.weight"][subword.EOS]) == len(items)
    assert int(counts["decoder.embed_tokens.weight"][subword.BOS]) == len(items)
    first = next(task.training_batches(16, 0))
    assert torch.equal(first["src"], next(task.training_batches(16, 0))["src"])


# --- BLEU --------------------------------------------------------------------------------------


@needs_catalogs
def test_bleu_of_a_perfect_and_of_a_copy_system():
    task = CatalogNMT(language="fr", train_size=300, test_size=200, **TINY)
    sources, refs = task.sides("test")
    assert corpus_bleu(refs, refs)["score"] == pytest.approx(100.0)
    copy = copy_baseline(sources, refs)["score"]
    assert 0 < copy < 60  # software messages share tokens (%s, names) with their translation
    assert corpus_bleu(["the"] * len(refs), refs)["score"] < copy
    reverse = CatalogNMT(language="fr", train_size=300, test_size=200, direction="from_en", **TINY)
    assert reverse.sides("test") == (refs, sources)


def test_arguments_are_checked(tmp_path):
    for bad, message in [({"direction": "sideways"}, "direction='sideways' must be"),
                         ({"train_size": 0}, "train_size=0 must be an integer >= 1"),
                         ({"d_model": 15}, "d_model=15 must be even"),
                         ({"dropout": 1.5}, "must be numbers in \\[0, 1\\)"),
                         ({"vocab_size": 100}, "vocab_size=100 is too small")]:
        with pytest.raises(TaskError, match=message):
            tiny(tmp_path, **bad)


def test_lca_train_records_the_tasks_record_args(tmp_path):
    from replay.cli import main

    config = tmp_path / "c.yaml"
    args = {**TINY, "language": "xx", "locale_dir": make_locale(str(tmp_path / "locale")),
            "valid_size": 10, "test_size": 10, "tokenizer": str(tmp_path / "tok.json")}
    config.write_text(json.dumps({"task": {"ref": REF, "args": args},
                                  "train": {"steps": 2, "lr": 0.01, "batch_size": 8}}))
    assert main(["train", str(config), "--out", str(tmp_path / "traj")]) == 0
    recorded = open_trajectory(str(tmp_path / "traj")).task_args
    assert recorded == load_task(REF, args).record_args()
    assert recorded["fingerprint"] and recorded["tokenizer_sha256"]
    assert {k: recorded[k] for k in args if k != "tokenizer"} == {
        k: v for k, v in args.items() if k != "tokenizer"}


@pytest.mark.parametrize("pre", [False, True])
def test_incremental_greedy_decoding_equals_decoding_the_whole_prefix(tmp_path, pre):
    task = tiny(tmp_path, normalize_before=pre, encoder_layers=2, decoder_layers=2)
    model = task.build_model().eval()
    with torch.no_grad():  # untrained logits are flat: sharpen them so argmax is stable
        model.decoder.output_projection.weight.mul_(8)
    batch = task.collate(task.datasets()["test"][:6])
    max_len = torch.tensor([3, 5, 7, 9, 11, 13])
    got = model.greedy(batch["src"], subword.BOS, subword.EOS, max_len)
    with torch.no_grad():
        for b, ids in enumerate(got):
            src = batch["src"][b:b + 1, :int((batch["src"][b] != 0).sum())]
            prefix = [subword.BOS]
            while len(prefix) <= int(max_len[b]):
                logits = model(src, torch.tensor([prefix]))[0, -1]
                logits[[subword.PAD, subword.BOS]] = float("-inf")
                nxt = int(logits.argmax())
                if nxt == subword.EOS:
                    break
                prefix.append(nxt)
            assert ids == prefix[1:], b
