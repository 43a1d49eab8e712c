"""The target model: built and pretrained in-process (smoke), or a local HF directory, hub id or GGUF file.

The stage directory always holds `target.json` telling how to load the model, so later stages call `load_target`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from dflash import chat, synthetic
from dflash.provenance import sha256_file

TARGET_JSON = "target.json"


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
    from transformers import Qwen3Config, Qwen3ForCausalLM

    s = cfg["synthetic"]
    torch.manual_seed(s["seed"])
    raw = [q + "\n" + r for _, q, r in synthetic.mixed(s["corpus_size"], synthetic.PRETRAIN_SEED)]
    tokenizer = train_tokenizer(raw, s["vocab_size"])
    ids = []
    for text in _corpus(tokenizer, s["corpus_size"]):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    n_seq = len(ids) // s["seq_len"]
    data = torch.tensor(ids[: n_seq * s["seq_len"]]).view(n_seq, s["seq_len"])
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        head_dim=s["hidden_size"] // s["num_heads"], max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None)
    model = Qwen3ForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01)
    gen = torch.Generator().manual_seed(s["seed"])
    t0, losses = time.time(), []
    model.train()
    for step in range(s["steps"]):
        for g in opt.param_groups:
            g["lr"] = _lr(step, s["steps"], s["lr"])
        batch = data[torch.randint(0, n_seq, (s["batch_size"],), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == s["steps"] - 1:
            log(f"target step {step} loss {loss.item():.4f}")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    (out / TARGET_JSON).write_text(json.dumps({"source": "dir", "model_path": "model"}, indent=1))
    return {"summary": {"params": sum(p.numel() for p in model.parameters()), "tokens": len(ids),
                        "final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": time.time() - t0}}


def build(cfg: dict, out: Path, log=print) -> dict:
    kind = cfg["kind"]
    if kind == "synthetic":
        return build_synthetic(cfg, out, log)
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
    raise ValueError(f"target.kind: {kind!r} is not built by this version")


def _model_path(target_dir: Path) -> tuple[str, bool]:
    """(path or hub id, whether it is local) from a target stage directory's target.json."""
    spec = json.loads((Path(target_dir) / TARGET_JSON).read_text())
    path = str(Path(target_dir) / spec["model_path"]) if spec["source"] == "dir" else spec["model_path"]
    return path, spec["source"] != "hub"


def load_tokenizer(target_dir: Path):
    from transformers import AutoTokenizer

    path, local = _model_path(target_dir)
    return AutoTokenizer.from_pretrained(path, local_files_only=local)


def load_target(target_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode from a target stage directory."""
    from transformers import AutoModelForCausalLM

    path, local = _model_path(target_dir)
    tokenizer = load_tokenizer(target_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def mask_token_id(tokenizer) -> int:
    """The drafter's mask token: `<|MASK|>` if the tokenizer has it, else the first id past the vocabulary."""
    tid = tokenizer.convert_tokens_to_ids(chat.MASK_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"the target tokenizer has no {chat.MASK_TOKEN} token")
    return tid
