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


def test_importing_the_package_changes_no_class_of_peft_trl_or_transformers():
    """Every attribute of every class of PEFT, TRL and transformers loaded before `import peft_cc` (and its trainer,
    commands and lm-eval model type) is the same object afterwards; only PeftType gains its `CC` member."""
    code = """
import inspect, json, sys
import lm_eval.api.registry, peft, peft.mapping, transformers, trl, trl.trainer.sft_trainer
from transformers import Trainer

def snapshot():
    classes = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("peft", "trl", "transformers")):
            continue
        for value in list(vars(module).values()):
            if inspect.isclass(value) and value.__module__ == name:
                classes[f"{name}.{value.__qualname__}"] = {key: id(item) for key, item in vars(value).items()}
    return classes

before = snapshot()
import peft_cc, peft_cc.sft_trainer, peft_cc.lm_eval.model, peft_cc.scripts.sft, peft_cc.scripts.compare
after = snapshot()
changed = {}
for name, attributes in before.items():
    now = after[name]
    differing = sorted(key for key in attributes.keys() | now.keys() if attributes.get(key) != now.get(key))
    if differing:
        changed[name] = differing
print(json.dumps(changed))
"""
    changed = json.loads(run_python(code).strip().splitlines()[-1])
    assert changed == {"peft.utils.peft_types.PeftType": ["CC"]}
