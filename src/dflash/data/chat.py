"""Chat formatting shared by regeneration, tokenisation and the benchmark: one place decides the prompt text."""

from __future__ import annotations

# Plain ChatML (the format Qwen uses, without thinking). Used for targets built in-process.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|MASK|>"]
MASK_TOKEN = "<|MASK|>"


def messages(turns: list[tuple[str, str]] | list[dict], system_prompt: str | None = None) -> list[dict]:
    """Conversation as chat messages; `turns` are (role, content) pairs or message dicts."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for t in turns:
        msgs.append(dict(t) if isinstance(t, dict) else {"role": t[0], "content": t[1]})
    return msgs


def render(tokenizer, msgs: list[dict], add_generation_prompt: bool, enable_thinking: bool = False) -> str:
    """The target's own chat template; `enable_thinking` is passed through (Qwen3 templates read it)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the target tokenizer has no chat template")
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking)


def prompt_ids(tokenizer, msgs: list[dict], enable_thinking: bool = False) -> list[int]:
    text = render(tokenizer, msgs, add_generation_prompt=True, enable_thinking=enable_thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
