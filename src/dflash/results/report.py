"""report: tables, figures and report.md of one phase, computed from the stages' raw records.

Every aggregate (math / code / chat / overall) is the mean of the per-dataset values shown in the same table;
nothing is copied from elsewhere. A phase's `external` runs (published per-dataset results, from the references
table) appear in the tables next to its own runs, with their aggregates recomputed the same way. Each run is compared
with the phase's `references` (and own runs with the external ones) in `tables/deltas.csv`; every reference value
carries its source id. Also links `results/phases/<phase>/<run>/<stage>` to the hashed directories.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from pathlib import Path

from dflash.data import references as refs
from dflash.data.benchmarks import FAMILIES, family
from dflash.data.jsonl import read_jsonl
from dflash.decoding import metrics
from dflash.plan.config import Phase
from dflash.plan.keys import Registry, RunPlan
from dflash.plan.paths import ResultsTree
from dflash.plan.rehearsal import PREFIX as REHEARSAL
from dflash.plan.stages import data_parallel

AGG_SOURCE = "mean of the run's per-dataset rows"

# tau_tokens_per_step (SGLang's spec_accept_length: completion tokens / verify steps) and tau_new_per_step (the
# prefill's token left out): one definition for every engine, from each record's token count and verify steps
TAU_COLS = ["run", "dataset", "family", "tau", "tau_token_weighted", "tau_no_bonus", "tau_tokens_per_step",
            "tau_new_per_step", "n_requests", "backend", "hardware", "temperature", "source"]
# speedup_decode_zlab and its TPOTs: z-lab's clock (restarted after the drafter's first pass, n tokens);
# speedup_decode_only: the project's own clock (from the end of prefill, n - 1 tokens); see decoding/metrics.py
SPEED_VALUES = ["speedup_decode_zlab", "tpot_dflash_zlab_ms", "tpot_baseline_zlab_ms", "speedup_decode_only",
                "speedup_e2e"]
# baseline: the baseline stage the speedups divide by (bench 2; the same engine by its key), and its hardware
SPEED_COLS = ["run", "dataset", *SPEED_VALUES, "lossless", "diverged", "n_requests", "backend", "hardware",
              "baseline_hardware", "temperature", "source", "baseline"]
TRAIN_COLS = ["run", "steps", "schedule_steps", "global_batch", "planned_global_batch", "samples", "epochs",
              "final_loss", "final_acc", "samples_per_s", "wall_s", "gpus", "gpu_hours", "device", "source"]
DELTA_COLS = ["run", "metric", "dataset", "family", "n_datasets", "value", "reference", "delta", "ratio",
              "compared_to", "role", "source", "label", "backend", "reference_backend"]
REF_COLS = ["reference", "role", "source", "label", "target_model", "method", "temperature", "backend", "dataset",
            "metric", "value", "note"]
TABLES = {"tau": TAU_COLS, "speedup": SPEED_COLS, "training": TRAIN_COLS, "deltas": DELTA_COLS,
          "references": REF_COLS}
REFERENCE_TABLES = ("deltas", "references")    # the tables of published numbers (Snakemake's report groups them)
# the columns of reports of format version 1 (no baseline columns, no one-definition tau columns)
TABLES_V1 = {**TABLES, "tau": [c for c in TAU_COLS if c not in ("tau_tokens_per_step", "tau_new_per_step")],
             "speedup": [c for c in SPEED_COLS if c not in ("baseline_hardware", "baseline")]}


def columns(name: str, version: int) -> list[str]:
    """The columns of table `name` in a report of format `version`."""
    return (TABLES_V1 if version < 2 else TABLES)[name]
# our summary field for each reference metric (published decode-only speedups: compared with z-lab's clock)
METRIC_FIELDS = {"tau": "tau_macro", "speedup_decode_only": "speedup_decode_zlab", "speedup_e2e": "speedup_e2e"}


def averages(values: dict[str, float | None]) -> dict[str, float]:
    """Per-family means and the overall mean of per-dataset values, each over at least two values (a mean of one
    would only repeat that dataset's value)."""
    out = {}
    for fam in FAMILIES:
        vals = [v for d, v in values.items() if family(d) == fam and v is not None]
        if len(vals) > 1:
            out[f"{fam} avg"] = statistics.fmean(vals)
    vals = [v for v in values.values() if v is not None]
    if len(vals) > 1:
        out["overall"] = statistics.fmean(vals)
    return out


def aggregate_names(datasets: list[str]) -> list[str]:
    """The aggregates `averages` can give over these datasets, in table order."""
    fams = [f"{f} avg" for f in FAMILIES if sum(family(d) == f for d in datasets) > 1]
    return fams + (["overall"] if len(datasets) > 1 else [])


# --------------------------------------------------------------------------- data


def bench_summary(directory: Path) -> dict:
    """A bench stage's summary with every metric recomputed from its raw records."""
    s = json.loads((directory / "summary.json").read_text())
    records = read_jsonl(directory / "records.jsonl")
    s.update(metrics.summarize(records, s["block_size"]))
    s.update(metrics.tau_definitions(records))
    return s


def run_entry(config: dict, bench: dict, bench_keys: dict, train_key: str | None = None, train: dict | None = None,
              train_metrics: list[dict] | None = None) -> dict:
    """One own run as the tables read it; a run with a pretrained drafter has no train stage (train_key None)."""
    entry = {"kind": "run", "config": config, "bench": bench, "bench_keys": dict(bench_keys), "train_key": train_key}
    if train_key is not None:
        entry.update(train=train, metrics=train_metrics)
    return entry


def collect_runs(ph: Phase, plans: dict[str, RunPlan], results: ResultsTree) -> dict:
    """Per own run: bench summaries recomputed from records, training metrics and summary (trained runs)."""
    out = {}
    for run, plan in plans.items():
        bench = {ds: bench_summary(results.stage_dir("bench", key)) for ds, key in plan.bench.items()}
        key = plan.keys.get("train")
        if key is None:
            out[run] = run_entry(ph.runs.get(run, {}), bench, plan.bench)
            continue
        tdir = results.stage_dir("train", key)
        out[run] = run_entry(ph.runs.get(run, {}), bench, plan.bench, key,
                             json.loads((tdir / "summary.json").read_text()), read_jsonl(tdir / "metrics.jsonl"))
    return out


def default_target(ph: Phase) -> str | None:
    targets = [refs.target_model_of(r) for r in ph.runs.values()]
    return next((t for t in targets if t), None)


def collect_external(ph: Phase) -> dict:
    """Per external run: its published per-dataset values (datasets of this phase only), from the references table."""
    names = [d["name"] for d in ph.datasets]
    out = {}
    for name, ext in ph.external.items():
        line = refs.external_line(ext, default_target(ph))
        bench = {}
        for ds in names:
            vals = {METRIC_FIELDS[m]: line.values(m).get(ds) for m in refs.METRICS}
            if any(v is not None for v in vals.values()):
                bench[ds] = {**vals, "backend": line.backend, "temperature": line.temperature}
        out[name] = {"kind": "external", "line": line, "bench": bench}
    return out


def collect(reg: Registry, phase: str) -> dict:
    ph = reg.phases[phase]
    return {**collect_runs(ph, reg.plans[phase], reg.results), **collect_external(ph)}


def comparisons(ph: Phase, data: dict) -> dict[str, list[refs.Line]]:
    """run -> the reference lines it is compared with: the phase's references for the run's target and bench
    temperature, and (for own runs) the phase's external runs. A line is never compared with itself."""
    out = {}
    for run, r in data.items():
        if r["kind"] == "run":
            target, temp = refs.target_model_of(r["config"]), float(r["config"]["bench"]["temperature"])
        else:
            target, temp = r["line"].target_model, r["line"].temperature
        lines = [ln for entry in ph.references for ln in refs.lines(entry, target, temp)]
        if r["kind"] == "run":
            lines += [x["line"] for x in data.values() if x["kind"] == "external"]
        else:
            lines = [ln for ln in lines if (ln.source, ln.method) != (r["line"].source, r["line"].method)]
        out[run] = list({ln.id: ln for ln in lines}.values())
    return out


# --------------------------------------------------------------------------- tables


def _r(x, nd: int = 4):
    return None if x is None else round(x, nd)


def tau_table(data: dict) -> list[dict]:
    rows = []
    for run, r in data.items():
        per = {ds: s.get("tau_macro") for ds, s in r["bench"].items()}
        for ds, s in r["bench"].items():
            if s.get("tau_macro") is None:
                continue
            if r["kind"] == "run":
                rows.append({"run": run, "dataset": ds, "family": family(ds), "tau": _r(s["tau_macro"]),
                             "tau_token_weighted": _r(s["tau_token"]), "tau_no_bonus": _r(s["tau_no_bonus"]),
                             "tau_tokens_per_step": _r(s.get("tau_tokens_per_step")),
                             "tau_new_per_step": _r(s.get("tau_new_per_step")),
                             "n_requests": s["n_requests"], "backend": s["backend"], "hardware": s["hardware"],
                             "temperature": s["temperature"], "source": f"bench/{r['bench_keys'][ds]}"})
            else:
                rows.append({"run": run, "dataset": ds, "family": family(ds), "tau": _r(s["tau_macro"]),
                             "backend": s["backend"], "temperature": s["temperature"], "source": r["line"].source})
        for name, v in averages(per).items():
            rows.append({"run": run, "dataset": name, "family": name.split()[0], "tau": _r(v), "source": AGG_SOURCE})
    return rows


def speedup_table(data: dict) -> list[dict]:
    rows = []
    for run, r in data.items():
        for ds, s in r["bench"].items():
            if r["kind"] == "run":
                rows.append({"run": run, "dataset": ds, **{c: _r(s.get(c)) for c in SPEED_VALUES},
                             "lossless": s.get("lossless"), "diverged": s.get("diverged"),
                             "n_requests": s["n_requests"], "backend": s["backend"], "hardware": s["hardware"],
                             "baseline_hardware": (s.get("baseline") or {}).get("hardware"),
                             "temperature": s["temperature"], "source": f"bench/{r['bench_keys'][ds]}",
                             "baseline": f"baseline/{s['baseline']['key']}" if s.get("baseline") else None})
            elif s.get("speedup_decode_zlab") is not None or s.get("speedup_e2e") is not None:
                # a published run: its decode-only speedup as its source defines it (not z-lab's clock)
                rows.append({"run": run, "dataset": ds, "speedup_decode_only": _r(s.get("speedup_decode_zlab")),
                             "speedup_e2e": _r(s.get("speedup_e2e")), "backend": s["backend"],
                             "temperature": s["temperature"], "source": r["line"].source})
    return rows


def planned_global_batch(run: dict) -> int:
    """micro batch x grad accum x data-parallel training processes (GPUs not serving the target, x nodes)."""
    tc = run["train"]
    return tc["micro_batch_size"] * tc["grad_accum"] * data_parallel(run["resources"].get("train", {}))


def training_table(data: dict) -> list[dict]:
    rows = []
    for run, r in data.items():
        if r["kind"] != "run" or r["train_key"] is None:
            continue
        t, res = r["train"], r["config"]["resources"].get("train", {})
        gpus = 0 if t["device"] == "cpu" else (res.get("gpus", 0) * res.get("nodes", 1) or t.get("world_size", 1))
        rates = [m["samples_per_s"] for m in r["metrics"] if m.get("samples_per_s")]
        rate = _r(statistics.median(rates), 2) if rates else None
        rows.append({"run": run, "steps": t["steps"], "schedule_steps": t.get("schedule_steps"),
                     "global_batch": t.get("global_batch"), "planned_global_batch": planned_global_batch(r["config"]),
                     "samples": t["samples"], "epochs": round(t["epochs"], 3), "final_loss": _r(t["final_loss"]),
                     "final_acc": _r(t["final_acc"]), "samples_per_s": rate,
                     "wall_s": round(t["wall_s"], 1), "gpus": gpus, "gpu_hours": round(gpus * t["wall_s"] / 3600, 4),
                     "device": t["device"], "source": f"train/{r['train_key']}"})
    return rows


def _run_values(r: dict, metric: str) -> dict[str, float]:
    field = METRIC_FIELDS[metric]
    return {ds: s[field] for ds, s in r["bench"].items() if s.get(field) is not None}


def _run_backend(r: dict) -> str:
    if r["kind"] == "external":
        return r["line"].backend
    return ",".join(sorted({s["backend"] for s in r["bench"].values()}))


def deltas_table(data: dict, comps: dict[str, list[refs.Line]], datasets: list[str]) -> list[dict]:
    """Run minus reference per dataset, then per family and overall over the datasets both have (each side's mean
    recomputed from its per-dataset values)."""
    rows = []
    for run, r in data.items():
        for line in comps.get(run, []):
            for metric in refs.METRICS:
                ours, theirs = _run_values(r, metric), line.values(metric)
                common = [d for d in datasets if d in ours and d in theirs]
                if not common:
                    continue
                base = {"run": run, "metric": metric, "compared_to": line.id, "role": line.role,
                        "source": line.source, "label": line.label, "backend": _run_backend(r),
                        "reference_backend": line.backend}
                for ds in common:
                    rows.append({**base, "dataset": ds, "family": family(ds), "n_datasets": 1,
                                 **_delta(ours[ds], theirs[ds])})
                groups = [(f"{fam} avg", fam, [d for d in common if family(d) == fam]) for fam in FAMILIES]
                groups.append(("overall", "overall", common))
                for name, fam, ds_list in groups:
                    if len(ds_list) > 1:                 # a mean of one dataset repeats its row
                        rows.append({**base, "dataset": name, "family": fam, "n_datasets": len(ds_list),
                                     **_delta(statistics.fmean(ours[d] for d in ds_list),
                                              statistics.fmean(theirs[d] for d in ds_list))})
    return rows


def _delta(value: float, reference: float) -> dict:
    return {"value": _r(value), "reference": _r(reference), "delta": _r(value - reference),
            "ratio": _r(value / reference) if reference else None}


def references_table(data: dict, comps: dict[str, list[refs.Line]], datasets: list[str]) -> list[dict]:
    """Every published value this report uses (references and external runs), each with its source id."""
    lines = {ln.id: ln for run_lines in comps.values() for ln in run_lines}
    lines.update({r["line"].id: r["line"] for r in data.values() if r["kind"] == "external"})
    rows = []
    for line in lines.values():
        for metric in refs.METRICS:
            for ds in datasets:
                v = line.values(metric).get(ds)
                if v is not None:
                    rows.append({"reference": line.id, "role": line.role, "source": line.source, "label": line.label,
                                 "target_model": line.target_model, "method": line.method,
                                 "temperature": line.temperature, "backend": line.backend, "dataset": ds,
                                 "metric": metric, "value": v, "note": line.note(ds, metric)})
    return rows


def tables(ph: Phase, data: dict) -> dict[str, list[dict]]:
    """All CSV tables of a report, by name (tables/<name>.csv)."""
    datasets = [d["name"] for d in ph.datasets]
    comps = comparisons(ph, data)
    return {"tau": tau_table(data), "speedup": speedup_table(data), "training": training_table(data),
            "deltas": deltas_table(data, comps, datasets), "references": references_table(data, comps, datasets)}


def csv_text(rows: list[dict], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_csv(path: Path, rows: list[dict], cols: list[str] | None = None) -> None:
    path.write_text(csv_text(rows, cols or list(dict.fromkeys(c for r in rows for c in r))))


# --------------------------------------------------------------------------- figures

FIGURES = ("loss.png", "tau.png", "acceptance.png", "tau_references.png")


def _save(fig, path: Path, **kwargs) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110, **kwargs)
    plt.close(fig)


def figures(ph: Phase, data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = {run: r for run, r in data.items() if r["kind"] == "run"}
    trained = {run: r for run, r in own.items() if r["train_key"] is not None}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, r in trained.items():
        steps = [m["step"] for m in r["metrics"]]
        ax1.plot(steps, [m["loss"] for m in r["metrics"]], label=run)
        ax2.plot(steps, [m["acc"] for m in r["metrics"]], label=run)
    ax1.set(xlabel="step", ylabel="loss", title=f"{ph.name}: training loss")
    ax2.set(xlabel="step", ylabel="accuracy", title=f"{ph.name}: block accuracy")
    if trained:
        ax1.legend(fontsize="small")
    _save(fig, out / "loss.png")

    datasets = [d["name"] for d in ph.datasets]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(datasets) + 2), 3.8))
    width = 0.8 / max(1, len(data))
    for i, (run, r) in enumerate(data.items()):
        xs = [j + i * width for j in range(len(datasets))]
        ax.bar(xs, [r["bench"].get(d, {}).get("tau_macro") or 0 for d in datasets], width,
               label=run + (" (published)" if r["kind"] == "external" else ""),
               hatch="//" if r["kind"] == "external" else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(datasets))], datasets, rotation=30, ha="right")
    ax.set(xlabel="benchmark dataset", ylabel="tau (incl. bonus)", title=f"{ph.name}: acceptance length per dataset")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)   # beside the bars
    _save(fig, out / "tau.png", bbox_inches="tight")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, r in own.items():
        summaries = list(r["bench"].values())
        hist = [sum(col) for col in zip(*(s["histogram"] for s in summaries), strict=True)]
        total = sum(hist) or 1
        ax1.plot(range(1, len(hist)), [h / total for h in hist[1:]], marker="o", label=run)   # >= 1: the bonus
        pos = [statistics.fmean(col) for col in zip(*(s["acceptance_per_position"] for s in summaries), strict=True)]
        ax2.plot(range(1, len(pos) + 1), pos, marker="o", label=run)
    ax1.set(xlabel="accepted length per step", ylabel="share of steps",
            title=f"{ph.name}: accepted length per step, all datasets")
    ax2.set(xlabel="draft position k", ylabel="acceptance rate", title=f"{ph.name}: acceptance per draft position")
    if own:
        ax1.legend(fontsize="small")
    _save(fig, out / "acceptance.png")

    reference_figure(ph, data, out / "tau_references.png")


def reference_figure(ph: Phase, data: dict, path: Path) -> None:
    """tau per dataset: one bar per run (published external runs hatched), one marker series per reference line."""
    import matplotlib.pyplot as plt

    datasets = [d["name"] for d in ph.datasets]
    lines = {ln.id: ln for run_lines in comparisons(ph, data).values() for ln in run_lines
             if ln.values("tau") and ln.role != "published run"}
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(datasets) + 2), 4.2))
    width = 0.8 / max(1, len(data))
    for i, (run, r) in enumerate(data.items()):
        xs = [j - 0.4 + (i + 0.5) * width for j in range(len(datasets))]
        ax.bar(xs, [r["bench"].get(d, {}).get("tau_macro") or 0 for d in datasets], width, alpha=0.8,
               label=run + (f" (published, {r['line'].source})" if r["kind"] == "external" else ""),
               hatch="//" if r["kind"] == "external" else None)
    markers = "D^vs*Pxo"
    for k, line in enumerate(lines.values()):
        vals = line.values("tau")
        xs = [j for j, d in enumerate(datasets) if d in vals]
        label = f"{line.label} [{line.role}]"
        colour = {"anchor": "black", "ablation": "tab:red"}.get(line.role, "grey")
        ax.scatter(xs, [vals[datasets[j]] for j in xs], marker=markers[k % len(markers)], s=46, zorder=3,
                   color=colour, label=label)
    ax.set_xticks(range(len(datasets)), datasets, rotation=30, ha="right")
    title = f"{ph.name}: tau per dataset against published references"
    if not lines:                                        # said in the title, never drawn over the bars
        title += "\n(no published reference for this phase's target and datasets)"
    ax.set(xlabel="benchmark dataset", ylabel="tau (incl. bonus)", title=title)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    _save(fig, path, bbox_inches="tight")


# --------------------------------------------------------------------------- markdown


def _md_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _wide_tau(ph: Phase, data: dict, comps: dict[str, list[refs.Line]]) -> list[dict]:
    """One row per run and per reference line: tau per dataset, family means and overall over the datasets shown."""
    datasets = [d["name"] for d in ph.datasets]
    rows = []
    for run, r in data.items():
        vals = _run_values(r, "tau")
        src = r["line"].source if r["kind"] == "external" else "this phase (bench records)"
        rows.append({"": run, "source": src, **{d: _r(vals.get(d), 2) for d in datasets},
                     **{k: _r(v, 2) for k, v in averages({d: vals.get(d) for d in datasets}).items()},
                     "datasets": len(vals)})
    for line in {ln.id: ln for v in comps.values() for ln in v}.values():
        vals = {d: v for d, v in line.values("tau").items() if d in datasets}
        if not vals:
            continue
        rows.append({"": f"{line.label} [{line.role}]", "source": line.source, **{d: vals.get(d) for d in datasets},
                     **{k: _r(v, 2) for k, v in averages(vals).items()}, "datasets": len(vals)})
    return rows


TAU_NOTE = (
    "`tau`: mean over requests of each request's mean accepted length per step, bonus included (z-lab's); local "
    "engines (`hf`, `fast`) give it per step, SGLang only as its `spec_accept_length`. The two columns after "
    "`tau_token_weighted` use one definition for every engine, from each request's completion tokens and verify "
    "steps: `tau_tokens_per_step` = tokens / steps (SGLang's `spec_accept_length`: it counts the token the prefill "
    "produced), `tau_new_per_step` = (tokens - 1) / steps (that token left out: the local engines' per-step mean "
    "where their accepted lengths add up to the output). Compare engines on one of these two.")


def baseline_note(rows: list[dict]) -> str:
    """What the speedups divide by, and the rows whose DFlash and baseline timings come from different hardware."""
    text = ("Each speedup divides a baseline timing (the baseline stage named in `baseline`: the target alone on "
            "the same prompts, same engine and settings) by the DFlash timing; both run on the hardware recorded in "
            "`hardware` and `baseline_hardware`.")
    differ = [f"{r['run']}/{r['dataset']} ({r['hardware']} vs {r['baseline_hardware']})" for r in rows
              if r.get("baseline_hardware") and r.get("hardware") and r["baseline_hardware"] != r["hardware"]]
    if differ:
        text += " **Different hardware (these speedups compare two machines):** " + "; ".join(differ) + "."
    return text


def markdown(ph: Phase, data: dict, t: dict[str, list[dict]]) -> str:
    comps = comparisons(ph, data)
    datasets = [d["name"] for d in ph.datasets]
    aggs = aggregate_names(datasets)
    lines = {ln.id: ln for v in comps.values() for ln in v}
    ref_rows = [{"reference": ln.label, "role": ln.role, "source": ln.source,
                 "detail": refs.SOURCES[ln.source]["detail"]} for ln in lines.values()]
    ext = {run: r for run, r in data.items() if r["kind"] == "external"}
    delta_rows = [r for r in t["deltas"] if r["metric"] == "tau" and r["dataset"] in aggs]
    head = [f"# Phase `{ph.name}`", ph.description.strip()]
    if ph.rehearsal:
        head = [f"# REHEARSAL of phase `{ph.name.removeprefix(REHEARSAL)}`",
                f"{ph.rehearsal['description']} Overlay `{ph.rehearsal['overlay']}`: every stage's `provenance.json` "
                "lists what it substituted (config `rehearsal`: field -> [the phase's value, the rehearsal's])."
                + "".join(f" Run `{r}` left out: {why}." for r, why in ph.rehearsal["left_out"].items())
                + (f" Datasets left out: {', '.join(ph.rehearsal['datasets_left_out'])}."
                   if ph.rehearsal["datasets_left_out"] else "") + " The phase:", ph.description.strip()]
    parts = [
        *head,
        f"Config: `{ph.file}`. Every number below is recomputed from the bench records and training metrics of the "
        "stage directories listed in `provenance.json`, or read per dataset from the project's references table "
        "(`src/dflash/data/references.csv`, source id in every row); aggregates are means of the per-dataset values "
        "shown.",
        "## Acceptance length (tau, includes the bonus token)" + (" against references" if lines else ""),
        _md_table(_wide_tau(ph, data, comps), ["", "source", *datasets, *aggs, "datasets"]),
    ]
    if not lines:
        parts.append(no_references(ph))
    published = {run: r["config"]["drafter"]["pretrained"] for run, r in data.items()
                 if r["kind"] == "run" and r["train_key"] is None}
    if published:
        parts.append("Runs with a published drafter (`drafter.pretrained`: benched as published, not trained here; "
                     "the bench provenance records its files' sha256 and, for a hub id, the commit): " + "; ".join(
                         f"`{run}` = `{ref}`" for run, ref in published.items()) + ".")
    if ext:
        parts.append("External runs (published elsewhere, shown as runs): " + "; ".join(
            f"`{run}` = {r['line'].label} [source `{r['line'].source}`]" for run, r in ext.items()) + ".")
    if ref_rows:
        parts += ["### References", _md_table(ref_rows, ["reference", "role", "source", "detail"]),
                  "Drafter anchors: the z-lab README table and the paper's Table 1 (DFlash b16); the README's "
                  "EAGLE-3 row is a baseline. The paper's Table 10 is an ablation (a drafter trained WITHOUT target "
                  "features), not a drafter anchor, although the seed PR compared itself with it as \"the z-lab "
                  "reference\"."]
    if lines:
        parts += [
            "## Deltas to references (tau, per family and overall over the datasets both report)",
            _md_table(delta_rows, ["run", "dataset", "n_datasets", "value", "reference", "delta", "ratio", "label",
                                   "role", "source"])
            if delta_rows else "No family or overall mean of tau is shared with a reference (two datasets or more).",
            "Per dataset and for the speedups: `tables/deltas.csv`.",
        ]
    parts += [
        "## Acceptance length per run and dataset",
        TAU_NOTE,
        _md_table(t["tau"], ["run", "dataset", "tau", "tau_token_weighted", "tau_tokens_per_step", "tau_new_per_step",
                             "n_requests", "backend", "hardware", "temperature", "source"]),
        "## Speedup (batch 1)",
        "`speedup_decode_zlab`: decode-only speedup with z-lab's timing (as z-lab's benchmark and README): mean "
        "target-only time per output token over mean DFlash time per output token, each request's clock restarted "
        "after the drafter's first pass over the prompt (the baseline's after its prefill), over its n output "
        "tokens; `tpot_*_zlab_ms` are those means. `speedup_decode_only`: the project's earlier timing (clock from "
        "the end of the target's prefill, n - 1 tokens). `speedup_e2e` includes prefill. `diverged`: requests whose "
        "output differs from the target-only output at temperature 0 (each record holds both token sequences, the "
        "first differing position and the target's top-2 logit gap there). Empty z-lab cells: records without "
        "that clock (written before it was recorded, or by SGLang). Published (external) runs show their source's "
        "decode-only speedup, as it defines it, under `speedup_decode_only`.",
        baseline_note(t["speedup"]),
        _md_table(t["speedup"], ["run", "dataset", "speedup_decode_zlab", "tpot_dflash_zlab_ms",
                                 "tpot_baseline_zlab_ms", "speedup_decode_only", "speedup_e2e", "lossless",
                                 "diverged", "backend", "hardware", "baseline_hardware", "source", "baseline"]),
        "## Training",
        _md_table(t["training"], ["run", "steps", "schedule_steps", "global_batch", "planned_global_batch", "samples",
                                  "epochs", "final_loss", "final_acc", "samples_per_s", "wall_s", "gpu_hours",
                                  "device"]) if t["training"] else "No run of this phase trains its drafter.",
        "## Figures",
        "\n\n".join(f"![{f.removesuffix('.png')}](figures/{f})" for f in FIGURES),
    ]
    return "\n\n".join(parts) + "\n"


def no_references(ph: Phase) -> str:
    """The one sentence a report without any reference line gives instead of reference tables and deltas."""
    why = (f"none of this phase's references ({', '.join(f'`{r}`' for r in ph.references)}) covers its target and "
           "datasets" if ph.references else "this phase names none (`references: []`)")
    return (f"No references: {why}, so there are no deltas; `tables/references.csv` and `tables/deltas.csv` hold only "
            "their headers.")


# --------------------------------------------------------------------------- build


def link_runs(reg: Registry, phase: str) -> None:
    """results/phases/<phase>/<run>/<stage>[/<dataset>] -> the hashed stage directory."""
    for run, plan in reg.plans[phase].items():
        base = reg.results.run_links(phase, run)
        for name, (stage, key) in plan.named().items():
            target = reg.results.stage_dir(stage, key)
            link = base / name
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(link.name + ".tmp")
            if tmp.is_symlink():
                tmp.unlink()
            tmp.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))
            os.replace(tmp, link)


def write_outputs(ph: Phase, data: dict, out: Path) -> dict[str, list[dict]]:
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    t = tables(ph, data)
    for name, rows in t.items():
        write_csv(out / "tables" / f"{name}.csv", rows, TABLES[name])
    figures(ph, data, out / "figures")
    (out / "report.md").write_text(markdown(ph, data, t))
    return t
