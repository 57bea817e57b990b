"""Reading the `adapter_config.json` of adapters saved by peft-cc 0.1.

peft-cc 0.1 (up to commit e659d73) configured the Decision Maker with nine separate options; five of them were
measured and did not help, and the other four made up the two settings that remain, now selected by
`CCConfig.decision_maker`. An old adapter whose options are one of those two settings loads as that setting; any
other combination fails with an error that says how to load it.
"""

from __future__ import annotations

from typing import Any

LAST_COMMIT_WITH_OLD_OPTIONS = "e659d73"

# Option of peft-cc 0.1 -> its value in the paper's method (the 0.1 default).
_OLD_DEFAULTS: dict[str, Any] = {
    "decision_maker_init": "normal",
    "injection_scaling": "none",
    "injection_gate_init": None,
    "gumbel_temperature_final": None,
    "soft_choice_fraction": 0.0,
    "soft_choice": "gumbel",
    "decision_maker_start_fraction": 0.0,
    "decision_maker_gradient": "straight_through",
    "choice_balance_weight": 0.0,
}
# Bookkeeping of 0.1 (the decoder's shape), checked now by the shapes of the stored weights.
_OLD_BOOKKEEPING = ("decoder_num_layers", "decoder_hidden_size")


def translate_legacy_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` of a saved CC-Tuning config, with peft-cc 0.1's Decision Maker options turned into
    `decision_maker` (+ `variance_reinforce_config`); fields of a current config pass through unchanged.

    Raises:
        ValueError: for an old adapter whose options match neither remaining setting.
    """
    old = {name: fields[name] for name in _OLD_DEFAULTS if name in fields}
    translated = {name: value for name, value in fields.items() if name not in old and name not in _OLD_BOOKKEEPING}
    if not old:
        return translated
    settings = {**_OLD_DEFAULTS, **old}
    changed = {name: value for name, value in settings.items() if value != _OLD_DEFAULTS[name]}
    if not changed:
        return {**translated, "decision_maker": "paper"}
    gated = {"decision_maker_init", "decision_maker_gradient", "injection_gate_init"}
    if (
        settings["decision_maker_init"] == "english_variance"
        and settings["decision_maker_gradient"] == "score_function"
        and settings["injection_gate_init"] is not None
        and set(changed) <= gated | {"decision_maker_start_fraction"}
    ):
        return {
            **translated,
            "decision_maker": "variance_reinforce_gated",
            "variance_reinforce_config": {
                "start_fraction": settings["decision_maker_start_fraction"],
                "gate_init": settings["injection_gate_init"],
            },
        }
    shown = ", ".join(f"{name}={value!r}" for name, value in sorted(changed.items()))
    raise ValueError(
        f"This CC-Tuning adapter was saved by peft-cc 0.1 with Decision Maker options that no longer exist ({shown}). "
        "They were measured and removed (docs/decision_maker.md lists their results); the remaining settings are "
        "`decision_maker='paper'` and `decision_maker='variance_reinforce_gated'`. Load this adapter with the "
        f"peft-cc version that saved it (commit {LAST_COMMIT_WITH_OLD_OPTIONS}), or retrain it with one of the "
        "remaining settings."
    )
