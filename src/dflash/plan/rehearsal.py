"""Rehearsals: a phase run as `rehearsal/<phase>`, with exactly its DAG, runs and stage options, but the target, the
sizes, the hub datasets, the bench device and the scheduler requests of the overlay file `configs/rehearsal.yaml`.

Each substitution is recorded as field -> [the phase's value, the rehearsal's], grouped by the section of the run
config it belongs to; the planner puts the groups a stage reads into that stage's config under `rehearsal`, so
they are part of its key and of its provenance.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import replace
from pathlib import Path

from dflash.data import root as data_root
from dflash.data.benchmarks import DATASETS
from dflash.errors import ConfigError
from dflash.plan import pretrained
from dflash.plan.config import Phase, check_run, fill_run, load_phase, load_yaml, validate
from dflash.plan.paths import PHASES_DIR, REHEARSAL_FILE
from dflash.plan.stages import STAGE_NAMES

PREFIX = "rehearsal/"
STAGE_SECTION = {"data_parallel": "resources.train"}     # a stage config key that is derived from another section


def is_rehearsal(name: str) -> bool:
    return name.startswith(PREFIX)


def load_overlay(path: Path = REHEARSAL_FILE) -> dict:
    """The overlay, validated, its target's defaults filled (read once per process and file version)."""
    if not path.is_file():
        raise ConfigError(f"rehearsal overlay {path} not found")
    return copy.deepcopy(_overlay(path, path.stat().st_mtime_ns))


@functools.cache
def _overlay(path: Path, mtime: int) -> dict:
    doc = load_yaml(path)
    validate(doc, str(path), "rehearsal")
    doc["target"] = fill_run({"target": doc["target"]})["target"]
    return {**doc, "source": str(path)}


def load(name: str, phases_dir: Path = PHASES_DIR, overlay_path: Path = REHEARSAL_FILE) -> Phase:
    """The rehearsal `rehearsal/<phase>` of a phase file."""
    return rehearse(load_phase(name.removeprefix(PREFIX), phases_dir), load_overlay(overlay_path))


class _Record:
    """Substitutions of one run: section -> {field path: [phase value, rehearsal value]}."""

    def __init__(self):
        self.by_section: dict[str, dict[str, list]] = {}

    def set(self, section: dict | list, key, value, path: str, drop: bool = False) -> None:
        """section[key] = value (`drop`: remove the key), recorded if it changes."""
        old = section[key] if isinstance(section, list) else section.get(key)
        if (old == value and not drop) or (drop and key not in section):
            return
        self.by_section.setdefault(path.split(".")[0], {})[path] = [copy.deepcopy(old), value]
        if drop:
            section.pop(key, None)
        else:
            section[key] = copy.deepcopy(value)

    def cap(self, section: dict, key: str, bound: int, path: str) -> None:
        if section.get(key) is None or section[key] > bound:
            self.set(section, key, bound, path)


def _stand_in(src: dict, overlay: dict, where: str) -> dict:
    """The local source standing in for hub source `src`: its `format`, records converted from the file's own."""
    ins = overlay["stand_ins"]
    found = ins.get(f"{src['hub_id']}:{src.get('split', 'train')}") or ins.get(src["hub_id"])
    if found is None:
        raise ConfigError(f"{where}: no local stand-in for hub dataset {src['hub_id']!r} in {overlay['source']} "
                          "(stand_ins)")
    new = {**{k: v for k, v in src.items() if k not in ("hub_id", "split")}, "kind": "jsonl", "path": found["path"]}
    if found["from"] != src.get("format", "messages"):
        new["convert_from"] = found["from"]
    return new


def _run(run: dict, overlay: dict, where: str) -> tuple[dict, dict]:
    """(the rehearsal's run config, its substitutions by section)."""
    run, rec, caps = copy.deepcopy(run), _Record(), overlay["caps"]
    rec.set(run, "target", overlay["target"], "target")      # with its defaults filled (load_overlay)
    for i, src in enumerate(run["data"]["sources"]):
        if src["kind"] == "hub":
            rec.set(run["data"]["sources"], i, _stand_in(src, overlay, f"{where}.data.sources.{i}"),
                    f"data.sources.{i}")
        rec.cap(run["data"]["sources"][i], "n", caps["source_rows"], f"data.sources.{i}.n")
    rec.cap(run["regenerate"], "max_new_tokens", caps["regenerate_new_tokens"], "regenerate.max_new_tokens")
    rec.cap(run["tokenize"], "max_length", caps["max_length"], "tokenize.max_length")
    rec.cap(run["tokenize"], "min_loss_tokens", caps["min_loss_tokens"], "tokenize.min_loss_tokens")
    layers = (run["target"].get(run["target"]["kind"]) or {}).get("num_layers")
    if layers and max(run["drafter"].get("target_layer_ids") or [0]) >= layers - 1:
        rec.set(run["drafter"], "target_layer_ids", None, "drafter.target_layer_ids")     # z-lab's rule for the depth
    if "mask_token_id" not in run["drafter"]:
        rec.set(run["drafter"], "mask_token", None, "drafter.mask_token", drop=True)
        rec.set(run["drafter"], "mask_token_id", overlay["mask_token_id"], "drafter.mask_token_id")
    for key, cap in (("max_steps", "train_steps"), ("micro_batch_size", "micro_batch_size"),
                     ("grad_accum", "grad_accum"), ("num_anchors", "num_anchors")):
        rec.cap(run["train"], key, caps[cap], f"train.{key}")
    for key, value in overlay["bench"].items():
        rec.set(run["bench"], key, value, f"bench.{key}")
    rec.cap(run["bench"], "max_new_tokens", caps["bench_new_tokens"], "bench.max_new_tokens")
    for stage in STAGE_NAMES:
        rec.set(run["resources"], stage, overlay["resources"], f"resources.{stage}")
    return run, rec.by_section


def _dataset(ds: dict, overlay: dict) -> tuple[dict, dict]:
    ds, rec = copy.deepcopy(ds), _Record()
    local = DATASETS[ds["name"]].local_file if ds["name"] in DATASETS else None
    if "path" not in ds and local:
        rec.set(ds, "path", data_root.join(overlay["benchmark_data"], local), "dataset.path")
    rec.cap(ds, "n", overlay["caps"]["prompts"], "dataset.n")
    return ds, rec.by_section.get("dataset", {})


def rehearse(phase: Phase, overlay: dict) -> Phase:
    """`phase` with the overlay's substitutions; `Phase.rehearsal` holds them for the planner and the report."""
    source = overlay["source"]
    runs, subs, left_out = {}, {}, {}
    for name, run in phase.runs.items():
        where = f"{phase.file}: runs.{name}"
        ref = run["drafter"].get("pretrained")
        if ref and pretrained.parse(ref).hub_id:
            left_out[name] = (f"drafter.pretrained {ref}: a hub checkpoint of the real target, which neither loads "
                              "offline nor fits the rehearsal target")
            continue
        new, subs[name] = _run(run, overlay, where)      # valid: the phase's run with values of the valid overlay
        check_run(new, f"{source} on {where}")
        runs[name] = new
    keep = overlay.get("datasets")
    if keep is not None and not any(ds["name"] in keep for ds in phase.datasets):
        keep = None                             # a phase with none of them keeps its own (e.g. the synthetic sets)
    datasets, ds_subs, ds_left_out = [], {}, []
    for ds in phase.datasets:
        if keep is not None and ds["name"] not in keep:
            ds_left_out.append(ds["name"])
            continue
        new, ds_subs[ds["name"]] = _dataset(ds, overlay)
        datasets.append(new)
    return replace(phase, name=PREFIX + phase.name, runs=runs, datasets=datasets, chain=[*phase.chain, source],
                   rehearsal={"overlay": source, "description": overlay.get("description", "").strip(),
                              "runs": subs, "datasets": ds_subs, "left_out": left_out,
                              "datasets_left_out": ds_left_out})


def stage_record(phase: Phase, run: str, stage: str, config: dict, dataset: dict | None) -> dict:
    """The substitutions a stage instance reads: those of the sections in its config, its scheduler request
    (`resources.<stage>`: the entry its jobs use; the baseline's is the bench's), and (bench, baseline) its
    dataset's."""
    subs = phase.rehearsal["runs"][run]
    out = {}
    for key in config:
        section = STAGE_SECTION.get(key, key)
        found = subs.get(section.split(".")[0], {})
        out.update({p: v for p, v in found.items() if p == section or p.startswith(section + ".")})
    out.update({p: v for p, v in subs.get("resources", {}).items() if p == f"resources.{stage}"})
    if dataset is not None:
        out.update(phase.rehearsal["datasets"].get(dataset["name"], {}))
    return out
