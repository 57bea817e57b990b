"""Registration of CC-Tuning as a PEFT method.

PEFT's registry (:func:`peft.utils.register_peft_method`) only accepts names that are members of
:class:`peft.PeftType`, and that enum is closed. :func:`register` therefore adds the member ``CC`` to
``PeftType`` first, then registers :class:`~peft_cc.CCConfig` and :class:`~peft_cc.CCModel` under it. Both
steps are idempotent, so importing :mod:`peft_cc` any number of times is safe.
"""

from __future__ import annotations

import functools
import os

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


def _cc_config(model: PeftModel):
    """The configuration of the model's active CC-Tuning adapter, or `None` for other adapters."""
    from .config import CCConfig

    configs = getattr(model, "peft_config", {})
    config = configs.get(getattr(model, "active_adapter", None))
    return config if isinstance(config, CCConfig) else None


def _write_cc_model_cards() -> None:
    """Make `PeftModel.save_pretrained` and `PeftModel.push_to_hub` write the CC-Tuning model card, and
    `PeftModel.load_adapter` (hence `from_pretrained`) read back the facts of a local adapter's card.

    `save_pretrained` writes the card with `create_or_update_model_card`. `push_to_hub` (transformers) saves the
    adapter into a folder, writes the Hub's model card over that one, then uploads the folder with
    `_upload_modified_files`. Both are wrapped (once) to write :func:`peft_cc.model_card.model_card` for a CC-Tuning
    adapter; other adapters are left to PEFT.
    """
    from .config import CCConfig
    from .model_card import read_model_card_facts, write_model_card

    if getattr(PeftModel.create_or_update_model_card, "writes_cc_model_card", False):
        return
    create_card = PeftModel.create_or_update_model_card
    upload = PeftModel._upload_modified_files
    load_adapter = PeftModel.load_adapter

    @functools.wraps(load_adapter)
    def load_adapter_with_card_facts(self, model_id, adapter_name, *args, **kwargs):
        result = load_adapter(self, model_id, adapter_name, *args, **kwargs)
        if isinstance(self.peft_config.get(adapter_name), CCConfig) and os.path.isdir(model_id):
            facts = self.base_model.model_card_facts
            for key, value in read_model_card_facts(model_id).items():
                facts.setdefault(key, value)
        return result

    @functools.wraps(create_card)
    def create_cc_model_card(self, output_dir, *args, **kwargs):
        config = _cc_config(self)
        if config is None:
            return create_card(self, output_dir, *args, **kwargs)
        write_model_card(output_dir, config, self.base_model.model_card_facts)

    @functools.wraps(upload)
    def upload_with_cc_model_card(self, working_dir, repo_id, *args, **kwargs):
        config = _cc_config(self)
        if config is not None:
            write_model_card(working_dir, config, self.base_model.model_card_facts, repo_id=repo_id)
        return upload(self, working_dir, repo_id, *args, **kwargs)

    create_cc_model_card.writes_cc_model_card = True
    PeftModel.create_or_update_model_card = create_cc_model_card
    PeftModel._upload_modified_files = upload_with_cc_model_card
    PeftModel.load_adapter = load_adapter_with_card_facts


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
    _write_cc_model_cards()
    return peft_type
