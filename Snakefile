"""DFlash experiment harness: `snakemake <phase>` builds results/reports/<phase>/ (default: smoke)."""

from snakemake.utils import min_version

min_version("9.0")


include: "rules/common.smk"
include: "rules/target.smk"
include: "rules/prepare.smk"
include: "rules/regenerate.smk"
include: "rules/tokenize.smk"
include: "rules/train.smk"
include: "rules/convert.smk"
include: "rules/baseline.smk"
include: "rules/bench.smk"
include: "rules/report.smk"
