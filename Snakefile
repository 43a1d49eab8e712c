"""DFlash experiment harness: `snakemake <phase>` builds results/reports/<phase>/ (default: smoke)."""

from snakemake.utils import min_version

min_version("9.0")


include: "rules/common.smk"
include: "rules/stages.smk"
include: "rules/report.smk"
