"""Result files of one JSON row per line, appended as each row finishes so that an interrupted benchmark resumes."""

from __future__ import annotations

import json
import os


def read_rows(path: str) -> list[dict]:
    """The rows of a results file (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def append_row(path: str, row: dict) -> None:
    """Append ``row`` to ``path`` (its folder made if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
