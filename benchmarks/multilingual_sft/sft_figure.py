"""A figure of the multilingual SFT experiment: per-seed paired differences of several models' reports, side by side.

Each panel is one model's `report.json` (:func:`sft_report.write_report`); each comparison of it gets one point per
seed (its item-level paired difference, with twice its standard error as the bar) and the across-seed mean (a
diamond, with twice its standard error across seeds as the bar), on one benchmark's log-likelihood metric (the one
metric of the reports' per-seed tables):

    python benchmarks/multilingual_sft/sft_figure.py --output docs/figures/multilingual_sft_mkqa.png
    python benchmarks/multilingual_sft/sft_figure.py --benchmark XNLI --output xnli.png \\
        --report "SmolLM2=benchmarks/multilingual_sft/results/multilingual_sft_smollm2_run1/report.json"

Reads only the reports given (default: the two models' main runs in this folder's `results/`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from paired_comparison import LABELS, LOWER_IS_BETTER

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_REPORTS = (
    f"SmolLM2-135M-Instruct={RESULTS / 'multilingual_sft_smollm2_run1' / 'report.json'}",
    f"Gemma-3-270M={RESULTS / 'multilingual_sft_gemma3_run1' / 'report.json'}",
)
# `(system, baseline)` as the reports name them.
DEFAULT_COMPARISONS = (
    ("lora", "base"),
    ("cc-paper", "lora"),
    ("cc-paper-noen", "lora"),
    ("cc-paper", "cc-paper (off)"),
)


def comparison_points(report: dict, benchmark: str, comparison: tuple[str, str]) -> tuple[list[dict], dict | None]:
    """`(per-seed rows, across-seed row or None)` of one comparison on `benchmark`."""

    def matches(row: dict) -> bool:
        return (row["system"], row["baseline"], row["benchmark"]) == (*comparison, benchmark)

    per_seed = sorted((row for row in report["differences_per_seed"] if matches(row)), key=lambda row: row["seed"])
    across = next((row for row in report["differences_across_seeds"] if matches(row)), None)
    return per_seed, across


def plot(
    reports: Sequence[tuple[str, dict]], benchmark: str, comparisons: Sequence[tuple[str, str]], path: Path
) -> None:
    """One panel per report: per comparison, each seed's difference ± 2 s.e. and the across-seed mean ± 2 s.e."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4.2), squeeze=False)
    seeds: set[int] = set()
    for axis, (title, report) in zip(axes[0], reports):
        metric = None
        for position, comparison in enumerate(comparisons):
            per_seed, across = comparison_points(report, benchmark, comparison)
            metric = next((row["metric"] for row in per_seed), metric)
            for row in per_seed:
                x = position - 0.2 + 0.1 * row["seed"]
                axis.errorbar(x, row["difference"], yerr=2 * row["standard_error"], fmt="o", color=f"C{row['seed']}")
                seeds.add(row["seed"])
            if across is not None:
                y, bar = across["difference"], 2 * across["standard_error"]
                axis.errorbar(position + 0.2, y, yerr=bar, fmt="D", color="k", capsize=3)
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(comparisons)), [f"{system}\n− {baseline}" for system, baseline in comparisons])
        axis.tick_params(axis="x", labelsize=8)
        if metric is None:
            raise ValueError(f"The report of {title} has no per-seed {benchmark} rows of these comparisons.")
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        axis.set(title=title, ylabel=f"{benchmark} {LABELS[metric]}, difference ({better} is better)")
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=f"C{seed}", label=f"seed {seed} ± 2 s.e. (items)")
        for seed in sorted(seeds)
    ]
    handles.append(plt.Line2D([], [], marker="D", linestyle="", color="k", label="mean over seeds ± 2 s.e. (seeds)"))
    axes[0][-1].legend(handles=handles, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_report(text: str) -> tuple[str, dict]:
    """`TITLE=PATH` -> (title, the report)."""
    title, separator, path = text.partition("=")
    if not separator or not title or not path:
        raise argparse.ArgumentTypeError(f"Expected TITLE=PATH, got {text!r}.")
    return title, json.loads(Path(path).read_text())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=parse_report, action="append", help="TITLE=PATH of a report.json; repeatable")
    parser.add_argument("--benchmark", default="MKQA", help="MKQA, XNLI, XStoryCloze (or XQuAD, XLSum, MMMLU)")
    parser.add_argument("--output", required=True, help="the PNG file to write")
    args = parser.parse_args(argv)
    reports = args.report or [parse_report(text) for text in DEFAULT_REPORTS]
    plot(reports, args.benchmark, DEFAULT_COMPARISONS, Path(args.output))


if __name__ == "__main__":
    main()
