"""The API tables of the docs are the code's: option tables regenerated from the dataclasses' help, method names that
exist, and links that resolve.

- docs/method.md holds the table of `CCConfig`'s own fields (those `peft.LoraConfig` does not have) and
  docs/training.md that of `CCSFTConfig`'s own fields (those `trl.SFTConfig` does not have), exactly as
  :func:`options_table` renders them from `dataclasses.fields(...)` and each field's `metadata["help"]`. After changing
  a field, print the new tables with `python tests/test_docs_api.py` and paste them into the pages.
- Every method the `CCModel` table of docs/method.md names exists on `peft_cc.CCModel`.
- The sizing table of docs/measure.md is what the page's own code prints from the experiment's records (slow: ~10 s).
- Every relative link of the user docs points at a file of the repository (and, into a Markdown file, at a heading it
  has).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
USER_DOCS = ("docs/method.md", "docs/training.md", "docs/inference.md", "docs/evaluation.md", "docs/measure.md")
METHOD_TABLE_HEADING = "### `CCModel`"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, `|` escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"


def own_fields(config_class: type, parent_class: type) -> list[dataclasses.Field]:
    """The dataclass fields of `config_class` that `parent_class` does not have, in declaration order."""
    inherited = {field.name for field in dataclasses.fields(parent_class)}
    return [field for field in dataclasses.fields(config_class) if field.name not in inherited]


def options_table(config_class: type, parent_class: type) -> str:
    """The Markdown table of `config_class`'s own fields: name, type, default and the help of its metadata."""
    lines = ["| field | type | default | what it does |", "| --- | --- | --- | --- |"]
    # The resolved annotations (HfArgumentParser, once it has parsed a dataclass, leaves them in `field.type` too).
    hints = typing.get_type_hints(config_class)
    for field in own_fields(config_class, parent_class):
        hint = hints[field.name]
        kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        lines.append(
            f"| `{field.name}` | `{_cell(kind)}` | {_default(field)} | {_cell(field.metadata.get('help', ''))} |"
        )
    return "\n".join(lines)


def cc_config_table() -> str:
    from peft import LoraConfig

    from peft_cc import CCConfig

    return options_table(CCConfig, LoraConfig)


def cc_sft_config_table() -> str:
    from trl import SFTConfig

    from peft_cc import CCSFTConfig

    return options_table(CCSFTConfig, SFTConfig)


def page(path: str) -> str:
    return (REPO_ROOT / path).read_text(encoding="utf-8")


def test_every_own_field_has_help():
    from peft import LoraConfig
    from trl import SFTConfig

    from peft_cc import CCConfig, CCSFTConfig

    for config_class, parent in ((CCConfig, LoraConfig), (CCSFTConfig, SFTConfig)):
        fields = own_fields(config_class, parent)
        assert fields, config_class
        assert all(field.metadata.get("help") for field in fields), [f.name for f in fields if not f.metadata]


def test_method_page_holds_the_cc_config_table_generated_from_the_code():
    table = cc_config_table()
    assert table in page("docs/method.md"), (
        f"docs/method.md: paste this table (python tests/test_docs_api.py):\n{table}"
    )


def test_training_page_holds_the_cc_sft_config_table_generated_from_the_code():
    table = cc_sft_config_table()
    assert table in page("docs/training.md"), (
        f"docs/training.md: paste this table (python tests/test_docs_api.py):\n{table}"
    )


def documented_methods() -> list[str]:
    """The method names in the first cell of each row of the `CCModel` table of docs/method.md."""
    text = page("docs/method.md")
    assert METHOD_TABLE_HEADING in text, f"docs/method.md has no heading {METHOD_TABLE_HEADING!r}"
    section = text.split(METHOD_TABLE_HEADING, 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`(\w+)\(", row.split("|")[1])]


def test_every_documented_cc_model_method_exists():
    from peft_cc import CCModel

    names = documented_methods()
    assert len(names) >= 8, names
    missing = [name for name in names if not callable(getattr(CCModel, name, None))]
    assert not missing, f"docs/method.md names CCModel methods that do not exist: {missing}"


@pytest.mark.slow
def test_measure_page_sizing_table_is_what_its_code_prints():
    from test_docs_code_blocks import python_blocks

    source = next(code for _, code, reason in python_blocks("docs/measure.md") if "sizing_rows" in code and not reason)
    printed = subprocess.run(
        [sys.executable, "-c", source], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    table = "\n".join(line for line in printed.splitlines() if line.startswith("|"))
    assert table.count("\n") >= 3, printed
    assert table in page("docs/measure.md"), f"docs/measure.md: paste the table its code prints:\n{table}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(markdown: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", markdown.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE):
        anchor, number = github_anchor(heading), 1
        while anchor in anchors:  # a repeated heading gets -1, -2, ...
            anchor = f"{github_anchor(heading)}-{number}"
            number += 1
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("doc", USER_DOCS)
def test_relative_links_resolve(doc):
    path = REPO_ROOT / doc
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors_of(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{doc}: broken links: {broken}"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    print("docs/method.md, CCConfig:\n")
    print(cc_config_table())
    print("\ndocs/training.md, CCSFTConfig:\n")
    print(cc_sft_config_table())
