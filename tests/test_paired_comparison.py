"""benchmarks/paired_comparison.py: per-item differences between systems of evaluator reports, seeds averaged."""

from __future__ import annotations

import json
import math

import paired_comparison as paired
import pytest


def system(nll: dict[str, list[float]], accuracy: list[float]) -> dict:
    """An evaluator report's system: MKQA gold NLL per item and language, XNLI log-likelihood accuracy in zh."""

    def items(scores: list[float], name: str) -> list[dict]:
        return [{"index": index, "scores": {name: score, "f1": 0.0}} for index, score in enumerate(scores)]

    return {
        "benchmarks": {
            "MKQA": {"languages": {lang: {"items": items(scores, "answer_nll")} for lang, scores in nll.items()}},
            "XNLI": {"languages": {"zh": {"items": items(accuracy, "accuracy_loglik")}}},
        }
    }


def write_report(path, systems: dict[str, dict]) -> str:
    path.write_text(json.dumps({"systems": systems}))
    return str(path)


def test_differences_are_paired_over_items_with_the_seeds_averaged(tmp_path):
    baseline = write_report(tmp_path / "base.json", {"base": system({"de": [2.0, 3.0], "en": [9.0, 9.0]}, [1, 0])})
    report = write_report(
        tmp_path / "new.json",
        {
            "new-seed0": system({"de": [1.0, 3.0], "en": [0.0, 0.0]}, [1, 1]),
            "new-seed1": system({"de": [2.0, 2.0], "en": [0.0, 0.0]}, [0, 1]),
            "other": system({"de": [100.0, 100.0]}, [0, 0]),
        },
    )
    rows = paired.compare(paired.parse_system(f"base={baseline}"), [paired.parse_system(f"new={report}:new-")])
    new = {row["benchmark"]: row for row in rows if row["system"] == "new"}
    # de items averaged over the seeds: 1.5 and 2.5, against 2.0 and 3.0 (English items are left out).
    assert new["MKQA"]["items"] == 2 and new["MKQA"]["seeds"] == 2
    assert new["MKQA"]["mean"] == 2.0 and new["MKQA"]["difference"] == -0.5
    assert new["MKQA"]["standard_error"] == 0.0  # both items moved by the same amount
    # XNLI in %: the seeds average to 50% and 100% against 100% and 0%: differences -50 and +100.
    assert new["XNLI"]["mean"] == 75.0 and new["XNLI"]["difference"] == 25.0
    assert math.isclose(new["XNLI"]["standard_error"], 75.0)  # stdev(-50, 100) / sqrt(2)
    table = paired.markdown(rows, "base")
    assert "| new | 2 | MKQA | gold NLL | 2 | 2.000 | -0.500 ± 0.000 |" in table


def test_bad_systems_are_refused_with_what_is_there(tmp_path):
    report = write_report(tmp_path / "r.json", {"lora-seed0": system({"de": [1.0, 2.0]}, [1, 0])})
    with pytest.raises(Exception, match=r"starts with 'cc-'.*lora-seed0"):
        paired.parse_system(f"cc={report}:cc-")
    with pytest.raises(Exception, match="NAME=RESULTS_JSON"):
        paired.parse_system(report)
    (tmp_path / "other.json").write_text(json.dumps({"steps": 120}))
    with pytest.raises(Exception, match="not an evaluator report"):
        paired.parse_system(f"x={tmp_path / 'other.json'}")
    uneven = write_report(
        tmp_path / "uneven.json",
        {"a": system({"de": [1.0, 2.0]}, [1, 0]), "b": system({"de": [1.0]}, [1, 0])},
    )
    with pytest.raises(ValueError, match="same MKQA items"):
        paired.item_scores(paired.parse_system(f"x={uneven}")[1])
