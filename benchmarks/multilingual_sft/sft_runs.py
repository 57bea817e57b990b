"""The systems of the multilingual SFT experiment, and a finished-run record that makes every invocation resumable.

A run (one system and seed trained, or one adapter evaluated with one connection) writes its result as one JSON
record, atomically, when it has finished. Invoked again with the same settings, it finds the record and is skipped;
with other settings, it refuses to run rather than mix two experiments in one folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class System:
    """A system of the experiment.

    Attributes:
        name: its name in the results, e.g. `"cc-paper"`.
        kind: `"base"` (the model zero-shot), `"lora"` (vanilla LoRA SFT, TRL's `SFTTrainer`) or `"cc"` (CC-Tuning,
            `CCSFTTrainer`).
        cc_options: the `CCConfig` options besides LoRA's, for a CC system.
        description: what it is, for the report. It is part of each run's recorded settings: edited, it makes the
            finished runs read as runs with other settings.
    """

    name: str
    kind: str
    cc_options: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def trained(self) -> bool:
        return self.kind != "base"

    @property
    def connections(self) -> tuple[str | None, ...]:
        """The connections every seed is evaluated with (`None`: the model has none); `bilingual` is added for the
        seeds of `--bilingual-seeds`."""
        return ("monolingual", "off") if self.kind == "cc" else (None,)


SYSTEMS: dict[str, System] = {
    system.name: system
    for system in (
        System("base", "base", description="the model zero-shot"),
        System("lora", "lora", description="vanilla multilingual LoRA SFT"),
        System("cc-paper", "cc", {}, "CC-Tuning with the paper's settings (`CCConfig()` defaults)"),
        System(
            "cc-paper-noen",
            "cc",
            {"english_gradients": False},
            "`cc-paper` with `english_gradients=False` (no gradient through the English pass)",
        ),
    )
}


def run_name(system: str, seed: int | None, connection: str | None = None) -> str:
    """`base`, `lora-seed0`, `cc-paper-seed1`, `cc-paper-seed1-off`: a run's name (and file name)."""
    name = system if seed is None else f"{system}-seed{seed}"
    return name if connection is None else f"{name}-{connection}"


def read_finished(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The finished record at `path` if there is one (the run is then skipped), else `None`.

    Raises:
        ValueError: the record there was made with other `settings` (the message names the differences).
    """
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("settings") != _jsonable(settings):
        old = record.get("settings") or {}
        new = _jsonable(settings)
        differences = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
        raise ValueError(
            f"{path} is a finished run with other settings ({', '.join(differences)} differ): remove it to run "
            "again with these settings, or give another --output-dir."
        )
    return record


def write_finished(path: Path, settings: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Write `{"settings": settings, **result}` to `path` atomically (a whole file renamed into place); returns it
    as it reads back (keys as strings), as :func:`read_finished` would."""
    record = _jsonable({"settings": settings, **result})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}-", delete=False) as staged:
        staged.write(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    os.replace(staged.name, path)
    return record


def _jsonable(value: Any) -> Any:
    """`value` as JSON reads it back (tuples as lists, keys as strings), so that settings compare equal."""
    return json.loads(json.dumps(value))
