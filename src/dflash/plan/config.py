"""Phase configs: YAML loading (YAML 1.2 floats), schema validation with file + field path, `extends:`, runs."""

from __future__ import annotations

import copy
import functools
import json
import keyword
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from dflash.data import references
from dflash.data import root as data_root
from dflash.data.benchmarks import DATASETS, FAMILIES, SYNTHETIC_PREFIX
from dflash.errors import ConfigError
from dflash.plan import pretrained
from dflash.plan.fit import layer_ids_problem, mask_id_problem
from dflash.plan.paths import PHASES_DIR, SCHEMA_DIR
from dflash.plan.stages import BY_NAME, builds_drafter

# A phase name is a Snakemake rule name and reaches shell commands: a plain identifier, not a rule of the workflow.
PHASE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
RESERVED = frozenset({*BY_NAME, "all"})
MAX_NAME = 100             # phase and run names name folders and files (with prefixes and suffixes: 255 bytes at most)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """SafeLoader (libyaml's when installed) that reads `1e-4` as a float (YAML 1.1 would read it as a string) and
    refuses a key given twice in one mapping (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first[key] + 1})", key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(path: Path) -> Any:
    raw = Path(path).read_bytes()
    try:
        return yaml.load(raw.decode("utf-8"), Loader=_Loader)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{_display(path)}: not UTF-8 text (byte {raw[e.start]:#04x} on line {line})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{_display(path)}: not valid YAML: {_one_line(e)}") from None


def _one_line(error: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (PyYAML's own text spans several lines)."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return " ".join(str(error).split())
    mark = error.problem_mark or error.context_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    what = "; ".join(" ".join(str(part).split()) for part in (error.context, error.problem) if part)
    return what + where


def _check_values(node: Any, where: str, path: str = "") -> None:
    """What a JSON schema cannot see in a YAML document: mapping keys that are not strings (`null:`, `1:`) and
    numbers that are not finite (`.nan`, `.inf`, `1e999`); either would break stage keys and JSON records later."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: {path or '(top level)'}: key {json.dumps(key)} is not a string (quote it)")
            _check_values(value, where, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_values(value, where, f"{path}.{i}" if path else str(i))
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{where}: {path or '(top level)'}: {node} is not a finite number")


@functools.cache
def _schema(path: Path) -> dict:
    return load_yaml(path)


def load_schema(name: str = "phase") -> dict:
    """The schema, parsed once per process (callers get a copy they may change)."""
    return copy.deepcopy(_schema(SCHEMA_DIR / f"{name}.schema.yaml"))


@functools.cache
def _validator(part: str | None) -> jsonschema.Draft202012Validator:
    """A validator for the phase schema, or for one of its `$defs` (`run`, `dataset`, ...), built once."""
    schema = _schema(SCHEMA_DIR / "phase.schema.yaml")
    return jsonschema.Draft202012Validator(schema if part is None else {**schema["$defs"][part],
                                                                        "$defs": schema["$defs"]})


_TYPE_WORDS = {"number": "a number", "integer": "an integer", "string": "a string", "boolean": "true or false",
               "object": "a mapping", "array": "a list", "null": "null"}


def _describe(error: jsonschema.ValidationError) -> str:
    v = error.validator
    if v == "type":
        types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        got = type(error.instance).__name__
        return f"expected {' or '.join(t if t in ('number',) else _TYPE_WORDS.get(t, t) for t in types)}" \
               f" (got {got} {error.instance!r})"
    if v == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unknown key {', '.join(map(repr, extra))}"
    if v == "enum":
        return f"expected one of {error.validator_value}, got {error.instance!r}"
    if v == "required":
        return error.message.replace("is a required property", "is required")
    return error.message


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path)


def validate(document: Any, source: str, part: str | None = None) -> None:
    """Raise ConfigError for the first (deepest-path) error, as `<source>: <field.path>: <what>`; `part` names the
    `$defs` entry of the phase schema to check against (default: a whole phase file)."""
    validator = _validator(part)
    if validator.is_valid(document):
        return
    errors = sorted(validator.iter_errors(document), key=lambda e: (-len(e.absolute_path), str(e.absolute_path)))
    if errors:
        err = errors[0]
        where = _path(err) or "(top level)"
        raise ConfigError(f"{source}: {where}: {_describe(err)}")


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def fill_defaults(instance: Any, schema: dict, root: dict) -> Any:
    """Return a copy of `instance` with every schema default filled in (recursively, through $ref)."""
    schema = _resolve(schema, root)
    if not isinstance(instance, dict) or "properties" not in schema:
        return copy.deepcopy(instance)
    out = copy.deepcopy(instance)
    for key, sub in schema["properties"].items():
        sub_r = _resolve(sub, root)
        if key not in out and "default" in sub_r:
            out[key] = copy.deepcopy(sub_r["default"])
        if key in out:
            out[key] = fill_defaults(out[key], sub_r, root)
    return out


def section_defaults(name: str, given: dict) -> dict:
    """`given` validated against the schema's `$defs.<name>` with its defaults filled (for code handed a section
    that did not come through a phase file)."""
    schema = _schema(SCHEMA_DIR / "phase.schema.yaml")
    full = fill_defaults(given, schema["$defs"][name], schema)
    validate(full, name, name)
    return full


def deep_merge(base: Any, override: Any) -> Any:
    """Mappings merge key by key; anything else (lists included) is replaced by the override."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for k, v in override.items():
            out[k] = deep_merge(out[k], v) if k in out else copy.deepcopy(v)
        return out
    return copy.deepcopy(override)


@dataclass
class Phase:
    name: str
    file: str
    description: str
    runs: dict[str, dict]             # run name -> full run config (defaults filled, validated)
    datasets: list[dict]
    references: list[str]
    external: dict[str, dict] = field(default_factory=dict)
    chain: list[str] = field(default_factory=list)   # files this phase was assembled from, child first
    rehearsal: dict | None = None     # a rehearsal's overlay and substitutions (dflash.plan.rehearsal)


def read_document(name: str, phases_dir: Path, seen: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    path = phases_dir / f"{name}.yaml"
    rel = _display(path)
    if name in seen:
        raise ConfigError(f"{rel}: extends: cycle {' -> '.join((*seen, name))}")
    if not path.is_file():
        where = f"{_display(phases_dir / (seen[-1] + '.yaml'))}: extends: " if seen else ""
        raise ConfigError(f"{where}phase file {rel} not found")
    doc = load_yaml(path)
    if doc is None:
        doc = {}
    _check_values(doc, rel)
    if isinstance(doc, dict) and isinstance(doc.get("runs"), dict):
        doc["runs"] = {name: {} if run is None else run for name, run in doc["runs"].items()}   # `R00:` = no change
    validate(doc, rel)
    chain = [rel]
    if "extends" in doc and not PHASE_NAME.match(doc["extends"]):
        raise ConfigError(f"{rel}: extends: {doc['extends']!r} is not a phase name (a file of {_display(phases_dir)}"
                          ", named without .yaml)")
    if "extends" in doc:
        parent, parent_chain = read_document(doc["extends"], phases_dir, (*seen, name))
        chain += parent_chain
        merged = {k: v for k, v in parent.items() if k not in ("runs", "description")}
        merged["defaults"] = deep_merge(parent.get("defaults", {}), doc.get("defaults", {}))
        for key in ("runs", "datasets", "references", "external", "description"):
            if key in doc:
                merged[key] = doc[key]
            elif key == "runs" and "runs" in parent:
                merged[key] = parent["runs"]
        doc = merged
    return doc, chain


def run_override(runs: dict[str, dict], name: str, where: str, seen: tuple[str, ...] = ()) -> dict:
    """A run's settings over those of the run it `extends` (a run of the same `runs:`), without `extends`."""
    run = runs[name]
    base = run.get("extends")
    own = {k: v for k, v in run.items() if k != "extends"}
    if base is None:
        return own
    if base not in runs:
        raise ConfigError(f"{where}: runs.{name}.extends: {base!r} is not a run of this phase (runs: "
                          f"{', '.join(runs)})")
    if base in (*seen, name):
        raise ConfigError(f"{where}: runs.{name}.extends: cycle {' -> '.join((*seen, name, base))}")
    return deep_merge(run_override(runs, base, where, (*seen, name)), own)


def _display(path: Path) -> str:
    """`path` relative to the working directory where it is inside it, control characters escaped (a message
    stays one line whatever a file is called)."""
    try:
        text = str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        text = str(path)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_name(name: str, phases_dir: Path = PHASES_DIR) -> None:
    where = _display(phases_dir / f"{name}.yaml")
    if not PHASE_NAME.match(name) or keyword.iskeyword(name):
        raise ConfigError(f"{where}: the phase name {name!r} (the file name) must start with a letter and hold only "
                          "letters, digits and underscores")
    if len(name) > MAX_NAME:
        raise ConfigError(f"{where}: the phase name (the file name) is {len(name)} characters long; at most "
                          f"{MAX_NAME} (it names result folders and files)")
    if name in RESERVED:
        raise ConfigError(f"{where}: the phase name {name!r} (the file name) is a rule of the workflow; rename the "
                          f"file (reserved: {', '.join(sorted(RESERVED))})")


def load_phase(name: str, phases_dir: Path = PHASES_DIR) -> Phase:
    check_name(name, phases_dir)
    schema = _schema(SCHEMA_DIR / "phase.schema.yaml")         # read only: fill_defaults copies what it takes
    doc, chain = read_document(name, phases_dir)
    src = chain[0]
    if "datasets" not in doc:
        raise ConfigError(f"{src}: datasets: is required (directly or through extends)")
    defaults = doc.get("defaults", {})
    if "extends" in defaults:
        raise ConfigError(f"{src}: defaults.extends: only a run (under runs:) extends another run")
    overrides = doc.get("runs") or {"main": {}}
    runs = {}
    for run_name in overrides:
        if len(run_name) > MAX_NAME:
            raise ConfigError(f"{src}: runs: the run name {run_name[:20]}... is {len(run_name)} characters long; at "
                              f"most {MAX_NAME} (it names result folders)")
        full = fill_run(deep_merge(defaults, run_override(overrides, run_name, src)))
        validate(full, f"{src}: runs.{run_name}", "run")
        check_run(full, f"{src}: runs.{run_name}")
        runs[run_name] = full
    _check_references(doc, src)
    _check_datasets(doc["datasets"], src)
    return Phase(name=name, file=src, description=doc.get("description", ""), runs=runs,
                 datasets=[fill_defaults(d, schema["$defs"]["dataset"], schema) for d in doc["datasets"]],
                 references=list(doc.get("references", [])), external=dict(doc.get("external", {})), chain=chain)


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> value of every leaf of a mapping (lists and empty mappings are leaves)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node} if prefix else {}


def explain(name: str, phases_dir: Path = PHASES_DIR) -> dict[str, dict[str, tuple[Any, str]]]:
    """Every resolved value of every run of a phase and where it comes from: {run: {path: (value, origin)}}. The
    origin is a phase file (`<file> defaults` or `<file> runs.<run>`, the last file of the `extends` chain that
    sets it), `schema default`, or `paper gamma` (`train.gamma` from the block size)."""
    phase = load_phase(name, phases_dir)
    docs: list[tuple[str, dict]] = []               # (file, raw document), the base phase first
    cur: str | None = name
    while cur is not None:                          # load_phase has checked the chain
        path = phases_dir / f"{cur}.yaml"
        doc = load_yaml(path) or {}
        docs.insert(0, (_display(path), doc))
        cur = doc.get("extends")
    runs_file, run_docs = next(((rel, doc["runs"]) for rel, doc in reversed(docs) if doc.get("runs")),
                               (phase.file, {"main": {}}))
    out = {}
    for run, full in phase.runs.items():
        origin: dict[str, str] = {}
        for rel, doc in docs:
            origin.update({p: f"{rel} defaults" for p in leaves(doc.get("defaults") or {})})
        chain, cur = [run], (run_docs.get(run) or {}).get("extends")
        while cur is not None:                     # a run's own settings over those of the runs it extends
            chain.append(cur)
            cur = (run_docs.get(cur) or {}).get("extends")
        for r in reversed(chain):
            own = {k: v for k, v in (run_docs.get(r) or {}).items() if k != "extends"}
            origin.update({p: f"{runs_file} runs.{r}" for p in leaves(own)})
        values = leaves(full)
        out[run] = {}
        for path, value in values.items():
            where = next((origin[q] for q in _prefixes(path) if q in origin), None)
            if where is None:
                where = "paper gamma" if path == "train.gamma" and value is not None else "schema default"
            out[run][path] = (value, where)
    return out


def _prefixes(path: str) -> list[str]:
    """`a.b.c` -> [`a.b.c`, `a.b`, `a`]: a value set as a whole list or mapping covers the paths below it."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


# The loss decay's gamma per block size, from the DFlash paper's training recipe (arXiv 2602.06036: "gamma = 7 for
# block size 16, 5 for 10, 4 for 8"); `train.gamma: null` takes the value of the drafter's block size.
PAPER_GAMMA = {16: 7.0, 10: 5.0, 8: 4.0}


def fill_run(run: dict) -> dict:
    """A run config with the schema's defaults filled; a target kind's own section (`target.qwen3_offline`) only
    when that kind is chosen (only `synthetic`'s is filled always: every key that hashes `target` holds it);
    `train.gamma` null becomes the paper's value for the block size (left null for other block sizes: `check_run`
    names the field)."""
    schema = _schema(SCHEMA_DIR / "phase.schema.yaml")
    if (run.get("target") or {}).get("kind") == "qwen3_offline":
        run = {**run, "target": {"qwen3_offline": {}, **run["target"]}}
    full = fill_defaults(run, {**schema["$defs"]["run"], "$defs": schema["$defs"]}, schema)
    train, block = full.get("train"), (full.get("drafter") or {}).get("block_size")
    if isinstance(train, dict) and train.get("gamma") is None and block in PAPER_GAMMA:
        train["gamma"] = PAPER_GAMMA[block]
    return full


def check_run(run: dict, where: str) -> None:
    """Cross-field rules a JSON schema cannot say."""
    t = run["target"]
    needs = {"path": "path", "hub": "hub_id", "gguf": "gguf_file"}
    if t["kind"] in needs and needs[t["kind"]] not in t:
        raise ConfigError(f"{where}.target.{needs[t['kind']]}: required when target.kind is {t['kind']!r}")
    if t["kind"] in ("synthetic", "qwen3_offline") and t[t["kind"]]["num_heads"] % t[t["kind"]]["num_kv_heads"]:
        raise ConfigError(f"{where}.target.{t['kind']}.num_kv_heads: must divide num_heads")
    if "pretrained" in run["drafter"]:
        problem = pretrained.problem(run["drafter"]["pretrained"])
        if problem:
            raise ConfigError(f"{where}.drafter.pretrained: {problem}")
    dr = run["drafter"]
    if "mask_token" in dr and "mask_token_id" in dr:
        raise ConfigError(f"{where}.drafter.mask_token_id: give drafter.mask_token or drafter.mask_token_id, not both")
    if "mask_token_id" in dr:
        check_mask_id(dr["mask_token_id"], known_embedding_rows(t), f"{where}.drafter")
    if dr.get("target_layer_ids") and builds_drafter(run):
        problem = layer_ids_problem(dr["target_layer_ids"], known_target_layers(t))
        if problem:
            raise ConfigError(f"{where}.drafter.target_layer_ids: {problem}")
    tr = run["train"]
    if tr["gamma"] is None and builds_drafter(run):
        raise ConfigError(f"{where}.train.gamma: required for drafter.block_size {dr['block_size']} (the DFlash paper "
                          f"gives gamma for block sizes {', '.join(map(str, sorted(PAPER_GAMMA)))} only)")
    if tr["min_lr"] > tr["lr"]:
        raise ConfigError(f"{where}.train.min_lr: must be <= train.lr ({tr['lr']})")
    for i, src in enumerate(run["data"]["sources"]):
        if src["kind"] == "jsonl" and "path" not in src:
            raise ConfigError(f"{where}.data.sources.{i}.path: required when kind is 'jsonl'")
        if src["kind"] == "hub" and "hub_id" not in src:
            raise ConfigError(f"{where}.data.sources.{i}.hub_id: required when kind is 'hub'")
        if src["kind"] == "jsonl":
            _check_local(src["path"], f"{where}.data.sources.{i}.path", reads=())
    if t["kind"] == "path" or (t["kind"] == "gguf" and "path" in t):
        _check_local(t["path"], f"{where}.target.path")


def _check_local(path: str, where: str, reads: tuple[str, ...] | None = None) -> None:
    """A local file (or folder of files) a phase names must exist and hold data before anything runs; a missing
    `data:` file makes the phase unavailable here (dflash.plan.availability), not invalid. `reads`: the file names a
    reader takes from a folder (a benchmark set shipped as several files; () where it takes no folder); None: any
    file of a folder (a model directory)."""
    p = data_root.resolve(path)
    if data_root.is_rooted(path) and not p.exists():
        return
    if p.is_dir():
        if reads is not None:
            if not reads:
                raise ConfigError(f"{where}: {path} is a folder; expected a file")
            found = [p / name for name in reads if (p / name).is_file()]
            if not found:
                raise ConfigError(f"{where}: {path} is a folder without any of the files read from it: "
                                  f"{', '.join(reads)}")
            for f in found:
                _check_local(str(f), where)
        elif not any(f.is_file() and f.stat().st_size for f in p.iterdir()):
            raise ConfigError(f"{where}: {path} is an empty folder")
    elif not p.is_file():
        raise ConfigError(f"{where}: {path} not found (paths are relative to the repository root)")
    elif p.stat().st_size == 0:
        raise ConfigError(f"{where}: {path} is empty")
    elif _blank(p):
        raise ConfigError(f"{where}: {path} holds only whitespace")


def _blank(path: Path, chunk: int = 1 << 16) -> bool:
    """Whether a file holds nothing but whitespace (read until the first other byte)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return False
    return True


def _check_datasets(datasets: list[dict], where: str) -> None:
    """Known names (the ten benchmarks, synthetic_<family>), each listed once, local files present."""
    first: dict[str, int] = {}
    synthetic = [SYNTHETIC_PREFIX + f for f in FAMILIES]
    for i, ds in enumerate(datasets):
        name = ds["name"]
        if name not in DATASETS and name not in synthetic:
            raise ConfigError(f"{where}: datasets.{i}.name: unknown dataset {name!r}; expected one of "
                              f"{', '.join([*DATASETS, *synthetic])}")
        if name in first:
            raise ConfigError(f"{where}: datasets.{i}: {name!r} is listed twice (also datasets.{first[name]}); "
                              "one entry per dataset")
        first[name] = i
        if "path" in ds:
            _check_local(ds["path"], f"{where}: datasets.{i}.path", DATASETS[name].hub_files if name in DATASETS
                         else ())


def known_embedding_rows(target: dict) -> int | None:
    """The target's embedding rows where they are known without running anything: a qwen3_offline target's
    `vocab_size`, a local `path` target's config.json; None for the others (synthetic: its trained BPE decides;
    hub, gguf), whose mask id the first stage that loads the target checks."""
    if target["kind"] == "qwen3_offline":
        return target["qwen3_offline"]["vocab_size"]
    config = Path(target.get("path", "")) / "config.json"
    if target["kind"] == "path" and config.is_file():
        cfg = json.loads(config.read_text())
        return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return None


def known_target_layers(target: dict) -> int | None:
    """The target's decoder layers where they are known without running anything (synthetic, qwen3_offline: their
    `num_layers`; a local `path` target's config.json); None for the others (hub, gguf), checked at training."""
    if target["kind"] in ("synthetic", "qwen3_offline"):
        return target[target["kind"]]["num_layers"]
    config = Path(target.get("path", "")) / "config.json"
    if target["kind"] == "path" and config.is_file():
        cfg = json.loads(config.read_text())
        return cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")
    return None


def check_mask_id(mask_id: int, rows: int | None, where: str) -> None:
    """`drafter.mask_token_id` must be a row of the target's embedding (`where`: the drafter section's location)."""
    problem = mask_id_problem(mask_id, rows)
    if problem:
        raise ConfigError(f"{where}.mask_token_id: {problem}")


def _check_references(doc: dict, where: str) -> None:
    """Every `references` entry and `external` run must name rows of the references table."""
    for i, entry in enumerate(doc.get("references", [])):
        problem = references.check(entry)
        if problem:
            raise ConfigError(f"{where}: references.{i}: {problem}")
    for name, ext in doc.get("external", {}).items():
        problem = references.check(ext, external=True)
        if problem:
            raise ConfigError(f"{where}: external.{name}: {problem}")


def phase_names(phases_dir: Path = PHASES_DIR) -> list[str]:
    return sorted(p.stem for p in phases_dir.glob("*.yaml"))


def load_all(phases_dir: Path = PHASES_DIR) -> dict[str, Phase]:
    return {name: load_phase(name, phases_dir) for name in phase_names(phases_dir)}

