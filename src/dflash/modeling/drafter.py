"""The DFlash drafter in one file, with z-lab's parameter names and config format.

A stack of Qwen3-style decoder layers over the block tokens (anchor + mask tokens). Target hidden states from
`target_layer_ids` are concatenated, projected by `fc` and normalised by `hidden_norm`; in every layer they are
turned into extra keys/values ("KV injection"), so each block attends to the target context and to itself
bidirectionally. The drafter has no embedding and no LM head: the target's are shared and frozen.

Weights: layers.{i}.self_attn.{q,k,v,o}_proj, layers.{i}.self_attn.{q,k}_norm, layers.{i}.mlp.{gate,up,down}_proj,
layers.{i}.{input,post_attention}_layernorm, fc, hidden_norm, norm.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from dflash.errors import ConfigError, DataError
from dflash.plan import pretrained
from dflash.plan.fit import layer_ids_problem, mask_id_problem


def build_target_layer_ids(num_target_layers: int, n: int) -> list[int]:
    """z-lab's rule: n layer ids spread evenly from layer 1 to layer L-3 (36 layers, n=5 -> [1, 9, 17, 25, 33]).

    An id i means the output of decoder layer i, read as HF `hidden_states[i + 1]` (index 0 is the embedding).
    """
    if n == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    if end < start:
        raise ValueError(f"a target with {num_target_layers} layers is too shallow for {n} feature layers")
    return [round(start + i * (end - start) / (n - 1)) for i in range(n)]


@dataclass
class DrafterConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_target_layers: int
    target_layer_ids: list[int]
    mask_token_id: int
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    extra: dict = field(default_factory=dict)

    def to_hf(self, dtype: str = "bfloat16") -> dict:
        """config.json in the z-lab / SGLang draft format."""
        return {
            "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_act": "silu",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings, "attention_bias": False,
            "attention_dropout": 0.0, "tie_word_embeddings": False, "torch_dtype": dtype,
            "layer_types": ["full_attention"] * self.num_hidden_layers, "use_sliding_window": False,
            "block_size": self.block_size, "num_target_layers": self.num_target_layers,
            "dflash_config": {"mask_token_id": self.mask_token_id, "target_layer_ids": list(self.target_layer_ids)},
            **self.extra,
        }

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> DrafterConfig:
        """From a config.json in the z-lab / SGLang format (ours, or z-lab's published Qwen3 configs); `source`
        names the file in errors. As in z-lab's code, `dflash_config.target_layer_ids` defaults to z-lab's rule
        over `num_target_layers`; the fields may also sit at the top level."""
        def fail(field: str, problem: str):
            raise DataError(f"{source}: {field}: {problem}")

        missing = [k for k in REQUIRED_HF_FIELDS if k not in cfg]
        if missing:
            fail(missing[0], "missing (a DFlash drafter config.json has " + ", ".join(REQUIRED_HF_FIELDS) + ")")
        if cfg.get("hidden_act", "silu") != "silu":
            fail("hidden_act", f"{cfg['hidden_act']!r} is not supported (SiLU MLPs only)")
        if cfg.get("attention_bias"):
            fail("attention_bias", "attention biases are not supported")
        if "sliding_attention" in (cfg.get("layer_types") or []):
            fail("layer_types", "sliding-window layers are not supported")
        rope_field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        rope = cfg.get(rope_field) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            fail(rope_field, f"RoPE type {rope.get('rope_type', rope.get('type'))!r} is not supported")
        dc = cfg.get("dflash_config") or {}
        ids = dc.get("target_layer_ids", cfg.get("target_layer_ids"))
        if ids is None:
            ids = build_target_layer_ids(cfg["num_target_layers"], cfg["num_hidden_layers"])
        mask = dc.get("mask_token_id", cfg.get("mask_token_id"))
        if mask is None:
            fail("dflash_config.mask_token_id", "missing")
        names = ("intermediate_size", "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings")
        kwargs = {k: cfg[k] for k in names if k in cfg}
        return cls(**kwargs, hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
                   num_attention_heads=cfg["num_attention_heads"], num_target_layers=cfg["num_target_layers"],
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                   rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 1e6),
                   target_layer_ids=[int(i) for i in ids], mask_token_id=int(mask),
                   block_size=int(cfg.get("block_size", dc.get("block_size", 16))))

    def check_target(self, target_config, source: str) -> None:
        """DataError (naming `source`) unless this drafter fits the target: its width, feature layers, mask id."""
        t = target_config
        if self.hidden_size != t.hidden_size:
            raise DataError(f"{source}: hidden_size: {self.hidden_size}, the target's is {t.hidden_size}")
        problem = layer_ids_problem(self.target_layer_ids, t.num_hidden_layers)
        if problem:
            raise DataError(f"{source}: dflash_config.target_layer_ids: {problem}")
        problem = mask_id_problem(self.mask_token_id, t.vocab_size)
        if problem:
            raise DataError(f"{source}: dflash_config.mask_token_id: {problem}")

    @classmethod
    def for_target(cls, target_config, drafter_cfg: dict, mask_token_id: int) -> DrafterConfig:
        """Drafter dimensions from the target's HF config and the phase's `drafter` section."""
        t = target_config
        n_feat = drafter_cfg.get("num_target_layers") or drafter_cfg["num_layers"]
        ids = drafter_cfg.get("target_layer_ids") or build_target_layer_ids(t.num_hidden_layers, n_feat)
        problem = layer_ids_problem(ids, t.num_hidden_layers)
        if problem:
            raise ConfigError(f"drafter.target_layer_ids: {problem}")
        problem = mask_id_problem(mask_token_id, t.vocab_size)
        if problem and drafter_cfg.get("mask_token_id") is not None:
            raise ConfigError(f"drafter.mask_token_id: {problem}")
        if problem:
            raise ValueError(f"drafter.mask_token: id {problem}")
        rope = getattr(t, "rope_theta", None) or (getattr(t, "rope_parameters", None) or {}).get("rope_theta", 1e6)
        return cls(hidden_size=t.hidden_size,
                   intermediate_size=drafter_cfg.get("intermediate_size") or t.intermediate_size,
                   num_hidden_layers=drafter_cfg["num_layers"], num_attention_heads=t.num_attention_heads,
                   num_key_value_heads=t.num_key_value_heads,
                   head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
                   vocab_size=t.vocab_size, num_target_layers=t.num_hidden_layers, target_layer_ids=list(ids),
                   mask_token_id=mask_token_id, block_size=drafter_cfg["block_size"], rms_norm_eps=t.rms_norm_eps,
                   rope_theta=float(rope), max_position_embeddings=t.max_position_embeddings)


REQUIRED_HF_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "vocab_size", "num_target_layers")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape (B, T, head_dim) for integer positions (B, T), half-split (Llama/Qwen) layout."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D); cos/sin (B, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@functools.cache
def _compiled_flex():
    """FlexAttention needs compiling to run its fused kernel; inside a compiled layer the plain function is used."""
    return torch.compile(flex_attention, dynamic=False)


class Attention(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, ctx, cos, sin, mask=None, cache=None):
        """x: block tokens (B, Q, H); ctx: projected target context (B, C, H); cos/sin over [ctx; block].

        `mask` is a dense boolean mask for SDPA, a FlexAttention BlockMask, or None (attend to everything).
        `cache` is a [k, v] list holding earlier context keys/values (roped); it is extended with this call's context.
        """
        c, (b, q_len, _) = self.c, x.shape
        ctx_len = ctx.shape[1]
        q = self.q_norm(self.q_proj(x).view(b, q_len, -1, c.head_dim)).transpose(1, 2)
        kv_in = torch.cat([ctx, x], dim=1)
        k = self.k_norm(self.k_proj(kv_in).view(b, ctx_len + q_len, -1, c.head_dim)).transpose(1, 2)
        v = self.v_proj(kv_in).view(b, ctx_len + q_len, -1, c.head_dim).transpose(1, 2)
        q = apply_rope(q, cos[:, ctx_len:], sin[:, ctx_len:])
        k = apply_rope(k, cos, sin)
        if cache is not None:
            if cache:
                k = torch.cat([cache[0], k], dim=2)
                v = torch.cat([cache[1], v], dim=2)
            n_ctx = k.shape[2] - q_len
            cache[:] = [k[:, :, :n_ctx], v[:, :, :n_ctx]]
        if isinstance(mask, BlockMask):
            flex = flex_attention if torch.compiler.is_compiling() or not q.is_cuda else _compiled_flex()
            out = flex(q, k, v, block_mask=mask, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))


class MLP(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, ctx, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), ctx, cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        c = config
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.fc = nn.Linear(len(c.target_layer_ids) * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, block_emb, target_hidden, positions, mask=None, cache=None):
        """block_emb (B, Q, H) target embeddings of the block tokens; target_hidden (B, C, n*H) concatenated target
        features of the new context positions; positions (B, C + Q). Returns normalised hidden states (B, Q, H)."""
        ctx = self.hidden_norm(self.fc(target_hidden))
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, block_emb.dtype)
        x = block_emb
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, cos, sin, mask, None if cache is None else cache[i])
        return self.norm(x)

    def new_cache(self) -> list[list]:
        return [[] for _ in self.layers]

    def save(self, out: Path, dtype: str = "bfloat16") -> None:
        """safetensors + config.json, loadable by z-lab's and SGLang's DFlash code."""
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        tdtype = getattr(torch, dtype)
        save_file({k: v.detach().to(tdtype).contiguous() for k, v in self.state_dict().items()},
                  str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(self.config.to_hf(dtype), indent=1))

    @classmethod
    def load(cls, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DFlashDrafter:
        """A drafter directory in the z-lab format: config.json (with dflash_config) and model.safetensors (keys
        as z-lab's, an optional `model.` prefix tolerated), as the convert stage writes and z-lab publishes."""
        from safetensors.torch import load_file

        path = Path(path)
        config, weights = path / "config.json", path / "model.safetensors"
        try:
            raw = json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{config}: not a readable JSON file ({e})") from None
        model = cls(DrafterConfig.from_hf(raw, str(config)))
        state = {k.removeprefix("model."): v for k, v in load_file(str(weights)).items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise DataError(f"{weights}: the weights do not match {config}: {e}") from None
        return model.to(device=device, dtype=dtype).eval()


class _Enough(Exception):
    """Raised by a hook once the deepest needed layer has run: later layers and the LM head are skipped."""


def target_features(target, input_ids, layer_ids: list[int], attention_mask=None) -> torch.Tensor:
    """Concatenated outputs of the target's decoder layers `layer_ids` (= HF `hidden_states[i + 1]`).

    Only layers up to max(layer_ids) run; no full-vocab logits are computed."""
    layers, captured, last = target.model.layers, {}, max(layer_ids)

    def hook(i):
        def capture(module, args, output):
            captured[i] = output[0] if isinstance(output, tuple) else output
            if i == last:
                raise _Enough

        return capture

    handles = [layers[i].register_forward_hook(hook(i)) for i in set(layer_ids)]
    try:
        target.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat([captured[i] for i in layer_ids], dim=-1)


def pretrained_dir(ref: str) -> tuple[Path, dict[str, str], dict]:
    """Where the drafter `drafter.pretrained` names lives: (directory, {input label: sha256} of its files, what was
    resolved). A hub id is fetched into the Hugging Face cache (the two files only), or found there offline
    (HF_HUB_OFFLINE=1); the snapshot's commit is recorded."""
    p = pretrained.parse(ref)
    if p.path is not None:
        directory, label, info = p.path, ref.rstrip("/"), {"pretrained": ref}
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

        try:
            directory = Path(snapshot_download(p.hub_id, revision=p.revision,
                                               allow_patterns=list(pretrained.FILES)))
        except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
            raise DataError(f"drafter.pretrained {ref}: cannot fetch it from the hub or find it in the local Hugging "
                            f"Face cache: {str(e).splitlines()[0]}") from None
        label = f"hub:{p.hub_id}@{directory.name}"
        info = {"pretrained": ref, "hub_id": p.hub_id, "revision": p.revision, "commit": directory.name}
    missing = [f for f in pretrained.FILES if not (directory / f).is_file()]
    if missing:
        raise DataError(f"drafter.pretrained {ref}: {directory} has no {' or '.join(missing)}")
    return directory, {f"{label}/{f}": pretrained.file_sha256(directory / f) for f in pretrained.FILES}, info


TRAINED_WEIGHTS, TRAINED_CONFIG = "drafter.pt", "drafter_config.json"


def load_trained(train_dir: Path, device: str = "cpu") -> DFlashDrafter:
    """The drafter a train stage wrote (`drafter.pt` + `drafter_config.json`), in eval mode."""
    cfg = DrafterConfig.from_hf(json.loads((Path(train_dir) / TRAINED_CONFIG).read_text()),
                                str(Path(train_dir) / TRAINED_CONFIG))
    model = DFlashDrafter(cfg)
    model.load_state_dict(torch.load(Path(train_dir) / TRAINED_WEIGHTS, map_location="cpu"))
    return model.to(device).eval()
