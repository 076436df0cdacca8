"""What every stage of ``lca paper`` writes with: the log callback type and strict JSON files."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

Log = Callable[[str], None]


def clean(value):
    """JSON-safe: NaN and infinities become null (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def write_json(path: str, data) -> None:
    """``data`` as indented UTF-8 JSON at ``path``, atomically (temp file + rename)."""
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(clean(data), f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
