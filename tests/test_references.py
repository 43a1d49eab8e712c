"""References: the project's table of published numbers, phase `references` / `external`, and report tables."""

import csv

import pytest
import yaml

from conftest import SHARED_DATA
from dflash.data import references as refs
from dflash.data.benchmarks import DATASETS
from dflash.plan.config import ConfigError, load_phase
from dflash.results import report

PUBLISHED = SHARED_DATA.parent / "references" / "published.csv"
EXTRA = {("torchspec_pr51", "phase_h_gsm8k_rebench")}      # from the seed PR's notes, not in published.csv


def test_every_value_has_a_known_source_and_a_known_dataset():
    rows = refs.load()
    assert len(rows) > 200
    for r in rows:
        assert r.source in refs.SOURCES and r.metric in refs.METRICS
        assert r.dataset in DATASETS, r
        assert r.value > 0
    cells = [(r.source, r.target_model, r.method, r.temperature, r.dataset, r.metric) for r in rows]
    assert len(cells) == len(set(cells)), "one value per cell"


def test_no_aggregates_are_stored():
    assert not [r for r in refs.load() if r.dataset not in DATASETS]


@pytest.mark.skipif(not PUBLISHED.is_file(), reason="../shared/references/published.csv is not available here")
def test_table_holds_exactly_the_published_facts():
    with open(PUBLISHED, newline="") as f:
        published = {(r["source"], r["target_model"], r["method"], float(r["temperature"]), r["dataset"], r["metric"]):
                     float(r["value"]) for r in csv.DictReader(f)}
    ours = {(r.source, r.target_model, r.method, r.temperature, r.dataset, r.metric): r.value for r in refs.load()}
    assert {k: v for k, v in ours.items() if (k[0], k[2]) not in EXTRA} == published


def test_anchor_and_ablation_roles():
    assert refs.SOURCES["zlab_readme"]["role"] == "anchor"
    assert refs.SOURCES["dflash_paper_table1"]["role"] == "anchor"
    assert refs.SOURCES["dflash_paper_table10_no_target_features"]["role"] == "ablation"
    assert "WITHOUT target features" in refs.SOURCES["dflash_paper_table10_no_target_features"]["title"]
    lines = refs.lines("zlab_readme", "Qwen3-8B", 0.0)
    assert {ln.method for ln in lines} == {"dflash-b16", "eagle3-speculator"}
    b16 = next(ln for ln in lines if ln.method == "dflash-b16")
    assert b16.values("tau")["math500"] == 7.87 and b16.values("speedup_decode_only")["gsm8k"] == 5.2
    assert refs.lines("zlab_readme", None, 0.0) == []                 # synthetic targets have no reference


def _tau(rows, run, dataset):
    return next(r["tau"] for r in rows if r["run"] == run and r["dataset"] == dataset)


def test_phase_h_published_overall_is_recomputed_as_3_55():
    ph = load_phase("phase_h")
    data = report.collect_external(ph)
    assert set(data) == {"pr51-H"} and len(data["pr51-H"]["bench"]) == 10
    tables = report.tables(ph, data)
    tau = tables["tau"]
    overall = _tau(tau, "pr51-H", "overall")
    assert round(overall, 2) == 3.55 and abs(overall - 3.553) < 1e-9      # the PR printed 3.45
    assert _tau(tau, "pr51-H", "math avg") == 3.79                        # 4 math sets, as the PR
    assert _tau(tau, "pr51-H", "code avg") == 3.78                        # 4 code sets here (z-lab's grouping)
    assert next(r for r in tau if r["run"] == "pr51-H" and r["dataset"] == "gsm8k")["source"] == "torchspec_pr51"
    # deltas: against the anchors and the ablation, each labelled with its source and role
    deltas = [r for r in tables["deltas"] if r["run"] == "pr51-H" and r["metric"] == "tau"]
    by = {(r["source"], r["compared_to"].split("/")[2], r["dataset"]): r for r in deltas}
    z = by[("zlab_readme", "dflash-b16", "overall")]
    assert z["role"] == "anchor" and z["n_datasets"] == 10 and z["value"] == 3.553
    assert z["reference"] == 5.998 and z["delta"] == pytest.approx(3.553 - 5.998, abs=1e-9)
    t10 = by[("dflash_paper_table10_no_target_features", "dflash-b16-no-target-features", "math avg")]
    assert t10["role"] == "ablation" and t10["n_datasets"] == 4
    assert t10["reference"] == pytest.approx((3.38 + 4.61 + 4.12 + 4.07) / 4, abs=1e-4)
    t1 = by[("dflash_paper_table1", "dflash-b16", "overall")]
    assert t1["n_datasets"] == 7                                          # Table 1 has no AIME24, SWE, Alpaca
    assert not [r for r in tables["deltas"] if r["source"] == "torchspec_pr51" and r["run"] == "pr51-H"]
    assert all(r["source"] in refs.SOURCES and r["value"] is not None for r in tables["references"])


def test_phase_k_published_p2_wsd_overall_is_3_61():
    ph = load_phase("phase_k")
    tau = report.tau_table(report.collect_external(ph))
    assert round(_tau(tau, "pr51-P2-WSD", "overall"), 2) == 3.61            # the PR printed 3.57
    assert round(_tau(tau, "pr51-P2-accum1", "overall"), 2) == 3.57


def test_report_files_from_external_runs_only(tmp_path):
    ph = load_phase("phase_i")
    data = report.collect_external(ph)
    t = report.write_outputs(ph, data, tmp_path)
    for f in ["report.md", *(f"tables/{n}.csv" for n in report.TABLES), *(f"figures/{f}" for f in report.FIGURES)]:
        assert (tmp_path / f).is_file(), f
    md = (tmp_path / "report.md").read_text()
    assert "ABLATION" in md and "zlab_readme" in md and "torchspec_pr51" in md
    rebench = [r for r in t["speedup"] if r["run"] == "pr51-H-rebench"]
    assert rebench == [{"run": "pr51-H-rebench", "dataset": "gsm8k", "speedup_decode_only": 2.5, "speedup_e2e": 2.45,
                        "backend": "sglang", "temperature": 0.0, "source": "torchspec_pr51"}]
    header = (tmp_path / "tables" / "deltas.csv").read_text().splitlines()[0].split(",")
    assert header == report.DELTA_COLS


def _write(d, name, doc):
    (d / f"{name}.yaml").write_text(yaml.safe_dump(doc))


@pytest.mark.parametrize("doc, message", [
    ({"references": ["nope"]}, "p.yaml: references.0: unknown source 'nope'"),
    ({"references": [{"source": "zlab_readme", "method": "medusa"}]}, "references.0: source 'zlab_readme' has no rows"),
    ({"references": [{"source": "zlab_readme", "colour": 1}]}, "p.yaml: references.0:"),
    ({"external": {"x": {"source": "torchspec_pr51"}}}, "p.yaml: external.x: 'method' is required"),
    ({"external": {"x": {"source": "torchspec_pr51", "method": "phase_z"}}}, "external.x: source 'torchspec_pr51'"),
    ({"external": {"x": {"source": "zlab_readme", "method": "dflash-b16"}}}, "covers several target models"),
])
def test_bad_references_name_file_and_field(tmp_path, doc, message):
    _write(tmp_path, "p", {"datasets": [{"name": "gsm8k"}], **doc})
    with pytest.raises(ConfigError) as e:
        load_phase("p", tmp_path)
    assert message in str(e.value)


def test_reference_mapping_narrows_a_source(tmp_path):
    _write(tmp_path, "p", {"datasets": [{"name": "gsm8k"}],
                           "defaults": {"target": {"kind": "hub", "hub_id": "Qwen/Qwen3-8B"}},
                           "references": [{"source": "zlab_readme", "method": "dflash-b16", "temperature": 1}],
                           "external": {"h": {"source": "torchspec_pr51", "method": "phase_h"}}})
    ph = load_phase("p", tmp_path)
    lines = refs.lines(ph.references[0], "Qwen3-8B", 0.0)
    assert [(ln.method, ln.temperature) for ln in lines] == [("dflash-b16", 1.0)]
    assert lines[0].values("tau")["gsm8k"] == 6.04
    assert report.default_target(ph) == "Qwen3-8B"
    data = report.collect_external(ph)
    assert list(data["h"]["bench"]) == ["gsm8k"]                           # only the phase's datasets


def test_a_mean_needs_two_datasets():
    """A family with one dataset shown gets no `<family> avg` (it would repeat that row); nor does a lone dataset
    get an `overall`."""
    from dflash.results.report import aggregate_names, averages

    assert averages({"synthetic_math": 2.0, "synthetic_code": 3.0, "synthetic_chat": None}) == {"overall": 2.5}
    assert averages({"gsm8k": 2.0, "math500": 3.0, "mbpp": 4.0}) == {"math avg": 2.5, "overall": 3.0}
    assert averages({"gsm8k": 2.0}) == {}
    assert aggregate_names(["gsm8k", "math500", "mbpp"]) == ["math avg", "overall"]
    assert aggregate_names(["synthetic_math", "synthetic_code", "synthetic_chat"]) == ["overall"]
