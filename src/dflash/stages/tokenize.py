"""tokenize: conversations -> token ids with an assistant-only loss mask, in the target's chat template.

Output `tokens.pt`: flat `input_ids` and `loss_mask` (int32 / bool) with `offsets` (n + 1,), one row per kept
conversation. Rows longer than `max_length` are truncated; rows with fewer than `min_loss_tokens` loss tokens are
dropped, and so are rows whose assistant turn the chat template rewrites (Qwen3's moves what precedes a `</think>`),
both counted.
"""

from __future__ import annotations

from dflash.data import chat
from dflash.data.tokens import save_tokens
from dflash.errors import DataError
from dflash.modeling.target import load_tokenizer
from dflash.stages import prepare


class Rewritten(ValueError):
    """The chat template rewrote an assistant turn (Qwen3's splits a turn at `</think>`): no span to mask."""


def assistant_spans(tokenizer, msgs: list[dict], enable_thinking: bool) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant turn's content plus the end-of-turn
    token that follows it. Spans are found in order in the rendered text, so templates that rewrite earlier turns
    (Qwen3 drops old think blocks) are handled."""
    full = chat.render(tokenizer, msgs, add_generation_prompt=False, enable_thinking=enable_thinking)
    eos = tokenizer.eos_token or ""
    spans, cursor = [], 0
    for m in msgs:
        if m["role"] != "assistant" or not m["content"]:
            continue
        start = full.find(m["content"], cursor)
        if start < 0:
            raise Rewritten("an assistant turn does not appear verbatim in the chat template's rendering")
        end = start + len(m["content"])
        if eos and full.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
        cursor = end
    return full, spans


def encode(tokenizer, msgs: list[dict], enable_thinking: bool = False) -> tuple[list[int], list[bool]]:
    text, spans = assistant_spans(tokenizer, msgs, enable_thinking)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def run(ctx) -> dict:
    tc, out, upstream, log = ctx.config["tokenize"], ctx.out, ctx.upstream, ctx.log
    tokenizer = load_tokenizer(upstream["target"])
    rows = prepare.read(upstream.get("regenerate") or upstream["prepare"])
    ids, masks, offsets = [], [], [0]
    dropped_short, truncated, rewritten = 0, 0, 0
    for r in rows:
        msgs = chat.messages(r["messages"], tc["system_prompt"])
        try:
            toks, mask = encode(tokenizer, msgs, tc["enable_thinking"])
        except Rewritten:
            rewritten += 1
            continue
        if len(toks) > tc["max_length"]:
            toks, mask = toks[: tc["max_length"]], mask[: tc["max_length"]]
            truncated += 1
        if sum(mask) < tc["min_loss_tokens"]:
            dropped_short += 1
            continue
        ids += toks
        masks += mask
        offsets.append(len(ids))
    if len(offsets) == 1:
        raise DataError(f"tokenize: no conversation left: {dropped_short} with fewer than min_loss_tokens="
                        f"{tc['min_loss_tokens']} loss tokens, {rewritten} whose assistant turn the chat template "
                        "rewrites")
    save_tokens(out, ids, masks, offsets)
    n = len(offsets) - 1
    log(f"tokenize: {n} rows, {len(ids)} tokens, {sum(masks)} loss tokens, {dropped_short} dropped as short, "
        f"{rewritten} as rewritten by the chat template, {truncated} cut")
    return {"summary": {"rows": n, "tokens": len(ids), "loss_tokens": sum(masks), "dropped_short": dropped_short,
                        "dropped_rewritten": rewritten, "truncated": truncated}}

