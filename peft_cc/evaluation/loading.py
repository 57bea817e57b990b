"""Loading the system to evaluate: a base model by name or path, and optionally a PEFT adapter on top."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..packaged_models import PACKAGED_MODELS, resolve_model_path

DTYPES = ("float32", "bfloat16", "float16", "auto")


def default_device() -> str:
    """`"cuda"` where a GPU is available, else `"cpu"`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_system(
    model: str,
    adapter: str | os.PathLike | None = None,
    dtype: str = "float32",
    device: str | None = None,
) -> tuple[torch.nn.Module, object, dict]:
    """Load a causal LM and its tokenizer, and a PEFT adapter (LoRA, CC-Tuning, ...) onto it, in eval mode.

    Args:
        model: a packaged model's name (see `peft_cc.packaged_models.PACKAGED_MODELS`), a local checkpoint folder
            or a Hub id.
        adapter: a folder saved by `save_pretrained` of a PEFT model (a CC-Tuning adapter needs `peft_cc`, which
            this module imports).
        dtype: the weights' dtype, one of :data:`DTYPES` (`"auto"`: the checkpoint's).
        device: where to run (default: :func:`default_device`).

    Returns:
        `(model, tokenizer, settings)`; `settings` records the model, its resolved path, the adapter and the
        loading time in seconds, for the results.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    started = time.perf_counter()
    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    if adapter is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, str(adapter))
    loaded.to(device or default_device()).eval()
    settings = {
        "model": model,
        "model_path": str(Path(path).resolve()) if model in PACKAGED_MODELS or Path(path).exists() else path,
        "adapter": str(Path(adapter).resolve()) if adapter is not None else None,
        "load_seconds": time.perf_counter() - started,
    }
    return loaded, tokenizer, settings
