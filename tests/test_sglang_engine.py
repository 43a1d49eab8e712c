"""The SGLang engine on CPU: command lines, ports, health waits, /generate parsing, process-group cleanup, and the
whole bench stage against fake servers (sglang itself needs CUDA and is not installed here)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dflash.decoding import metrics
from dflash.decoding import sglang as sglang_engine
from dflash.decoding.sglang import ServerError, ServerSpec, SGLangServer
from dflash.plan.stages import DRAFT_ONLY
from dflash.ports import PORT_SPAN, free_ports
from dflash.processes import pid_alive
from dflash.stages import baseline, bench
from dflash.stages.runner import Context

# A stand-in for `python -m sglang.launch_server`: the same HTTP surface (/health_generate, /generate streamed or
# not, /flush_cache), deterministic answers (a function of the prompt text), and switches for the failure paths.
FAKE_SERVER = r'''
import argparse, hashlib, json, math, os, signal, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--spec", action="store_true")
p.add_argument("--die", action="store_true")
p.add_argument("--never-healthy", action="store_true")
p.add_argument("--delay", type=float, default=0.0)
p.add_argument("--child-file")
p.add_argument("--ignore-term", action="store_true")
a = p.parse_args()
print("fake sglang starting", os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
if a.die:
    print("boom: CUDA out of memory", flush=True)
    sys.exit(3)
if a.child_file:
    pid = os.fork()
    if pid == 0:                       # a "TP worker" that ignores SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    with open(a.child_file + ".tmp", "w") as f:
        f.write(str(pid))
    os.replace(a.child_file + ".tmp", a.child_file)
if a.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
start = time.time()


def answer(text, max_new):
    h = hashlib.sha256(text.encode()).digest()
    n = min(max_new, 3 + h[0] % 6)
    ids = [10 + b % 50 for b in h[1:1 + n]]
    return ids


class H(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, code, obj=None):
        body = json.dumps(obj if obj is not None else {}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path in ("/health", "/health_generate"):
            ok = not a.never_healthy and time.time() - start >= a.delay
            return self.send(200 if ok else 503)
        self.send(404)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/flush_cache":
            return self.send(200)
        if self.path != "/generate":
            return self.send(404)
        req = json.loads(body)
        sp = req["sampling_params"]
        ids = answer(req["text"], sp["max_new_tokens"])
        words = ["w%d" % i for i in ids]
        meta = {"prompt_tokens": len(req["text"].split()), "finish_reason": {"type": "length"}}
        if a.spec:
            verify = math.ceil(len(ids) / 3)
            meta.update({"spec_accept_length": len(ids) / verify, "spec_verify_ct": verify})
        if not req.get("stream"):
            meta.update({"completion_tokens": len(ids), "e2e_latency": 0.01})
            return self.send(200, {"text": " ".join(words), "output_ids": ids, "meta_info": meta})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for k in range(0, len(ids), 2):            # increments of two tokens; text cumulative (SGLang default)
            m = dict(meta, completion_tokens=min(k + 2, len(ids)), e2e_latency=0.01)
            chunk = {"text": " ".join(words[:k + 2]), "output_ids": ids[k:k + 2], "meta_info": m}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
            time.sleep(0.002)
        self.wfile.write(b"data: [DONE]\n\n")


ThreadingHTTPServer((a.host, a.port), H).serve_forever()
'''



def write_fake_server(directory: Path) -> Path:
    path = Path(directory) / "fake_sglang_server.py"
    path.write_text(FAKE_SERVER)
    return path


def fake_server_command(script: Path, *flags: str):
    """A replacement for sglang_engine.server_command that starts the fake server (DFlash specs get --spec)."""
    def command(spec: ServerSpec) -> list[str]:
        spec_flag = ["--spec"] if spec.draft_model_path else []
        return [sys.executable, str(script), "--port", str(spec.port), "--host", spec.host, *spec_flag, *flags]
    return command


def build_tiny_target(directory: Path) -> Path:
    """A target stage directory with a random 2-layer Qwen3 and a small trained tokenizer (ChatML template)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dflash.modeling.bpe_tokenizer import train_tokenizer
    from dflash.modeling.target import TARGET_JSON

    texts = [f"what is {i} plus {i * 7 % 13}? the answer is {i + i * 7 % 13}." for i in range(60)]
    tokenizer = train_tokenizer(texts, 300)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    (directory / TARGET_JSON).write_text(json.dumps({"source": "dir", "model_path": "model"}))
    return directory


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    return write_fake_server(tmp_path_factory.mktemp("fake"))


def _server(fake: Path, tmp_path: Path, *flags: str, **kw) -> SGLangServer:
    cmd = [sys.executable, str(fake), "--port", sglang_engine.PORT_PLACEHOLDER, *flags]
    kw.setdefault("poll_s", 0.05)
    return SGLangServer(cmd, tmp_path / "server.log", **kw)


def test_server_commands_are_pinned():
    base = ServerSpec(model_path="/m/target", port=31000, tp_size=2, dtype="bfloat16", seed=7,
                      mem_fraction_static=0.8, attention_backend="fa3", python="python")
    assert sglang_engine.server_command(base) == [
        "python", "-m", "dflash.decoding.sglang_launch", "--model-path", "/m/target", "--host", "127.0.0.1",
        "--port", "31000",
        "--tp-size", "2", "--dtype", "bfloat16", "--random-seed", "7", "--mem-fraction-static", "0.8",
        "--attention-backend", "fa3"]
    spec = ServerSpec(model_path="/m/target", draft_model_path="/m/draft", block_size=16, python="python",
                      extra_args=["--max-running-requests", "8"])
    assert sglang_engine.server_command(spec) == [
        "python", "-m", "dflash.decoding.sglang_launch", "--model-path", "/m/target", "--host", "127.0.0.1",
        "--port", "{port}",
        "--tp-size", "1", "--dtype", "bfloat16", "--random-seed", "0",
        "--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", "/m/draft",
        "--speculative-num-draft-tokens", "16", "--max-running-requests", "8"]
    assert sglang_engine.with_port(sglang_engine.server_command(spec), 4242)[8] == "4242"


def test_free_ports_are_bindable_distinct_and_pass_sglangs_port_check():
    import socket

    ports = [free_ports(1, "127.0.0.1") for _ in range(50)]
    assert len(set(ports)) == 50
    # SGLang adds 10000 for its gRPC port and refuses anything above 65535
    assert all(PORT_SPAN[0] <= p and p + 10000 <= 65535 for p in ports)
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_options_fill_schema_defaults_and_reject_unknown_keys():
    opt = sglang_engine.options({"sglang": {"tp_size": 2}}, 4)
    assert opt["concurrency"] == 4 and opt["tp_size"] == 2 and opt["stream"] is True
    assert sglang_engine.options({"sglang": {"concurrency": 3}}, 4)["concurrency"] == 3
    with pytest.raises(ValueError, match="tp_sizes"):
        sglang_engine.options({"sglang": {"tp_sizes": 2}}, 1)


def test_missing_sglang_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sglang_engine, "sglang_installed", lambda: False)
    with pytest.raises(sglang_engine.SGLangUnavailable, match=r"dflash\[sglang\]"):
        sglang_engine.require_sglang()
    cfg = {"bench": {"engine": "sglang"}, "dataset": {"name": "synthetic_math", "n": 2}}
    with pytest.raises(sglang_engine.SGLangUnavailable, match="engine 'sglang'"):
        bench.run(Context(cfg, tmp_path, {}, tmp_path))


def test_old_sglang_is_refused(monkeypatch):
    monkeypatch.setattr(sglang_engine, "sglang_installed", lambda: True)
    monkeypatch.setattr(sglang_engine, "sglang_version", lambda: "0.5.10.post1")
    assert "0.5.11" in sglang_engine.unavailable_reason(need_gpu=False)


def test_health_wait_then_stop(fake, tmp_path):
    srv = _server(fake, tmp_path, "--delay", "0.5")
    with srv:
        assert srv.startup_s >= 0.4
        assert sglang_engine.http_get(srv.url + "/health_generate") == 200
        pid = srv.proc.pid
    assert not pid_alive(pid)
    assert srv.proc.returncode is not None
    assert "fake sglang starting" in (tmp_path / "server.log").read_text()


def test_server_that_dies_fails_fast_with_log_tail(fake, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="exited with code 3") as err, _server(fake, tmp_path, "--die"):
        pass
    assert "boom: CUDA out of memory" in str(err.value)
    assert time.monotonic() - t0 < 10


def test_server_never_healthy_times_out_and_is_stopped(fake, tmp_path):
    srv = _server(fake, tmp_path, "--never-healthy", startup_timeout_s=1.0, stop_grace_s=2)
    with pytest.raises(ServerError, match="not healthy after"), srv:
        pass
    assert not pid_alive(srv.proc.pid)


def test_whole_process_group_is_killed(fake, tmp_path):
    child_file = tmp_path / "child.pid"
    srv = _server(fake, tmp_path, "--child-file", str(child_file), "--ignore-term", stop_grace_s=1.0)
    with srv:
        leader = srv.proc.pid
        child = int(child_file.read_text())
        assert pid_alive(child) and os.getpgid(child) == leader
    assert not pid_alive(leader)
    deadline = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child)
    assert sglang_engine.group_members(leader) == []


def test_stop_runs_when_the_body_raises(fake, tmp_path):
    srv = _server(fake, tmp_path)
    with pytest.raises(KeyError), srv:
        raise KeyError("x")
    assert not pid_alive(srv.proc.pid)


def test_generate_against_fake_server(fake, tmp_path):
    sampling = sglang_engine.sampling_params(0.0, 64)
    assert sampling == {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "max_new_tokens": 64}
    with _server(fake, tmp_path, "--spec") as srv:
        plain = sglang_engine.generate(srv.url, "hello there", sampling, stream=False)
        streamed = sglang_engine.generate(srv.url, "hello there", sampling, stream=True)
        many, wall = sglang_engine.generate_many(srv.url, ["a", "b", "c", "hello there"], sampling, concurrency=3)
        sglang_engine.flush_cache(srv.url)
    assert plain.output_ids == streamed.output_ids == many[3].output_ids
    assert plain.completion_tokens == len(plain.output_ids) == streamed.completion_tokens
    assert plain.text == streamed.text == " ".join(f"w{i}" for i in plain.output_ids)
    assert plain.ttft_s is None and 0 < streamed.ttft_s <= streamed.e2e_s
    assert plain.spec_verify_ct == -(-plain.completion_tokens // 3)
    assert plain.spec_accept_length == pytest.approx(plain.completion_tokens / plain.spec_verify_ct)
    assert plain.prompt_tokens == 2 and plain.finish_reason == "length" and plain.server_e2e_s == 0.01
    assert wall > 0 and [c.completion_tokens > 0 for c in many] == [True] * 4


def test_read_stream_handles_incremental_and_cumulative_ids():
    def sse(chunks):
        return [f"data: {json.dumps(c)}\n".encode() for c in chunks] + [b"\n", b"data: [DONE]\n"]

    meta = lambda n: {"completion_tokens": n, "spec_accept_length": 2.0, "spec_verify_ct": 2}    # noqa: E731
    inc = sse([{"text": "a", "output_ids": [1], "meta_info": meta(1)},
               {"text": "a b c", "output_ids": [2, 3], "meta_info": meta(3)},
               {"text": "a b c d", "output_ids": [4], "meta_info": meta(4)}])
    cum = sse([{"text": "a", "output_ids": [1], "meta_info": meta(1)},
               {"text": "a b c", "output_ids": [1, 2, 3], "meta_info": meta(3)},
               {"text": "a b c d", "output_ids": [1, 2, 3, 4], "meta_info": meta(4)}])
    for lines in (inc, cum):
        c = sglang_engine.read_stream(lines, time.perf_counter())
        assert c.output_ids == [1, 2, 3, 4] and c.completion_tokens == 4 and c.text == "a b c d"
        assert c.spec_accept_length == 2.0 and c.ttft_s is not None
    with pytest.raises(ServerError, match="without any data"):
        sglang_engine.read_stream([b"data: [DONE]\n"], time.perf_counter())


def test_error_answers_raise():
    with pytest.raises(ServerError, match="bad request"):
        sglang_engine.parse_response({"error": {"message": "bad request"}}, 0.1)
    with pytest.raises(ServerError, match="aborted"):
        sglang_engine.parse_response({"text": "", "meta_info": {"finish_reason": {"type": "abort"}}}, 0.1)


def test_metrics_use_server_means_and_keep_hf_behaviour():
    hf = [{"n_tokens": 7, "accept_lengths": [3, 2, 1, 1], "prefill_s": 0.1, "decode_s": 0.6}]
    before = metrics.summarize(hf, 4)
    assert before["tau_macro"] == pytest.approx(1.75) and before["n_steps"] == 4 and "tau_source" not in before
    served = [{"n_tokens": 12, "accept_lengths": [], "spec_accept_length": 3.0, "spec_verify_ct": 4},
              {"n_tokens": 10, "accept_lengths": [], "spec_accept_length": 2.5, "spec_verify_ct": None},
              {"n_tokens": 1, "accept_lengths": [], "spec_accept_length": 0, "spec_verify_ct": 0}]
    s = metrics.summarize(served, 4)
    assert s["tau_macro"] == pytest.approx(2.75) and s["n_steps"] == 8
    assert s["tau_token"] == pytest.approx(22 / 8) and s["tau_source"] == "server-mean"
    assert s["histogram"] == [0] * 5 and s["n_requests"] == 3


def test_tau_has_one_definition_for_every_engine():
    """Issue 24's measurement on the smoke model: a 17-token answer in one verify step reads 17.0 from SGLang and
    16.0 from the HF engine; 33 tokens in two steps 16.5 vs 16.0. From completion tokens and verify steps, both
    definitions come out alike for both engines."""
    served = [{"n_tokens": 17, "accept_lengths": [], "spec_accept_length": 17.0, "spec_verify_ct": 1,
               "verify_steps": 1},
              {"n_tokens": 33, "accept_lengths": [], "spec_accept_length": 16.5, "spec_verify_ct": 2,
               "verify_steps": 2}]
    local = [{"n_tokens": 17, "accept_lengths": [16], "verify_steps": 1},
             {"n_tokens": 33, "accept_lengths": [16, 16]}]                     # a bench 1 record: no verify_steps
    assert metrics.summarize(served, 16)["tau_macro"] == pytest.approx(16.75)      # SGLang's own numbers
    assert metrics.summarize(local, 16)["tau_macro"] == pytest.approx(16.0)        # the HF engine's per step
    for records in (served, local):
        assert metrics.tau_definitions(records) == {"tau_tokens_per_step": pytest.approx(16.75),
                                                    "tau_new_per_step": pytest.approx(16.0)}
    assert metrics.tau_definitions([{"n_tokens": 3, "accept_lengths": []}]) == {"tau_tokens_per_step": None,
                                                                               "tau_new_per_step": None}


def test_output_steps_leave_out_zlab_s_step_after_a_complete_output():
    """z-lab's loop runs one more step when exactly max_new_tokens are committed (and one after a first token that
    is EOS); a server stopping at the cap does not. The steps counted for the one-definition taus are those until
    the output is complete."""
    assert metrics.output_steps([16, 16], 33) == 2
    assert metrics.output_steps([16, 16, 3], 33) == 2            # the extra step at the cap (exactly 33 committed)
    assert metrics.output_steps([16, 5], 20) == 2                # the last step runs past the cap: counted
    assert metrics.output_steps([1], 1) == 0                     # first token EOS (or a cap of 1): no verify step
    assert metrics.output_steps([], 1) == 0


def test_run_bench_with_fake_servers(fake, tmp_path, monkeypatch):
    """The baseline stage on a target-only server, then the bench on a DFLASH server, each its own job."""
    target = build_tiny_target(tmp_path / "target")
    draft = tmp_path / "convert"
    draft.mkdir()
    (draft / "config.json").write_text(json.dumps({"block_size": 8}))
    seen = []

    def command(spec):
        seen.append(spec)
        return fake_server_command(fake)(spec)

    monkeypatch.setattr(sglang_engine, "require_sglang", lambda need_gpu=True: None)
    monkeypatch.setattr(sglang_engine, "server_command", command)
    cfg = {"bench": {"engine": "sglang", "max_new_tokens": 16, "temperature": 0.0, "block_size": None,
                     "system_prompt": None, "enable_thinking": False, "baseline": True, "device": "auto",
                     "dtype": "bfloat16", "seed": 0, "sglang": {"concurrency": 2}},
           "dataset": {"name": "synthetic_math", "n": 3, "seed": 0}}
    base_out, out = tmp_path / "baseline", tmp_path / "out"
    base_out.mkdir()
    out.mkdir()
    base_cfg = {"bench": {k: v for k, v in cfg["bench"].items() if k not in DRAFT_ONLY}, "dataset": cfg["dataset"]}
    baseline.run(Context(base_cfg, base_out, {"target": target}, tmp_path, log=lambda *_: None))
    result = bench.run(Context(cfg, out, {"target": target, "convert": draft, "baseline": base_out}, tmp_path,
                               log=lambda *_: None))

    assert [s.draft_model_path for s in seen] == [None, str(draft.resolve())]
    assert seen[1].block_size == 8 and seen[1].dtype == "bfloat16"
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 and {r["prompt_id"] for r in records} == {"math/0", "math/1", "math/2"}
    for r in records:
        assert r["accept_lengths"] == [] and r["spec_accept_length"] >= 1 and r["spec_verify_ct"] >= 1
        assert r["verify_steps"] == r["spec_verify_ct"]
        assert r["n_tokens"] == r["baseline"]["n_tokens"] and r["lossless"] is True
        assert r["prompt_tokens"] > 0 and r["decode_s"] >= 0 and r["prefill_s"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "sglang" and summary["concurrency"] == 2 and summary["block_size"] == 8
    assert summary["tau_macro"] == pytest.approx(sum(r["spec_accept_length"] for r in records) / 3)
    assert summary["tau_tokens_per_step"] == pytest.approx(summary["tau_macro"])     # SGLang's own definition
    assert summary["lossless"] is True and summary["speedup_throughput"] > 0
    assert summary["baseline"]["key"] == base_out.name and summary["engine"]["started_here"] is True
    assert set(summary["server_commands"]) == {"dflash"}
    assert result["summary"]["backend"] == "sglang" and "prompt_ids" not in result["summary"]
    for d, name in ((out, "dflash"), (base_out, "baseline")):
        log = (d / f"sglang-{name}.log").read_text()
        assert "fake sglang starting" in log and log.startswith("$ ")


def test_sigterm_becomes_exit_in_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit), sglang_engine.sigterm_as_exit():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before


def test_served_dtype_is_never_fp16_for_fp32_and_never_fp32():
    """`--dtype auto` served a float32 checkpoint in fp16; SGLang has no float32 path at all."""
    assert sglang_engine.served_dtype(None) == sglang_engine.served_dtype("auto") == "bfloat16"
    assert sglang_engine.served_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="no float32 path"):
        sglang_engine.served_dtype("float32")
    assert ServerSpec(model_path="/m").dtype == "bfloat16"


def test_sampled_requests_get_the_seeded_sampling_backend():
    spec = ServerSpec(model_path="/m", sampling_backend=sglang_engine.sampling_backend(0.7), python="python")
    cmd = sglang_engine.server_command(spec)
    assert cmd[cmd.index("--sampling-backend") + 1] == "pytorch"
    assert sglang_engine.sampling_backend(0.0) is None


def test_a_target_without_architectures_is_served_through_a_completed_view(tmp_path):
    """A GGUF-built target directory has no `architectures`; SGLang's loader fails on it. The stage output stays
    as it is; SGLang gets a view of it with the causal-LM class filled in."""
    model = build_tiny_target(tmp_path / "target") / "model"
    config = json.loads((model / "config.json").read_text())
    del config["architectures"]
    (model / "config.json").write_text(json.dumps(config))
    view = sglang_engine.served_target(model, tmp_path / "scratch")
    assert json.loads((view / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert (view / "model.safetensors").resolve() == (model / "model.safetensors").resolve()
    assert "architectures" not in json.loads((model / "config.json").read_text())
    complete = build_tiny_target(tmp_path / "target2") / "model"
    assert sglang_engine.served_target(complete, tmp_path / "scratch2") == complete


def test_drafters_sglang_cannot_serve_are_refused(tmp_path):
    def draft(**cfg):
        d = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    sglang_engine.check_draft(draft(rope_theta=1e6, dflash_config={"target_layer_ids": [1, 9, 17, 25, 33]}), 36)
    sglang_engine.check_draft(draft(rope_parameters={"rope_theta": 1e5}), 30)    # SmolLM2's: the launcher fixes it
    with pytest.raises(ValueError, match="target layer 35, the last of the target's 36"):
        sglang_engine.check_draft(draft(dflash_config={"target_layer_ids": [1, 35]}), 36)
