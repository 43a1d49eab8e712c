"""The SGLang launcher's two fixes on CPU: the tolerant registration on transformers' real AutoConfig registry, the
RoPE theta taken from `rope_parameters` of a real transformers 5 config, and both in effect in a child started the
way sglang starts its scheduler (multiprocessing spawn), through a stand-in `sglang` package (the real one needs
CUDA and is not installed here)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dflash.decoding import sglang_launch as launch

SRC = Path(__file__).resolve().parents[1] / "src"


def test_only_unguarded_registrations_are_found():
    src = ('AutoConfig.register("qwen3_asr", Qwen3ASRConfig)\n'
           'AutoConfig.register("qwen3_asr_thinker", Qwen3ASRThinkerConfig, exist_ok=True)\n')
    assert launch.unguarded_registrations(src) == ["qwen3_asr"]
    assert launch.unguarded_registrations('AutoConfig.register("qwen3_asr", C, exist_ok=True)') == []
    assert launch.unguarded_registrations("nothing here") == []


def test_registering_a_transformers_model_type_again_is_tolerated_for_sglang_only():
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    def config_class(module):
        cls = type("LlamaLike", (PretrainedConfig,), {"model_type": "llama"})
        cls.__module__ = module
        return cls

    ours, theirs = config_class("sglang.srt.configs.fake"), config_class("elsewhere")
    original = AutoConfig.register
    with pytest.raises(ValueError, match="already used"):
        AutoConfig.register("llama", ours)
    try:
        assert launch.tolerate_registrations(AutoConfig, ["llama"], CONFIG_MAPPING_NAMES)
        assert not launch.tolerate_registrations(AutoConfig, ["llama"], CONFIG_MAPPING_NAMES)    # idempotent
        AutoConfig.register("llama", ours)                       # twice: both tolerated
        AutoConfig.register("llama", ours)
        assert CONFIG_MAPPING["llama"] is ours
        with pytest.raises(ValueError, match="already used"):
            AutoConfig.register("llama", theirs)                 # not sglang's class: unchanged behaviour
    finally:
        AutoConfig.register = original
        CONFIG_MAPPING._extra_content.pop("llama", None)
    assert CONFIG_MAPPING["llama"].__name__ == "LlamaConfig"


def test_theta_comes_from_rope_parameters_when_the_attribute_is_missing():
    from transformers import Qwen3Config

    class Attention:
        def __init__(self, config, layer_id):
            self.theta = float(getattr(config, "rope_theta", 1000000))

    assert launch.theta_from_rope_parameters(Attention)
    assert not launch.theta_from_rope_parameters(Attention)                   # idempotent
    config = Qwen3Config(rope_parameters={"rope_type": "default", "rope_theta": 1e5})
    assert not hasattr(config, "rope_theta") or config.rope_theta == 1e5
    assert Attention(config, 0).theta == 1e5
    plain = type("Plain", (), {"rope_theta": 5e5})()                          # an explicit attribute wins
    assert Attention(plain, 0).theta == 5e5
    assert Attention(type("Bare", (), {})(), 0).theta == 1e6                   # nothing anywhere: sglang's default


FAKE = {
    "sglang/__init__.py": "",
    "sglang/srt/__init__.py": "",
    "sglang/srt/configs/__init__.py": "",
    "sglang/srt/configs/qwen3_asr.py": """
        from transformers import AutoConfig, PretrainedConfig


        class Qwen3ASRConfig(PretrainedConfig):
            model_type = "qwen3_asr"


        AutoConfig.register("qwen3_asr", Qwen3ASRConfig)
        """,
    "sglang/srt/models/__init__.py": "",
    "sglang/srt/models/dflash.py": """
        class DFlashAttention:
            def __init__(self, config, layer_id: int) -> None:
                self.rope_theta = float(getattr(config, "rope_theta", 1000000))
        """,
    "sglang/child.py": """
        import sys


        def scheduler(out):
            import sglang.srt.configs.qwen3_asr  # noqa: F401  (raises unless patched)
            from sglang.srt.models.dflash import DFlashAttention
            from transformers import Qwen3Config

            config = Qwen3Config(rope_parameters={"rope_type": "default", "rope_theta": 1e5})
            with open(out, "w") as f:
                f.write(f"{DFlashAttention(config, 0).rope_theta} {sys.modules['__main__'].__spec__.name}")
        """,
    "sglang/launch_server.py": """
        import multiprocessing as mp
        import sys

        from sglang.child import scheduler

        if __name__ == "__main__":
            mp.set_start_method("spawn", force=True)
            p = mp.Process(target=scheduler, args=(sys.argv[sys.argv.index("--out") + 1],))
            p.start()
            p.join()
            sys.exit(p.exitcode)
        """,
}


def test_both_fixes_reach_a_spawned_scheduler(tmp_path):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "qwen3_asr" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers does not define qwen3_asr")
    for name, text in FAKE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    out = tmp_path / "theta.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(tmp_path)])}
    r = subprocess.run([sys.executable, "-m", "dflash.decoding.sglang_launch", "--model-path", "x", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "100000.0 dflash.decoding.sglang_launch"
    assert "patched AutoConfig.register: exist_ok=True for sglang's qwen3_asr" in r.stderr
    assert "patched sglang.srt.models.dflash.DFlashAttention: RoPE theta from config.rope_parameters" in r.stderr
