"""Published drafters as runs: `drafter.pretrained` names a drafter directory in the z-lab format (`config.json` with
`dflash_config`, `model.safetensors`), on this machine or on the Hugging Face hub.

* a local directory: a path starting with `/`, `./` or `../` (relative paths from the repository root, like data
  paths), identified by the sha256 of the two files;
* a hub id `owner/name[@revision]`, identified by the id and the revision as written (no revision: the newest,
  resolved when the bench runs and recorded in its provenance). Planning never calls the hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dflash.checksums import sha256_file

FILES = ("config.json", "model.safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOCAL = ("/", "./", "../")


@dataclass(frozen=True)
class Pretrained:
    ref: str                       # as written in the phase file
    path: Path | None = None       # local directory
    hub_id: str | None = None
    revision: str | None = None


def parse(ref: str) -> Pretrained:
    """A `drafter.pretrained` value; ValueError (saying what is accepted) for anything else."""
    if ref.startswith(_LOCAL):
        return Pretrained(ref, path=Path(ref))
    hub_id, at, revision = ref.partition("@")
    if not _HUB_ID.match(hub_id) or (at and not revision):
        raise ValueError(f"{ref!r} is neither a local directory (a path starting with /, ./ or ../) nor a hub id "
                         "owner/name[@revision]")
    return Pretrained(ref, hub_id=hub_id, revision=revision or None)


def problem(ref: str) -> str | None:
    """What is wrong with a `drafter.pretrained` value at planning time (None: nothing)."""
    try:
        p = parse(ref)
    except ValueError as e:
        return str(e)
    if p.path is None:
        if Path(ref).is_dir():
            return f"{ref!r} is read as a hub id, but a local directory of that name exists: write ./{ref} for it"
        return None
    missing = [f for f in FILES if not (p.path / f).is_file()]
    if missing:
        return (f"{p.path} has no {' or '.join(missing)} (expected a drafter directory in the z-lab format, e.g. a "
                "convert stage's output)")
    return None


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a drafter file, computed once per process per (file, size, mtime): every stage job plans all
    phases, and a drafter's weights may be gigabytes."""
    st = path.stat()
    ident = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if ident not in _DIGESTS:
        _DIGESTS[ident] = sha256_file(path)
    return _DIGESTS[ident]


def identity(ref: str) -> dict:
    """What a bench key hashes for `drafter.pretrained`: {"files": {name: sha256}} of a local directory (not its
    path), {"hub_id", "revision"} of a hub id."""
    p = parse(ref)
    if p.path is not None:
        return {"files": {f: file_sha256(p.path / f) for f in FILES}}
    return {"hub_id": p.hub_id, "revision": p.revision}
