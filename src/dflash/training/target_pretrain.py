"""Pretraining a small target in-process (the synthetic and qwen3_offline targets) on the rendered synthetic corpus;
the model and tokenizer are saved as a target stage directory (`model/`, `target.json`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dflash.data import chat, synthetic
from dflash.modeling.corpus_rows import CorpusRows
from dflash.modeling.schedule import pretrain_lr
from dflash.modeling.target import TARGET_JSON


def corpus(tokenizer, size: int) -> list[str]:
    """The synthetic pretraining corpus of `size` conversations, rendered with the tokenizer's chat template."""
    return [chat.render(tokenizer, chat.messages([("user", q), ("assistant", r)]), add_generation_prompt=False)
            for _, q, r in synthetic.mixed(size, synthetic.PRETRAIN_SEED)]


def pretrain(config, tokenizer, s: dict, out: Path, log, corpus_rows: bool = False,
             eos_ids: list[int] | None = None) -> dict:
    """Pretrain a Qwen3ForCausalLM of `config` on the rendered synthetic corpus (`s`: corpus_size, seq_len, steps,
    batch_size, lr, seed); `corpus_rows`: an untied head trained on the corpus's rows only (CorpusRows) over an input
    embedding kept at its random initialisation (a dense update of all its rows would cost more than the layers).
    Saves model and tokenizer to `out/model` and writes target.json."""
    from transformers import Qwen3ForCausalLM

    ids = []
    for text in corpus(tokenizer, s["corpus_size"]):
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
            g["lr"] = pretrain_lr(step, s["steps"], s["lr"])
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
