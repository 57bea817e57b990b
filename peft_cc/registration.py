"""Registration of CC-Tuning as a PEFT method.

PEFT's registry (:func:`peft.utils.register_peft_method`) only accepts names that are members of
:class:`peft.PeftType`, and that enum is closed. :func:`register` therefore adds the member ``CC`` to
``PeftType`` first, then registers :class:`~peft_cc.CCConfig` and :class:`~peft_cc.CCModel` under it. Both
steps are idempotent, so importing :mod:`peft_cc` any number of times is safe.
"""

from __future__ import annotations

import functools

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

PEFT_TYPE_NAME = "CC"


def _add_peft_type_member(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it to the enum first if it does not exist yet."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def _add_section_to_pushed_model_cards() -> None:
    """Make `PeftModel.push_to_hub` upload a model card with the CC-Tuning section.

    transformers' `push_to_hub` saves the adapter into a folder, then writes the Hub's model card over the one
    `save_pretrained` wrote, then uploads the folder with `_upload_modified_files`. Wrapping that last step (once)
    appends the CC-Tuning section to the card that is really uploaded; other adapters are left as they are.
    """
    from .config import CCConfig
    from .model_card import add_model_card_section

    upload = PeftModel._upload_modified_files
    if getattr(upload, "adds_cc_model_card_section", False):
        return

    @functools.wraps(upload)
    def upload_with_cc_section(self, working_dir, *args, **kwargs):
        for config in getattr(self, "peft_config", {}).values():
            if isinstance(config, CCConfig):
                add_model_card_section(working_dir, config.source_layers, config.injection_layer)
                break
        return upload(self, working_dir, *args, **kwargs)

    upload_with_cc_section.adds_cc_model_card_section = True
    PeftModel._upload_modified_files = upload_with_cc_section


def register() -> PeftType:
    """Make CC-Tuning known to PEFT under ``PeftType.CC``; a second call changes nothing.

    Returns:
        The ``PeftType.CC`` enum member.
    """
    from .config import CCConfig
    from .model import CCModel

    peft_type = _add_peft_type_member(PEFT_TYPE_NAME)
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        # CCModel is a LoRA tuner: its LoRA parameters keep LoRA's "lora_" prefix, which PEFT uses to find them.
        register_peft_method(
            name=PEFT_TYPE_NAME.lower(), config_cls=CCConfig, model_cls=CCModel, prefix=CCModel.prefix
        )
    _add_section_to_pushed_model_cards()
    return peft_type
