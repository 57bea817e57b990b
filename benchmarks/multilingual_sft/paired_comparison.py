"""Paired per-item comparison of systems: mean differences with standard errors, each system's seeds averaged.

Systems that answered the same items can be compared item by item: for every item, each system's score is averaged
over its seeds, and the comparison is the mean of the per-item differences against a baseline, with its standard
error. Pooled over several languages, the items of one index are the same item translated (the benchmarks are
parallel), so their differences are not independent: the standard error treats each item index as one unit (the
differences of its languages averaged; sample standard deviation of these over the indices / √indices). With one
language that is the ordinary paired standard error. A difference larger than twice its standard error is marked:
it is unlikely to be item noise (seed noise is only in it as far as the seeds were averaged).

Scores (as the evaluation wrote them): `answer_nll` (gold NLL, nats per answer token, lower is better); `acc` /
`accuracy_loglik` (the option with the highest log-likelihood); the generation metrics (`accuracy`, `exact_match`,
`f1`, `contains`, `rouge_l`). Fractions are shown in %.

    python benchmarks/multilingual_sft/paired_comparison.py \\
        --baseline "lora=outputs/multilingual_sft/smollm2/evaluation:lora-seed*" \\
        --system "cc-paper=outputs/multilingual_sft/smollm2/evaluation:cc-paper-seed?-monolingual"
    python benchmarks/multilingual_sft/paired_comparison.py \\
        --baseline "cc paper=benchmarks/multilingual_sft/results/multilingual_sft_smollm2.json:cc-mono-" \\
        --system "lora=benchmarks/multilingual_sft/results/multilingual_sft_smollm2.json:lora-"

Each system is `NAME=SOURCE[:PATTERN]`. SOURCE is a folder of evaluation records (:mod:`sft_evaluate`; the records
whose file names, without `.json`, match the glob PATTERN are the seeds) or an evaluator report of peft-cc 0.1
(`{"systems": ...}`, the earlier run of this folder's README; its systems whose names match are the seeds). A PATTERN
without a wildcard is a prefix; without PATTERN, every record or system is a seed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

ENGLISH = "en"
LABELS = {
    "answer_nll": "gold NLL (nats/token)",
    "acc": "acc %",
    "accuracy_loglik": "acc (log-lik.) %",
    "accuracy": "answer in output %",
    "exact_match": "exact match %",
    "f1": "F1 %",
    "contains": "contains %",
    "rouge_l": "ROUGE-L %",
}
LOWER_IS_BETTER = frozenset({"answer_nll"})
PERCENT = frozenset(LABELS) - {"answer_nll"}

Scores = dict[tuple[str, int], float]
"""`{(language, item index): score}` of one benchmark and metric."""
SystemScores = dict[tuple[str, str], Scores]
"""`{(benchmark, metric): Scores}` of one system (one seed, or its seeds averaged)."""


def scores_of_record(record: dict) -> SystemScores:
    """The item scores of an evaluation record (`{"items": {benchmark: {language: {index: {metric: value}}}}}`)."""
    scores: SystemScores = {}
    for benchmark, per_language in record["items"].items():
        for language, per_item in per_language.items():
            for index, metrics in per_item.items():
                for metric, value in metrics.items():
                    scores.setdefault((benchmark, metric), {})[language, int(index)] = float(value)
    return scores


def scores_of_report_system(results: dict) -> SystemScores:
    """The item scores of a system of a peft-cc 0.1 evaluator report (`benchmarks -> languages -> items`)."""
    scores: SystemScores = {}
    for benchmark, report in results["benchmarks"].items():
        for language, entry in report["languages"].items():
            for item in entry["items"]:
                for metric, value in item["scores"].items():
                    if metric in LABELS and value is not None:
                        scores.setdefault((benchmark, metric), {})[language, item["index"]] = float(value)
    return scores


def seed_average(seeds: Sequence[SystemScores]) -> SystemScores:
    """Every item's score averaged over the seeds.

    Raises:
        ValueError: no seed, or the seeds did not all score the same items of a benchmark and metric.
    """
    if not seeds:
        raise ValueError("A system needs at least one seed.")
    averaged: SystemScores = {}
    for key in seeds[0]:
        if any(key not in seed or seed[key].keys() != seeds[0][key].keys() for seed in seeds):
            raise ValueError(f"The seeds of a system did not all score the same {key[0]} items ({key[1]}).")
        averaged[key] = {item: statistics.fmean(seed[key][item] for seed in seeds) for item in seeds[0][key]}
    return averaged


def select(scores: Scores, languages: str | Sequence[str] = "non-English") -> Scores:
    """The scores of `languages`: a list of codes, `"non-English"` (every language but English) or `"all"`."""
    if languages == "all":
        return dict(scores)
    if languages == "non-English":
        return {item: value for item, value in scores.items() if item[0] != ENGLISH}
    return {item: value for item, value in scores.items() if item[0] in languages}


def unit_means(scores: Scores) -> list[float]:
    """Per item index (one item in all its languages), the mean of its scores: the independent units."""
    units: dict[int, list[float]] = {}
    for (_, index), value in scores.items():
        units.setdefault(index, []).append(value)
    return [statistics.fmean(values) for _, values in sorted(units.items())]


def sample_mean_and_standard_error(values: Sequence[float]) -> tuple[float, float]:
    """`(mean, standard error)` of independent values: their sample standard deviation / √count (at least 2)."""
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def beyond_two_standard_errors(difference: float, standard_error: float) -> bool:
    """Whether `difference` is larger in size than twice its standard error (the reports' bold)."""
    return abs(difference) > 2 * standard_error


def mean_and_standard_error(scores: Scores) -> tuple[float, float, int]:
    """`(mean, standard error, item indices)` of scores pooled over languages, an item index as one unit.

    Raises:
        ValueError: fewer than 2 item indices.
    """
    units = unit_means(scores)
    if len(units) < 2:
        raise ValueError(f"Need at least 2 items for a standard error, got {len(units)}.")
    return *sample_mean_and_standard_error(units), len(units)


def paired_difference(system: Scores, baseline: Scores) -> dict:
    """The per-item differences `system − baseline` over the items both scored, pooled as
    :func:`mean_and_standard_error` pools scores.

    Returns:
        `items` (language-item pairs), `units` (item indices), `mean` (the system's), `baseline_mean`,
        `difference`, `standard_error`, `sd` (the standard deviation of the per-unit differences) and `beyond_2se`
        (|difference| > 2 standard errors).

    Raises:
        ValueError: fewer than 2 item indices scored by both.
    """
    shared = sorted(system.keys() & baseline.keys())
    difference, standard_error, units = mean_and_standard_error(
        {item: system[item] - baseline[item] for item in shared}
    )
    return {
        "items": len(shared),
        "units": units,
        "mean": statistics.fmean(unit_means({item: system[item] for item in shared})),
        "baseline_mean": statistics.fmean(unit_means({item: baseline[item] for item in shared})),
        "difference": difference,
        "standard_error": standard_error,
        "sd": standard_error * math.sqrt(units),
        "beyond_2se": beyond_two_standard_errors(difference, standard_error),
    }


def in_display_units(row: dict, metric: str) -> dict:
    """`row` with its means, difference, standard error and sd in % for a fraction metric."""
    if metric not in PERCENT:
        return row
    scaled = ("mean", "baseline_mean", "difference", "standard_error", "sd")
    return {key: 100 * value if key in scaled else value for key, value in row.items()}


def compare(
    baseline: tuple[str, SystemScores],
    systems: Sequence[tuple[str, SystemScores]],
    languages: str | Sequence[str] = "non-English",
    metrics: Sequence[str] | None = None,
) -> list[dict]:
    """One row per system and (benchmark, metric) that the baseline also has, paired against the baseline (where
    both scored at least 2 items of `languages`).

    Args:
        baseline, systems: `(name, scores)`, the scores seed-averaged (:func:`seed_average`).
        languages: which languages to pool (see :func:`select`).
        metrics: the metrics to compare (default: every one both have).
    """
    baseline_name, baseline_scores = baseline
    rows = []
    for name, scores in systems:
        for (benchmark, metric), per_item in scores.items():
            if (benchmark, metric) not in baseline_scores or (metrics is not None and metric not in metrics):
                continue
            system_items = select(per_item, languages)
            baseline_items = select(baseline_scores[benchmark, metric], languages)
            if len({index for _, index in system_items.keys() & baseline_items.keys()}) < 2:
                continue  # e.g. a benchmark without those languages
            row = paired_difference(system_items, baseline_items)
            row = in_display_units(row, metric)
            rows.append({"system": name, "baseline": baseline_name, "benchmark": benchmark, "metric": metric, **row})
    return rows


def format_difference(row: dict) -> str:
    """`−0.070 ± 0.060`, in bold when the difference is beyond two standard errors."""
    text = f"{row['difference']:+.3f} ± {row['standard_error']:.3f}".replace("-", "−")
    return f"**{text}**" if row["beyond_2se"] else text


def markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`compare`'s rows; differences beyond two standard errors in bold."""
    lines = [
        "| system | baseline | benchmark | metric | items | mean | baseline | difference ± s.e. |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['system']} | {row['baseline']} | {row['benchmark']} | {LABELS.get(row['metric'], row['metric'])} "
            f"| {row['items']} | {row['mean']:.3f} | {row['baseline_mean']:.3f} | {format_difference(row)} |"
        )
    return "\n".join(lines)


def _matches(name: str, pattern: str) -> bool:
    wildcard = any(character in pattern for character in "*?[")
    return fnmatch.fnmatchcase(name, pattern) if wildcard else name.startswith(pattern)


def parse_system(text: str) -> tuple[str, SystemScores]:
    """`NAME=SOURCE[:PATTERN]` -> (name, the seed-averaged scores of the matching records or report systems)."""
    name, separator, location = text.partition("=")
    if not separator or not name or not location:
        raise argparse.ArgumentTypeError(f"Expected NAME=SOURCE[:PATTERN], got {text!r}.")
    source, _, pattern = location.partition(":")
    path = Path(source)
    if path.is_dir():
        records = {record.stem: json.loads(record.read_text()) for record in sorted(path.glob("*.json"))}
        available = {name: record for name, record in records.items() if "items" in record}  # not the report
        chosen = [key for key in available if _matches(key, pattern)]
        seeds = [scores_of_record(available[key]) for key in chosen]
    elif path.is_file():
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or "systems" not in report:
            raise argparse.ArgumentTypeError(
                f"{path} is neither a folder of evaluation records nor an evaluator report (no 'systems')."
            )
        available = report["systems"]
        chosen = [key for key in available if _matches(key, pattern)]
        seeds = [scores_of_report_system(available[key]) for key in chosen]
    else:
        raise argparse.ArgumentTypeError(f"{source} is neither a folder nor a file (in {text!r}).")
    if not seeds:
        raise argparse.ArgumentTypeError(f"Nothing in {source} matches {pattern!r}; it has {sorted(available)}.")
    return name, seed_average(seeds)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=parse_system, required=True, help="NAME=SOURCE[:PATTERN]")
    parser.add_argument("--system", type=parse_system, action="append", default=[], help="repeatable; as --baseline")
    parser.add_argument(
        "--languages", default="non-English", help="'non-English' (default), 'all', or comma-separated codes"
    )
    parser.add_argument("--output", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    languages = args.languages if args.languages in ("all", "non-English") else args.languages.split(",")
    rows = compare(args.baseline, args.system, languages)
    print(markdown(rows))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
