"""Published numbers the reports compare against: `references.csv`, one row per cell, each with its source id.

A *line* is the set of rows of one (source, target model, method, temperature): e.g. the z-lab README's
Qwen3-8B-DFlash-b16 at temperature 0. A phase names the lines it reports against in `references` (a source id, or
`{source, method, target_model, temperature, label}` to narrow it), and may record a published run as an `external`
run (`{source, method, label}`), whose per-dataset values then appear in the tables next to its own runs. Aggregates
over datasets are never read from here: the table holds per-dataset cells only and reports recompute the means.

Sources (`SOURCES`): the z-lab README table and the paper's Table 1 are the drafter anchors; the paper's Table 10 is
an ablation (a drafter trained WITHOUT target features) that the seed PR quoted as "the z-lab reference"; the seed PR's
own measurements are a published run, not an anchor.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TABLE = Path(__file__).with_name("references.csv")
METRICS = ("tau", "speedup_decode_only", "speedup_e2e")

SOURCES: dict[str, dict[str, str]] = {
    "zlab_readme": {
        "title": "z-lab/dflash README results table",
        "short": "z-lab README",
        "role": "anchor",
        "detail": "HF Transformers backend, thinking off, max 2048 new tokens, block 16, H200/B200, batch 1; "
                  "speedup is decode-only",
    },
    "dflash_paper_table1": {
        "title": "DFlash paper (arXiv 2602.06036) Table 1",
        "short": "paper Table 1",
        "role": "anchor",
        "detail": "HF Transformers backend, thinking off, max 2048 new tokens, batch 1; 7 datasets",
    },
    "dflash_paper_table10_no_target_features": {
        "title": "DFlash paper Table 10: ablation, drafter trained WITHOUT target features",
        "short": "paper Table 10 ABLATION (no target features)",
        "role": "ablation",
        "detail": "not a drafter anchor; the seed PR quoted these tau values as its z-lab reference",
    },
    "torchspec_pr51": {
        "title": "TorchSpec PR #51 (seed PR), its own published measurements",
        "short": "seed PR #51",
        "role": "published run",
        "detail": "SGLang, 1xH100, greedy, 2048 new tokens, concurrency 1",
    },
}

METHOD_TITLES = {
    "dflash-b16": "DFlash b16 (z-lab release)",
    "eagle3-speculator": "EAGLE-3 (Qwen3-8B-speculator.eagle3)",
    "dflash-b16-no-target-features": "DFlash b16 without target features",
    "phase_g": "phase G",
    "phase_h": "phase H",
    "phase_h_gsm8k_rebench": "phase H model, GSM8K decode-only re-bench",
    "phase_j_ultrachat": "phase J (UltraChat)",
    "phase_k_p2_accum1": "phase K P2-accum1",
    "phase_k_p2_wsd": "phase K P2-WSD",
}


@dataclass(frozen=True)
class Ref:
    source: str
    target_model: str
    method: str
    temperature: float
    backend: str
    dataset: str
    metric: str
    value: float
    note: str


@dataclass(frozen=True)
class Line:
    """The rows of one (source, target model, method, temperature)."""

    source: str
    target_model: str
    method: str
    temperature: float
    label: str
    rows: tuple[Ref, ...]

    @property
    def id(self) -> str:
        t = f"{self.temperature:g}"
        return f"{self.source}/{self.target_model}/{self.method}/T{t}"

    @property
    def role(self) -> str:
        """anchor (a released DFlash drafter), baseline (another method in an anchor table), ablation, published run"""
        role = SOURCES[self.source]["role"]
        return "baseline" if role == "anchor" and not self.method.startswith("dflash") else role

    @property
    def backend(self) -> str:
        return ",".join(sorted({r.backend for r in self.rows}))

    def values(self, metric: str) -> dict[str, float]:
        """dataset -> value of `metric`."""
        return {r.dataset: r.value for r in self.rows if r.metric == metric}

    def note(self, dataset: str, metric: str) -> str:
        return next((r.note for r in self.rows if r.dataset == dataset and r.metric == metric), "")


@lru_cache(maxsize=4)
def load(path: Path = TABLE) -> tuple[Ref, ...]:
    rows = []
    with open(path, newline="") as f:
        for i, r in enumerate(csv.DictReader(f), start=2):
            if r["source"] not in SOURCES:
                raise ValueError(f"{path}:{i}: unknown source id {r['source']!r}")
            if r["metric"] not in METRICS:
                raise ValueError(f"{path}:{i}: unknown metric {r['metric']!r}")
            rows.append(Ref(r["source"], r["target_model"], r["method"], float(r["temperature"]), r["backend"],
                            r["dataset"], r["metric"], float(r["value"]), r["note"]))
    return tuple(rows)


def query(source: str | None = None, method: str | None = None, target_model: str | None = None,
          temperature: float | None = None, dataset: str | None = None, metric: str | None = None) -> list[Ref]:
    return [r for r in load()
            if (source is None or r.source == source) and (method is None or r.method == method)
            and (target_model is None or r.target_model == target_model)
            and (temperature is None or r.temperature == float(temperature))
            and (dataset is None or r.dataset == dataset) and (metric is None or r.metric == metric)]


def target_model_of(run: dict) -> str | None:
    """The model name references use for a run's target (`Qwen/Qwen3-8B` -> `Qwen3-8B`); None for synthetic."""
    t = run["target"]
    name = t.get("hub_id") or t.get("path") or t.get("gguf_file")
    return None if t["kind"] == "synthetic" or not name else Path(name).name


def default_label(source: str, method: str, target_model: str, temperature: float) -> str:
    return f"{SOURCES[source]['short']}: {METHOD_TITLES.get(method, method)}, {target_model}, T={temperature:g}"


def as_selector(entry: str | dict) -> dict:
    return {"source": entry} if isinstance(entry, str) else dict(entry)


def lines(entry: str | dict, target_model: str | None, temperature: float) -> list[Line]:
    """The reference lines an entry of a phase's `references` selects for a run with this target and temperature.
    An entry's own `target_model` / `temperature` win over the run's."""
    sel = as_selector(entry)
    target = sel.get("target_model", target_model)
    if target is None:
        return []
    temp = float(sel.get("temperature", temperature))
    rows = query(sel["source"], sel.get("method"), target, temp)
    groups: dict[str, list[Ref]] = {}
    for r in rows:
        groups.setdefault(r.method, []).append(r)
    return [Line(sel["source"], target, m, temp, sel.get("label") or default_label(sel["source"], m, target, temp),
                 tuple(rs)) for m, rs in groups.items()]


def external_line(ext: dict, default_target: str | None) -> Line:
    """The published run an `external` entry names; its own target_model / temperature win over the defaults."""
    target = ext.get("target_model", default_target)
    temp = float(ext.get("temperature", 0.0))
    rows = tuple(query(ext["source"], ext["method"], target, temp))
    if not rows:
        raise ValueError(f"no rows for source {ext['source']!r}, method {ext['method']!r}, target {target!r}, "
                         f"temperature {temp:g} in {TABLE.name}")
    label = ext.get("label") or default_label(ext["source"], ext["method"], target, temp)
    return Line(ext["source"], target, ext["method"], temp, label, rows)


def check(entry: str | dict, external: bool = False) -> str | None:
    """Why a `references` entry (or, with external=True, an `external` entry) names nothing; None when it is fine."""
    sel = as_selector(entry)
    src = sel.get("source")
    if src not in SOURCES:
        return f"unknown source {src!r}; known: {', '.join(SOURCES)}"
    temperature = sel.get("temperature", 0.0 if external else None)
    rows = query(src, sel.get("method"), sel.get("target_model"), temperature)
    if not rows:
        parts = [f"{k} {sel[k]!r}" for k in ("method", "target_model") if k in sel]
        parts += [f"temperature {temperature:g}"] if temperature is not None else []
        what = ", ".join(parts) or "any method"
        methods = sorted({r.method for r in query(src)})
        return f"source {src!r} has no rows for {what}; its methods: {', '.join(methods)}"
    if external:
        if "target_model" not in sel and len({r.target_model for r in rows}) > 1:
            return f"method {sel['method']!r} of {src!r} covers several target models; set target_model"
    return None
