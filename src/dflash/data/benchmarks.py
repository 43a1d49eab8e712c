"""Prompt loaders for the ten DFlash benchmark datasets.

The prompt text and the sample selection follow z-lab/dflash (paper-era ``model/utils.py`` and
``benchmark.py``; the five datasets that the current ``dflash/benchmark.py`` still lists use the same text):

* every dataset is mapped to a list of user turns (two for MT-Bench, one elsewhere);
* when fewer prompts are asked for than the split holds, the selection is
  ``datasets.Dataset.shuffle(seed=seed).select(range(n))``, i.e. the first ``n`` entries of
  ``numpy.random.default_rng(seed).permutation(n_total)``; otherwise every row is kept in upstream order.

Rows come from the Hugging Face hub (``datasets`` is imported lazily) or from a local jsonl/parquet file
whose records use the upstream field names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dflash.checksums import sha256_files
from dflash.data import root as data_root
from dflash.data import synthetic
from dflash.data.jsonl import iter_jsonl
from dflash.errors import DataError

FAMILIES = synthetic.FAMILIES            # math, code, chat: the report's groups, and the synthetic sets' kinds
SYNTHETIC_PREFIX = "synthetic_"          # dataset names `synthetic_<family>`: prompts built in-process

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_PREFIX = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
SWE_PREFIX = "Problem Statement:\n"
SWE_SUFFIX = "\nPlease fix the issue described above."
LCB_SYSTEM = (
    "You are an expert Python programmer. You will be given a question (problem specification) "
    "and will generate a correct Python program that matches the specification and passes all tests. "
    "You will NOT return anything except for the program"
)
LCB_FORMAT_STARTER = "### Format: Use the following code structure:"
LCB_FORMAT_STDIN = "### Format: Write your code in the following format:"
LCB_ANSWER = "### Answer: (use the provided format with backticks)"
LCB_FILES = ("test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl")


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark prompt: its upstream id and the user turns, already formatted."""

    id: str
    turns: tuple[str, ...]


class _MissingField(Exception):
    """Raised by formatters when a row lacks a field (or has the wrong type); turned into ValueError."""

    def __init__(self, field: str, problem: str = "missing field"):
        super().__init__(field)
        self.field = field
        self.problem = problem


Formatter = Callable[[Mapping[str, Any]], tuple[str, ...]]


@dataclass(frozen=True)
class DatasetSpec:
    """Where a benchmark lives upstream and how its rows become prompts.

    ``id_fields`` lists the id column names accepted, in order of preference (the hub and the usual local
    copies do not always agree); an empty tuple means the 0-based row index is the id. ``fields`` lists every
    column the formatter may read. ``hub_files`` is set for hub repos that are read as raw json files
    (LiveCodeBench) instead of through ``load_dataset(hub_id, hub_config)``. ``local_file`` is the usual
    path of a local copy inside the data root (``dflash.data.root``).
    """

    name: str
    family: str
    hub_id: str
    hub_config: str | None
    split: str
    default_n: int
    id_fields: tuple[str, ...]
    fields: tuple[str, ...]
    formatter: Formatter
    hub_files: tuple[str, ...] = ()
    local_file: str | None = None

    def hub_source(self) -> str:
        return f"hub:{self.hub_id}/{self.hub_config or 'default'}/{self.split}"

    def hub_urls(self) -> list[str]:
        return [f"https://huggingface.co/datasets/{self.hub_id}/resolve/main/{fn}" for fn in self.hub_files]


# --------------------------------------------------------------------------- field access / formatters


def _text(row: Mapping[str, Any], *names: str) -> str:
    """The first of ``names`` present in ``row``; it must be a string."""
    for name in names:
        if name in row and row[name] is not None:
            value = row[name]
            if not isinstance(value, str):
                raise _MissingField(repr(name), f"field is not a string ({type(value).__name__})")
            return value
    raise _MissingField(" or ".join(repr(n) for n in names) if len(names) > 1 else repr(names[0]))


def _optional_text(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _MissingField(repr(name), f"field is not a string ({type(value).__name__})")
    return value


def _math(field: str) -> Formatter:
    def fmt(row: Mapping[str, Any]) -> tuple[str, ...]:
        return (_text(row, field) + MATH_SUFFIX,)

    return fmt


def _fmt_humaneval(row: Mapping[str, Any]) -> tuple[str, ...]:
    return (HUMANEVAL_PREFIX + _text(row, "prompt") + "\n```",)


def _fmt_mbpp(row: Mapping[str, Any]) -> tuple[str, ...]:
    return (_text(row, "prompt"),)


def _fmt_livecodebench(row: Mapping[str, Any]) -> tuple[str, ...]:
    question = "### Question:\n" + _text(row, "question_content")
    starter = _optional_text(row, "starter_code")
    if starter:
        fmt_line, code = LCB_FORMAT_STARTER, f"```python\n{starter}\n```"
    else:
        fmt_line, code = LCB_FORMAT_STDIN, "```python\n# YOUR CODE HERE\n```"
    return (f"{LCB_SYSTEM}\n\n{question}\n\n{fmt_line}\n{code}\n\n{LCB_ANSWER}",)


def _fmt_swe_bench(row: Mapping[str, Any]) -> tuple[str, ...]:
    return (SWE_PREFIX + _text(row, "problem_statement") + SWE_SUFFIX,)


def _fmt_mt_bench(row: Mapping[str, Any]) -> tuple[str, ...]:
    # Hub (HuggingFaceH4/mt_bench_prompts): `prompt`; FastChat question.jsonl: `turns`. Both are lists of turns.
    for name in ("turns", "prompt"):
        if name in row and row[name] is not None:
            value = row[name]
            turns = tuple(value) if isinstance(value, list | tuple) else ()
            if not turns or not all(isinstance(t, str) for t in turns):
                raise _MissingField(repr(name), "field is not a non-empty list of strings")
            return turns
    raise _MissingField("'turns' or 'prompt'")


def _fmt_alpaca(row: Mapping[str, Any]) -> tuple[str, ...]:
    instruction = _text(row, "instruction")
    extra = _optional_text(row, "input")
    return (f"{instruction}\n\nInput:\n{extra}" if extra else instruction,)


def _spec(name: str, family: str, hub: str, split: str, default_n: int, **kw: Any) -> DatasetSpec:
    hub_id, _, hub_config = hub.partition(":")
    return DatasetSpec(name, family, hub_id, hub_config or None, split, default_n, **kw)


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        # math
        _spec(
            "gsm8k",
            "math",
            "openai/gsm8k:main",
            "test",
            128,
            id_fields=(),
            fields=("question",),
            formatter=_math("question"),
            local_file="gsm8k/test.jsonl",
        ),
        _spec(
            "math500",
            "math",
            "HuggingFaceH4/MATH-500",
            "test",
            128,
            id_fields=("unique_id",),
            fields=("problem",),
            formatter=_math("problem"),
            local_file="math500/test.jsonl",
        ),
        _spec(
            "aime24",
            "math",
            "HuggingFaceH4/aime_2024",
            "train",
            30,
            id_fields=("id",),
            fields=("problem",),
            formatter=_math("problem"),
            local_file="aime24/test.jsonl",
        ),
        # MathArena/aime_2025 numbers its rows `problem_idx`; math-ai/aime25-style copies use `id`.
        _spec(
            "aime25",
            "math",
            "MathArena/aime_2025",
            "train",
            30,
            id_fields=("id", "problem_idx"),
            fields=("problem",),
            formatter=_math("problem"),
            local_file="aime25/test.jsonl",
        ),
        # code
        _spec(
            "humaneval",
            "code",
            "openai/openai_humaneval",
            "test",
            164,
            id_fields=("task_id",),
            fields=("prompt",),
            formatter=_fmt_humaneval,
            local_file="humaneval/test.jsonl",
        ),
        _spec(
            "mbpp",
            "code",
            "google-research-datasets/mbpp:sanitized",
            "test",
            128,
            id_fields=("task_id",),
            fields=("prompt",),
            formatter=_fmt_mbpp,
            local_file="mbpp/sanitized_test.jsonl",
        ),
        _spec(
            "livecodebench",
            "code",
            "livecodebench/code_generation_lite",
            "test",
            128,
            id_fields=("question_id",),
            fields=("question_content", "starter_code"),
            formatter=_fmt_livecodebench,
            hub_files=LCB_FILES,
            local_file="livecodebench/test.jsonl",
        ),
        _spec(
            "swe_bench",
            "code",
            "princeton-nlp/SWE-bench_Lite",
            "test",
            128,
            id_fields=("instance_id",),
            fields=("problem_statement",),
            formatter=_fmt_swe_bench,
            local_file="swe_bench_lite/test.jsonl",
        ),
        # chat
        _spec(
            "mt_bench",
            "chat",
            "HuggingFaceH4/mt_bench_prompts",
            "train",
            80,
            id_fields=("question_id", "prompt_id"),
            fields=("turns", "prompt"),
            formatter=_fmt_mt_bench,
            local_file="mt_bench/question.jsonl",
        ),
        _spec(
            "alpaca",
            "chat",
            "tatsu-lab/alpaca",
            "train",
            128,
            id_fields=(),
            fields=("instruction", "input"),
            formatter=_fmt_alpaca,
            local_file="alpaca/train.jsonl",
        ),
    )
}


# --------------------------------------------------------------------------- selection


def select_indices(n_total: int, n: int, seed: int = 0) -> list[int]:
    """Indices of the rows that z-lab's ``dataset.shuffle(seed=seed).select(range(n))`` keeps.

    ``datasets.Dataset.shuffle`` draws ``numpy.random.default_rng(seed).permutation(len(dataset))``.
    When ``n >= n_total`` z-lab does not shuffle, so all rows are returned in upstream order.
    """
    if n <= 0:
        raise ValueError(f"n must be a positive number of prompts, got {n}")
    if n >= n_total:
        return list(range(n_total))
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n_total)
    return [int(i) for i in perm[:n]]


# --------------------------------------------------------------------------- row sources


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for where, _, record in iter_jsonl(path):
        yield where, record


def _iter_parquet(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow ships with `datasets`
        raise ImportError(f"reading {path} needs pyarrow: pip install 'dflash[hub]' (datasets brings pyarrow)") from exc
    import pyarrow

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({' '.join(str(exc).split())})") from None
    for i, record in enumerate(table.to_pylist(), start=1):
        yield f"{path}, row {i}", record


def _iter_file(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if path.suffix == ".parquet":
        return _iter_parquet(path)
    return _iter_jsonl(path)


def _local_files(spec: DatasetSpec, path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"{spec.name}: local data file not found: {path}")
    if not path.is_dir():
        return [path]
    # A folder is accepted for datasets that upstream ships as several files (LiveCodeBench test*.jsonl).
    files = [path / fn for fn in spec.hub_files if (path / fn).is_file()]
    if not files:
        expected = ", ".join(spec.hub_files) or "a jsonl or parquet file"
        raise FileNotFoundError(f"{spec.name}: {path} is a folder without any of: {expected}")
    return files


def _hub_rows(spec: DatasetSpec) -> Iterator[tuple[str, Mapping[str, Any]]]:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"loading {spec.name} from the Hugging Face hub needs the `datasets` package "
            "(pip install 'dflash[hub]'), or pass a local file with `path=`"
        ) from exc
    if spec.hub_files:
        ds = datasets.load_dataset("json", data_files={spec.split: spec.hub_urls()}, split=spec.split)
    else:
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.split)
    names = getattr(ds, "column_names", None)
    if isinstance(names, list) and hasattr(ds, "select_columns"):
        keep = [c for c in names if c in spec.fields or c in spec.id_fields]
        if keep:
            ds = ds.select_columns(keep)
    source = spec.hub_source()
    for i, record in enumerate(ds, start=1):
        yield f"{source}, row {i}", record


# --------------------------------------------------------------------------- public loader


def _row_id(spec: DatasetSpec, where: str, index: int, record: Mapping[str, Any]) -> str:
    if not spec.id_fields:
        return str(index)
    for name in spec.id_fields:
        value = record.get(name)
        if value is not None and value != "":
            return str(value)
    wanted = " or ".join(repr(n) for n in spec.id_fields)
    raise DataError(f"{where}: missing field {wanted} (the {spec.name} prompt id)")


def load_benchmark(
    name: str, n: int | None = None, seed: int = 0, path: str | os.PathLike[str] | None = None
) -> tuple[list[BenchPrompt], dict]:
    """Load benchmark ``name`` and select ``n`` prompts (default: ``DATASETS[name].default_n``) the way z-lab does.

    Rows come from the Hugging Face hub (``datasets.load_dataset(hub_id, hub_config, split=split)``) unless
    ``path`` names a local jsonl or parquet file with the upstream field names (for LiveCodeBench, also a
    folder holding upstream ``test*.jsonl`` files, read in upstream order).

    Returns the prompts (in selection order) and a meta dict with ``dataset``, ``source``
    (``hub:<id>/<config>/<split>``, config ``default`` when the repo has none, or ``file:<path>``), ``sha256``
    (of the local file(s), concatenated in reading order; ``None`` for the hub), ``n_total`` (rows upstream),
    ``n`` (prompts returned), ``n_requested``, ``seed``, ``subset`` (whether a shuffled subset was taken) and
    ``ids`` (the selected upstream ids, in order).
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise ValueError(f"unknown benchmark dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if n is None:
        n = spec.default_n
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n must be a positive int, got {n!r}")
    if n <= 0:
        raise ValueError(f"n must be a positive number of prompts, got {n}")

    if path is None:
        rows = _hub_rows(spec)
        source, sha256 = spec.hub_source(), None
    else:
        local = Path(path)
        files = _local_files(spec, local)
        rows = (item for f in files for item in _iter_file(f))
        source, sha256 = f"file:{local}", sha256_files(files)

    prompts: list[BenchPrompt] = []
    for index, (where, record) in enumerate(rows):
        try:
            turns = spec.formatter(record)
        except _MissingField as exc:
            raise DataError(f"{where}: {exc.problem} {exc.field} (needed by {spec.name})") from None
        prompts.append(BenchPrompt(id=_row_id(spec, where, index, record), turns=turns))

    if not prompts:
        raise DataError(f"{spec.name}: {source} holds no rows")
    picked = select_indices(len(prompts), n, seed)
    selected = [prompts[i] for i in picked]
    meta = {
        "dataset": spec.name,
        "source": source,
        "sha256": sha256,
        "n_total": len(prompts),
        "n": len(selected),
        "n_requested": n,
        "seed": seed,
        "subset": n < len(prompts),
        "ids": [p.id for p in selected],
    }
    return selected, meta


def load_prompts(ds: dict) -> tuple[list[BenchPrompt], dict]:
    """Prompts of a phase's dataset entry (bench and prepare): `synthetic_<family>` sets or one of the ten
    benchmark datasets (local `path:` or the hub)."""
    name = ds["name"]
    if name.startswith(SYNTHETIC_PREFIX):
        fam = name.removeprefix(SYNTHETIC_PREFIX)
        n = ds.get("n", 16)
        pairs = synthetic.examples(fam, n, synthetic.BENCH_SEED + ds.get("seed", 0))
        prompts = [BenchPrompt(id=f"{fam}/{i}", turns=(q,)) for i, (q, _) in enumerate(pairs)]
        return prompts, {"dataset": name, "source": f"synthetic:{fam}", "n": n, "seed": ds.get("seed", 0),
                         "ids": [p.id for p in prompts], "sha256": None}
    path = ds.get("path")
    if data_root.is_rooted(path) and not data_root.resolve(path).exists():
        raise FileNotFoundError(f"{name}: {data_root.missing(path)}; {data_root.HOW}")
    prompts, meta = load_benchmark(name, n=ds.get("n"), seed=ds.get("seed", 0),
                                   path=None if path is None else data_root.resolve(path))
    if data_root.is_rooted(path):
        meta["source"] = f"file:{path}"          # the file as the phase names it, wherever the data root is
    return prompts, meta


def family(dataset: str) -> str:
    """math, code or chat (the report's groups); `other` for a name outside both lists."""
    if dataset.startswith(SYNTHETIC_PREFIX):
        return dataset.removeprefix(SYNTHETIC_PREFIX)
    return DATASETS[dataset].family if dataset in DATASETS else "other"
