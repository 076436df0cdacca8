"""Hand-made gettext catalogs for the CatalogNMT tests: real ``.mo`` files in a temp locale dir.

:func:`write_mo` writes the binary format of the GNU gettext manual ("The Format of GNU MO
Files"): magic, revision, N, the offsets of the two string tables, an empty hash table, then the
NUL-terminated strings. ``gettext.GNUTranslations`` reads them like any installed catalog.
"""

from __future__ import annotations

import os
import struct

HEADER = ("Content-Type: text/plain; charset={charset}\n"
          "Plural-Forms: nplurals=2; plural=(n != 1);\n")


def write_mo(path: str, entries: dict, charset: str = "UTF-8") -> str:
    """Write ``entries`` as a ``.mo`` file. Keys: msgid str, ``(context, msgid)`` or
    ``(msgid, msgid_plural)`` marked by a value that is a list (the plural forms)."""
    pairs = {"": HEADER.format(charset=charset)}
    for key, value in entries.items():
        if isinstance(value, list):
            pairs["\x00".join(key)] = "\x00".join(value)
        elif isinstance(key, tuple):
            pairs[f"{key[0]}\x04{key[1]}"] = value
        else:
            pairs[key] = value
    keys = sorted(pairs)
    ids = [k.encode(charset) for k in keys]
    strs = [pairs[k].encode(charset) for k in keys]
    n = len(keys)
    start = 7 * 4 + 16 * n
    offsets, blob = [], b""
    for data in ids + strs:
        offsets.append((len(data), start + len(blob)))
        blob += data + b"\x00"
    table = b"".join(struct.pack("<II", length, off) for length, off in offsets)
    head = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, start)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(head + table + blob)
    return path


def sentences(n: int, offset: int = 0) -> dict[str, str]:
    """``n`` distinct English sentences of 3–6 words with a mock translation each."""
    words = ["open", "the", "file", "cannot", "read", "write", "device", "network", "server",
             "user", "password", "disk", "folder", "window", "printer", "copy"]
    out = {}
    for i in range(offset, offset + n):
        k = 3 + i % 4
        en = " ".join(words[(i * 7 + j * 3 + i // 16) % len(words)] for j in range(k))
        en = f"{en} {i}"
        out[en] = " ".join(w[::-1] for w in en.split()) + " ."
    return out


def make_locale(root: str, language: str = "xx", n: int = 120, offset: int = 0) -> str:
    """A locale dir with ``n`` sentence pairs for ``language`` in one catalog ``app.mo``."""
    write_mo(os.path.join(root, language, "LC_MESSAGES", "app.mo"), sentences(n, offset))
    return root
