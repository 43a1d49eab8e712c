"""Publish a phase's report with its whole provenance chain as a results tree to commit (e.g. docs/results/PHASE).

The copy mirrors results/ (`reports/<phase>/`, `<stage>/<key>/`), so `dflash audit PHASE --results DEST` checks it
exactly as it checks results/: checksums, keys, and every table cell recomputed from the raw records. Model weights
and token tensors (files under a `model/` folder or with a weights suffix) are left out; `omitted.json` lists each
with the sha256 its stage recorded, so that the audit tells a file left out on purpose from a lost one. Every copied
file is checked against its provenance first: a changed file is never published.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePosixPath

from dflash.checksums import sha256_file
from dflash.errors import InputError
from dflash.plan.paths import Results
from dflash.results import provenance

OMITTED = "omitted.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".gguf")


def left_out(rel: str) -> bool:
    """Whether a stage output (path relative to its directory) is a weights file that is not published."""
    p = PurePosixPath(rel)
    return p.suffix in WEIGHT_SUFFIXES or "model" in p.parts[:-1]


def _records(results: Results, phase: str) -> list[dict]:
    """The provenance records of `phase`'s report and every stage directory below it, each once."""
    out = results.report_dir(phase)
    if not (out / provenance.PROVENANCE).is_file():
        raise FileNotFoundError(f"{out}: no report ({provenance.PROVENANCE} missing); build it first")
    records = provenance.chain(out)
    missing = [r["dir"] for r in records if r.get("missing")]
    if missing:
        raise FileNotFoundError(f"stage directories of {phase}'s report are missing or incomplete: {missing}")
    return records


def publish(results: Results, phase: str, dest: Path) -> dict:
    """Copy the report and its chain into `dest` (its entries replaced whole; other files there, e.g. a README, are
    kept). Returns counts of directories, files copied and files left out."""
    omitted, copied = {}, 0
    records = _records(results, phase)
    with provenance.atomic_dir(Path(dest), merge=True) as tmp:
        for prov in records:
            src, rel_dir = ((results.report_dir(phase), PurePosixPath("reports", phase)) if prov["stage"] == "report"
                            else (results.stage_dir(prov["stage"], prov["key"]),
                                  PurePosixPath(prov["stage"], prov["key"])))
            (tmp / rel_dir).mkdir(parents=True)
            shutil.copy2(src / provenance.PROVENANCE, tmp / rel_dir / provenance.PROVENANCE)
            for rel, digest in prov.get("outputs", {}).items():
                if left_out(rel):
                    omitted[str(rel_dir / rel)] = digest
                    continue
                f = src / rel
                if not f.is_file() or sha256_file(f) != digest:
                    raise InputError(f"{f}: missing or changed since its stage recorded it; not publishing")
                (tmp / rel_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, tmp / rel_dir / rel)
                copied += 1
        (tmp / OMITTED).write_text(json.dumps({"reason": "model weights and token tensors are not published; "
                                               "sha256 as recorded by their stage", "files": omitted},
                                              indent=1, sort_keys=True) + "\n")
    return {"dirs": len(records), "copied": copied, "omitted": len(omitted)}


def omitted_files(root: Path) -> dict[str, str]:
    """'<stage>/<key>/<file>' -> recorded sha256 of the files a published tree left out ({} for results/)."""
    path = Path(root) / OMITTED
    return json.loads(path.read_text())["files"] if path.is_file() else {}
