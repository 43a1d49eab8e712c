"""JSON-lines files of records (training data, local benchmark copies, stage outputs: records, metrics,
conversations): the one reader, with the file and line of every error, and the one writer."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped), with `iter_jsonl`'s checks and messages."""
    return [record for _, _, record in iter_jsonl(path)]


def jsonl_line(record: dict[str, Any]) -> str:
    """One record as a line of a JSON-lines file: every writer of one goes through this."""
    return json.dumps(record) + "\n"


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Write `records` to `path`, one line each (the file is replaced)."""
    with open(path, "w") as f:
        for record in records:
            f.write(jsonl_line(record))
