"""A real parallel corpus from the gettext message catalogs installed on the machine.

Every Debian system carries thousands of human translations of software messages in
``<locale dir>/<language>/LC_MESSAGES/*.mo``: English ``msgid`` → translated ``msgstr``.
:func:`load_corpus` reads them with Python's :mod:`gettext` and turns them into sentence
pairs, deterministically (the same catalogs give the same pairs, in the same order):

1. **Directories** (:func:`locale_dirs`): ``locale_dir`` if given, else :data:`SEARCH_DIRS` in
   order — Python's own default (``sys.base_prefix/share/locale``; in a pyenv or venv build it
   may hold nothing), then ``/usr/share/locale`` (Debian's), then ``/usr/local/share/locale``.
   Catalogs of all of them are read; a catalog file name present in several is read from the
   first (as ``PATH`` works).
2. **Catalogs**: the ``*.mo`` files of ``<dir>/<language>/LC_MESSAGES``, sorted by name, except
   the ISO code-name lists (:data:`EXCLUDED_CATALOGS`: language, country, script and currency
   names, which are names, not sentences). A catalog that :class:`gettext.GNUTranslations`
   cannot read (not UTF-8 and not in its declared charset, corrupt) is skipped and counted.
3. **Entries**: the header (empty msgid) and plural entries are left out; a message context
   (``ctxt\\x04msgid``) is dropped. Runs of white space (newlines, tabs) become one space.
4. **Accelerators** (:func:`strip_accelerators`): a GTK mnemonic ``_`` (``Save _As``) or a Qt
   ``&`` (``&Open``) is removed from both sides when the English has exactly one such marker
   at a word start; in the translation the marker may sit inside a word (``Ö_ffnen``) or be a
   CJK-style suffix (``開く(_O)``), which is removed whole.
5. **Sentences**: the English must have ``min_words``..``max_words`` white-space separated
   words (default 2–25), at least two of them containing a letter outside printf/brace format
   specifiers (so ``%s: %s`` goes); the translation must contain a letter.
6. **De-duplication**: one pair per English message. When catalogs translate the same
   English differently, the translation found most often wins, ties to the smallest string.

Pairs are sorted by English. Their :func:`fingerprint` (sha256 of the pairs as JSON) identifies
the corpus; :func:`split` deals them into test, valid and train by a seeded permutation, one
pair per English message, so no English message falls in two splits.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import gettext
import hashlib
import json
import os
import re
import struct
import sys
from dataclasses import dataclass, field

import numpy as np

from replay.errors import TaskError

SEARCH_DIRS = (os.path.join(sys.base_prefix, "share", "locale"), "/usr/share/locale",
               "/usr/local/share/locale")
"""Locale directories searched when no ``locale_dir`` is given, in order."""

EXCLUDED_CATALOGS = ("iso_639*", "iso_3166*", "iso_15924*", "iso_4217*")
"""Catalog file-name patterns left out: the iso-codes lists of names (languages, countries,
scripts, currencies)."""

# Debian packages that install many more catalogs (named in the too-few-pairs error).
MORE_TRANSLATIONS = ("gcc-12-locales", "util-linux-locales", "gutenprint-locales",
                     "and desktop applications (gimp, inkscape, GNOME or KDE programs)")

Pair = tuple[str, str]
"""(English message, translation), white space normalised."""

_SPACE = re.compile(r"\s+")
_LETTER = re.compile(r"[^\W\d_]")
# printf conversions (%s, %-10.3lf, %1$s, %%) and {placeholders}: words of code, not language.
_FORMAT = re.compile(r"%(?:\d+\$)?[-+ #0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?"
                     r"(?:hh|h|ll|l|L|q|j|z|t)?[diouxXeEfFgGaAcspn%]|\{[^{}]*\}")
# A mnemonic marker at a word start, followed by a letter or digit; `&` not an entity.
_EN_MNEMONIC = re.compile(r"(?<![\w&_])(?:_(?=[^\W_])|&(?=[^\W_])(?![A-Za-z]+;))")
_CJK_MNEMONIC = re.compile(r"\s?\([_&][^\W_]\)")
_READ_ERRORS = (OSError, UnicodeError, LookupError, ValueError, struct.error, IndexError,
                KeyError)


@dataclass
class CorpusStats:
    """What :func:`load_corpus` read and why entries were left out (counts)."""

    directories: list[str]
    catalogs: int = 0
    skipped: list[str] = field(default_factory=list)  # catalog files that could not be read
    excluded: int = 0  # ISO code-name catalogs
    entries: int = 0  # singular, non-header entries read
    plural: int = 0
    not_sentence: int = 0  # English outside the word range, or without two words with letters
    no_letter: int = 0  # translation without a letter
    duplicates: int = 0  # entries merged into an English message seen before
    pairs: int = 0

    def describe(self) -> str:
        skipped = (f", {len(self.skipped)} skipped as unreadable ({', '.join(self.skipped[:3])}"
                   f"{' …' if len(self.skipped) > 3 else ''})" if self.skipped else "")
        return (f"{self.pairs} pairs from {self.catalogs} catalogs in "
                f"{', '.join(self.directories)}{skipped}; left out: {self.excluded} ISO "
                f"code-name catalogs, {self.plural} plural entries, {self.not_sentence} "
                f"non-sentences, {self.no_letter} translations without a letter, "
                f"{self.duplicates} repeated English messages")


def locale_dirs(locale_dir: str | None = None) -> list[str]:
    """The directories to read: ``[locale_dir]`` if given, else :data:`SEARCH_DIRS` (existing
    ones, each real path once)."""
    if locale_dir is not None:
        if not os.path.isdir(locale_dir):
            raise TaskError(f"CatalogNMT: locale_dir {locale_dir!r} is not a directory; give the "
                            f"directory holding <language>/LC_MESSAGES/*.mo (e.g. "
                            f"/usr/share/locale) or leave it null to search the default list")
        return [locale_dir]
    out, seen = [], set()
    for d in SEARCH_DIRS:
        real = os.path.realpath(d)
        if os.path.isdir(d) and real not in seen:
            seen.add(real)
            out.append(d)
    return out


def catalog_files(language: str, dirs: list[str], searched: list[str]) -> list[str]:
    """Paths of the ``*.mo`` catalogs of ``language``, sorted by file name, first dir wins."""
    chosen: dict[str, str] = {}
    for d in dirs:
        folder = os.path.join(d, language, "LC_MESSAGES")
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.endswith(".mo") and name not in chosen:
                    chosen[name] = os.path.join(folder, name)
    if not chosen:
        have = available_languages(dirs)
        offer = ", ".join(f"{lang} ({n})" for lang, n in have[:12]) or "none"
        raise TaskError(f"CatalogNMT: no gettext catalogs for language {language!r} in "
                        f"{', '.join(searched) or '(no existing directory)'}; languages with the "
                        f"most catalogs there: {offer}; pass another language, or locale_dir")
    return [chosen[name] for name in sorted(chosen)]


def available_languages(dirs: list[str]) -> list[tuple[str, int]]:
    """(language, number of catalogs) in ``dirs``, most catalogs first."""
    counts: collections.Counter = collections.Counter()
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for lang in os.listdir(d):
            folder = os.path.join(d, lang, "LC_MESSAGES")
            if os.path.isdir(folder):
                counts[lang] += sum(1 for n in os.listdir(folder) if n.endswith(".mo"))
    return sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: (-kv[1], kv[0]))


def strip_accelerators(english: str, translation: str) -> Pair:
    """Both sides without their keyboard-accelerator marker (module docstring, rule 4)."""
    markers = _EN_MNEMONIC.findall(english)
    if len(markers) != 1 or english.count(markers[0]) != 1:
        return english, translation
    mark = markers[0]
    english = _EN_MNEMONIC.sub("", english, count=1)
    if _CJK_MNEMONIC.search(translation):
        translation = _CJK_MNEMONIC.sub("", translation, count=1)
    elif translation.count(mark) == 1:
        translation = re.sub(re.escape(mark) + r"(?=[^\W_])", "", translation, count=1)
    return english, translation


def is_sentence(english: str, min_words: int, max_words: int) -> bool:
    """``min_words``..``max_words`` words, at least two of them with a letter outside format
    specifiers."""
    words = english.split(" ")
    return (min_words <= len(words) <= max_words
            and sum(1 for w in words if _LETTER.search(_FORMAT.sub("", w))) >= 2)


def read_catalog(path: str) -> dict:
    """The parsed ``{msgid: msgstr}`` (plural keys are ``(msgid, n)`` tuples) of one ``.mo``."""
    with open(path, "rb") as fp:
        # GNUTranslations decodes with the catalog's declared charset; _catalog is the mapping
        # it parses into (the same attribute in every CPython since 2.x).
        return gettext.GNUTranslations(fp)._catalog


def load_corpus(language: str, locale_dir: str | None = None, min_words: int = 2,
                max_words: int = 25) -> tuple[list[Pair], CorpusStats]:
    """The de-duplicated (English, translation) pairs of ``language``, sorted by English.

    Kept per process while the catalog files (names, sizes, modification times) stay the same,
    since replays and reports build the task several times."""
    dirs = locale_dirs(locale_dir)
    searched = [locale_dir] if locale_dir is not None else list(SEARCH_DIRS)
    files = catalog_files(language, dirs, searched)
    key = (tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files),
           min_words, max_words)
    if key not in _CACHE:
        _CACHE.clear()  # one corpus at a time: a process rarely needs two
        _CACHE[key] = _read(files, min_words, max_words)
    pairs, stats = _CACHE[key]
    return list(pairs), dataclasses.replace(stats, skipped=list(stats.skipped))


_CACHE: dict = {}


def _read(files: list[str], min_words: int, max_words: int) -> tuple[list[Pair], CorpusStats]:
    stats = CorpusStats(directories=sorted({os.path.dirname(os.path.dirname(os.path.dirname(f)))
                                            for f in files}))
    found: dict[str, collections.Counter] = {}
    for path in files:
        name = os.path.basename(path)
        if any(fnmatch.fnmatch(name, p) for p in EXCLUDED_CATALOGS):
            stats.excluded += 1
            continue
        try:
            catalog = read_catalog(path)
        except _READ_ERRORS:
            stats.skipped.append(name)
            continue
        stats.catalogs += 1
        for key, value in catalog.items():
            if not isinstance(key, str):  # (msgid, n): one key per plural form
                stats.plural += key[1] == 0
                continue
            if not key:
                continue  # the header
            stats.entries += 1
            english = _SPACE.sub(" ", key.rpartition("\x04")[2]).strip()
            translation = _SPACE.sub(" ", value).strip()
            english, translation = strip_accelerators(english, translation)
            if not is_sentence(english, min_words, max_words):
                stats.not_sentence += 1
            elif not _LETTER.search(translation):
                stats.no_letter += 1
            else:
                if english in found:
                    stats.duplicates += 1
                found.setdefault(english, collections.Counter())[translation] += 1
    pairs = []
    for english in sorted(found):
        votes = found[english]
        best = min(votes, key=lambda t: (-votes[t], t))
        pairs.append((english, best))
    stats.pairs = len(pairs)
    return pairs, stats


def fingerprint(pairs: list[Pair]) -> str:
    """sha256 (hex) of the pairs as UTF-8 JSON: equal exactly when the corpora are equal."""
    data = json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def split(pairs: list[Pair], sizes: dict[str, int | None], seed: int,
          where: str) -> dict[str, list[Pair]]:
    """{"train", "valid", "test"}: lists of pairs, dealt by a permutation seeded by ``seed``.

    Test takes the first ``sizes["test"]`` pairs of the permutation, valid the next, train
    the next ``sizes["train"]`` (None: all the rest). So valid and test do not depend on the
    train size: a smaller train split is a subset of a larger one. ``where`` (the language and
    directories) goes into the too-few-pairs error.
    """
    held = sizes["test"] + sizes["valid"]
    want = held + (sizes["train"] if sizes["train"] is not None else 1)
    if len(pairs) < want:
        asked = "train all the rest" if sizes["train"] is None else f"train {sizes['train']}"
        raise TaskError(f"CatalogNMT: the catalogs of {where} give {len(pairs)} sentence pairs, "
                        f"fewer than requested ({asked} + valid {sizes['valid']} + test "
                        f"{sizes['test']}); ask for fewer, or install more translations (Debian "
                        f"packages: {', '.join(MORE_TRANSLATIONS)})")
    order = np.random.default_rng([seed, 0x5B1]).permutation(len(pairs))
    stop = None if sizes["train"] is None else held + sizes["train"]
    picks = {"test": order[:sizes["test"]], "valid": order[sizes["test"]:held],
             "train": order[held:stop]}
    return {name: [pairs[i] for i in idx] for name, idx in picks.items()}
