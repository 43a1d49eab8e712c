"""Whether a phase can run here: a phase whose `data:` files (dflash.data.root) are not under the data root is
unavailable. It still loads and plans (its keys do not depend on the files), so `dflash gc`, the audit of its
published tree and every other phase are unaffected; `dflash plan` and `snakemake <phase>` refuse it and say what
is missing and how to get it."""

from __future__ import annotations

from dflash.data import root as data_root
from dflash.errors import UserError
from dflash.plan.config import Phase


class Unavailable(UserError):
    """A phase's local data files are not under the data root."""


def missing(phase: Phase) -> list[str]:
    """The `data:` files the phase reads that are not under the data root (each once, in phase order)."""
    paths = [src["path"] for run in phase.runs.values() for src in run["data"]["sources"] if src["kind"] == "jsonl"]
    paths += [ds["path"] for ds in phase.datasets if "path" in ds]
    return [p for p in dict.fromkeys(paths) if data_root.is_rooted(p) and data_root.missing(p)]


def message(phase: Phase) -> str | None:
    """One line saying why `phase` cannot run here and how to get its data (None: it can)."""
    gone = missing(phase)
    if not gone:
        return None
    shown = ", ".join(gone[:4]) + (f" and {len(gone) - 4} more" if len(gone) > 4 else "")
    return (f"{phase.file}: phase {phase.name} is unavailable here: {len(gone)} of its local data files are not in "
            f"the data root {data_root.describe()}: {shown}. {data_root.HOW[0].upper()}{data_root.HOW[1:]}; or "
            "drop a benchmark's `path:` to load it from the hub")


def check(phase: Phase) -> None:
    """Raise Unavailable (exit 2 in the CLI) when the phase's local data is missing."""
    problem = message(phase)
    if problem:
        raise Unavailable(problem)
