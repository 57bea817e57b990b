"""docs/reference.md names every option and public method of the package, as the code has them, and nothing removed.

The page is written by hand (there is no autodoc here), so this test keeps it honest: each configuration section lists
exactly the dataclass fields of its class, with their defaults; each documented method exists with the parameters the
page gives it, and every public method `CCModel` adds to `LoraModel` is documented; the options removed from peft-cc
0.1 appear nowhere on the page, and each of them is in the table of removed options of docs/decision_maker.md.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re

import pytest
from helpers import REPO_ROOT
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from trl import SFTConfig

import peft_cc
from peft_cc import CCConfig, CCModel, CCSFTConfig, CCSFTTrainer, VarianceReinforceConfig

PAGE = REPO_ROOT / "docs" / "reference.md"
DECISION_MAKER_PAGE = REPO_ROOT / "docs" / "decision_maker.md"

# The options of peft-cc 0.1 (commit e659d73) that the redesign of the config removed.
REMOVED = (
    "DECISION_MAKER_PRESETS",
    "decision_maker_init",
    "injection_scaling",
    "injection_gate_init",
    "gumbel_temperature_final",
    "soft_choice_fraction",
    "soft_choice",
    "decision_maker_start_fraction",
    "decision_maker_gradient",
    "choice_balance_weight",
    "decoder_num_layers",
    "decoder_hidden_size",
    "injection_gate_learning_rate",
    "variance_reinforce",  # the preset without the gate
)

# `- **`name`** (`type`, defaults to `value`): ...` or `- **`name`** (`type`, *optional*): ...`
FIELD = re.compile(r"^- \*\*`(?P<name>\w+)`\*\* \((?P<spec>.*?)\):", re.MULTILINE)
# `- `name(parameters)`...` or `- `trainer.name(parameters)`...`
METHOD = re.compile(r"^- `(?:trainer\.)?(?P<name>\w+)\((?P<params>[^`]*)\)`", re.MULTILINE)


def section(text: str, title: str) -> str:
    """The text of a page's `## <title>` section, its list items joined onto one line each."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no section `## {title}`"
    return re.sub(r"\n  (?=\S)", " ", match.group(1))  # a list item's continuation lines


def documented_fields(title: str) -> dict[str, object]:
    """`name -> default` of the fields listed in a section (`None` for an *optional* one)."""
    fields = {}
    for match in FIELD.finditer(section(PAGE.read_text(encoding="utf-8"), title)):
        default = re.search(r"defaults to `(.*?)`", match["spec"])
        if default is None:
            assert "*optional*" in match["spec"], f"{match['name']}: say its default or that it is *optional*"
        fields[match["name"]] = None if default is None else ast.literal_eval(default[1])
    return fields


def own_fields(cls: type, parent: type | None) -> dict[str, object]:
    """`name -> default` of the dataclass fields `cls` adds to `parent` (all of them without a parent)."""
    inherited = {field.name for field in dataclasses.fields(parent)} if parent is not None else set()
    return {field.name: field.default for field in dataclasses.fields(cls) if field.name not in inherited}


def parameter_names(params: str) -> list[str]:
    """The names in a documented parameter list such as `model, pairs, *, batch_size=8, **kwargs`."""
    names = [part.split("=")[0].strip() for part in params.split(",")]
    return [name for name in names if name and name != "*"]


def signature_names(function) -> list[str]:
    """The parameter names of `function` as `parameter_names` reads them from the page (`self` left out)."""
    names = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name == "self":
            continue
        prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
        names.append(prefix + parameter.name)
    return names


@pytest.mark.parametrize(
    ("title", "cls", "parent"),
    [
        ("`CCConfig`", CCConfig, LoraConfig),
        ("`VarianceReinforceConfig`", VarianceReinforceConfig, None),
        ("`CCSFTConfig`", CCSFTConfig, SFTConfig),
    ],
)
def test_every_option_is_documented_with_its_default(title, cls, parent):
    expected = own_fields(cls, parent)
    documented = documented_fields(title)
    assert sorted(documented) == sorted(expected), f"{title}: the page lists other fields than the class has"
    assert documented == expected, f"{title}: a documented default differs from the code's"


def test_every_public_method_of_ccmodel_is_documented_with_its_parameters():
    text = section(PAGE.read_text(encoding="utf-8"), "`CCModel`")
    documented = {match["name"]: match["params"] for match in METHOD.finditer(text)}
    added = {
        name
        for name, value in vars(CCModel).items()
        if not name.startswith("_") and callable(value) and not hasattr(LoraModel, name)
    }
    assert added, "CCModel adds no public method? The check would be empty."
    assert added <= documented.keys(), f"undocumented CCModel methods: {sorted(added - documented.keys())}"
    for name, params in documented.items():
        assert hasattr(CCModel, name), f"docs/reference.md documents CCModel.{name}, which does not exist"
        assert parameter_names(params) == signature_names(getattr(CCModel, name)), f"CCModel.{name}: parameters"


def test_trainer_methods_and_fit_transform_matrix_have_their_parameters():
    text = PAGE.read_text(encoding="utf-8")
    trainer = {match["name"]: match["params"] for match in METHOD.finditer(section(text, "`CCSFTTrainer`"))}
    assert {"initialize_decision_maker", "fit_transform_matrix"} <= trainer.keys()
    for name, params in trainer.items():
        assert parameter_names(params) == signature_names(getattr(CCSFTTrainer, name)), f"CCSFTTrainer.{name}"
    fit = re.search(r"`peft_cc\.fit_transform_matrix\(([^`]*)\)`", section(text, "`fit_transform_matrix`"))
    assert fit, "the signature of peft_cc.fit_transform_matrix"
    assert parameter_names(fit[1].replace("\n", " ")) == signature_names(peft_cc.fit_transform_matrix)


def test_the_page_names_no_removed_option():
    text = PAGE.read_text(encoding="utf-8")
    for name in REMOVED:
        assert not re.search(rf"\b{name}\b", text), f"docs/reference.md names the removed option {name}"


@pytest.mark.parametrize("name", REMOVED)
def test_each_removed_option_is_gone_and_in_the_table_of_removed_options(name):
    assert not hasattr(peft_cc, name)
    for cls in (CCConfig, CCSFTConfig):
        assert name not in {field.name for field in dataclasses.fields(cls)}, f"{cls.__name__}.{name} still exists"
    table = section(DECISION_MAKER_PAGE.read_text(encoding="utf-8"), "Removed options")
    assert re.search(rf"`(CCSFTConfig\.)?\"?{name}\b", table), f"{name} is not in decision_maker.md's removed options"


def test_python_blocks_of_the_page_compile():
    blocks = re.findall(r"^```python\n(.*?)^```$", PAGE.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    assert blocks
    for index, block in enumerate(blocks, start=1):
        compile(block, f"docs/reference.md:block{index}", "exec")
