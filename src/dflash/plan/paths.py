"""Where things live, relative to the repository root (the working directory of Snakemake and the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PHASES_DIR = Path("configs/phases")
REHEARSAL_FILE = Path("configs/rehearsal.yaml")
SCHEMA_DIR = Path("workflow/schemas")
RESULTS = Path("results")


@dataclass(frozen=True)
class ResultsTree:
    """A results tree: `results/` (what Snakemake writes) or a published copy such as docs/results/PHASE."""

    root: Path = RESULTS

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def report_dir(self, phase: str) -> Path:
        return self.root / "reports" / phase

    @property
    def checkpoints(self) -> Path:
        """Resumable work (training checkpoints, regeneration chunks), outside every declared output: Snakemake
        never deletes it."""
        return self.root / "checkpoints"

    def work_dir(self, stage: str, key: str) -> Path:
        return self.checkpoints / f"{stage}-{key}"

    def lock_file(self, stage: str, key: str) -> Path:
        """The lock a process holds while it builds this stage instance (one writer at a time)."""
        return self.root / ".locks" / f"{stage}-{key}.lock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def run_links(self, phase: str, run: str) -> Path:
        """Friendly links results/phases/<phase>/<run>/<stage> to the hashed directories."""
        return self.root / "phases" / phase / run

    @classmethod
    def of(cls, directory: Path) -> ResultsTree:
        """The tree that holds a stage directory (<root>/<stage>/<key>) or a report (<root>/reports/<phase>)."""
        return cls(Path(directory).parent.parent)
