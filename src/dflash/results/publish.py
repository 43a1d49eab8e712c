"""Publish a phase's report with its whole provenance chain as a results tree to commit (e.g. docs/results/PHASE).

The copy mirrors results/ (`reports/<phase>/`, `<stage>/<key>/`), so `dflash audit PHASE --results DEST` checks it
exactly as it checks results/: checksums, keys, and every table cell recomputed from the raw records. Model weights
and token tensors (files under a `model/` folder or with a weights suffix) are left out; `omitted.json` lists each
with the sha256 its stage recorded, so that the audit tells a file left out on purpose from a lost one. Every copied
file is checked against its provenance first: a changed file is never published.

The destination is refused when it is a file, lies inside a results tree (or holds one), or holds another phase's
publication (`--force` adds this one beside it). The new tree is built beside the destination and swapped into
place in one step; what the destination held besides this phase's previous publication (a README, other phases'
publications) is kept, and of that publication only what the new one no longer holds goes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath

from dflash.checksums import sha256_file
from dflash.errors import InputError
from dflash.plan.paths import ResultsTree
from dflash.processes import libc
from dflash.results import provenance

OMITTED = "omitted.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".gguf")


def left_out(rel: str) -> bool:
    """Whether a stage output (path relative to its directory) is a weights file that is not published."""
    p = PurePosixPath(rel)
    return p.suffix in WEIGHT_SUFFIXES or "model" in p.parts[:-1]


def _records(results: ResultsTree, phase: str) -> list[dict]:
    """The provenance records of `phase`'s report and every stage directory below it, each once."""
    out = results.report_dir(phase)
    if not (out / provenance.PROVENANCE).is_file():
        raise InputError(f"{out}: no report ({provenance.PROVENANCE} missing); build it first")
    records = provenance.chain(out)
    missing = [r["dir"] for r in records if r.get("missing")]
    if missing:
        raise InputError(f"stage directories of {phase}'s report are missing or incomplete: {missing}")
    return records


def _files(prov: dict, rel_dir: PurePosixPath) -> set[str]:
    """'<rel_dir>/<file>' of what a publication holds of one stage directory: provenance.json and the outputs that
    are not weights."""
    return {str(rel_dir / provenance.PROVENANCE),
            *(str(rel_dir / rel) for rel in prov.get("outputs", {}) if not left_out(rel))}


def _rel_dir(prov: dict) -> PurePosixPath:
    return PurePosixPath(prov["stage"], prov["key"])


def publications(dest: Path) -> dict[str, set[str]]:
    """Phase -> the files (relative to `dest`) of its publication in `dest`: its report and the provenance chain
    below it, as the records there list them."""
    out = {}
    for report in sorted(Path(dest).glob(f"reports/*/{provenance.PROVENANCE}")):
        phase = report.parent.name
        files: set[str] = set()
        for prov in provenance.chain(report.parent):
            if prov.get("missing"):
                continue
            rel_dir = PurePosixPath("reports", phase) if prov["stage"] == "report" else _rel_dir(prov)
            files.update(_files(prov, rel_dir))
        out[phase] = files
    return out


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def check_dest(results: ResultsTree, phase: str, dest: Path, force: bool = False) -> dict[str, set[str]]:
    """Refuse a destination that is a file, inside (or holding) a results tree, or holding another phase's
    publication (unless `force`: then this one is added beside it). Returns the publications there."""
    if dest.exists() and not dest.is_dir():
        raise InputError(f"{dest}: exists and is not a folder; publish into a new or published folder")
    for tree in {results.root, ResultsTree().root}:
        where = ("is the results tree" if dest.resolve() == tree.resolve() else
                 f"is inside the results tree {tree}" if _inside(dest, tree) else
                 f"holds the results tree {tree}" if tree.exists() and _inside(tree, dest) else None)
        if where:
            raise InputError(f"{dest}: {where}; publish elsewhere, e.g. docs/results/{phase}")
    found = publications(dest) if dest.is_dir() else {}
    others = sorted(set(found) - {phase})
    if others and not force:
        raise InputError(f"{dest}: holds the publication of {', '.join(others)}; publish {phase} into a folder of "
                         "its own, or pass --force to add it beside (nothing of theirs is removed)")
    return found


def publish(results: ResultsTree, phase: str, dest: Path, force: bool = False) -> dict:
    """Copy the report and its chain into `dest`, built beside it and swapped into place whole. What `dest` held
    besides this phase's previous publication (a README, with `force` other phases' publications) is kept; of that
    publication, what the new one no longer holds goes. Returns counts of directories, files copied and files left
    out."""
    dest = Path(dest)
    found = check_dest(results, phase, dest, force)
    records = _records(results, phase)
    theirs = set().union(*(files for p, files in found.items() if p != phase))
    replaced = found.get(phase, set()) - theirs          # what this phase's previous publication alone wrote
    omitted, copied, written = {}, 0, set()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = provenance.tmp_name(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for prov in records:
            src, rel_dir = ((results.report_dir(phase), PurePosixPath("reports", phase)) if prov["stage"] == "report"
                            else (results.stage_dir(prov["stage"], prov["key"]), _rel_dir(prov)))
            (tmp / rel_dir).mkdir(parents=True)
            shutil.copy2(src / provenance.PROVENANCE, tmp / rel_dir / provenance.PROVENANCE)
            written.add(str(rel_dir / provenance.PROVENANCE))
            for rel, digest in prov.get("outputs", {}).items():
                if left_out(rel):
                    omitted[str(rel_dir / rel)] = digest
                    continue
                f = src / rel
                if not f.is_file() or sha256_file(f) != digest:
                    raise InputError(f"{f}: missing or changed since its stage recorded it; not publishing")
                (tmp / rel_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, tmp / rel_dir / rel)
                written.add(str(rel_dir / rel))
                copied += 1
        kept_omitted = _keep(dest, tmp, written, replaced, theirs)
        (tmp / OMITTED).write_text(json.dumps({"reason": "model weights and token tensors are not published; "
                                               "sha256 as recorded by their stage",
                                               "files": {**kept_omitted, **omitted}}, indent=1, sort_keys=True) + "\n")
        _swap(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dirs": len(records), "copied": copied, "omitted": len(omitted)}


def _keep(dest: Path, tmp: Path, written: set[str], replaced: set[str], theirs: set[str]) -> dict[str, str]:
    """Link into `tmp` every file of `dest` that the new publication neither writes nor replaces (files of other
    publications, a README); a file of the user's that the new publication would overwrite stops it. Returns the
    entries of dest's omitted.json that other publications still need."""
    if not dest.is_dir():
        return {}
    for f in sorted(p for p in dest.rglob("*") if p.is_file() or p.is_symlink()):
        rel = f.relative_to(dest).as_posix()
        if rel == OMITTED or rel in replaced:
            continue
        if rel in written:
            if rel in theirs:
                continue                  # a stage directory both publications hold: the same key, the same files
            raise InputError(f"{f}: not written by `dflash publish` and in the way of {rel}; move it away first")
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        if f.is_symlink():
            (tmp / rel).symlink_to(os.readlink(f))
        else:
            try:
                os.link(f, tmp / rel)
            except OSError:
                shutil.copy2(f, tmp / rel)
    dirs = {str(PurePosixPath(rel).parent) for rel in theirs if rel.endswith("/" + provenance.PROVENANCE)}
    return {name: digest for name, digest in omitted_files(dest).items()
            if "/".join(PurePosixPath(name).parts[:2]) in dirs}


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _swap(tmp: Path, dest: Path) -> None:
    """Put the finished tree `tmp` in place of `dest` in one step (renameat2 RENAME_EXCHANGE; where the file system
    lacks it, two renames); `tmp` then holds the old tree."""
    if not dest.exists():
        os.rename(tmp, dest)
        return
    lib = libc()
    if lib is not None and hasattr(lib, "renameat2") and lib.renameat2(
            AT_FDCWD, os.fsencode(tmp), AT_FDCWD, os.fsencode(dest), RENAME_EXCHANGE) == 0:
        return
    old = tmp.with_name(tmp.name + "-old")
    os.rename(dest, old)
    os.rename(tmp, dest)
    os.rename(old, tmp)


def omitted_files(root: Path) -> dict[str, str]:
    """'<stage>/<key>/<file>' -> recorded sha256 of the files a published tree left out ({} for results/)."""
    path = Path(root) / OMITTED
    return json.loads(path.read_text())["files"] if path.is_file() else {}
