"""`python -m dflash.decoding.sglang_launch <sglang.launch_server arguments>`: SGLang's server with two fixes for
sglang >= 0.5.11 under transformers 5, applied in every server process without editing installed files, each only
where the installed source still has the problem it fixes (one log line per process where applied):

1. `qwen3_asr` config registration: sglang registers model types transformers 5 also defines, without `exist_ok`,
   so importing its configs fails; `AutoConfig.register` is wrapped to pass `exist_ok=True` for exactly those types.
2. The DFLASH draft model's RoPE theta: sglang reads `config.rope_theta`, which a transformers 5 config keeps only in
   `rope_parameters`, so another theta (SmolLM2: 1e5) was served as 1e6; an import hook sets the attribute first.

SGLang starts its schedulers with the `spawn` start method, and a spawned child re-runs its parent's main module:
`launch_server` therefore runs with `runpy.run_module(..., alter_sys=False)`, so this module stays `__main__` and
its children apply the same fixes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger("dflash.sglang_launch")

ASR_MODULE = "sglang.srt.configs.qwen3_asr"
ASR_TYPES = ("qwen3_asr", "qwen3_asr_thinker")
DFLASH_MODULE = "sglang.srt.models.dflash"
THETA_READ = re.compile(r"""getattr\(\s*config\s*,\s*["']rope_theta["']""")


def _say(msg: str) -> None:
    print(f"[dflash.sglang_launch] {msg}", file=sys.stderr, flush=True)


def module_file(name: str) -> Path | None:
    """The source file of module `name`, found on sys.path without importing anything."""
    parts = name.split(".")
    spec = importlib.machinery.PathFinder.find_spec(parts[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        for candidate in (Path(base, *parts[1:]).with_suffix(".py"), Path(base, *parts[1:], "__init__.py")):
            if candidate.is_file():
                return candidate
    return None


# ---------------------------------------------------------------------------------------------- patch 1


def unguarded_registrations(source: str, types=ASR_TYPES) -> list[str]:
    """Model types of `types` that `source` registers with AutoConfig.register(...) and no exist_ok."""
    found = []
    for t in types:
        for m in re.finditer(rf"""AutoConfig\.register\(\s*["']{t}["'][^)]*\)""", source):
            if "exist_ok" not in m.group(0):
                found.append(t)
                break
    return found


def tolerate_registrations(auto_config, types, builtin, owner_prefix: str = "sglang.") -> bool:
    """Wrap `auto_config.register` so that registering one of `types` that transformers already defines (`builtin`:
    the built-in model types), with a config class from a module under `owner_prefix`, passes exist_ok=True.
    Idempotent; False when already wrapped."""
    original = auto_config.register
    if getattr(original, "_dflash_tolerant", False):
        return False
    types, builtin = frozenset(types), frozenset(builtin)

    def register(model_type, config, exist_ok=False):
        if (model_type in types and model_type in builtin
                and getattr(config, "__module__", "").startswith(owner_prefix)):
            exist_ok = True
        return original(model_type, config, exist_ok=exist_ok)

    register._dflash_tolerant = True
    register.__wrapped__ = original
    auto_config.register = register
    return True


def patch_qwen3_asr_registration() -> list[str]:
    """Patch 1 where needed: the model types made tolerant (empty: nothing to fix here)."""
    path = module_file(ASR_MODULE)
    if path is None:
        return []
    pending = unguarded_registrations(path.read_text(errors="replace"))
    if not pending:
        return []
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    clash = [t for t in pending if t in CONFIG_MAPPING_NAMES]
    if clash and tolerate_registrations(AutoConfig, clash, CONFIG_MAPPING_NAMES):
        _say(f"patched AutoConfig.register: exist_ok=True for sglang's {', '.join(clash)} "
             f"(already defined by transformers {transformers.__version__})")
    return clash


# ---------------------------------------------------------------------------------------------- patch 2


def rope_theta_of(config) -> float | None:
    """The theta a transformers 5 config keeps in `rope_parameters` (None: none there)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return None


def theta_from_rope_parameters(cls) -> bool:
    """Wrap `cls.__init__(self, config, ...)` so that a config without a `rope_theta` attribute gets the theta of its
    `rope_parameters` first. Idempotent; False when already wrapped."""
    original = cls.__init__
    if getattr(original, "_dflash_theta", False):
        return False

    def __init__(self, config, *args, **kwargs):
        if not hasattr(config, "rope_theta"):
            theta = rope_theta_of(config)
            if theta is not None:
                config.rope_theta = theta
        original(self, config, *args, **kwargs)

    __init__._dflash_theta = True
    __init__.__wrapped__ = original
    __init__.__name__, __init__.__qualname__ = original.__name__, original.__qualname__
    cls.__init__ = __init__
    return True


def patch_dflash_module(module) -> bool:
    """Patch 2 on an imported sglang.srt.models.dflash, where its DFlashAttention reads `rope_theta` by attribute."""
    import inspect

    cls = getattr(module, "DFlashAttention", None)
    if cls is None:
        return False
    try:
        source = inspect.getsource(cls.__init__)
    except (OSError, TypeError):
        return False
    if not THETA_READ.search(source):
        return False
    if theta_from_rope_parameters(cls):
        _say(f"patched {module.__name__}.DFlashAttention: RoPE theta from config.rope_parameters")
        return True
    return False


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs `hook(module)` right after module `name` is first executed (the normal finders load it)."""

    def __init__(self, name: str, hook):
        self.name, self.hook = name, hook

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader, hook = spec.loader, self.hook
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                exec_module(module)
                hook(module)

            def __getattr__(self, attr):
                return getattr(loader, attr)

        spec.loader = Loader()
        return spec


def install_dflash_hook() -> bool:
    """Patch 2: at once when the module is already imported, else on its import. False: not needed here."""
    path = module_file(DFLASH_MODULE)
    if path is None or not THETA_READ.search(path.read_text(errors="replace")):
        return False
    if DFLASH_MODULE in sys.modules:
        return patch_dflash_module(sys.modules[DFLASH_MODULE])
    if not any(isinstance(f, AfterImport) and f.name == DFLASH_MODULE for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImport(DFLASH_MODULE, patch_dflash_module))
    return True


def install() -> None:
    patch_qwen3_asr_registration()
    install_dflash_hook()


# at import: in the launching process and in every spawned child (which re-runs this module as __mp_main__)
install()


def main(argv: list[str] | None = None) -> None:
    import runpy

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=False)


if __name__ == "__main__":
    main()
