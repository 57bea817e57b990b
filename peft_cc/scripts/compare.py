"""`peft-cc compare RUN_A RUN_B`: the paired, item-by-item difference B − A of two lm-evaluation-harness runs.

Prints a table (per task, with its language where tasks are per-language, and per group), or the same as JSON
(`--json`), and can draw the differences with ±2 standard-error bars (`--plot FILE`, needs matplotlib). The reading,
pairing and statistics are :mod:`peft_cc.lm_eval.comparison`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..lm_eval.comparison import (
    RUN_HELP,
    Comparison,
    ComparisonError,
    Row,
    compare_runs,
    metric_label,
    read_run,
)

EXAMPLE = """\
example (a LoRA baseline against a CC-Tuning adapter on lm-eval's XNLI, both evaluated with --log_samples):

  python -m peft_cc.lm_eval --model cc --tasks xnli --log_samples --output_path runs/lora \\
      --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,peft=lora-adapter
  python -m peft_cc.lm_eval --model cc --tasks xnli --log_samples --output_path runs/cc \\
      --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,peft=cc-adapter
  peft-cc compare runs/lora runs/cc
  peft-cc compare runs/lora runs/cc --json > cc_vs_lora.json
  peft-cc compare runs/lora/lora-adapter/results_2025-06-01T12-00-00.000000.json runs/cc --plot cc_vs_lora.png

Every row: each run's mean over the paired items, B − A with its paired standard error (SE), the number of paired
items, and whether |B − A| > 2 SE ("better": whether a higher or a lower score is better). A group row pools its
tasks' items; its SE treats each doc_id (one item in all its languages) as one unit.
"""

HEADERS = ("task / group", "lang", "metric", "better", "items", "mean A", "mean B", "B − A", "SE", "> 2 SE")
RIGHT_ALIGNED = {"items", "mean A", "mean B", "B − A", "SE"}


def make_parser() -> argparse.ArgumentParser:
    """The parser of `peft-cc compare`: the runs A and B, `--json` and `--plot FILE`."""
    parser = argparse.ArgumentParser(
        prog="peft-cc compare",
        description="Compare two lm-evaluation-harness runs of the same tasks item by item: the paired difference "
        "B − A and its standard error, per task, per language and per group.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_a", metavar="RUN_A", help=f"the baseline run: {RUN_HELP}")
    parser.add_argument("run_b", metavar="RUN_B", help="the run compared against it (differences are B − A)")
    parser.add_argument("--json", action="store_true", help="print the comparison as one JSON document instead")
    parser.add_argument(
        "--plot", metavar="FILE", help="also draw the differences with ±2 SE bars into FILE (PNG, PDF, SVG)"
    )
    return parser


def display_order(comparison: Comparison) -> list[tuple[int, Row]]:
    """The rows as the table and the plot show them: `(depth, row)`, each group's rows followed by its subtasks'
    and subgroups' (one deeper), groups by name, then the tasks of no group by name."""
    rows_by_name: dict[str, list[Row]] = {}
    for row in comparison.rows:
        rows_by_name.setdefault(row.name, []).append(row)
    children = {child for members in comparison.groups.values() for child in members}
    ordered: list[tuple[int, Row]] = []
    shown: set[str] = set()

    def add(name: str, depth: int) -> None:
        shown.add(name)
        ordered.extend((depth, row) for row in rows_by_name.get(name, []))
        for child in comparison.groups.get(name, []):
            add(child, depth + 1)

    for group in sorted(set(comparison.groups) - children):
        add(group, 0)
    for name in rows_by_name:
        if name not in shown:
            add(name, 0)
    return ordered


def verdict(row: Row) -> str:
    """The table's last column: `yes, B better` / `yes, B worse` (or `yes` where the direction is unknown) when
    |B − A| > 2 SE, else `no`."""
    if not row.statistics.beyond_two_standard_errors:
        return "no"
    if row.higher_is_better is None:
        return "yes"
    return "yes, B better" if (row.statistics.difference > 0) == row.higher_is_better else "yes, B worse"


def _cells(depth: int, row: Row) -> tuple[str, ...]:
    numbers = row.statistics
    items = str(numbers.items) if row.kind == "task" else f"{numbers.items} ({numbers.units} ids)"
    better = {True: "higher", False: "lower", None: "?"}[row.higher_is_better]
    standard_error = "n/a" if numbers.standard_error is None else f"{numbers.standard_error:.4f}"
    return (
        "  " * depth + row.name,
        row.language or "",
        metric_label(row.metric),
        better,
        items,
        f"{numbers.mean_a:.4f}",
        f"{numbers.mean_b:.4f}",
        f"{numbers.difference:+.4f}",
        standard_error,
        verdict(row),
    )


def format_table(comparison: Comparison) -> str:
    """The comparison as a plain-text table, aligned for a terminal, with the runs above it and the notes below."""
    lines = []
    for label, run in (("A", comparison.run_a), ("B", comparison.run_b)):
        model = f" (model {run.model_name})" if run.model_name else ""
        lines.append(f"{label}: {run.results_file}{model}")
    lines.append("")
    table = [HEADERS, *(_cells(depth, row) for depth, row in display_order(comparison))]
    widths = [max(len(cells[column]) for cells in table) for column in range(len(HEADERS))]
    for cells in table:
        aligned = [
            cell.rjust(width) if header in RIGHT_ALIGNED else cell.ljust(width)
            for cell, width, header in zip(cells, widths, HEADERS)
        ]
        lines.append("  ".join(aligned).rstrip())
    lines.append("")
    lines.append("B − A: the mean per-item difference over the paired items; SE: its paired standard error (a group's")
    lines.append(
        "treats each doc_id as one unit); > 2 SE: whether |B − A| > 2 SE; better: whether higher or lower is better."
    )
    lines.extend(f"Note: {note}" for note in comparison.notes)
    return "\n".join(lines)


def plot_differences(comparison: Comparison, path: str | Path) -> None:
    """Draw B − A with ±2 SE bars into `path` (its format from its suffix): one panel per metric, a line per task
    or group (groups as squares), green where B is better beyond 2 SE, red where it is worse, blue beyond 2 SE with
    no known direction.

    Raises:
        ComparisonError: matplotlib is not installed, or there is no row to draw.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ComparisonError("--plot needs matplotlib, which is not installed: pip install matplotlib") from error
    panels: dict[str, list[Row]] = {}
    for _, row in display_order(comparison):
        panels.setdefault(row.metric, []).append(row)
    if not panels:
        raise ComparisonError("Nothing to plot: no task and metric of the two runs could be paired (see the notes).")
    colors = {"yes, B better": "tab:green", "yes, B worse": "tab:red", "yes": "tab:blue", "no": "0.3"}
    figure = Figure(figsize=(8, 1.2 + 0.3 * sum(len(rows) + 2 for rows in panels.values())), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False, height_ratios=[len(rows) + 2 for rows in panels.values()])
    for axis, (metric, rows) in zip(axes[:, 0], panels.items()):
        for position, row in enumerate(rows):
            numbers = row.statistics
            axis.errorbar(
                numbers.difference,
                position,
                xerr=0 if numbers.standard_error is None else 2 * numbers.standard_error,
                fmt="s" if row.kind == "group" else "o",
                color=colors[verdict(row)],
                capsize=3,
            )
        axis.axvline(0, color="0.6", linewidth=0.8)
        axis.set_yticks(range(len(rows)), [row.name for row in rows])
        axis.set_ylim(len(rows) - 0.5, -0.5)
        better = {True: "higher is better", False: "lower is better", None: "direction unknown"}
        axis.set_xlabel(f"B − A, {metric_label(metric)} ({better[rows[0].higher_is_better]}), ±2 SE")
    name_a = comparison.run_a.model_name or comparison.run_a.results_file.name
    name_b = comparison.run_b.model_name or comparison.run_b.results_file.name
    figure.suptitle(
        f"B ({name_b}) − A ({name_a}), paired, ±2 SE\n"
        "green: B better beyond 2 SE, red: B worse beyond 2 SE; squares: groups"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def run(argv: list[str] | None = None) -> int:
    """`peft-cc compare RUN_A RUN_B [--json] [--plot FILE]` (arguments without the command's name); returns the
    exit status: 0, or 2 with a one-paragraph message on standard error for input that cannot be compared."""
    args = make_parser().parse_args(argv)
    try:
        comparison = compare_runs(read_run(args.run_a), read_run(args.run_b))
        if args.plot:
            plot_differences(comparison, args.plot)
    except ComparisonError as error:
        print(f"peft-cc compare: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(comparison.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_table(comparison))
        if args.plot:
            print(f"Plot written to {args.plot}.")
    return 0


if __name__ == "__main__":
    sys.exit(run())
