"""benchmarks/multilingual_sft/paired_comparison.py: per-item differences between systems, seeds averaged, standard
errors with an item index (in all its languages) as one unit, and the 2-standard-error mark."""

from __future__ import annotations

import json
import math

import paired_comparison as paired
import pytest


def report_system(nll: dict[str, list[float]], accuracy: list[float]) -> dict:
    """A system of a peft-cc 0.1 evaluator report: MKQA gold NLL per item and language, XNLI accuracy in zh."""

    def items(scores: list[float], name: str) -> list[dict]:
        return [{"index": index, "scores": {name: score, "f1": None}} for index, score in enumerate(scores)]

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
    baseline = write_report(
        tmp_path / "base.json", {"base": report_system({"de": [2.0, 3.0], "en": [9.0, 9.0]}, [1, 0])}
    )
    report = write_report(
        tmp_path / "new.json",
        {
            "new-seed0": report_system({"de": [1.0, 3.0], "en": [0.0, 0.0]}, [1, 1]),
            "new-seed1": report_system({"de": [2.0, 2.0], "en": [0.0, 0.0]}, [0, 1]),
            "other": report_system({"de": [100.0, 100.0]}, [0, 0]),
        },
    )
    rows = paired.compare(paired.parse_system(f"base={baseline}"), [paired.parse_system(f"new={report}:new-")])
    new = {row["benchmark"]: row for row in rows}
    assert {row["metric"] for row in rows} == {"answer_nll", "accuracy_loglik"}  # f1 None: left out
    # de items averaged over the seeds: 1.5 and 2.5, against 2.0 and 3.0 (English items are left out).
    assert new["MKQA"]["items"] == 2 and new["MKQA"]["units"] == 2
    assert new["MKQA"]["mean"] == 2.0 and new["MKQA"]["baseline_mean"] == 2.5 and new["MKQA"]["difference"] == -0.5
    assert new["MKQA"]["standard_error"] == 0.0 and new["MKQA"]["beyond_2se"]  # both items moved by the same amount
    # XNLI in %: the seeds average to 50% and 100% against 100% and 0%: differences -50 and +100.
    assert new["XNLI"]["mean"] == 75.0 and new["XNLI"]["difference"] == 25.0
    assert math.isclose(new["XNLI"]["standard_error"], 75.0)  # stdev(-50, 100) / sqrt(2)
    assert not new["XNLI"]["beyond_2se"]
    table = paired.markdown(rows)
    assert "| new | base | MKQA | gold NLL (nats/token) | 2 | 2.000 | 2.500 | **−0.500 ± 0.000** |" in table
    english = paired.compare(
        paired.parse_system(f"base={baseline}"), [paired.parse_system(f"n={report}:new-")], ["en"]
    )
    assert [(row["benchmark"], row["difference"]) for row in english] == [("MKQA", -9.0)]


def test_the_languages_of_one_item_are_one_unit_of_the_standard_error():
    # Two items in two languages; the languages of an item moved together: 2 units, not 4 independent items.
    baseline = {("de", 0): 1.0, ("zh", 0): 1.0, ("de", 1): 1.0, ("zh", 1): 1.0}
    system = {("de", 0): 2.0, ("zh", 0): 2.0, ("de", 1): 0.0, ("zh", 1): 0.0}
    row = paired.paired_difference(system, baseline)
    assert row["items"] == 4 and row["units"] == 2 and row["difference"] == 0.0
    assert math.isclose(row["standard_error"], 1.0)  # stdev(+1, -1) / sqrt(2); as 4 items it would be 0.577
    assert math.isclose(row["sd"], math.sqrt(2))
    # Beyond two standard errors, or not.
    assert paired.paired_difference({("de", 0): 1.1, ("de", 1): 1.3}, {("de", 0): 1.0, ("de", 1): 1.0})["beyond_2se"]
    assert not paired.paired_difference({("de", 0): 1.1, ("de", 1): 0.8}, {("de", 0): 1.0, ("de", 1): 1.0})[
        "beyond_2se"
    ]
    with pytest.raises(ValueError, match="at least 2 items"):
        paired.paired_difference({("de", 0): 1.0, ("zh", 0): 2.0}, {("de", 0): 1.0, ("zh", 0): 1.0})


def test_beyond_two_standard_errors_is_strict_and_two_sided():
    assert paired.beyond_two_standard_errors(-0.21, 0.1) and paired.beyond_two_standard_errors(0.21, 0.1)
    assert not paired.beyond_two_standard_errors(0.2, 0.1)  # exactly two standard errors is not beyond
    assert not paired.beyond_two_standard_errors(0.0, 0.0)  # no difference, however certain, is not bold


def test_a_folder_of_evaluation_records_is_read_by_name_pattern(tmp_path):
    def record(values: list[float]) -> dict:
        return {"items": {"XNLI": {"ar": {str(i): {"acc": v} for i, v in enumerate(values)}}}}

    for name, values in {
        "cc-seed0-monolingual": [1, 1, 0],
        "cc-seed1-monolingual": [1, 0, 0],
        "cc-seed0-off": [0, 0, 0],
        "lora-seed0": [0, 1, 0],
    }.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(record(values)))
    (tmp_path / "report.json").write_text(json.dumps({"levels": []}))  # the experiment's report: not a record
    assert len(paired.parse_system(f"all={tmp_path}")[1]["XNLI", "acc"]) == 3
    name, scores = paired.parse_system(f"cc={tmp_path}:cc-seed?-monolingual")
    assert name == "cc" and scores["XNLI", "acc"] == {("ar", 0): 1.0, ("ar", 1): 0.5, ("ar", 2): 0.0}
    rows = paired.compare(paired.parse_system(f"lora={tmp_path}:lora-"), [(name, scores)])
    assert rows[0]["difference"] == pytest.approx(100 * 0.5 / 3)


def test_bad_systems_are_refused_with_what_is_there(tmp_path):
    report = write_report(tmp_path / "r.json", {"lora-seed0": report_system({"de": [1.0, 2.0]}, [1, 0])})
    with pytest.raises(Exception, match=r"matches 'cc-'.*lora-seed0"):
        paired.parse_system(f"cc={report}:cc-")
    with pytest.raises(Exception, match="NAME=SOURCE"):
        paired.parse_system(report)
    (tmp_path / "other.json").write_text(json.dumps({"steps": 120}))
    with pytest.raises(Exception, match="nor an evaluator report"):
        paired.parse_system(f"x={tmp_path / 'other.json'}")
    with pytest.raises(Exception, match="neither a folder nor a file"):
        paired.parse_system(f"x={tmp_path / 'missing'}")
    uneven = write_report(
        tmp_path / "uneven.json",
        {"a": report_system({"de": [1.0, 2.0]}, [1, 0]), "b": report_system({"de": [1.0]}, [1, 0])},
    )
    with pytest.raises(ValueError, match="same MKQA items"):
        paired.parse_system(f"x={uneven}")
