"""Paired per-item comparison of systems in evaluator reports, each system's seeds averaged item by item.

With 16 items per language, a difference between two systems' averages is hard to read from the averages alone. Both
systems answered the same items, so the differences can be paired: for every non-English item, each system's score
is averaged over its seeds, and the table gives the mean of the per-item differences against a baseline and its
standard error (sample standard deviation over the items / √items). A difference more than about two standard errors
from 0 is unlikely to be item noise (seed noise is only in it as far as the seeds were averaged).

Scores: `answer_nll` (gold NLL, nats per token, lower is better) for the generative benchmarks, `accuracy_loglik`
(the option with the highest log-likelihood, in %) for the multiple-choice ones: the figures that do not depend on
how the generated text is parsed.

    python benchmarks/paired_comparison.py \\
        --baseline "cc paper=docs/results/multilingual_sft_smollm2.json:cc-mono-" \\
        --system "lora=docs/results/multilingual_sft_smollm2.json:lora-" \\
        --system "gate closed=docs/results/multilingual_sft_smollm2_gate_closed.json"

Each system is `NAME=RESULTS_JSON[:PREFIX]`: the systems of that report whose names start with `PREFIX` (default:
all of them) are its seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

SCORES = {"answer_nll": "gold NLL", "accuracy_loglik": "acc (log-lik.) %"}
ENGLISH = "en"


def parse_system(text: str) -> tuple[str, list[dict]]:
    """`NAME=RESULTS_JSON[:PREFIX]` -> (name, the per-seed system results)."""
    name, separator, location = text.partition("=")
    if not separator or not name or not location:
        raise argparse.ArgumentTypeError(f"Expected NAME=RESULTS_JSON[:PREFIX], got {text!r}.")
    path, _, prefix = location.partition(":")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a file (in {text!r}).")
    report = json.loads(Path(path).read_text())
    if not isinstance(report, dict) or "systems" not in report:
        raise argparse.ArgumentTypeError(f"{path} is not an evaluator report (no 'systems'; see docs/evaluation.md).")
    systems = report["systems"]
    seeds = [results for key, results in systems.items() if key.startswith(prefix)]
    if not seeds:
        raise argparse.ArgumentTypeError(f"No system of {path} starts with {prefix!r}; it has {sorted(systems)}.")
    return name, seeds


def item_scores(seeds: Sequence[dict]) -> dict[tuple[str, str], dict[tuple[str, int], float]]:
    """`{(benchmark, score): {(language, item index): score averaged over the seeds}}`, non-English items only.

    Raises:
        ValueError: if the seeds did not all score the same items.
    """
    collected: dict[tuple[str, str], dict[tuple[str, int], list[float]]] = {}
    for results in seeds:
        for benchmark, report in results["benchmarks"].items():
            for language, entry in report["languages"].items():
                if language == ENGLISH:
                    continue
                for item in entry["items"]:
                    for score in SCORES.keys() & item["scores"].keys():
                        per_item = collected.setdefault((benchmark, score), {})
                        per_item.setdefault((language, item["index"]), []).append(item["scores"][score])
    for (benchmark, _), per_item in collected.items():
        if any(len(values) != len(seeds) for values in per_item.values()):
            raise ValueError(f"The seeds of a system did not all score the same {benchmark} items.")
    return {
        key: {item: statistics.fmean(values) for item, values in per_item.items()}
        for key, per_item in collected.items()
    }


def paired_difference(system: dict[tuple[str, int], float], baseline: dict[tuple[str, int], float]) -> dict:
    """Mean and standard error of the per-item differences `system − baseline` over the items both scored."""
    shared = sorted(system.keys() & baseline.keys())
    if len(shared) < 2:
        raise ValueError(f"Need at least 2 items scored by both systems, got {len(shared)}.")
    differences = [system[item] - baseline[item] for item in shared]
    return {
        "items": len(shared),
        "mean": statistics.fmean(system[item] for item in shared),
        "difference": statistics.fmean(differences),
        "standard_error": statistics.stdev(differences) / math.sqrt(len(differences)),
    }


def compare(baseline: tuple[str, list[dict]], systems: Sequence[tuple[str, list[dict]]]) -> list[dict]:
    """One row per system and (benchmark, score) that the baseline also has; accuracies in %."""
    baseline_scores = item_scores(baseline[1])
    rows = []
    for name, seeds in [baseline, *systems]:
        for (benchmark, score), per_item in item_scores(seeds).items():
            if (benchmark, score) not in baseline_scores:
                continue
            row = paired_difference(per_item, baseline_scores[benchmark, score])
            if score == "accuracy_loglik":
                row.update(mean=100 * row["mean"], difference=100 * row["difference"])
                row["standard_error"] *= 100
            rows.append({"system": name, "seeds": len(seeds), "benchmark": benchmark, "score": score, **row})
    return rows


def markdown(rows: Sequence[dict], baseline_name: str) -> str:
    lines = [
        f"| system | seeds | benchmark | score | items | mean | difference vs {baseline_name} ± s.e. |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        difference = (
            "—" if row["system"] == baseline_name else f"{row['difference']:+.3f} ± {row['standard_error']:.3f}"
        )
        lines.append(
            f"| {row['system']} | {row['seeds']} | {row['benchmark']} | {SCORES[row['score']]} | {row['items']} | "
            f"{row['mean']:.3f} | {difference} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=parse_system, required=True, help="NAME=RESULTS_JSON[:PREFIX]")
    parser.add_argument("--system", type=parse_system, action="append", default=[], help="repeatable; as --baseline")
    parser.add_argument("--output", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    rows = compare(args.baseline, args.system)
    print(markdown(rows, args.baseline[0]))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
