"""The SGLang engine (optional `sglang` extra, GPU only): server lifecycle, /generate client, replicas and their
pools (regenerate), multi-turn conversations (bench, baseline).

A server is `python -m dflash.decoding.sglang_launch` (SGLang's `sglang.launch_server` with two fixes for
sglang 0.5.11 under transformers 5, see that module) for the target, bound to loopback on a free port, in its own
process group (new session) with its log in a file; the DFlash server adds `--speculative-algorithm DFLASH
--speculative-draft-model-path <converted draft> --speculative-num-draft-tokens <block size>` (sglang >= 0.5.11).
It is healthy once `/health_generate` answers 200; a server that exits first fails at once with its log tail. It is
always stopped as a whole group: SIGTERM, then SIGKILL after a grace period (TP workers may outlive SIGTERM).

Requests go to `/generate` with the chat-templated prompt text (the target tokenizer's template, thinking off) and
are read back from `meta_info`: completion tokens, `spec_accept_length` (SGLang's completion_tokens / verify steps,
which counts the prefill token and the bonus), `spec_verify_ct` and, when streamed, the time to first token.

The sglang package is never imported here: the server runs as a subprocess, so only its presence is checked.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dflash.modeling.target import model_path
from dflash.plan.config import section_defaults
from dflash.ports import free_ports
from dflash.processes import parent_death_hook

SERVER_MODULE = "dflash.decoding.sglang_launch"   # runs sglang.launch_server, patched
MIN_VERSION = "0.5.11"                      # first PyPI release with DFLASH
HOST = "127.0.0.1"
PORT_PLACEHOLDER = "{port}"                 # replaced by the process that starts the server (see Replica)
HEALTH_PATH = "/health_generate"
LOG_TAIL_LINES = 40

class SGLangUnavailable(RuntimeError):
    """sglang (with DFLASH) or a CUDA GPU is missing."""


class ServerError(RuntimeError):
    """An SGLang server died, never became healthy, or answered a request with an error."""


# ---------------------------------------------------------------------------------------------- availability


def sglang_version() -> str | None:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_count() -> int:
    """CUDA GPUs this process may use (torch is imported only here)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def sglang_installed() -> bool:
    return importlib.util.find_spec("sglang") is not None


def unavailable_reason(need_gpu: bool = True) -> str | None:
    """Why the SGLang engine cannot run here, or None when it can."""
    if not sglang_installed():
        return ("the sglang package is not installed: it is the optional `sglang` extra "
                "(pip install 'dflash[sglang]'), which needs a CUDA machine")
    version = sglang_version()
    if version is not None:
        from packaging.version import InvalidVersion, Version

        with contextlib.suppress(InvalidVersion):
            if Version(version) < Version(MIN_VERSION):
                return f"sglang {version} has no DFLASH speculative decoding (needs sglang>={MIN_VERSION})"
    if need_gpu and gpu_count() == 0:
        return "no CUDA GPU is visible (SGLang serves on GPUs only)"
    return None


def require_sglang(need_gpu: bool = True) -> None:
    reason = unavailable_reason(need_gpu)
    if reason:
        raise SGLangUnavailable(f"engine 'sglang': {reason}")


def options(section: dict, concurrency: int) -> dict:
    """The `sglang` options of a `bench` / `regenerate` section, defaults from the phase schema, with `concurrency`
    filled in where the section leaves it null."""
    out = section_defaults("sglang", section.get("sglang") or {})
    out["concurrency"] = int(out["concurrency"] or concurrency)
    return out


# ---------------------------------------------------------------------------------------------- command line


@dataclass
class ServerSpec:
    model_path: str
    port: int | str = PORT_PLACEHOLDER
    host: str = HOST
    draft_model_path: str | None = None     # set: DFLASH server; None: target-only baseline
    block_size: int | None = None
    tp_size: int = 1
    dtype: str = "bfloat16"                 # SGLang has no float32 path; "auto" serves a float32 checkpoint in fp16
    sampling_backend: str | None = None     # "pytorch" for seeded sampling at temperature > 0
    seed: int = 0
    mem_fraction_static: float | None = None
    attention_backend: str | None = None
    extra_args: list[str] = field(default_factory=list)
    python: str = sys.executable


def server_command(spec: ServerSpec) -> list[str]:
    """`python -m dflash.decoding.sglang_launch ...` (sglang.launch_server's arguments) for one server. SGLang sets
    num_steps = topk = 1 for DFLASH itself."""
    cmd = [spec.python, "-m", SERVER_MODULE, "--model-path", str(spec.model_path), "--host", spec.host,
           "--port", str(spec.port), "--tp-size", str(spec.tp_size), "--dtype", spec.dtype,
           "--random-seed", str(spec.seed)]
    if spec.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(spec.mem_fraction_static)]
    if spec.attention_backend:
        cmd += ["--attention-backend", spec.attention_backend]
    if spec.sampling_backend:
        cmd += ["--sampling-backend", spec.sampling_backend]
    if spec.draft_model_path is not None:
        cmd += ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", str(spec.draft_model_path)]
        if spec.block_size:
            cmd += ["--speculative-num-draft-tokens", str(spec.block_size)]
    return cmd + [str(a) for a in spec.extra_args]


def served_dtype(dtype: str | None) -> str:
    """The dtype a server gets: SGLang has no float32 path and `auto` serves a float32 checkpoint in fp16."""
    if dtype in (None, "auto"):
        return "bfloat16"
    if dtype == "float32":
        raise ValueError("engine sglang: SGLang has no float32 path (its rmsnorm kernel fails on float); use "
                         "dtype bfloat16 (bench.dtype / regenerate.sglang.dtype)")
    return dtype


def sampling_backend(temperature: float) -> str | None:
    """Seeded sampling needs SGLang's pytorch sampling backend; greedy decoding needs nothing."""
    return "pytorch" if temperature > 0 else None


def served_target(model_dir: Path, scratch: Path) -> Path:
    """The target directory as SGLang needs it: a config.json with `architectures` (a GGUF-built target has none,
    and SGLang's loader fails on it). Without it, a view of the directory (links to its files, a completed
    config.json) is made under `scratch`; the stage output itself is never changed."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("architectures"):
        return model_dir
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    if arch is None:
        raise ValueError(f"{model_dir}/config.json: no `architectures` and no causal-LM class for model_type "
                         f"{config.get('model_type')!r}")
    view = Path(scratch) / "served-target"
    view.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not (view / f.name).exists():
            (view / f.name).symlink_to(f.resolve())
    (view / "config.json").write_text(json.dumps({**config, "architectures": [arch]}, indent=1))
    return view


def target_spec(target_dir: Path, opt: dict, dtype: str | None, seed: int, temperature: float,
                scratch: Callable[[], Path]) -> ServerSpec:
    """The target-only server's spec (the DFLASH server adds the drafter) for a target stage directory: the target as
    SGLang needs it (`served_target`, its view made under `scratch()` where needed), the engine options `opt`
    (`options`), the served dtype, seed and sampling backend."""
    path, local = model_path(target_dir)
    if local:
        path = served_target(Path(path), scratch())
    return ServerSpec(model_path=str(path), tp_size=int(opt["tp_size"]), dtype=served_dtype(dtype), seed=int(seed),
                      sampling_backend=sampling_backend(temperature), mem_fraction_static=opt["mem_fraction_static"],
                      attention_backend=opt["attention_backend"], extra_args=list(opt["extra_args"]))


def check_draft(draft_dir: Path, target_layers: int) -> None:
    """Refuse what SGLang's DFLASH would not serve (sglang 0.5.11-0.5.12 read from their wheels): it never captures
    the target's last layer as a feature. (Its reading of the drafter's RoPE theta from a config attribute that
    transformers 5 keeps in `rope_parameters` is fixed by the launcher, dflash.decoding.sglang_launch.)"""
    cfg = json.loads((Path(draft_dir) / "config.json").read_text())
    ids = (cfg.get("dflash_config") or {}).get("target_layer_ids") or cfg.get("target_layer_ids") or []
    if ids and max(ids) >= target_layers - 1:
        raise ValueError(f"engine sglang: the drafter reads target layer {max(ids)}, the last of the target's "
                         f"{target_layers}; SGLang never captures the last layer (drafter.target_layer_ids)")


def with_port(cmd: list[str], port: int) -> list[str]:
    return [str(port) if a == PORT_PLACEHOLDER else a for a in cmd]


# ---------------------------------------------------------------------------------------------- process group


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def kill_group(pgid: int, proc: subprocess.Popen | None = None, grace_s: float = 30.0, log=None) -> None:
    """SIGTERM to the whole group, SIGKILL to whatever is left after `grace_s`; reaps `proc` (the leader)."""
    def signal_group(sig) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def wait_gone(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            if proc is not None:
                proc.poll()
            if not group_members(pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    signal_group(signal.SIGTERM)
    if not wait_gone(grace_s):
        if log:
            log(f"sglang: process group {pgid} still alive {grace_s:.0f} s after SIGTERM; sending SIGKILL")
        signal_group(signal.SIGKILL)
        if not wait_gone(10.0) and log:
            log(f"sglang: process group {pgid} still has members after SIGKILL: {group_members(pgid)}")
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------- server


def http_get(url: str, timeout: float = 5.0) -> int:
    """HTTP status of a GET (connection errors raise OSError)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_healthy(base_url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float, path: str = HEALTH_PATH,
                 poll_s: float = 2.0) -> float:
    """Poll `base_url + path` until it answers 200; seconds waited. Fails at once when `proc` exits.
    The interval grows from 0.1 s to `poll_s`."""
    t0, interval = time.monotonic(), min(0.1, poll_s)
    while True:
        rc = proc.poll()
        if rc is not None:
            raise ServerError(f"SGLang server exited with code {rc} before it became healthy; "
                              f"last lines of {log_path}:\n{log_tail(log_path)}")
        with contextlib.suppress(OSError):
            if http_get(base_url + path, timeout=max(1.0, min(30.0, timeout_s))) == 200:
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise ServerError(f"SGLang server not healthy after {timeout_s:.0f} s ({base_url}{path}); "
                              f"last lines of {log_path}:\n{log_tail(log_path)}")
        time.sleep(interval)
        interval = min(poll_s, interval * 1.5)


class SGLangServer:
    """One server process group. Use as a context manager: started and healthy inside, stopped on exit."""

    def __init__(self, cmd: list[str], log_path: Path, port: int | None = None, host: str = HOST,
                 env: dict | None = None, startup_timeout_s: float = 1200, stop_grace_s: float = 30,
                 health_path: str = HEALTH_PATH, poll_s: float = 2.0, log=None):
        self.port = port if port is not None else free_ports(1, host)
        self.cmd, self.host = with_port(cmd, self.port), host
        self.log_path, self.env = Path(log_path), env
        self.startup_timeout_s, self.stop_grace_s = startup_timeout_s, stop_grace_s
        self.health_path, self.poll_s, self.log = health_path, poll_s, log
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> SGLangServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **{k: str(v) for k, v in (self.env or {}).items()}}
        with open(self.log_path, "ab") as logf:
            logf.write(f"$ {' '.join(self.cmd)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True, preexec_fn=parent_death_hook())
        self.pgid = self.proc.pid                      # a new session: the leader's pid is the group id
        if self.log:
            self.log(f"sglang: started pid {self.proc.pid} on {self.url}, log {self.log_path}")
        return self

    def wait(self) -> SGLangServer:
        self.startup_s = wait_healthy(self.url, self.proc, self.log_path, self.startup_timeout_s, self.health_path,
                                      self.poll_s)
        if self.log:
            self.log(f"sglang: {self.url} healthy after {self.startup_s:.1f} s")
        return self

    def stop(self) -> None:
        if self.pgid is not None:
            kill_group(self.pgid, self.proc, self.stop_grace_s, self.log)
            self.pgid = None

    def __enter__(self) -> SGLangServer:
        try:
            return self.start().wait()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def sigterm_as_exit():
    """Inside: SIGTERM raises SystemExit (main thread only), so `finally` blocks stop the servers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------- requests


def sampling_params(temperature: float, max_new_tokens: int) -> dict:
    """Greedy (T=0: top_k 1) or sampled; no stop strings beyond the model's EOS."""
    if temperature <= 0:
        return {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "max_new_tokens": int(max_new_tokens)}
    return {"temperature": float(temperature), "top_p": 1.0, "max_new_tokens": int(max_new_tokens)}


@dataclass
class Completion:
    text: str
    output_ids: list[int] | None
    completion_tokens: int
    prompt_tokens: int | None
    e2e_s: float                                  # client wall time of the request
    ttft_s: float | None = None                   # client time to the first streamed token
    server_e2e_s: float | None = None             # meta_info.e2e_latency
    spec_accept_length: float | None = None
    spec_verify_ct: int | None = None
    finish_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_response(obj: dict, e2e_s: float, ttft_s: float | None = None, output_ids: list[int] | None = None,
                   text: str | None = None) -> Completion:
    """A Completion from a /generate answer (the last streamed chunk, or the whole non-streamed answer)."""
    if "error" in obj:
        raise ServerError(f"SGLang /generate error: {obj['error']}")
    meta = obj.get("meta_info") or {}
    ids = output_ids if output_ids is not None else obj.get("output_ids")
    n = meta.get("completion_tokens", len(ids) if ids is not None else 0)
    finish = meta.get("finish_reason")
    if isinstance(finish, dict):
        finish = finish.get("type")
    if finish == "abort":
        raise ServerError(f"SGLang aborted the request: {meta.get('finish_reason')}")
    acc = meta.get("spec_accept_length")
    verify = meta.get("spec_verify_ct")
    return Completion(text=text if text is not None else obj.get("text", ""), output_ids=ids, completion_tokens=int(n),
                      prompt_tokens=meta.get("prompt_tokens"), e2e_s=e2e_s, ttft_s=ttft_s,
                      server_e2e_s=meta.get("e2e_latency"),
                      spec_accept_length=float(acc) if acc is not None else None,
                      spec_verify_ct=int(verify) if verify is not None else None, finish_reason=finish)


def read_stream(lines, t0: float) -> Completion:
    """Server-sent events of a streamed /generate: `data: {...}` lines ending with `data: [DONE]`.

    `output_ids` may come as increments or cumulatively depending on the SGLang version; the cumulative
    `meta_info.completion_tokens` of each chunk says which."""
    last, ids, ttft = None, [], None
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        line = line.strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        obj = json.loads(data)
        if "error" in obj:
            raise ServerError(f"SGLang /generate error: {obj['error']}")
        new = obj.get("output_ids")
        count = (obj.get("meta_info") or {}).get("completion_tokens")
        if new is not None:
            if count is not None and len(new) == count and len(new) >= len(ids):
                ids = list(new)                          # cumulative
            else:
                ids.extend(new)                          # incremental
        if ttft is None and (count or new or obj.get("text")):
            ttft = time.perf_counter() - t0
        last = obj
    if last is None:
        raise ServerError("SGLang /generate stream ended without any data")
    has_ids = last.get("output_ids") is not None
    return parse_response(last, time.perf_counter() - t0, ttft, ids if has_ids else None)


def generate(base_url: str, text: str, sampling: dict, stream: bool = True, timeout_s: float = 3600) -> Completion:
    """One /generate request (blocking)."""
    body = json.dumps({"text": text, "sampling_params": sampling, "stream": stream}).encode()
    req = urllib.request.Request(base_url + "/generate", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            if stream:
                return read_stream(r, t0)
            obj = json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read()[:2000].decode(errors="replace")
        raise ServerError(f"SGLang /generate answered HTTP {e.code}: {detail}") from None
    if isinstance(obj, list):
        obj = obj[0]
    return parse_response(obj, time.perf_counter() - t0)


def flush_cache(base_url: str) -> None:
    """Empty the radix cache (after a warm-up); a server without the endpoint is not an error."""
    req = urllib.request.Request(base_url + "/flush_cache", data=b"", method="POST")
    with contextlib.suppress(OSError), urllib.request.urlopen(req, timeout=60):
        pass


def generate_many(base_url: str, texts: list[str], sampling: dict, concurrency: int = 1, stream: bool = True,
                  timeout_s: float = 3600) -> tuple[list[Completion], float]:
    """All `texts`, `concurrency` in flight, in input order; and the wall time of the whole batch."""
    t0 = time.perf_counter()
    if concurrency <= 1:
        out = [generate(base_url, t, sampling, stream, timeout_s) for t in texts]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            out = list(pool.map(lambda t: generate(base_url, t, sampling, stream, timeout_s), texts))
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- replicas


class Replica:
    """One target-only server for regeneration; runs in the driver or as a Ray actor (GPUs set by Ray)."""

    def __init__(self, cmd: list[str], log_path: str, env: dict | None = None, startup_timeout_s: float = 1200,
                 stop_grace_s: float = 30, wait: bool = True):
        self.server = SGLangServer(cmd, Path(log_path), env=env, startup_timeout_s=startup_timeout_s,
                                   stop_grace_s=stop_grace_s)
        self.server.start()
        if wait:
            self.wait()

    def wait(self) -> float:
        """Seconds the server took to become healthy (waits for it the first time)."""
        if self.server.startup_s is not None:
            return self.server.startup_s
        try:
            self.server.wait()
        except BaseException:
            self.server.stop()
            raise
        return self.server.startup_s

    def generate(self, texts: list[str], sampling: dict, concurrency: int, stream: bool = False,
                 timeout_s: float = 3600) -> dict:
        done, seconds = generate_many(self.server.url, texts, sampling, concurrency, stream, timeout_s)
        return {"completions": [c.to_dict() for c in done], "seconds": seconds}

    def close(self) -> None:
        self.server.stop()


class LocalWorker:
    """A replica driven from this process; one chunk at a time."""

    def __init__(self, replica: Replica, call: dict):
        self.replica, self.call = replica, call
        self.pool = ThreadPoolExecutor(1)

    def submit(self, texts: list[str]):
        return self.pool.submit(self.replica.generate, texts, **self.call)

    def close(self) -> None:
        self.replica.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


class RayWorker:
    """A replica as a Ray actor (Ray gives it its GPUs through CUDA_VISIBLE_DEVICES)."""

    def __init__(self, actor, call: dict):
        self.actor, self.call = actor, call

    def submit(self, texts: list[str]):
        return self.actor.generate.remote(texts, **self.call).future()

    def close(self) -> None:
        import ray

        with contextlib.suppress(Exception):        # the actor may be dead already; it is killed below anyway
            ray.get(self.actor.close.remote(), timeout=120)
        with contextlib.suppress(Exception):
            ray.kill(self.actor)


def gpu_groups(n: int, tp: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each local replica (within this process's own visible devices)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(gpu_count())]
    if n * tp > len(ids):
        raise ValueError(f"regenerate.sglang: {n} replicas x tp_size {tp} need {n * tp} GPUs, {len(ids)} visible")
    return [",".join(ids[i * tp:(i + 1) * tp]) for i in range(n)]


def start_local_replicas(n: int, tp: int, cmd: list[str], opt: dict, logs: Path, call: dict, log) -> list[LocalWorker]:
    """`n` replicas of `cmd` as local processes, `tp` GPUs each (started together, then waited for)."""
    replicas = []
    try:
        for i, gpus in enumerate(gpu_groups(n, tp)):        # start all, then wait: servers load in parallel
            replicas.append(Replica(cmd, str(logs / f"replica-{i}.log"), {**opt["env"], "CUDA_VISIBLE_DEVICES": gpus},
                                    opt["startup_timeout_s"], opt["stop_grace_s"], wait=False))
            log(f"regenerate: replica {i} on GPU(s) {gpus}: {replicas[-1].server.url}")
        for r in replicas:
            r.wait()
    except BaseException:
        for r in replicas:
            r.close()
        raise
    return [LocalWorker(r, call) for r in replicas]


def start_ray_replicas(n: int, tp: int, cmd: list[str], opt: dict, logs: Path, call: dict, log) -> list[RayWorker]:
    """`n` replicas of `cmd` as Ray actors of `tp` GPUs each, every one healthy on return."""
    import ray

    actor_cls = ray.remote(num_gpus=tp, num_cpus=1)(Replica)
    actors = [actor_cls.remote(cmd, str(logs / f"replica-{i}.log"), opt["env"], opt["startup_timeout_s"],
                               opt["stop_grace_s"]) for i in range(n)]
    workers = [RayWorker(a, call) for a in actors]
    try:
        ray.get([a.wait.remote() for a in actors])       # constructors done: every server is healthy
    except BaseException:
        for w in workers:
            w.close()
        raise
    log(f"regenerate: {n} Ray replica(s) healthy")
    return workers


def dispatch(workers: list, parts: dict[int, list[dict]], texts_of, on_done) -> None:
    """Whole chunks to free workers, in order; `on_done(index, result)` as each finishes (any order)."""
    queue, running = deque(parts), {}

    def feed(w) -> None:
        if queue:
            index = queue.popleft()
            running[w.submit(texts_of(index))] = (w, index)

    for w in workers:
        feed(w)
    while running:
        done, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for fut in done:
            w, index = running.pop(fut)
            on_done(index, fut.result())
            feed(w)


# ---------------------------------------------------------------------------------------------- conversations


def run_conversations(url: str, convs: list[list[str]], build_text, reply_text, sampling: dict, concurrency: int,
                      stream: bool, timeout_s: float) -> tuple[list[list[tuple[str, Completion]]], float]:
    """Multi-turn conversations: turns of one conversation in order (each sees the model's earlier answers,
    `reply_text(completion)`), up to `concurrency` conversations in flight. Returns [(prompt text, completion) per
    turn] per conversation, and the wall time."""
    def one(turns: list[str]):
        history, out = [], []
        for user in turns:
            history.append(("user", user))
            text = build_text(history)
            c = generate(url, text, sampling, stream, timeout_s)
            out.append((text, c))
            history.append(("assistant", reply_text(c)))
        return out

    t0 = time.perf_counter()
    if concurrency <= 1:
        res = [one(t) for t in convs]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            res = list(pool.map(one, convs))
    return res, time.perf_counter() - t0


def timing(c: Completion) -> dict:
    """prefill/decode split of a request: time to first token, and the rest (client clock)."""
    if c.ttft_s is None:
        return {"prefill_s": 0.0, "decode_s": c.e2e_s, "e2e_s": c.e2e_s, "ttft_s": None}
    return {"prefill_s": c.ttft_s, "decode_s": max(0.0, c.e2e_s - c.ttft_s), "e2e_s": c.e2e_s, "ttft_s": c.ttft_s}


def warm_up(url: str, text: str, concurrency: int, timeout_s: float) -> None:
    """`concurrency` short requests of `text` (graphs, caches), then an empty prefix cache."""
    generate_many(url, [text] * concurrency, sampling_params(0.0, 32), concurrency, False, timeout_s)
    flush_cache(url)
