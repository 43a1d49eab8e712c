"""The data root: the one folder that phases name their local data files by, as `data:<path inside it>`.

Set it with the environment variable `DFLASH_DATA` (relative paths from the repository root) or, for a Snakemake
run, `--config data_root=DIR` (which sets the variable for the run and its jobs); default: `data/` in the repository
(git-ignored). The folder holds the data files at the paths the phases name (`gsm8k/train.jsonl`, ...), as the
project's shared data folder does; `tests/fixtures/data/` holds a few rows of each.

Stage keys hash a `data:` path in the spelling the project used before the data root existed
(`../shared/data/<path>`), so that results built then keep their keys; the key names the file, not where the root
is on a machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ENV = "DFLASH_DATA"
CONFIG = "data_root"                  # snakemake --config data_root=DIR
PREFIX = "data:"
DEFAULT = Path("data")
KEY_SPELLING = "../shared/data/"
HOW = ("copy the files there (README: Data says where each comes from), or point the data root at a "
       f"folder that holds them: {ENV}=DIR, or `snakemake --config {CONFIG}=DIR`")


def root() -> Path:
    """The data root of this process."""
    return Path(os.environ.get(ENV) or DEFAULT)


def is_rooted(path: Any) -> bool:
    """Whether `path` is a `data:` path (a file under the data root)."""
    return isinstance(path, str) and path.startswith(PREFIX)


def resolve(path: str | os.PathLike[str]) -> Path:
    """The file a config path names: `data:<rel>` under the data root, anything else as written."""
    if is_rooted(path):
        return root() / str(path).removeprefix(PREFIX)
    return Path(path)


def join(folder: str, rel: str) -> str:
    """`rel` inside `folder`, which may be the data root itself (`data:`) or a folder in it (`data:<dir>`)."""
    return folder + rel if folder == PREFIX else f"{folder.rstrip('/')}/{rel}"


def describe() -> str:
    """The data root as messages name it."""
    where = root()
    return f"{where}/" + ("" if where.is_dir() else " (it does not exist)")


def missing(path: str) -> str | None:
    """Why a `data:` path is not available here (None when its file exists)."""
    if resolve(path).exists():
        return None
    return f"{path} is not in the data root {describe()}"


def key_form(obj: Any, field: str | None = None) -> Any:
    """`obj` (a stage config) with every `data:` path (the value of a `path` field, or of a rehearsal record's
    `<...>.path`) in the spelling stage keys hash."""
    if isinstance(obj, dict):
        return {k: key_form(v, k) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [key_form(v, field) for v in obj]
    if is_rooted(obj) and field is not None and (field == "path" or field.endswith(".path")):
        return KEY_SPELLING + obj.removeprefix(PREFIX)
    return obj
