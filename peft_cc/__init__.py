"""peft-cc: CC-Tuning (Cross-lingual Connection Tuning, ACL 2025) as a PEFT method.

Importing this package registers the method with PEFT under ``PeftType.CC``, so that
``peft.get_peft_model(model, peft_cc.CCConfig(...))`` and ``PeftModel.from_pretrained(...)`` work; it changes nothing
else of PEFT, TRL or transformers. ``peft_cc.CCSFTTrainer`` (configured by ``peft_cc.CCSFTConfig``) trains such an
adapter with TRL; the trainer is imported on first use, so that loading an adapter for inference does not import TRL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import CCConfig
from .least_squares import NormalEquations
from .model import CCCausalLMOutputWithPast, CCModel
from .model_card import write_model_card
from .registration import register
from .transform_matrix import fit_transform_matrix

if TYPE_CHECKING:
    from .sft_config import CCSFTConfig
    from .sft_trainer import CCSFTTrainer, DataCollatorForCCLanguageModeling

__version__ = "0.1.0"

_LAZY = {
    "CCSFTConfig": ".sft_config",
    "CCSFTTrainer": ".sft_trainer",
    "DataCollatorForCCLanguageModeling": ".sft_trainer",
}

__all__ = [
    "CCCausalLMOutputWithPast",
    "CCConfig",
    "CCModel",
    "CCSFTConfig",
    "CCSFTTrainer",
    "DataCollatorForCCLanguageModeling",
    "NormalEquations",
    "fit_transform_matrix",
    "register",
    "write_model_card",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register(CCConfig, CCModel)
