"""The stage table: the pipeline's stages, in order. One table drives the planner (`dflash.plan.keys`), the
runner (`dflash.stages.runner`), the Snakemake rules (`rules/common.smk`, `rules/stages.smk`) and the README's stage
table (`dflash stages`).

Each stage's code is a module `dflash.stages.<name>` with `run(ctx) -> {"summary": {...}, "inputs": {...}}` (see
`dflash.stages.runner.Context`). Adding a stage: a row in STAGES, its module, its rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dflash.plan import pretrained


def _all(run: dict) -> bool:
    return True


def builds_drafter(run: dict) -> bool:
    """Whether the run builds its own drafter through the data and train stages (False: `drafter.pretrained` names a
    published one, benched as it is). A `train.untrained` run builds one too, with no optimisation step."""
    return "pretrained" not in run["drafter"]


def _engine_options(section: dict) -> dict:
    """A `bench` / `regenerate` section as its stage reads it: the `sglang` options count only with engine sglang,
    the `fast` ones (bench) only with engine fast; with another engine the key holds `sglang: {}` and no `fast`, so
    an engine's options never change the keys of the others."""
    out = {k: v for k, v in section.items() if k != "fast" or section["engine"] == "fast"}
    return out if section["engine"] == "sglang" else {**out, "sglang": {}}


def data_parallel(train_resources: dict) -> int:
    """Training ranks of a layout: (GPUs per node - inference GPUs) x nodes, 1 on CPU. Part of the train key, since
    the global batch (and so the schedule) is micro batch x accumulation x ranks."""
    gpus = train_resources.get("gpus", 0) - train_resources.get("inference_gpus", 0)
    return max(1, gpus) * train_resources.get("nodes", 1)


@dataclass(frozen=True)
class Stage:
    name: str
    version: int                 # bump when the stage's code changes what it writes: its key and all below change
    upstream: tuple[str, ...]    # "a|b": the first of a, b that the run plans; "a?": a if planned, else none
    reads: str                   # the config a key hashes (docs)
    output: str                  # what the directory holds (docs)
    select: Callable             # (run, phase, dataset) -> the config subset the key hashes
    when: Callable = _all        # (run) -> whether the run plans this stage
    per_dataset: bool = False    # one instance per dataset entry of the phase
    threads: int = 1             # CPU threads of the job (GPU stages: see resources)
    resources: str | None = None  # the `resources.<stage>` entry its jobs use (default: its own name)
    since: tuple[str, int] | None = None   # (stage, version): planned only where that stage has at least that
                                           # format version (an older tree keeps its older layout)
    engine: bool = False         # per-dataset instances that share all but the dataset share one engine (one job)
    launch: bool = False         # its jobs run through `dflash launch` (torchrun, srun, Ray, as its resources ask)

    def upstream_names(self) -> set[str]:
        """Every stage name its upstream entries mention."""
        return {name for entry in self.upstream for name in alternatives(entry)}


def alternatives(entry: str) -> list[str]:
    """The stage names of one upstream entry, in order of preference."""
    return entry.removesuffix("?").split("|")


def _prepare(run: dict, phase, ds=None) -> dict:
    data = dict(run["data"])
    if data["exclude_benchmarks"]:
        data["benchmarks"] = phase.datasets
    return {"data": data}


# bench fields that change neither the target's output nor its timing (the baseline does not read them)
DRAFT_ONLY = ("block_size", "baseline")


def _baseline(run: dict, phase, ds=None) -> dict:
    bench = {k: v for k, v in _engine_options(run["bench"]).items() if k not in DRAFT_ONLY}
    return {"bench": bench, "dataset": ds}


def _bench(run: dict, phase, ds=None) -> dict:
    config = {"bench": _engine_options(run["bench"]), "dataset": ds}
    if not builds_drafter(run):
        config["drafter"] = pretrained.identity(run["drafter"]["pretrained"])
    return config


STAGES: tuple[Stage, ...] = (
    Stage("target", 1, (), "`target`", "model + tokenizer (or a pointer to a local path / hub id)",
          lambda run, phase, ds=None: {"target": run["target"]}, threads=2),
    Stage("prepare", 1, (), "`data` (+ the phase's datasets, to drop benchmark prompts)", "`conversations.jsonl`",
          _prepare, when=builds_drafter),
    Stage("regenerate", 1, ("prepare", "target"), "`regenerate`",
          "`conversations.jsonl` with the target's answers",
          lambda run, phase, ds=None: {"regenerate": _engine_options(run["regenerate"])},
          when=lambda run: builds_drafter(run) and run["regenerate"]["enabled"], threads=2),
    Stage("tokenize", 1, ("regenerate|prepare", "target"), "`tokenize`",
          "`tokens.pt` with the assistant-only loss mask", lambda run, phase, ds=None: {"tokenize": run["tokenize"]},
          when=builds_drafter),
    # train format versions, each as the one before but for what it names. 1: an anchor needs room for a whole
    # block; AdamW betas (0.9, 0.95); the loss is the mean of each micro-batch's weighted mean (the rule of
    # `train.loss_normalisation: micro_batch_mean`). 2: an anchor needs the loss mask at p and p + 1 and its block
    # may run past the row end (SpecForge's rule); AdamW betas (0.9, 0.999) as SpecForge. 3: the loss is normalised
    # by the weight sum over all micro-batches and ranks of a step, as SpecForge; the summary counts
    # `empty_micro_batches`
    Stage("train", 3, ("tokenize", "target"), "`drafter`, `train`, the layout's data-parallel size",
          "`drafter.pt`, `metrics.jsonl`, `summary.json`",
          lambda run, phase, ds=None: {"drafter": run["drafter"], "train": run["train"],
                                       "data_parallel": data_parallel(run["resources"].get("train", {}))},
          when=builds_drafter, launch=True),
    Stage("convert", 1, ("train",), "`convert`", "`model.safetensors` + `config.json` (z-lab / SGLang format)",
          lambda run, phase, ds=None: {"convert": run["convert"]}, when=builds_drafter),
    # baseline: the target-only decode of one dataset, shared by every run and phase with the same target, dataset
    # and decoding settings (nothing of the drafter); bench from format version 2 reads it (a version 1 bench
    # decoded its own baseline)
    Stage("baseline", 1, ("target",),
          "`bench` without `block_size` and `baseline` (engine and its options, dtype, device, max new tokens, "
          "temperature, seed, system prompt, thinking), one dataset entry",
          "`records.jsonl` (target-only, per request), `summary.json`", _baseline,
          when=lambda run: run["bench"]["baseline"], per_dataset=True, resources="bench", since=("bench", 2),
          engine=True),
    # bench format versions. 1: decodes its own baseline. 2: the baseline comes from the baseline stage; records
    # hold `verify_steps`; one engine per run; the hf and fast loops stop as z-lab's dflash_generate (one more step
    # when exactly max_new_tokens are committed, one step after a first token that is EOS; the baseline likewise):
    # accept lengths are z-lab's
    Stage("bench", 2, ("convert?", "target", "baseline?"),
          "`bench`, one dataset entry (`drafter.pretrained`: its files' sha256, or hub id and revision)",
          "`records.jsonl` (raw, per request), `summary.json`", _bench, per_dataset=True, engine=True),
)
# One per phase, over every run's train and bench stages; its directory is results/reports/<phase>/.
# report format version 2: the tau table's two one-definition columns, the speedup table's baseline and its
# hardware; one sentence for a phase without references; family averages of two or more sets
REPORT = Stage("report", 2, ("train", "bench"), "the phase", "`results/reports/<phase>/`",
               lambda run, phase, ds=None: {"phase": phase.name, "references": phase.references,
                                            "external": phase.external})

BY_NAME = {s.name: s for s in (*STAGES, REPORT)}
# the `resources.<entry>` names of a run's phase file (workflow/schemas/phase.schema.yaml lists the same)
RESOURCE_ENTRIES = tuple(dict.fromkeys(s.resources or s.name for s in STAGES))
STAGE_NAMES = tuple(s.name for s in STAGES)


def markdown_table() -> str:
    """The README's stage table."""
    rows = ["| stage | reads | upstream | output |", "|---|---|---|---|"]
    def entry(u: str) -> str:
        first, *rest = alternatives(u)
        if u.endswith("?"):
            return f"{first} (if planned)"
        return first + "".join(f" (or {r})" for r in rest)

    for s in (*STAGES, REPORT):
        up = ", ".join(entry(u) for u in s.upstream) or "-"
        if s is REPORT:
            up = "every bench and train of the phase"
        rows.append(f"| {s.name} | {s.reads} | {up} | {s.output} |")
    return "\n".join(rows)
