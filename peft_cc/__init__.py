"""peft-cc: CC-Tuning (Cross-lingual Connection Tuning, ACL 2025) as a PEFT method.

Importing this package registers the method with PEFT under ``PeftType.CC``, so that
``peft.get_peft_model(model, peft_cc.CCConfig(...))`` and ``PeftModel.from_pretrained(...)`` work.
"""

from .config import CCConfig
from .model import CCCausalLMOutputWithPast, CCModel
from .registration import register
from .transform_matrix import NormalEquations, fit_transform_matrix

__version__ = "0.1.0"

__all__ = ["CCCausalLMOutputWithPast", "CCConfig", "CCModel", "NormalEquations", "fit_transform_matrix", "register"]

register()
