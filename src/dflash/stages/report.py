"""report: tables, figures and report.md of one phase (`dflash.results.report`), from its runs' raw records."""

from __future__ import annotations

from dflash.checksums import sha256_file
from dflash.data import references as refs
from dflash.results import report


def run(ctx) -> dict:
    phase = ctx.registry.phases[ctx.config["phase"]]
    data = report.collect(ctx.registry, phase.name)
    report.write_outputs(phase, data, ctx.out)
    return {"inputs": {f"references/{refs.TABLE.name}": sha256_file(refs.TABLE)}}
