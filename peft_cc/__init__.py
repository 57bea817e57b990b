"""peft-cc: CC-Tuning (Cross-lingual Connection Tuning, ACL 2025) as a PEFT method.

Importing this package registers the method with PEFT under ``PeftType.CC``, so that
``peft.get_peft_model(model, peft_cc.CCConfig(...))`` and ``PeftModel.from_pretrained(...)`` work.
``peft_cc.CCSFTTrainer`` (configured by ``peft_cc.CCSFTConfig``) trains such an adapter with TRL; the trainer is
imported on first use, so that loading an adapter for inference does not import TRL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import CCConfig, VarianceReinforceConfig
from .model import CCCausalLMOutputWithPast, CCModel
from .model_card import add_model_card_facts, install_model_card_hooks
from .registration import register
from .transform_matrix import NormalEquations, fit_transform_matrix

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
    "add_model_card_facts",
    "NormalEquations",
    "fit_transform_matrix",
    "register",
    "VarianceReinforceConfig",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register(CCConfig, CCModel)
install_model_card_hooks()
