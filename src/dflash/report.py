"""report: tables, figures and report.md of one phase, computed from the stages' raw records.

Every aggregate (math / code / chat / overall) is the mean of the per-dataset values shown in the same table;
nothing is copied from elsewhere. Also links `results/phases/<phase>/<run>/<stage>` to the hashed directories.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
from pathlib import Path

from dflash import provenance
from dflash.paths import RESULTS, report_dir, stage_dir
from dflash.registry import Registry

FAMILY_ORDER = ("math", "code", "chat")


def family(dataset: str) -> str:
    from dflash.bench import SYNTHETIC_PREFIX
    from dflash.benchmarks import DATASETS

    if dataset.startswith(SYNTHETIC_PREFIX):
        return dataset.removeprefix(SYNTHETIC_PREFIX)
    return DATASETS[dataset].family if dataset in DATASETS else "other"


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def averages(values: dict[str, float]) -> dict[str, float]:
    """Per-family means and the overall mean of per-dataset values."""
    out = {}
    for fam in FAMILY_ORDER:
        vals = [v for d, v in values.items() if family(d) == fam and v is not None]
        if vals:
            out[f"{fam} avg"] = statistics.fmean(vals)
    vals = [v for v in values.values() if v is not None]
    if vals:
        out["overall"] = statistics.fmean(vals)
    return out


def collect(reg: Registry, phase: str) -> dict:
    """Per run: bench summaries recomputed from records, training metrics and summary."""
    from dflash import metrics

    runs = {}
    for run, plan in reg.plans[phase].items():
        bench = {}
        for ds, key in plan.bench.items():
            d = stage_dir("bench", key)
            s = json.loads((d / "summary.json").read_text())
            s.update(metrics.summarize(_read_jsonl(d / "records.jsonl"), s["block_size"]))
            bench[ds] = s
        tdir = stage_dir("train", plan.keys["train"])
        runs[run] = {"bench": bench, "train": json.loads((tdir / "summary.json").read_text()),
                     "metrics": _read_jsonl(tdir / "metrics.jsonl")}
    return runs


def tau_table(data: dict) -> list[dict]:
    rows = []
    for run, r in data.items():
        per = {ds: s["tau_macro"] for ds, s in r["bench"].items()}
        for ds, s in r["bench"].items():
            rows.append({"run": run, "dataset": ds, "family": family(ds), "tau": round(s["tau_macro"], 4),
                         "tau_token_weighted": round(s["tau_token"], 4), "tau_no_bonus": round(s["tau_no_bonus"], 4),
                         "n_requests": s["n_requests"], "backend": s["backend"], "hardware": s["hardware"],
                         "temperature": s["temperature"]})
        for name, v in averages(per).items():
            rows.append({"run": run, "dataset": name, "family": name.split()[0], "tau": round(v, 4)})
    return rows


def speedup_table(data: dict) -> list[dict]:
    rows = []
    for run, r in data.items():
        for ds, s in r["bench"].items():
            rows.append({"run": run, "dataset": ds, "speedup_decode_only": _r(s.get("speedup_decode_only")),
                         "speedup_e2e": _r(s.get("speedup_e2e")), "tpot_dflash_ms": _r(s.get("tpot_dflash_ms")),
                         "tpot_baseline_ms": _r(s.get("tpot_baseline_ms")), "lossless": s.get("lossless"),
                         "n_requests": s["n_requests"], "backend": s["backend"], "hardware": s["hardware"],
                         "temperature": s["temperature"]})
    return rows


def training_table(data: dict) -> list[dict]:
    rows = []
    for run, r in data.items():
        t = r["train"]
        gpus = 0 if t["device"] == "cpu" else t.get("world_size", 1)
        rows.append({"run": run, "steps": t["steps"], "samples": t["samples"], "epochs": round(t["epochs"], 3),
                     "final_loss": _r(t["final_loss"]), "final_acc": _r(t["final_acc"]),
                     "wall_s": round(t["wall_s"], 1),
                     "gpu_hours": round(gpus * t["wall_s"] / 3600, 4), "device": t["device"]})
    return rows


def _r(x, nd: int = 4):
    return None if x is None else round(x, nd)


def write_csv(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def figures(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, r in data.items():
        steps = [m["step"] for m in r["metrics"]]
        ax1.plot(steps, [m["loss"] for m in r["metrics"]], label=run)
        ax2.plot(steps, [m["acc"] for m in r["metrics"]], label=run)
    ax1.set(xlabel="step", ylabel="loss", title="training loss")
    ax2.set(xlabel="step", ylabel="accuracy", title="block accuracy")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

    datasets = sorted({ds for r in data.values() for ds in r["bench"]}, key=lambda d: (family(d), d))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(datasets) + 2), 3.8))
    width = 0.8 / max(1, len(data))
    for i, (run, r) in enumerate(data.items()):
        xs = [j + i * width for j in range(len(datasets))]
        ax.bar(xs, [r["bench"].get(d, {}).get("tau_macro", 0) for d in datasets], width, label=run)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(datasets))], datasets, rotation=30, ha="right")
    ax.set(ylabel="tau (incl. bonus)", title="acceptance length per dataset")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tau.png", dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, r in data.items():
        summaries = list(r["bench"].values())
        hist = [sum(col) for col in zip(*(s["histogram"] for s in summaries), strict=True)]
        total = sum(hist) or 1
        ax1.plot(range(len(hist)), [h / total for h in hist], marker="o", label=run)
        pos = [statistics.fmean(col) for col in zip(*(s["acceptance_per_position"] for s in summaries), strict=True)]
        ax2.plot(range(1, len(pos) + 1), pos, marker="o", label=run)
    ax1.set(xlabel="accepted length per step", ylabel="share of steps", title="tau histogram (all datasets)")
    ax2.set(xlabel="draft position k", ylabel="acceptance rate", title="per-position acceptance")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(out / "acceptance.png", dpi=110)
    plt.close(fig)


def _md_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def markdown(reg: Registry, phase: str, tau: list[dict], speed: list[dict], training: list[dict]) -> str:
    ph = reg.phases[phase]
    return "\n\n".join([
        f"# Phase `{phase}`", ph.description.strip(),
        f"Config: `{ph.file}`. Every number below is recomputed from the bench records and training metrics of the "
        "stage directories listed in `provenance.json`; aggregates are means of the per-dataset values shown.",
        "## Acceptance length (tau, includes the bonus token)",
        _md_table(tau, ["run", "dataset", "tau", "tau_token_weighted", "n_requests", "backend", "hardware",
                        "temperature"]),
        "## Speedup (batch 1)",
        _md_table(speed, ["run", "dataset", "speedup_decode_only", "speedup_e2e", "tpot_dflash_ms",
                          "tpot_baseline_ms", "lossless", "hardware"]),
        "## Training", _md_table(training, ["run", "steps", "samples", "epochs", "final_loss", "final_acc", "wall_s",
                                            "gpu_hours", "device"]),
        "## Figures", "![loss](figures/loss.png)\n\n![tau](figures/tau.png)\n\n![acceptance](figures/acceptance.png)",
    ]) + "\n"


def link_runs(reg: Registry, phase: str) -> None:
    """results/phases/<phase>/<run>/<stage>[/<dataset>] -> the hashed stage directory."""
    for run, plan in reg.plans[phase].items():
        base = RESULTS / "phases" / phase / run
        targets = {stage: stage_dir(stage, key) for stage, key in plan.keys.items()}
        targets.update({f"bench/{ds}": stage_dir("bench", key) for ds, key in plan.bench.items()})
        for name, target in targets.items():
            link = base / name
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(link.name + ".tmp")
            if tmp.is_symlink():
                tmp.unlink()
            tmp.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))
            os.replace(tmp, link)


def build(reg: Registry, phase: str) -> Path:
    final = report_dir(phase)
    tmp = final.with_name(f".tmp-{phase}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tables").mkdir(parents=True)
    (tmp / "figures").mkdir()
    started = provenance.now()
    try:
        data = collect(reg, phase)
        tau, speed, training = tau_table(data), speedup_table(data), training_table(data)
        write_csv(tmp / "tables" / "tau.csv", tau)
        write_csv(tmp / "tables" / "speedup.csv", speed)
        write_csv(tmp / "tables" / "training.csv", training)
        figures(data, tmp / "figures")
        (tmp / "report.md").write_text(markdown(reg, phase, tau, speed, training))
        upstream = {"runs": {r: {**p.keys, "bench": p.bench} for r, p in reg.plans[phase].items()}}
        pairs = [(s, k) for p in reg.plans[phase].values()
                 for s, k in [*p.keys.items(), *(("bench", b) for b in p.bench.values())]]
        inputs = {f"{s}/{k}": provenance.sha256_file(stage_dir(s, k) / provenance.PROVENANCE) for s, k in pairs}
        ph = reg.phases[phase]
        prov = provenance.record("report", reg.report_key(phase), {"phase": phase, "file": ph.file, "chain": ph.chain,
                                 "references": ph.references}, upstream, tmp, started, inputs, {}, [(phase, "*")])
        provenance.write(tmp, prov)
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    link_runs(reg, phase)
    return final
