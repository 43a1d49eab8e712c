"""JSON-lines files of records (training data, local benchmark copies), read with the file and line of every error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dflash.errors import DataError


def iter_jsonl(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(where, line index from 0, record) per non-blank line; `where` names the file, row and line for messages."""
    row_no = 0
    with open(path, "rb") as f:
        for index, raw in enumerate(f):
            if not raw.strip():
                continue
            row_no += 1
            where = f"{path}, row {row_no} (line {index + 1})"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})") \
                    from None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON: {exc}") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, index, record
