"""Sizing the multilingual SFT experiment from a pilot, and planning its invocations with their expected wall times.

From a pilot's finished runs (a model folder of `multilingual_sft.py` run with small sizes):

- the standard deviation, over item indices, of the paired per-item differences pooled over the non-English
  languages (:mod:`paired_comparison`), hence the item indices needed for twice the standard error to reach a
  target: `n = (2 sd / target)²` (0.05 nats per token for gold NLL, 4 points for accuracy);
- the seconds per training step of each system and per evaluated item (one item in one language) of each part
  (`<benchmark> loglik` or `<benchmark> generation`) and kind of model (no connection, or a CC adapter with the
  monolingual, off or bilingual connection).

`plan` multiplies the rates by the experiment's sizes, invocation by invocation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import paired_comparison as paired
from sft_evaluate import LOGLIK_METRIC, EvaluationSettings, evaluation_parts
from sft_mixture import EvaluationSizes
from sft_report import load_evaluations, load_trainings, paired_rows

TARGET_TWO_SE = {"answer_nll": 0.05, "acc": 4.0}
"""Twice the standard error that a pooled non-English paired difference should reach (accuracy in points)."""


def items_needed(sd: float, metric: str) -> int:
    """Item indices for which `2 sd / √n` reaches the metric's target."""
    return math.ceil((2 * sd / TARGET_TWO_SE[metric]) ** 2)


def sizing(folder: Path) -> list[dict]:
    """Per pilot comparison and benchmark (log-likelihood metric): the sd of the per-unit differences and the item
    indices needed."""
    loglik = {benchmark: (metric,) for benchmark, metric in LOGLIK_METRIC.items()}
    rows = paired_rows(load_evaluations(folder), loglik)
    return [
        {
            "comparison": f"{row['system']} − {row['baseline']}",
            "benchmark": row["benchmark"],
            "metric": row["metric"],
            "units": row["units"],
            "sd": row["sd"],
            "items_needed": items_needed(row["sd"], row["metric"]),
        }
        for row in rows
    ]


def connection_kind(connection: str | None) -> str:
    return "none" if connection is None else connection


def rates(folder: Path, clock: str = "seconds") -> dict[str, dict[str, float]]:
    """`{"step": {system: seconds per step}, "fixed": {system: seconds besides the steps},
    "item": {"<part>|<connection kind>": seconds per item}, "loading": {"evaluation": seconds}}` of a pilot.

    Args:
        clock: `"seconds"` (wall time) or `"cpu_seconds"` (the process's CPU time).
    """
    measured: dict[str, dict[str, list[float]]] = {"step": {}, "fixed": {}, "item": {}, "loading": {}}
    for record in load_trainings(folder).values():
        system = record["settings"]["system"]["name"]
        steps = record["settings"]["steps"]
        seconds = record[clock]
        measured["step"].setdefault(system, []).append(seconds["training"] / steps)
        measured["fixed"].setdefault(system, []).append(seconds["total"] - seconds["training"])
    for variant, records in load_evaluations(folder).items():
        for record in records.values():
            kind = connection_kind(variant.connection)
            for part, count in record["item_counts"].items():
                measured["item"].setdefault(f"{part}|{kind}", []).append(record[clock][part] / count)
            measured["loading"].setdefault("evaluation", []).append(record[clock]["loading"])
    return {
        group: {key: statistics.fmean(values) for key, values in by_key.items()} for group, by_key in measured.items()
    }


def evaluation_seconds(
    settings: EvaluationSettings, sizes: EvaluationSizes, connection: str | None, measured: dict
) -> float:
    """Expected seconds of one evaluation: items × seconds per item of each part, plus loading."""
    seconds = measured["loading"].get("evaluation", 0.0)
    for part in evaluation_parts(settings, sizes):
        key = f"{part.name}|{connection_kind(connection)}"
        rate = measured["item"].get(key, measured["item"].get(f"{part.name}|none"))
        if rate is None:
            raise ValueError(f"The pilot has no rate for {key}: measure it first.")
        seconds += rate * (part.stop - part.start) * len(part.languages)
    return seconds


def training_seconds(system: str, steps: int, measured: dict) -> float:
    """Expected seconds of one training: steps × seconds per step, plus the fixed part (loading, Transform Matrix)."""
    if system not in measured["step"]:
        raise ValueError(f"The pilot has no training rate for {system}: measure it first.")
    return steps * measured["step"][system] + measured["fixed"][system]


def format_sizing(rows: Sequence[dict]) -> str:
    lines = ["| comparison | benchmark | metric | pilot items | sd of unit differences | items needed |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        lines.append(
            f"| {row['comparison']} | {row['benchmark']} | {paired.LABELS[row['metric']]} | {row['units']} | "
            f"{row['sd']:.3f} | {row['items_needed']} |"
        )
    return "\n".join(lines)


def plan(args, measured: dict) -> str:
    """The invocations of the experiment (`multilingual_sft.invocations`) with their expected seconds at the rates
    `measured` (:func:`rates`), and the total."""
    from multilingual_sft import command_line, evaluation_settings, invocations, sizes_for

    settings = evaluation_settings(args)
    lines = ["| invocation | expected s |", "| --- | --- |"]
    total = 0.0
    for command, system, seed, connection in invocations(args):
        if command == "train":
            seconds = training_seconds(system.name, args.steps, measured)
        else:
            seconds = evaluation_seconds(settings, sizes_for(args, connection), connection, measured)
        total += seconds
        lines.append(f"| `{command_line(args, command, system, seed, connection)}` | {seconds:.0f} |")
    lines.append(f"| total | {total:.0f} ({total / 3600:.2f} h) |")
    return "\n".join(lines)
