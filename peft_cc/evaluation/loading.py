"""Loading the system to evaluate: a base model by name or path, and optionally a PEFT adapter on top."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

DTYPES = ("float32", "bfloat16", "float16", "auto")


def default_device() -> str:
    """`"cuda"` where a GPU is available, else `"cpu"`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def adapter_base_model(adapter: str | os.PathLike) -> str:
    """The base model a saved adapter records (`base_model_name_or_path` of its `adapter_config.json`).

    Raises:
        ValueError: the folder has no `adapter_config.json`, or it records no base model.
    """
    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"{adapter} is not a saved adapter folder (no adapter_config.json): pass --model too.")
    recorded = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not recorded:
        raise ValueError(f"The adapter {adapter} records no base model: pass --model.")
    return recorded


def load_system(
    model: str,
    adapter: str | os.PathLike | None = None,
    dtype: str = "float32",
    device: str | None = None,
) -> tuple[torch.nn.Module, object, dict]:
    """Load a causal LM and its tokenizer, and a PEFT adapter (LoRA, CC-Tuning, ...) onto it, in eval mode.

    Args:
        model: a local checkpoint folder or a Hub id.
        adapter: a folder saved by `save_pretrained` of a PEFT model (a CC-Tuning adapter needs `peft_cc`, which
            this module imports).
        dtype: the weights' dtype, one of :data:`DTYPES` (`"auto"`: the checkpoint's).
        device: where to run (default: :func:`default_device`).

    Returns:
        `(model, tokenizer, settings)`; `settings` records the model (`model_path`: its absolute path, for a local
        folder), the adapter and the loading time in seconds, for the results.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model)
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    if adapter is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, str(adapter))
    loaded.to(device or default_device()).eval()
    settings = {
        "model": model,
        "model_path": str(Path(model).resolve()) if Path(model).exists() else model,
        "adapter": str(Path(adapter).resolve()) if adapter is not None else None,
        "load_seconds": time.perf_counter() - started,
    }
    return loaded, tokenizer, settings
