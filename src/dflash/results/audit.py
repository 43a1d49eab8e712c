"""Audit a phase's report down to the raw records, and find result directories no phase uses.

`audit(phase)` checks, and lists every mismatch it finds:

* the report: every file against the sha256 in its provenance.json (and no unrecorded file), its key against the key
  the current phase config gives (else the report is stale; keyed with the stage format versions the tree records,
  an older tree of an unchanged config is current, with a note), the references table it read;
* every stage directory in the provenance chain below it, each once: outputs against their sha256, inputs (upstream
  provenance.json files, local data files) against the digests recorded when the stage ran, and its key against
  the hash of the config and upstream keys recorded in its provenance (an edited provenance.json shows here);
* every table cell: the tables are recomputed from the raw records (bench `records.jsonl`, train `metrics.jsonl`)
  and the references table, and compared cell by cell with the CSV files; the aggregates (family means, overall)
  are also recomputed from the per-dataset rows of the CSV file itself; bench and train `summary.json` are checked
  against the same raw records.

A problem in a stage directory names the table rows that depend on it. """

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from dflash.checksums import sha256_file
from dflash.data import references as refs
from dflash.data import root as data_root
from dflash.data.benchmarks import FAMILIES, family
from dflash.data.jsonl import read_jsonl
from dflash.plan.keys import Registry, RunPlan, build, stage_key, upstream_pairs
from dflash.plan.stages import BY_NAME, REPORT, STAGE_NAMES
from dflash.results import provenance, publish
from dflash.results import report as rep

KEY = re.compile(r"^[0-9a-f]{12}$")
SUMMARY_FIELDS = ("n_requests", "n_steps", "tau_macro", "tau_token", "tau_no_bonus", "histogram",
                  "acceptance_per_position", "tokens", "speedup_decode_only", "speedup_e2e", "tpot_dflash_ms",
                  "tpot_baseline_ms", "lossless", "speedup_decode_zlab", "tpot_dflash_zlab_ms",
                  "tpot_baseline_zlab_ms", "diverged", "tau_tokens_per_step", "tau_new_per_step")
ROW_KEYS = {"tau": ("run", "dataset"), "speedup": ("run", "dataset"), "training": ("run",),
            "deltas": ("run", "compared_to", "metric", "dataset"), "references": ("reference", "metric", "dataset")}
AGG_TOLERANCE = 2e-4        # mean of 4-decimal cells vs the 4-decimal mean


@dataclass
class Problem:
    path: str
    message: str
    rows: list[str] = field(default_factory=list)     # table rows that depend on `path`

    def __str__(self) -> str:
        s = f"{self.path}: {self.message}"
        if self.rows:
            more = f" and {len(self.rows) - 6} more" if len(self.rows) > 6 else ""
            s += f"\n    affects {', '.join(self.rows[:6])}{more}"
        return s


@dataclass
class Result:
    phase: str
    problems: list[Problem] = field(default_factory=list)
    dirs: int = 0
    files: int = 0
    cells: int = 0
    omitted: int = 0     # weights a published tree left out, their recorded sha256 listed in its omitted.json
    notes: list[str] = field(default_factory=list)    # facts that are not mismatches (older format versions)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        left = f" ({self.omitted} weights files not published, sha256 in {publish.OMITTED})" if self.omitted else ""
        head = (f"audit {self.phase}: {self.dirs} directories, {self.files} files{left}, {self.cells} table cells "
                "checked: " + ("OK" if self.ok else f"{len(self.problems)} mismatch(es)"))
        return "\n".join([head, *(f"  note: {n}" for n in self.notes), *(f"  {p}" for p in self.problems)])


def _equal(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) or (math.isnan(x) and math.isnan(y))


def _close(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


class Auditor:
    def __init__(self, reg: Registry, phase: str):
        self.reg, self.phase, self.ph, self.tree = reg, phase, reg.phases[phase], reg.results
        self.result = Result(phase)
        self.deps: dict[tuple[str, str], set[tuple[str, str]]] = {}   # stage dir -> every stage dir below it
        self.omitted = publish.omitted_files(self.tree.root)
        self.versions: dict[str, set[int]] = {}        # stage -> format versions recorded in the tree
        self.report_version = REPORT.version

    def problem(self, path, message: str, rows: list[str] | None = None) -> None:
        self.result.problems.append(Problem(str(path), message, rows or []))

    # ------------------------------------------------------------------ files and chain

    def check_files(self, d: Path, prov: dict) -> None:
        """Outputs against their recorded sha256; files the provenance does not record."""
        outputs = prov.get("outputs", {})
        for rel, digest in outputs.items():
            p = d / rel
            self.result.files += 1
            if not p.is_file():
                if self.omitted.get(p.relative_to(self.tree.root).as_posix()) == digest:
                    self.result.omitted += 1
                    continue
                self.problem(p, "missing (recorded in provenance.json)")
            elif sha256_file(p) != digest:
                self.problem(p, f"sha256 {sha256_file(p)[:16]}... differs from provenance.json "
                                f"({digest[:16]}...): the file changed after the stage wrote it")
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.name != provenance.PROVENANCE and str(p.relative_to(d)) not in outputs:
                self.problem(p, "not recorded in provenance.json outputs")

    def check_inputs(self, d: Path, prov: dict) -> None:
        for name, digest in prov.get("inputs", {}).items():
            stage, _, rest = name.partition("/")
            key, _, rel = rest.partition("/")
            if stage in STAGE_NAMES and KEY.match(key):
                p = self.tree.stage_dir(stage, key) / (rel or provenance.PROVENANCE)
                if rel and not p.is_file() and self.omitted.get(f"{stage}/{key}/{rel}") == digest:
                    continue        # a weights file a published tree left out
            elif name == f"references/{refs.TABLE.name}":
                p = refs.TABLE
            elif data_root.resolve(name).is_file():
                p = data_root.resolve(name)              # a local data file (`data:`: under this data root)
            else:
                continue            # a hub dataset or a file not on this machine: recorded, not checkable here
            self.result.files += 1
            if not p.is_file():
                self.problem(d / provenance.PROVENANCE, f"input {name}: {p} is missing")
            elif digest and sha256_file(p) != digest:
                self.problem(p, f"changed since {d} was built from it (input {name}: sha256 differs from the "
                                f"digest in {d / provenance.PROVENANCE})")

    def walk(self, stage: str, key: str) -> set[tuple[str, str]]:
        """Verify a stage directory and everything below it (each once); return the set of stage dirs below."""
        ident = (stage, key)
        if ident in self.deps:
            return self.deps[ident]
        self.deps[ident] = {ident}
        d = self.tree.stage_dir(stage, key)
        if not (d / provenance.PROVENANCE).is_file():
            self.problem(d, f"missing: no {provenance.PROVENANCE}")
            return self.deps[ident]
        self.result.dirs += 1
        try:
            prov = provenance.read(d)
        except (OSError, ValueError) as e:
            self.problem(d / provenance.PROVENANCE, f"unreadable: {e}")
            return self.deps[ident]
        if prov.get("stage") != stage or prov.get("key") != key:
            self.problem(d / provenance.PROVENANCE, f"records {prov.get('stage')}/{prov.get('key')}, not {stage}/{key}")
        elif stage_key(stage, prov["config"], prov["upstream"], prov.get("version", 1)) != key:
            self.problem(d / provenance.PROVENANCE, "config and upstream keys recorded here do not hash to the "
                                                    f"directory's key {key}: provenance.json was edited")
        self.versions.setdefault(stage, set()).add(prov.get("version", 1))
        self.check_files(d, prov)
        self.check_inputs(d, prov)
        below = {ident}
        for up_stage, up_key in upstream_pairs(prov.get("upstream", {})):
            below |= self.walk(up_stage, up_key)
        self.deps[ident] = below
        return below

    # ------------------------------------------------------------------ recomputation

    def recompute_runs(self, runs: dict[str, dict]) -> dict:
        data = {}
        for run, keys in runs.items():
            bench, ok = {}, True
            for ds, key in keys["bench"].items():
                d = self.tree.stage_dir("bench", key)
                try:
                    stored = json.loads((d / "summary.json").read_text())
                    bench[ds] = rep.bench_summary(d)
                except (OSError, ValueError, KeyError, TypeError) as e:
                    self.problem(d / "records.jsonl", f"cannot recompute the metrics from the raw records: {e!r}")
                    ok = False
                    continue
                bad = [f for f in SUMMARY_FIELDS if f in stored and not _close(stored[f], bench[ds].get(f))]
                if bad:
                    self.problem(d / "summary.json", f"{', '.join(bad)} differ from the values recomputed from "
                                                     "records.jsonl")
                self.check_baseline(d, stored)
            tkey = keys.get("train")            # None: a pretrained drafter, nothing trained
            train = metrics = None
            if tkey is not None:
                tdir = self.tree.stage_dir("train", tkey)
                try:
                    train = json.loads((tdir / "summary.json").read_text())
                    metrics = read_jsonl(tdir / "metrics.jsonl")
                except (OSError, ValueError) as e:
                    self.problem(tdir / "metrics.jsonl", f"cannot read the training metrics: {e!r}")
                    continue
                self.check_train(tdir, train, metrics)
                planned = rep.planned_global_batch(self.ph.runs[run]) if run in self.ph.runs else None
                if planned is not None and train.get("global_batch") not in (None, planned):
                    self.problem(tdir / "summary.json", f"run {run} trained with global batch "
                                 f"{train['global_batch']}, its config plans {planned} (micro batch x accum x "
                                 "training GPUs): its schedule is not the one the config states")
            if ok:
                data[run] = rep.run_entry(self.ph.runs.get(run, {}), bench, keys["bench"], tkey, train, metrics)
        return data

    def check_baseline(self, d: Path, summary: dict) -> None:
        """A bench that read a baseline stage: every record's `baseline` entry equals that stage's record of the same
        prompt and turn, and the summary names that stage."""
        try:
            upstream = provenance.read(d).get("upstream", {})
        except (OSError, ValueError):
            return                      # reported by walk()
        key = upstream.get("baseline")
        if key is None:
            return
        if (summary.get("baseline") or {}).get("key") != key:
            self.problem(d / "summary.json", f"names baseline {(summary.get('baseline') or {}).get('key')}, its "
                                             f"provenance reads baseline {key}")
        bdir = self.tree.stage_dir("baseline", key)
        try:
            base = {(r["prompt_id"], r["turn"]): r for r in read_jsonl(bdir / "records.jsonl")}
            records = read_jsonl(d / "records.jsonl")
        except (OSError, ValueError, KeyError) as e:
            self.problem(bdir / "records.jsonl", f"cannot read the baseline records: {e!r}")
            return
        for r in records:
            b = base.get((r["prompt_id"], r["turn"]))
            got = r.get("baseline") or {}
            differ = ["record"] if b is None else [f for f in got if f != "same_prompt" and got[f] != b.get(f)]
            if differ:
                self.problem(d / "records.jsonl", f"{r['prompt_id']} turn {r['turn']}: baseline "
                                                  f"{', '.join(differ)} differ from {bdir / 'records.jsonl'}")
                return

    def check_train(self, tdir: Path, summary: dict, metrics: list[dict]) -> None:
        steps = [m.get("step") for m in metrics]
        if any(b is None or a is None or b <= a for a, b in zip(steps, steps[1:], strict=False)):
            self.problem(tdir / "metrics.jsonl", "steps are not strictly increasing")
        last = metrics[-1] if metrics else {}
        expect = {"final_loss": last.get("loss"), "final_acc": last.get("acc")}
        if summary.get("steps"):
            expect["steps"] = last.get("step")
        bad = [k for k, v in expect.items() if not _close(summary.get(k), v)]
        if bad:
            self.problem(tdir / "summary.json", f"{', '.join(bad)} differ from the last line of metrics.jsonl")

    def compare_tables(self, out: Path, expected: dict[str, list[dict]]) -> None:
        for name, rows in expected.items():
            path = out / "tables" / f"{name}.csv"
            if not path.is_file():
                self.problem(path, "missing")
                continue
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header, have = reader.fieldnames or [], list(reader)
            cols = rep.columns(name, self.report_version)
            if header != cols:
                self.problem(path, f"columns {header} differ from {cols}")
            ident = ROW_KEYS[name]
            table = {tuple(r.get(k, "") for k in ident): r for r in have}
            want = list(csv.DictReader(io.StringIO(rep.csv_text(rows, cols))))
            seen = set()
            for w in want:
                k = tuple(w[c] for c in ident)
                seen.add(k)
                label = f"{name}.csv[{'/'.join(k)}]"
                got = table.get(k)
                if got is None:
                    self.problem(path, f"row {'/'.join(k)} missing (the raw records give one)")
                    continue
                for c in cols:
                    self.result.cells += 1
                    if not _equal(got.get(c, ""), w[c]):
                        src = f" (source {got['source']})" if got.get("source") else ""
                        self.problem(path, f"{label} {c}: table has {got.get(c)!r}, the raw records give "
                                           f"{w[c]!r}{src}")
            for k in table:
                if k not in seen:
                    self.problem(path, f"row {'/'.join(k)} is not produced by the raw records")
            if name == "tau":
                self.check_aggregates(path, have)

    def check_aggregates(self, path: Path, rows: list[dict]) -> None:
        """The family means and the overall of each run, recomputed from the table's own per-dataset rows."""
        per_run: dict[str, dict[str, float]] = {}
        aggs = []
        for r in rows:
            if r["dataset"] in ("overall", *(f"{f} avg" for f in FAMILIES)):
                aggs.append(r)
            elif r["tau"] not in ("", None):
                per_run.setdefault(r["run"], {})[r["dataset"]] = float(r["tau"])
        for r in aggs:
            vals = per_run.get(r["run"], {})
            fam = r["dataset"].removesuffix(" avg")
            chosen = [v for d, v in vals.items() if fam == "overall" or family(d) == fam]
            if not chosen:
                self.problem(path, f"{r['run']}/{r['dataset']}: aggregate without per-dataset rows")
                continue
            mean = statistics.fmean(chosen)
            self.result.cells += 1
            if abs(mean - float(r["tau"])) > AGG_TOLERANCE:
                self.problem(path, f"{r['run']}/{r['dataset']}: tau {r['tau']} is not the mean of the run's "
                                   f"{len(chosen)} per-dataset rows ({mean:.4f})")

    def affected_rows(self, tables: dict[str, list[dict]], runs: dict[str, dict]) -> None:
        """Name, for every problem in a stage directory, the table rows whose provenance chain contains it: a
        per-dataset row depends on its bench (and everything below it), a family mean or overall on the benches it
        averages, a training row on its train stage."""
        def below(stage: str, key: str) -> set:
            return self.deps.get((stage, key), set())

        def family_deps(run: str, fam: str) -> set:
            keys = runs.get(run, {}).get("bench", {})
            return set().union(*(below("bench", k) for ds, k in keys.items() if fam == "overall"
                                 or family(ds) == fam))

        row_deps = []
        for name, rows in tables.items():
            for r in rows:
                stage, _, key = str(r.get("source", "")).partition("/")
                run, ds = r.get("run", ""), r.get("dataset", "")
                if stage in STAGE_NAMES and KEY.match(key):
                    deps = below(stage, key)
                elif ds in runs.get(run, {}).get("bench", {}):
                    deps = below("bench", runs[run]["bench"][ds])
                elif r.get("family"):
                    deps = family_deps(run, r["family"])
                else:
                    deps = set()
                row_deps.append((f"{name}.csv[{'/'.join(str(r.get(k, '')) for k in ROW_KEYS[name])}]", deps))
        base = self.tree.root.parts
        for p in self.result.problems:
            parts = Path(p.path).parts
            if len(parts) > len(base) + 1 and parts[:len(base)] == base and parts[len(base)] in STAGE_NAMES:
                ident = (parts[len(base)], parts[len(base) + 1])
                p.rows = [label for label, deps in row_deps if ident in deps]

    # ------------------------------------------------------------------ report

    def run(self) -> Result:
        out = self.tree.report_dir(self.phase)
        if not (out / provenance.PROVENANCE).is_file():
            self.problem(out, f"no report (no {provenance.PROVENANCE}); build it with `snakemake {self.phase}`")
            return self.result
        prov = provenance.read(out)
        self.report_version = prov.get("version", 1)
        self.result.dirs += 1
        self.check_files(out, prov)
        self.check_inputs(out, prov)
        runs = prov.get("upstream", {}).get("runs", {})
        for stage, key in upstream_pairs(prov.get("upstream", {})):
            self.walk(stage, key)
        self.check_current(out, prov)
        self.check_links(runs)
        data = {**self.recompute_runs(runs)}
        try:
            data.update(rep.collect_external(self.ph))
        except ValueError as e:
            self.problem(refs.TABLE, f"external runs of {self.phase}: {e}")
        complete = set(data) >= set(runs)
        expected = rep.tables(self.ph, data)
        if complete:
            self.compare_tables(out, expected)
        else:
            self.problem(out / "tables", "not compared: some runs could not be recomputed (see above)")
        self.affected_rows(expected, runs)
        return self.result

    def check_current(self, out: Path, prov: dict) -> None:
        """The report's key against the current phase config. A tree whose stages were built by earlier format
        versions of their code (recorded per directory) is current if the phase config keyed with those versions
        gives its key: a note names the versions, not a mismatch."""
        current = self.reg.report_key(self.phase)
        if prov.get("key") == current:
            return
        recorded = {s: v.pop() for s, v in self.versions.items() if len(v) == 1}
        recorded[REPORT.name] = prov.get("version", 1)
        older = {s: v for s, v in recorded.items() if v != BY_NAME[s].version}
        if older and build({self.phase: self.ph}, self.tree, recorded).report_key(self.phase) == prov.get("key"):
            self.result.notes.append(
                "built by earlier format versions of " + ", ".join(f"stage {s} ({v}; now {BY_NAME[s].version})"
                                                                    for s, v in sorted(older.items()))
                + f": the config of phase {self.phase} is unchanged; rebuilding it would rerun those stages")
            return
        self.problem(out / provenance.PROVENANCE, f"stale: built for report key {prov.get('key')}, the current "
                                                  f"config of phase {self.phase} gives {current}")

    def check_links(self, runs: dict[str, dict]) -> None:
        for run, keys in runs.items():
            base = self.tree.run_links(self.phase, run)
            for name, (stage, key) in RunPlan.from_dict(self.phase, run, keys).named().items():
                link = base / name
                if link.is_symlink() and link.resolve() != self.tree.stage_dir(stage, key).resolve():
                    self.problem(link, f"points to {link.resolve()}, not to {self.tree.stage_dir(stage, key)}")


def audit(reg: Registry, phase: str) -> Result:
    return Auditor(reg, phase).run()
