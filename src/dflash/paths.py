"""Where things live, relative to the repository root (the working directory of Snakemake and the CLI)."""

from pathlib import Path

PHASES_DIR = Path("configs/phases")
SCHEMA_DIR = Path("workflow/schemas")

_results = Path("results")


def results_root() -> Path:
    """The results tree: `results/` (what Snakemake writes), or a published copy chosen with `use_results`."""
    return _results


def use_results(root: str | Path) -> None:
    """Read (and, for the report, write) another results tree, e.g. a published copy under docs/results/."""
    global _results
    _results = Path(root)


def checkpoints_dir() -> Path:
    """Training work directories, outside every declared output: Snakemake never deletes them."""
    return _results / "checkpoints"


def stage_dir(stage: str, key: str) -> Path:
    return _results / stage / key


def report_dir(phase: str) -> Path:
    return _results / "reports" / phase
