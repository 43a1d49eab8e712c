"""Tests for dflash.benchmarks: z-lab prompt text, selection and provenance, on the offline data in shared/data."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from dflash.data.benchmarks import DATASETS, MATH_SUFFIX, BenchPrompt, load_benchmark, select_indices

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"

ZLAB_DEFAULT_N = {
    "gsm8k": 128,
    "math500": 128,
    "aime24": 30,
    "aime25": 30,
    "humaneval": 164,
    "mbpp": 128,
    "livecodebench": 128,
    "swe_bench": 128,
    "mt_bench": 80,
    "alpaca": 128,
}
FAMILY = {
    "gsm8k": "math",
    "math500": "math",
    "aime24": "math",
    "aime25": "math",
    "humaneval": "code",
    "mbpp": "code",
    "livecodebench": "code",
    "swe_bench": "code",
    "mt_bench": "chat",
    "alpaca": "chat",
}
LOCAL = [name for name, spec in DATASETS.items() if spec.local_file]
SUBSETTED = ["gsm8k", "math500", "mbpp", "swe_bench", "alpaca"]  # local file larger than z-lab's default n


def _local(name: str) -> Path:
    path = DATA / DATASETS[name].local_file
    if not path.is_file():
        pytest.skip(f"offline data {path} is absent (expected the shared data folder next to the repo)")
    return path


def _manifest() -> dict[str, dict]:
    path = DATA / "manifest.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return {entry["path"]: entry for entry in json.loads(path.read_text())}


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- registry


def test_registry_matches_zlab():
    assert set(DATASETS) == set(ZLAB_DEFAULT_N)
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert spec.default_n == ZLAB_DEFAULT_N[name]
        assert spec.family == FAMILY[name]
    hub = {name: (s.hub_id, s.hub_config, s.split) for name, s in DATASETS.items()}
    assert hub == {
        "gsm8k": ("openai/gsm8k", "main", "test"),
        "math500": ("HuggingFaceH4/MATH-500", None, "test"),
        "aime24": ("HuggingFaceH4/aime_2024", None, "train"),
        "aime25": ("MathArena/aime_2025", None, "train"),
        "humaneval": ("openai/openai_humaneval", None, "test"),
        "mbpp": ("google-research-datasets/mbpp", "sanitized", "test"),
        "livecodebench": ("livecodebench/code_generation_lite", None, "test"),
        "swe_bench": ("princeton-nlp/SWE-bench_Lite", None, "test"),
        "mt_bench": ("HuggingFaceH4/mt_bench_prompts", None, "train"),
        "alpaca": ("tatsu-lab/alpaca", None, "train"),
    }


def test_select_indices_matches_hf_shuffle_semantics():
    np = pytest.importorskip("numpy")
    assert select_indices(10, 10, seed=3) == list(range(10))
    assert select_indices(10, 50, seed=3) == list(range(10))
    picked = select_indices(1000, 7, seed=0)
    assert picked == [int(i) for i in np.random.default_rng(0).permutation(1000)[:7]]
    with pytest.raises(ValueError):
        select_indices(10, 0)


# --------------------------------------------------------------------------- real local files


@pytest.mark.parametrize("name", LOCAL)
def test_local_default_load(name):
    path = _local(name)
    entry = _manifest()[DATASETS[name].local_file]
    prompts, meta = load_benchmark(name, path=str(path))

    expected_n = min(ZLAB_DEFAULT_N[name], entry["rows"])
    assert len(prompts) == expected_n
    assert all(isinstance(p, BenchPrompt) for p in prompts)
    assert meta["dataset"] == name
    assert meta["source"] == f"file:{path}"
    assert meta["sha256"] == entry["sha256"]
    assert meta["n_total"] == entry["rows"]
    assert meta["n"] == expected_n
    assert meta["seed"] == 0
    assert meta["ids"] == [p.id for p in prompts]
    assert len(set(meta["ids"])) == expected_n
    assert all(isinstance(i, str) and i for i in meta["ids"])
    n_turns = 2 if name == "mt_bench" else 1
    assert all(len(p.turns) == n_turns and all(isinstance(t, str) and t for t in p.turns) for p in prompts)
    if DATASETS[name].family == "math":
        assert all(p.turns[0].endswith(MATH_SUFFIX) for p in prompts)


@pytest.mark.parametrize("name", SUBSETTED)
def test_seeded_subset_is_deterministic(name):
    path = _local(name)
    _, meta0 = load_benchmark(name, path=path)
    _, again = load_benchmark(name, path=path, seed=0)
    _, meta1 = load_benchmark(name, path=path, seed=1)
    assert meta0["subset"] and meta0["ids"] == again["ids"]
    assert meta1["seed"] == 1 and meta1["ids"] != meta0["ids"]
    assert len(meta1["ids"]) == len(meta0["ids"]) == ZLAB_DEFAULT_N[name]
    # the subset is a shuffle, not a prefix of the file
    _, everything = load_benchmark(name, path=path, n=10**6)
    assert meta0["ids"] != everything["ids"][: len(meta0["ids"])]
    assert set(meta0["ids"]) <= set(everything["ids"])


def test_subset_equals_hf_shuffle_select():
    """z-lab: dataset.shuffle(seed=0).select(range(max_samples)) on the HF split; gsm8k ids are row indices."""
    datasets = pytest.importorskip("datasets")
    path = _local("gsm8k")
    rows = _rows(path)
    ds = datasets.Dataset.from_dict({"question": [r["question"] for r in rows], "row": list(range(len(rows)))})
    for seed in (0, 7):
        expected = [str(i) for i in ds.shuffle(seed=seed).select(range(128))["row"]]
        _, meta = load_benchmark("gsm8k", path=path, seed=seed)
        assert meta["ids"] == expected


def test_n_at_least_size_takes_all_in_order():
    path = _local("aime24")
    prompts, meta = load_benchmark("aime24", n=1000, seed=5, path=path)
    assert meta["ids"] == [str(r["id"]) for r in _rows(path)]
    assert meta["n"] == meta["n_total"] == 30 and meta["n_requested"] == 1000 and not meta["subset"]
    assert prompts[0].id == "60"


def test_gsm8k_prompt_text():
    prompts, _ = load_benchmark("gsm8k", n=10**6, path=_local("gsm8k"))
    assert prompts[0] == BenchPrompt(
        id="0",
        turns=(
            "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
            "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh "
            "duck egg. How much in dollars does she make every day at the farmers' market?"
            "\nPlease reason step by step, and put your final answer within \\boxed{}.",
        ),
    )


def test_math_prompt_text():
    prompts, _ = load_benchmark("math500", n=500, path=_local("math500"))
    assert prompts[0].id == "test/precalculus/807.json"
    assert prompts[0].turns == (
        "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.  Enter your answer in the form "
        "$(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$"
        "\nPlease reason step by step, and put your final answer within \\boxed{}.",
    )
    prompts, meta = load_benchmark("aime25", path=_local("aime25"))
    assert meta["ids"] == [str(i) for i in range(30)]
    assert prompts[0].turns == (
        "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b.$" + MATH_SUFFIX,
    )


def test_humaneval_prompt_text():
    path = _local("humaneval")
    prompts, meta = load_benchmark("humaneval", path=path)
    assert meta["ids"][:2] == ["HumanEval/0", "HumanEval/1"] and meta["ids"][-1] == "HumanEval/163"
    raw = _rows(path)[0]["prompt"]
    text = prompts[0].turns[0]
    assert text == (
        "Write a solution to the following problem and make sure that it passes the tests:\n```python\n" + raw + "\n```"
    )
    assert text.startswith(
        "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
        "from typing import List\n\n\ndef has_close_elements("
    )
    assert text.endswith('    True\n    """\n\n```')


def test_mbpp_and_swe_prompt_text():
    prompts, _ = load_benchmark("mbpp", n=1000, path=_local("mbpp"))
    assert prompts[0] == BenchPrompt(
        id="11",
        turns=("Write a python function to remove first and last occurrence of a given character from the string.",),
    )
    path = _local("swe_bench")
    prompts, _ = load_benchmark("swe_bench", n=1000, path=path)
    statement = _rows(path)[0]["problem_statement"]
    assert prompts[0].id == "astropy__astropy-12907"
    assert prompts[0].turns == ("Problem Statement:\n" + statement + "\nPlease fix the issue described above.",)
    assert (
        prompts[0]
        .turns[0]
        .startswith("Problem Statement:\nModeling's `separability_matrix` does not compute separability correctly")
    )


def test_mt_bench_two_turns():
    prompts, meta = load_benchmark("mt_bench", path=_local("mt_bench"))
    assert meta["ids"] == [str(i) for i in range(81, 161)]
    assert prompts[0] == BenchPrompt(
        id="81",
        turns=(
            "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences "
            "and must-see attractions.",
            "Rewrite your previous response. Start every sentence with the letter A.",
        ),
    )


def test_alpaca_with_and_without_input():
    prompts, _ = load_benchmark("alpaca", n=10**6, path=_local("alpaca"))
    assert prompts[0] == BenchPrompt(
        id="0",
        turns=(
            "Are the two sentences below grammatically correct? Output yes or no.\n\nInput:\n"
            "Sentence 1: I am going to the store.\nSentence 2: I goes to the store.",
        ),
    )
    assert prompts[4] == BenchPrompt(id="4", turns=("Generate a new solution to address the global climate crisis.",))


# --------------------------------------------------------------------------- LiveCodeBench (built files)

LCB_HEAD = (
    "You are an expert Python programmer. You will be given a question (problem specification) and will generate "
    "a correct Python program that matches the specification and passes all tests. You will NOT return anything "
    "except for the program\n\n"
)


def _lcb_row(qid: str, content: str, starter: str) -> dict:
    return {
        "question_title": f"title {qid}",
        "question_content": content,
        "platform": "atcoder" if not starter else "leetcode",
        "question_id": qid,
        "contest_id": "c1",
        "contest_date": "2023-08-01T00:00:00",
        "starter_code": starter,
        "difficulty": "easy",
        "public_test_cases": json.dumps([{"input": "1\n", "output": "1\n", "testtype": "stdin"}]),
        "private_test_cases": "eJyrVkrOz0vOTy1WsgIAHJ0ELg==",
        "metadata": "{}",
    }


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_livecodebench_prompt_text(tmp_path):
    starter = "class Solution:\n    def add(self, a: int, b: int) -> int:\n        "
    path = _write_jsonl(
        tmp_path / "lcb.jsonl",
        [_lcb_row("abc301_a", "Print N.\n\nInput\n\nN", ""), _lcb_row("2812", "Add two numbers.", starter)],
    )
    prompts, meta = load_benchmark("livecodebench", path=path)
    assert meta["ids"] == ["abc301_a", "2812"] and meta["n_total"] == 2 and meta["n_requested"] == 128
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prompts[0].turns == (
        LCB_HEAD + "### Question:\nPrint N.\n\nInput\n\nN\n\n"
        "### Format: Write your code in the following format:\n```python\n# YOUR CODE HERE\n```\n\n"
        "### Answer: (use the provided format with backticks)",
    )
    assert prompts[1].turns == (
        LCB_HEAD + "### Question:\nAdd two numbers.\n\n"
        "### Format: Use the following code structure:\n```python\n" + starter + "\n```\n\n"
        "### Answer: (use the provided format with backticks)",
    )


def test_livecodebench_folder_reads_upstream_files_in_order(tmp_path):
    folder = tmp_path / "code_generation_lite"
    _write_jsonl(folder / "test2.jsonl", [_lcb_row("b", "second file", "")])
    _write_jsonl(folder / "test.jsonl", [_lcb_row("a", "first file", "")])
    (folder / "notes.jsonl").write_text("not json\n")
    _, meta = load_benchmark("livecodebench", path=folder)
    assert meta["ids"] == ["a", "b"]
    combined = (folder / "test.jsonl").read_bytes() + (folder / "test2.jsonl").read_bytes()
    assert meta["sha256"] == hashlib.sha256(combined).hexdigest()


def test_parquet_file(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    rows = [_lcb_row("x1", "Q1", ""), _lcb_row("x2", "Q2", "def f():\n    ")]
    parquet = tmp_path / "lcb.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    from_parquet, meta = load_benchmark("livecodebench", path=parquet)
    from_jsonl, _ = load_benchmark("livecodebench", path=_write_jsonl(tmp_path / "lcb.jsonl", rows))
    assert from_parquet == from_jsonl and meta["source"] == f"file:{parquet}"


# --------------------------------------------------------------------------- hub code path (offline)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Route datasets.load_dataset(hub_id, config, split=...) to local json files, fully offline."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    real_load = datasets.load_dataset
    files: dict[str, Path] = {}
    calls: list[tuple] = []

    def fake_load(path, name=None, *, split=None, data_files=None, **kwargs):
        calls.append((path, name, split, data_files))
        if path == "json":  # raw-file hub repos (LiveCodeBench): map URLs to local files
            local = {s: [str(files[u]) for u in urls] for s, urls in data_files.items()}
            return real_load("json", data_files=local, split=split, cache_dir=str(tmp_path / "cache"))
        spec = next(s for s in DATASETS.values() if s.hub_id == path)
        assert (name, split) == (spec.hub_config, spec.split)
        return real_load("json", data_files=str(files[path]), split="train", cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    return files, calls


# LiveCodeBench's local copy is release_v1 (upstream test.jsonl) alone; the hub loader reads test.jsonl .. test6.jsonl
@pytest.mark.parametrize("name", [n for n in LOCAL if not DATASETS[n].hub_files])
def test_hub_path_matches_local_file(name, fake_hub, tmp_path):
    files, calls = fake_hub
    path = _local(name)
    spec = DATASETS[name]
    if name == "mt_bench":  # the hub copy names the fields `prompt` / `prompt_id`, FastChat's file `turns`
        hub_rows = [
            {"prompt": r["turns"], "prompt_id": r["question_id"], "category": r["category"]} for r in _rows(path)
        ]
        files[spec.hub_id] = _write_jsonl(tmp_path / "mt_bench_prompts.jsonl", hub_rows)
    else:
        files[spec.hub_id] = path
    from_hub, meta = load_benchmark(name)
    from_file, file_meta = load_benchmark(name, path=path)
    assert calls == [(spec.hub_id, spec.hub_config, spec.split, None)]
    assert from_hub == from_file
    assert meta["source"] == f"hub:{spec.hub_id}/{spec.hub_config or 'default'}/{spec.split}"
    assert meta["sha256"] is None
    assert {k: v for k, v in meta.items() if k not in ("source", "sha256")} == {
        k: v for k, v in file_meta.items() if k not in ("source", "sha256")
    }


def test_hub_path_livecodebench(fake_hub, tmp_path):
    files, calls = fake_hub
    spec = DATASETS["livecodebench"]
    for i, url in enumerate(spec.hub_urls()):
        files[url] = _write_jsonl(tmp_path / f"lcb{i}.jsonl", [_lcb_row(f"q{i}", f"problem {i}", "")])
    prompts, meta = load_benchmark("livecodebench")
    assert calls[0][0] == "json" and calls[0][3] == {"test": spec.hub_urls()}
    base = "https://huggingface.co/datasets/livecodebench/code_generation_lite/resolve/main/"
    assert spec.hub_urls() == [base + f for f in ("test.jsonl", *(f"test{i}.jsonl" for i in range(2, 7)))]
    assert meta["ids"] == [f"q{i}" for i in range(6)]
    assert meta["source"] == "hub:livecodebench/code_generation_lite/default/test"
    assert "### Question:\nproblem 0\n\n" in prompts[0].turns[0]


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="datasets"):
        load_benchmark("gsm8k")


# --------------------------------------------------------------------------- errors


def test_unknown_dataset():
    with pytest.raises(ValueError, match=r"'gsm8kk'.*gsm8k.*alpaca"):
        load_benchmark("gsm8kk", path="unused.jsonl")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope" / "test.jsonl"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_benchmark("gsm8k", path=missing)


@pytest.mark.parametrize("n", [0, -3])
def test_bad_n(n, tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match="n must be"):
        load_benchmark("gsm8k", n=n, path=path)


def test_row_missing_field(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "fine"}, {"answer": "42"}])
    with pytest.raises(ValueError) as err:
        load_benchmark("gsm8k", path=path)
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and "'question'" in msg


def test_row_missing_id_and_bad_types(tmp_path):
    path = _write_jsonl(tmp_path / "h.jsonl", [{"prompt": "def f():\n"}])
    with pytest.raises(ValueError, match=r"row 1.*'task_id'"):
        load_benchmark("humaneval", path=path)
    path = _write_jsonl(tmp_path / "m.jsonl", [{"question_id": 1, "turns": "not a list"}])
    with pytest.raises(ValueError, match=r"row 1.*'turns'"):
        load_benchmark("mt_bench", path=path)
    path = _write_jsonl(tmp_path / "m2.jsonl", [{"question_id": 1}])
    with pytest.raises(ValueError, match=r"row 1.*'turns' or 'prompt'"):
        load_benchmark("mt_bench", path=path)


def test_invalid_json_and_empty_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a"}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, row 2 \(line 2\): invalid JSON"):
        load_benchmark("gsm8k", path=bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        load_benchmark("gsm8k", path=empty)
