"""CC-Tuning's place in PEFT's registry.

PEFT's registry (:func:`peft.utils.register_peft_method`) accepts only names that are members of
:class:`peft.PeftType`, and that enum is closed: PEFT offers no way to add a member. :func:`cc_peft_type` therefore
adds ``CC`` to ``PeftType`` by writing the enum's member tables, once; ``tests/test_registration.py`` fails if PEFT
changes the enum or the registry underneath. This module imports nothing from the rest of the package, so that the
config can take its ``peft_type`` from here without an import cycle.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

PEFT_TYPE_NAME = "CC"


def cc_peft_type() -> PeftType:
    """``PeftType.CC``, added to the enum on the first call."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    return member


def register(config_cls: type, model_cls: type) -> PeftType:
    """Register `config_cls` and `model_cls` as PEFT's ``CC`` method; a second call changes nothing.

    `model_cls` is a LoRA tuner: its LoRA parameters keep LoRA's ``lora_`` prefix (`model_cls.prefix`), which PEFT
    uses to find an adapter's parameters.

    Returns:
        The ``PeftType.CC`` enum member.
    """
    peft_type = cc_peft_type()
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(
            name=PEFT_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix
        )
    return peft_type
