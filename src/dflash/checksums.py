"""sha256 of files and of directory trees: the one hashing helper of provenance, data loaders and checkpoints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def sha256_file(path: Path) -> str:
    return sha256_files([path])


def sha256_files(paths: Iterable[Path]) -> str:
    """One digest over the concatenated contents of several files, in the given order (a dataset split over
    files); for one file, its sha256."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tree_checksums(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `directory` (relative paths), files named in `skip` excluded."""
    out = {}
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file() and p.name not in skip:
            out[str(p.relative_to(directory))] = sha256_file(p)
    return out
