"""Evaluation reports: one or more systems' results as JSON, a Markdown table and a plot, side by side.

A system is one evaluated configuration (a model, with or without an adapter, with one connection), and its
results are what :func:`peft_cc.evaluation.evaluate` returns. :func:`write_report` writes, for an output path
`out/results.json`:

- `out/results.json`: `{"format": "peft-cc-evaluation/1", "systems": {name: results, ...}}`;
- `out/results.md`: a summary table (each benchmark's main figure averaged over non-English languages and over all)
  and one table per benchmark (its table metrics per language, systems side by side; for multiple-choice benchmarks
  the majority-class rate beside them);
- `out/results.png`: one panel per benchmark, its main figure per language, systems side by side, with the
  majority-class rate marked for multiple-choice benchmarks. Written when matplotlib is installed
  (`pip install "peft-cc[eval]"`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .benchmarks import METRIC_LABELS, UNBOUNDED_METRICS

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "peft-cc-evaluation/1"
AVERAGES = (("average_non_english", "avg non-en"), ("average_all", "avg all"))


def report_paths(output: str | os.PathLike) -> dict[str, Path]:
    """The files of a report: `output` itself if it ends in `.json`, else `output/results.json`; `.md` and `.png`
    next to it, with the same stem."""
    output = Path(output)
    json_path = output if output.suffix == ".json" else output / "results.json"
    return {
        "json": json_path,
        "markdown": json_path.with_suffix(".md"),
        "plot": json_path.with_suffix(".png"),
    }


def write_report(results_by_system: Mapping[str, dict], output: str | os.PathLike) -> dict[str, Path]:
    """Write the JSON results, the Markdown tables and the plot of several systems (see the module docstring).

    Args:
        results_by_system: system name -> the results of :func:`peft_cc.evaluation.evaluate`, in display order.
        output: the JSON file to write (`.json`), or a folder to write `results.json` into.

    Returns:
        The paths written: `json`, `markdown`, and `plot` (absent without matplotlib).
    """
    if not results_by_system:
        raise ValueError("No results to report.")
    paths = report_paths(output)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    document = {"format": RESULTS_FORMAT, "systems": dict(results_by_system)}
    paths["json"].write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown_report(results_by_system), encoding="utf-8")
    if plot_results(results_by_system, paths["plot"]) is None:
        del paths["plot"]
    return paths


def load_results(paths: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """The systems of one or more `results.json` files, in order; a repeated name gets its file's folder appended."""
    systems: dict[str, dict] = {}
    for path in paths:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(document, dict) or document.get("format") != RESULTS_FORMAT:
            raise ValueError(f"{path} is not a results file of this evaluator (format {RESULTS_FORMAT!r}).")
        for name, results in document["systems"].items():
            unique = name if name not in systems else f"{name} ({Path(path).resolve().parent.name})"
            systems[unique] = results
    return systems


def _percent(value: float | None, metric: str = "") -> str:
    """A score for the tables: fractions in %, unbounded scores (`answer_nll`) as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}" if metric in UNBOUNDED_METRICS else f"{100 * value:.1f}"


def _benchmark_order(results_by_system: Mapping[str, dict]) -> list[str]:
    names: list[str] = []
    for results in results_by_system.values():
        names += [name for name in results["benchmarks"] if name not in names]
    return names


def _language_order(results_by_system: Mapping[str, dict], benchmark: str) -> list[str]:
    languages: list[str] = []
    for results in results_by_system.values():
        entry = results["benchmarks"].get(benchmark, {"languages": {}})
        languages += [language for language in entry["languages"] if language not in languages]
    return languages


def _score(results: dict, benchmark: str, group: str, metric: str) -> float | None:
    """A system's `metric` on `benchmark` for a language or an average (`average_non_english`, `average_all`)."""
    entry = results["benchmarks"].get(benchmark)
    if entry is None:
        return None
    scores = entry.get(group) if group.startswith("average_") else entry["languages"].get(group, {}).get("scores")
    return (scores or {}).get(metric)


def _first_entry(results_by_system: Mapping[str, dict], benchmark: str) -> dict:
    return next(
        results["benchmarks"][benchmark]
        for results in results_by_system.values()
        if benchmark in results["benchmarks"]
    )


def _majority(results_by_system: Mapping[str, dict], benchmark: str, group: str) -> float | None:
    """The majority-class rate of `group`, from the first system that evaluated it."""
    for results in results_by_system.values():
        value = _score(results, benchmark, group, "majority_rate")
        if value is not None:
            return value
    return None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _system_rows(results_by_system: Mapping[str, dict]) -> list[list[str]]:
    rows = []
    for name, results in results_by_system.items():
        settings = results["settings"]
        first = settings.get("offset", 0)
        limit = settings.get("limit")
        items = f"{first}–{first + limit - 1}" if limit else f"{first}–end"
        rows.append(
            [
                name,
                str(settings.get("model", "–")),
                str(settings.get("adapter") or "–"),
                str(settings.get("connection") or "–"),
                items,
                "yes" if settings.get("chat_template") else "no",
                f"{results.get('seconds', 0):.0f}",
            ]
        )
    return rows


def markdown_report(results_by_system: Mapping[str, dict]) -> str:
    """The Markdown tables of several systems' results (see the module docstring)."""
    systems = list(results_by_system)
    benchmarks = _benchmark_order(results_by_system)
    lines = ["# Evaluation results", ""]
    lines += _table(
        ["system", "model", "adapter", "connection", "items per language", "chat template", "seconds"],
        _system_rows(results_by_system),
    )
    lines += [
        "",
        "Scores in %. Multiple-choice benchmarks show the majority-class rate (the accuracy of always giving the most "
        "common gold label) beside every score: `acc` is the first option label in the generated text, "
        "`acc (log-lik.)` the option with the highest log-likelihood. `gold NLL` is the negative log-likelihood of "
        "the gold answer, in nats per token (not in %; lower is better). Decoding is greedy.",
        "",
        "## Summary",
        "",
        "Each benchmark's main figure, averaged over the non-English languages / over all languages evaluated.",
        "",
    ]
    rows = []
    for benchmark in benchmarks:
        entry = _first_entry(results_by_system, benchmark)
        metric = entry["primary_metric"]
        cells = [benchmark, METRIC_LABELS.get(metric, metric)]
        if entry["kind"] == "multiple_choice":
            cells.append(" / ".join(_percent(_majority(results_by_system, benchmark, group)) for group, _ in AVERAGES))
        else:
            cells.append("")
        for results in results_by_system.values():
            cells.append(
                " / ".join(_percent(_score(results, benchmark, group, metric), metric) for group, _ in AVERAGES)
            )
        rows.append(cells)
    lines += _table(["benchmark", "metric", "majority"] + systems, rows)

    for benchmark in benchmarks:
        entry = _first_entry(results_by_system, benchmark)
        multiple_choice = entry["kind"] == "multiple_choice"
        metrics = entry["table_metrics"]
        header = ["language", "items"] + (["majority"] if multiple_choice else [])
        header += [f"{system} {METRIC_LABELS.get(metric, metric)}" for system in systems for metric in metrics]
        rows = []
        groups = [(language, language) for language in _language_order(results_by_system, benchmark)]
        for group, label in groups + [(group, f"**{label}**") for group, label in AVERAGES]:
            counts = {
                results["benchmarks"][benchmark]["languages"][group]["num_items"]
                for results in results_by_system.values()
                if group in results["benchmarks"].get(benchmark, {}).get("languages", {})
            }
            row = [label, "/".join(str(count) for count in sorted(counts))]
            if multiple_choice:
                row.append(_percent(_majority(results_by_system, benchmark, group)))
            row += [
                _percent(_score(results, benchmark, group, metric), metric)
                for results in results_by_system.values()
                for metric in metrics
            ]
            rows.append(row)
        lines += ["", f"## {benchmark}", ""] + _table(header, rows)
        differing = _languages_with_different_items(results_by_system, benchmark)
        if differing:
            lines += ["", f"Note: the systems were evaluated on different items in {', '.join(differing)}."]
    return "\n".join(lines) + "\n"


def _languages_with_different_items(results_by_system: Mapping[str, dict], benchmark: str) -> list[str]:
    differing = []
    for language in _language_order(results_by_system, benchmark):
        indices = {
            tuple(results["benchmarks"][benchmark]["languages"][language]["indices"])
            for results in results_by_system.values()
            if language in results["benchmarks"].get(benchmark, {}).get("languages", {})
        }
        if len(indices) > 1:
            differing.append(language)
    return differing


def plot_results(results_by_system: Mapping[str, dict], path: str | os.PathLike) -> Path | None:
    """A PNG with one panel per benchmark: its main figure per language and average, systems side by side.

    Returns:
        `path`, or `None` (with a warning) where matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed, so no plot was written: pip install 'peft-cc[eval]'.")
        return None
    systems = list(results_by_system)
    benchmarks = _benchmark_order(results_by_system)
    widest = max(len(_language_order(results_by_system, benchmark)) + len(AVERAGES) for benchmark in benchmarks)
    figure = Figure(figsize=(max(6.0, 0.35 * widest * (len(systems) + 1) + 1.5), 2.8 * len(benchmarks)))
    axes = figure.subplots(len(benchmarks), 1, squeeze=False)[:, 0]
    bar_width = 0.8 / len(systems)
    for axis, benchmark in zip(axes, benchmarks):
        entry = _first_entry(results_by_system, benchmark)
        metric = entry["primary_metric"]
        groups = _language_order(results_by_system, benchmark) + [group for group, _ in AVERAGES]
        labels = _language_order(results_by_system, benchmark) + [label.replace(" ", "\n") for _, label in AVERAGES]
        for position, (name, results) in enumerate(results_by_system.items()):
            values = [_score(results, benchmark, group, metric) for group in groups]
            axis.bar(
                [index - 0.4 + bar_width * (position + 0.5) for index in range(len(groups))],
                [math.nan if value is None else 100 * value for value in values],
                bar_width,
                label=name,
            )
        if entry["kind"] == "multiple_choice":
            marked = [
                (index, majority)
                for index, group in enumerate(groups)
                if (majority := _majority(results_by_system, benchmark, group)) is not None
            ]
            for number, (index, majority) in enumerate(marked):
                axis.hlines(
                    100 * majority,
                    index - 0.45,
                    index + 0.45,
                    colors="black",
                    linestyles="dashed",
                    label="majority class" if number == 0 else None,
                )
        axis.set_xticks(range(len(groups)), labels)
        axis.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%)")
        axis.set_title(benchmark, loc="left")
        axis.set_ylim(bottom=0)
        axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)
