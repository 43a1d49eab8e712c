"""Where things live, relative to the repository root (the working directory of Snakemake and the CLI)."""

from pathlib import Path

PHASES_DIR = Path("configs/phases")
SCHEMA_DIR = Path("workflow/schemas")
RESULTS = Path("results")
CHECKPOINTS = RESULTS / "checkpoints"   # outside every declared output: Snakemake never deletes it


def stage_dir(stage: str, key: str) -> Path:
    return RESULTS / stage / key


def report_dir(phase: str) -> Path:
    return RESULTS / "reports" / phase
