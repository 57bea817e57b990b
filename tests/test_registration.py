"""`import peft_cc` registers CC-Tuning with PEFT as `PeftType.CC`, once, in any process."""

import importlib
import json

import peft
import pytest
from conftest import make_tiny_model
from helpers import cc_config, run_python
from peft import PeftModelForCausalLM, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_cc
from peft_cc import CCConfig, CCModel


def _registry_snapshot():
    return (
        list(PeftType.__members__),
        list(PeftType),
        dict(PEFT_TYPE_TO_TUNER_MAPPING),
        dict(PEFT_TYPE_TO_CONFIG_MAPPING),
        dict(PEFT_TYPE_TO_PREFIX_MAPPING),
    )


def _assert_registered_once():
    assert list(PeftType.__members__).count("CC") == 1
    assert [member for member in PeftType if member.value == "CC"] == [PeftType.CC]
    assert PeftType("CC") is PeftType.CC
    assert PeftType.CC == "CC" and PeftType.CC.value == "CC"
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.CC] is CCModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.CC] is CCConfig
    # A config read from JSON looks the type up by its string value.
    assert PEFT_TYPE_TO_CONFIG_MAPPING["CC"] is CCConfig


def test_registered_on_import():
    """After `import peft_cc`, PeftType.CC exists and maps to CCModel / CCConfig."""
    _assert_registered_once()
    assert CCConfig().peft_type is PeftType.CC


@pytest.mark.parametrize(
    "again",
    [
        lambda: importlib.import_module("peft_cc"),
        lambda: importlib.reload(peft_cc),
        lambda: peft_cc.register(CCConfig, CCModel),
    ],
    ids=["import-again", "reload", "register-again"],
)
def test_registration_is_idempotent(again):
    """Importing again, reloading the package or calling register() again changes nothing in PEFT's registry."""
    before = _registry_snapshot()
    again()
    again()
    assert _registry_snapshot() == before
    assert peft_cc.register(CCConfig, CCModel) is PeftType.CC
    _assert_registered_once()


def test_get_peft_model_returns_cc_model(architecture):
    """get_peft_model with a CCConfig gives a PeftModelForCausalLM whose tuner is a CCModel, for every architecture."""
    model = peft.get_peft_model(make_tiny_model(architecture), cc_config())
    assert isinstance(model, PeftModelForCausalLM)
    assert isinstance(model.base_model, CCModel)
    assert model.peft_type is PeftType.CC
    assert isinstance(model.peft_config["default"], CCConfig)


def test_fresh_process_sees_registration():
    """A new interpreter that only does `import peft_cc` finds the method in PEFT's registry."""
    code = """
import json
import peft_cc
from peft import PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
print(json.dumps({
    "members": list(PeftType.__members__).count("CC"),
    "lookup": PeftType("CC") is PeftType.CC,
    "tuner": PEFT_TYPE_TO_TUNER_MAPPING[PeftType.CC] is peft_cc.CCModel,
    "config": PEFT_TYPE_TO_CONFIG_MAPPING["CC"] is peft_cc.CCConfig,
}))
"""
    result = json.loads(run_python(code).strip().splitlines()[-1])
    assert result == {"members": 1, "lookup": True, "tuner": True, "config": True}
