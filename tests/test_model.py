"""Drafter: z-lab layer-id rule, the hidden_states[i + 1] convention, z-lab parameter names, save/load."""

import json

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from dflash.modeling.drafter import DFlashDrafter, DrafterConfig, build_target_layer_ids, target_features


def tiny_target(layers=6, vocab=64, hidden=32, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                      initializer_range=0.3)
    return Qwen3ForCausalLM(cfg).eval()


def test_layer_ids_zlab_rule():
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]      # Qwen3-8B
    assert build_target_layer_ids(30, 5) == [1, 8, 14, 20, 27]      # SmolLM2-135M (round half to even, as z-lab)
    assert build_target_layer_ids(36, 1) == [18]
    with pytest.raises(ValueError):
        build_target_layer_ids(3, 2)


def test_feature_i_is_output_of_decoder_layer_i():
    """Layer id i must read HF hidden_states[i + 1], the output of decoder layer i (index 0 is the embedding)."""
    target = tiny_target()
    ids = torch.randint(0, 64, (1, 9))
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple)
                                                                                   else out))
             for i, layer in enumerate(target.model.layers)]
    feats = target_features(target, ids, [1, 3])
    for h in hooks:
        h.remove()
    assert torch.allclose(feats[..., :32], seen[1]) and torch.allclose(feats[..., 32:], seen[3])
    emb = target.model.embed_tokens(ids)
    assert not torch.allclose(feats[..., :32], emb)                   # off-by-one would read the embedding for 0


def _drafter(target, n_layers=2):
    cfg = DrafterConfig.for_target(target.config, {"num_layers": n_layers, "num_target_layers": None,
                                                   "target_layer_ids": None, "block_size": 4,
                                                   "intermediate_size": None}, mask_token_id=63)
    d = DFlashDrafter(cfg)
    d.init_weights(0)
    return d


def test_parameter_names_and_config_format(tmp_path):
    target = tiny_target()
    d = _drafter(target)
    names = set(d.state_dict())
    for n in ["fc.weight", "hidden_norm.weight", "norm.weight", "layers.0.self_attn.q_proj.weight",
              "layers.0.self_attn.k_norm.weight", "layers.1.mlp.gate_proj.weight",
              "layers.1.post_attention_layernorm.weight"]:
        assert n in names
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert d.fc.weight.shape == (32, 2 * 32)
    d.save(tmp_path, "bfloat16")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["model_type"] == "qwen3"
    assert cfg["dflash_config"] == {"mask_token_id": 63, "target_layer_ids": [1, 3]}
    assert cfg["block_size"] == 4 and cfg["num_target_layers"] == 6 and cfg["num_hidden_layers"] == 2
    back = DFlashDrafter.load(tmp_path)
    for k, v in d.state_dict().items():
        assert torch.allclose(back.state_dict()[k], v.to(torch.bfloat16).float())


def test_cached_forward_equals_full_forward():
    """Context fed in two pieces through the cache gives the same block output as all at once."""
    target = tiny_target()
    d = _drafter(target)
    feats = torch.randn(1, 10, 64)
    block = torch.randn(1, 4, 32)
    full = d(block, feats, torch.arange(0, 14)[None], cache=d.new_cache())
    cache = d.new_cache()
    d(torch.randn(1, 4, 32), feats[:, :6], torch.cat([torch.arange(6), torch.arange(6, 10)])[None], cache=cache)
    part = d(block, feats[:, 6:], torch.arange(6, 14)[None], cache=cache)
    assert torch.allclose(full, part, atol=1e-5)


def test_block_mask_path_equals_dense_mask_path():
    """The FlexAttention BlockMask and the dense SDPA mask come from one mask_mod and give the same output."""
    from torch.nn.attention.flex_attention import create_block_mask

    from dflash.modeling import objective

    target = tiny_target()
    d = _drafter(target)
    anchors = torch.tensor([[3, 9, 20]])
    s, bs = 24, 4
    feats, block = torch.randn(1, s, 64), torch.randn(1, 3 * bs, 32)
    pos = torch.cat([torch.arange(s), (anchors[0, :, None] + torch.arange(bs)).flatten()])[None]
    dense = d(block, feats, pos, mask=objective.dense_mask(anchors, s, bs))
    bm = create_block_mask(objective.mask_mod_for(anchors, s, bs), 1, None, 3 * bs, s + 3 * bs, device="cpu")
    with torch.no_grad():
        flex = d(block, feats, pos, mask=bm)
    assert torch.allclose(dense, flex, atol=1e-5)


def test_last_target_layer_is_refused_with_the_reason():
    """Layer L-1: the training hook gives the decoder output before the final norm, HF's output_hidden_states (the
    bench engines, z-lab's loop) the state after it: not the same tensor, so the layer is refused everywhere."""
    from dflash.errors import ConfigError, DataError

    target = tiny_target(layers=6)
    ids = torch.randint(0, 64, (1, 9))
    hook = target_features(target, ids, [5])
    out = target(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(target_features(target, ids, [4]), out.hidden_states[5])
    assert not torch.allclose(hook, out.hidden_states[6])                  # the normed state
    with pytest.raises(ConfigError, match=r"drafter.target_layer_ids: \[1, 5\] include layer 5, the target's last"):
        DrafterConfig.for_target(target.config, {"num_layers": 2, "num_target_layers": None,
                                                 "target_layer_ids": [1, 5], "block_size": 4,
                                                 "intermediate_size": None}, mask_token_id=63)
    d = _drafter(target)
    d.config.target_layer_ids = [1, 5]
    with pytest.raises(DataError, match=r"d/config.json: dflash_config.target_layer_ids: \[1, 5\] include layer 5"):
        d.config.check_target(target.config, "d/config.json")
