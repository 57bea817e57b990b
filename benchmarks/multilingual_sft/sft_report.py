"""The report of the multilingual SFT experiment, assembled from the finished runs of one model's folder.

It reads `evaluation/*.json` and the `adapters/*/training.json` of the adapters evaluated there (whatever has finished)
and writes, beside the former, `report.md`, `report.json` (every table row) and `curves.png` (training loss per run).
Two trained systems are compared on the seeds both have, each averaged item by item over them, and again one seed at a
time; every comparison is paired item by item (:mod:`paired_comparison`), with its standard error, and a difference
beyond twice its standard error is in bold. Where a comparison has several seeds, the per-seed differences are
summarised too, with their standard error across seeds: the spread between training runs, which the item-level one
leaves out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paired_comparison as paired
from sft_evaluate import GENERATION_METRICS, LOGLIK_METRIC
from sft_runs import SYSTEMS, run_name
from sft_train import RECORD, layer_choice, loss_curve

RUN_NAME = re.compile(r"^(?P<system>.+?)(?:-seed(?P<seed>\d+))?(?:-(?P<connection>monolingual|off|bilingual))?$")
BENCHMARK_ORDER = ("MKQA", "XQuAD", "XLSum", "XNLI", "XStoryCloze", "MMMLU")
# In the curves, a system has its colour and a seed its line style: seed 0 solid, 1 dashed, 2 dotted, 3 dash-dotted.
SEED_LINE_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Variant:
    """A system as evaluated: its name and connection (`None`: without one, or a CC adapter's monolingual)."""

    system: str
    connection: str | None

    @property
    def label(self) -> str:
        return self.system if self.connection in (None, "monolingual") else f"{self.system} ({self.connection})"

    @property
    def order(self) -> tuple[int, int]:
        group = {"off": 1, "bilingual": 2}.get(self.connection, 0)
        return group, list(SYSTEMS).index(self.system) if self.system in SYSTEMS else len(SYSTEMS)


def load_evaluations(folder: Path, evaluation_dir: str = "evaluation") -> dict[Variant, dict[int | None, dict]]:
    """`{variant: {seed: evaluation record}}` of the finished evaluations under `folder/evaluation_dir`."""
    variants: dict[Variant, dict[int | None, dict]] = {}
    for path in sorted((folder / evaluation_dir).glob("*.json")):
        if path.name == "report.json":
            continue
        match = RUN_NAME.match(path.stem)
        seed = int(match["seed"]) if match["seed"] is not None else None
        variant = Variant(match["system"], match["connection"])
        variants.setdefault(variant, {})[seed] = json.loads(path.read_text())
    return dict(sorted(variants.items(), key=lambda item: item[0].order))


def load_trainings(folder: Path) -> dict[str, dict]:
    """`{run name: training record}` of the finished trainings under `folder/adapters`."""
    return {
        path.parent.name: json.loads(path.read_text()) for path in sorted((folder / "adapters").glob(f"*/{RECORD}"))
    }


def evaluated_trainings(trainings: dict[str, dict], variants: dict[Variant, dict]) -> dict[str, dict]:
    """The trainings of `trainings` whose adapters `variants` evaluate: another evaluation folder of the same model
    folder may score only some of its adapters."""
    evaluated = {run_name(variant.system, seed) for variant, records in variants.items() for seed in records}
    return {name: record for name, record in trainings.items() if name in evaluated}


def scores(records: dict[int | None, dict], seeds: Sequence[int | None] | None = None) -> paired.SystemScores:
    """The item scores of a variant, averaged over `seeds` (default: all it has)."""
    chosen = [records[seed] for seed in (seeds if seeds is not None else records)]
    return paired.seed_average([paired.scores_of_record(record) for record in chosen])


def comparisons(variants: dict[Variant, dict]) -> list[tuple[Variant, Variant]]:
    """The paired comparisons `(variant, baseline)` that the finished evaluations allow, in reading order."""
    cc = [system for system, spec in SYSTEMS.items() if spec.kind == "cc"]
    wanted = [(Variant("lora", None), Variant("base", None))]
    wanted += [(Variant(system, "monolingual"), Variant("lora", None)) for system in cc]
    wanted += [
        (Variant(system, "monolingual"), Variant("cc-paper", "monolingual")) for system in cc if system != "cc-paper"
    ]
    wanted += [(Variant(system, "monolingual"), Variant(system, "off")) for system in cc]
    wanted += [(Variant(system, "off"), Variant("lora", None)) for system in cc]  # the adapter's LoRA, alone
    # the real English prompt at inference: the upper bound, against the simulated one and against LoRA
    wanted += [(Variant(system, "bilingual"), Variant(system, "monolingual")) for system in cc]
    wanted += [(Variant(system, "bilingual"), Variant("lora", None)) for system in cc]
    return [(variant, baseline) for variant, baseline in wanted if variant in variants and baseline in variants]


def paired_rows(variants: dict[Variant, dict], metrics_of: dict[str, Sequence[str]], languages="non-English") -> list:
    """The rows of every comparison of :func:`comparisons` on the metrics `{benchmark: metrics}`. Two trained systems
    are paired on the seeds both have (one seed: the same batches and the same LoRA initialisation), each side
    averaged over them; against the base model (one unseeded record), a system is averaged over all its seeds."""
    rows = []
    for variant, baseline in comparisons(variants):
        seeds = sorted(variants[variant].keys() & variants[baseline].keys(), key=str) or None
        count = len(seeds) if seeds is not None else len(variants[variant])
        rows += [
            {**row, "seeds": count}
            for row in _compare(variants, variant, seeds, baseline, seeds, metrics_of, languages)
        ]
    return rows


def seed_rows(variants: dict[Variant, dict], metrics_of: dict[str, Sequence[str]], languages="non-English") -> list:
    """The comparisons of :func:`comparisons` whose system has several seeds, once per seed: that seed's record
    against the baseline's of the same seed (or against its one unseeded record, the base model's). Whether a
    difference keeps its sign and size from seed to seed is what the item-level standard error does not show."""
    rows = []
    for variant, baseline in comparisons(variants):
        if len(variants[variant]) < 2:
            continue
        for seed in sorted(variants[variant]):
            baseline_seed = seed if seed in variants[baseline] else None
            if baseline_seed not in variants[baseline]:
                continue
            pairs = _compare(variants, variant, [seed], baseline, [baseline_seed], metrics_of, languages)
            rows += [{**row, "seed": seed} for row in pairs]
    return rows


def across_seed_rows(per_seed: Sequence[dict]) -> list[dict]:
    """Per comparison and (benchmark, metric) of :func:`seed_rows` with at least 2 seeds: the mean of the per-seed
    differences and its standard error across seeds (a seed as one unit; with two seeds, half the gap between them),
    seed noise included where the item-level standard error leaves it out. `beyond_2se` is
    :func:`paired_comparison.beyond_two_standard_errors`; with two seeds it holds exactly when both seeds have the same
    sign and the smaller difference is more than a third of the larger: a consistency check (one degree of freedom),
    not a test."""
    groups: dict[tuple[str, str, str, str], list[float]] = {}
    for row in per_seed:
        key = (row["system"], row["baseline"], row["benchmark"], row["metric"])
        groups.setdefault(key, []).append(row["difference"])
    rows = []
    for (system, baseline, benchmark, metric), differences in groups.items():
        if len(differences) < 2:
            continue
        mean, standard_error = paired.sample_mean_and_standard_error(differences)
        rows.append(
            {
                "system": system,
                "baseline": baseline,
                "seeds": len(differences),
                "benchmark": benchmark,
                "metric": metric,
                "difference": mean,
                "standard_error": standard_error,
                "beyond_2se": paired.beyond_two_standard_errors(mean, standard_error),
            }
        )
    return rows


def _compare(
    variants: dict[Variant, dict],
    variant: Variant,
    seeds: Sequence[int | None] | None,
    baseline: Variant,
    baseline_seeds: Sequence[int | None] | None,
    metrics_of: dict[str, Sequence[str]],
    languages: str | Sequence[str],
) -> list[dict]:
    """`variant` (averaged over `seeds`) paired against `baseline` (over `baseline_seeds`) on `metrics_of`."""
    system = (variant.label, scores(variants[variant], seeds))
    base = (baseline.label, scores(variants[baseline], baseline_seeds))
    rows = paired.compare(base, [system], languages)
    return [row for row in rows if row["metric"] in metrics_of.get(row["benchmark"], ())]


def level_rows(variants: dict[Variant, dict], metrics_of: dict[str, Sequence[str]], languages="non-English") -> list:
    """Per variant, benchmark and metric: the mean (seeds averaged, then pooled over `languages`) and its standard
    error (an item index as one unit)."""
    rows = []
    for variant, records in variants.items():
        for (benchmark, metric), per_item in scores(records).items():
            if metric not in metrics_of.get(benchmark, ()):
                continue
            selected = paired.select(per_item, languages)
            if len({index for _, index in selected}) < 2:
                continue
            mean, standard_error, units = paired.mean_and_standard_error(selected)
            row = {"mean": mean, "standard_error": standard_error}
            row = paired.in_display_units(row, metric)
            rows.append(
                {
                    "variant": variant.label,
                    "seeds": len(records),
                    "benchmark": benchmark,
                    "metric": metric,
                    "units": units,
                }
                | row
            )
    return rows


def level_table(rows: Sequence[dict]) -> str:
    """Variants as rows, (benchmark, metric) as columns: `mean ± s.e.`."""
    columns = sorted({(row["benchmark"], row["metric"]) for row in rows}, key=_column_order)
    variants = list(dict.fromkeys((row["variant"], row["seeds"]) for row in rows))
    cell = {(row["variant"], row["benchmark"], row["metric"]): row for row in rows}
    header = ["system", "seeds"] + [f"{benchmark} {paired.LABELS[metric]}" for benchmark, metric in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for variant, seeds in variants:
        cells = [variant, str(seeds)]
        for benchmark, metric in columns:
            row = cell.get((variant, benchmark, metric))
            cells.append(f"{row['mean']:.3f} ± {row['standard_error']:.3f}" if row else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{_items_note(rows)}\n"


def _items_note(rows: Sequence[dict]) -> str:
    """`Items per language: MKQA 150, ...` of the first variant, then of each variant evaluated on other counts."""
    counts_of = {}
    for variant in dict.fromkeys(row["variant"] for row in rows):
        units = {(row["benchmark"], row["units"]) for row in rows if row["variant"] == variant}
        ordered = sorted(units, key=lambda pair: _column_order((pair[0], "")))
        counts_of[variant] = ", ".join(f"{benchmark} {count}" for benchmark, count in ordered)
    first = next(iter(counts_of.values()), "")
    others = "; ".join(f"{variant}: {counts}" for variant, counts in counts_of.items() if counts != first)
    return f"Items per language: {first}" + (f" ({others})" if others else "") + "."


def difference_table(rows: Sequence[dict], column: str = "seeds") -> str:
    """Comparisons as rows, (benchmark, metric) as columns: `difference ± s.e.`, bold beyond 2 s.e. `column` is the
    rows' key that tells apart two rows of one comparison: `seeds` (how many were averaged) or `seed`."""
    columns = sorted({(row["benchmark"], row["metric"]) for row in rows}, key=_column_order)
    pairs = list(dict.fromkeys((row["system"], row["baseline"], row[column]) for row in rows))
    cell = {(row["system"], row["baseline"], row[column], row["benchmark"], row["metric"]): row for row in rows}
    header = ["system", "against", column] + [f"{b} {paired.LABELS[m]}" for b, m in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for system, baseline, key in pairs:
        cells = [system, baseline, str(key)]
        for benchmark, metric in columns:
            row = cell.get((system, baseline, key, benchmark, metric))
            cells.append(paired.format_difference(row) if row else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _column_order(column: tuple[str, str]) -> tuple[int, str]:
    benchmark, metric = column
    return (BENCHMARK_ORDER.index(benchmark) if benchmark in BENCHMARK_ORDER else 99, metric)


def training_table(trainings: dict[str, dict]) -> str:
    """Per trained run: steps, the loss of the first and last logging windows, the wall time, and for CC runs what
    the Decision Maker chose at the end."""
    lines = [
        "| run | steps | loss first → last window | training s | Decision Maker at the end |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, record in trainings.items():
        curve = loss_curve(record)
        losses = f"{curve[0][1]:.3f} → {curve[-1][1]:.3f}" if curve else "–"
        lines.append(
            f"| {name} | {record['settings']['steps']} | {losses} | {record['seconds']['training']:.0f} | "
            f"{describe_choice(layer_choice(record))} |"
        )
    return "\n".join(lines) + "\n"


def describe_choice(choice: dict[str, Any] | None) -> str:
    """What :func:`layer_choice` found, in words: `layer 11 (19% of rows), entropy 2.84 nats; Transform Matrix
    held-out R² 0.940`."""
    if choice is None:
        return "–"
    parts = []
    if "most_chosen_layer" in choice:
        layer = int(choice["most_chosen_layer"])
        share = choice.get("layer_frequency", {}).get(str(layer), choice.get("layer_frequency", {}).get(layer))
        parts.append(f"layer {layer}" + (f" ({100 * share:.0f}% of rows)" if share is not None else ""))
    if "choice_entropy" in choice:
        # abs(): a record may hold -0.0, the entropy of a single chosen layer as -(1·log 1)
        parts.append(f"entropy {abs(choice['choice_entropy']):.2f} nats")
    text = ", ".join(parts)
    r2 = choice.get("transform_r2_heldout")
    return text + (f"; Transform Matrix held-out R² {r2:.3f}" if r2 is not None else "")


def wall_times(trainings: dict[str, dict], variants: dict[Variant, dict]) -> str:
    """Every invocation's wall time, and the total."""
    lines = ["| invocation | seconds | of which |", "| --- | --- | --- |"]
    total = 0.0
    for name, record in trainings.items():
        total += record["seconds"]["total"]
        lines.append(
            f"| train {name} | {record['seconds']['total']:.0f} | training {record['seconds']['training']:.0f} |"
        )
    for variant, records in variants.items():
        for seed, record in records.items():
            seconds = record["seconds"]
            total += seconds["total"]
            parts = ", ".join(
                f"{part} {seconds[part]:.0f} ({seconds[part] / max(1, count):.2f}/item)"
                for part, count in record["item_counts"].items()
            )
            seed_text = "" if seed is None else f" seed {seed}"
            lines.append(f"| evaluate {variant.label}{seed_text} | {seconds['total']:.0f} | {parts} |")
    lines.append(f"| **total** | **{total:.0f}** ({total / 3600:.2f} h) | |")
    return "\n".join(lines) + "\n"


def plot_curves(trainings: dict[str, dict], path: Path) -> bool:
    """Training loss against step for every run, at `path`; `False` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(8, 4.5))
    colors = {name: f"C{index}" for index, name in enumerate(SYSTEMS)}
    for name, record in trainings.items():
        match = RUN_NAME.match(name)
        curve = loss_curve(record)
        if curve:
            style = SEED_LINE_STYLES[int(match["seed"] or 0) % len(SEED_LINE_STYLES)]
            axis.plot(*zip(*curve), style, color=colors.get(match["system"], "k"), label=name)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (nats per completion token)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(folder: Path, evaluation_dir: str = "evaluation") -> str:
    """Write `report.md`, `report.json` and `curves.png` into `folder/evaluation_dir` from the finished runs of the
    model folder `folder`; returns the Markdown."""
    variants = load_evaluations(folder, evaluation_dir)
    output = folder / evaluation_dir
    trainings = evaluated_trainings(load_trainings(folder), variants)
    loglik = {benchmark: (metric,) for benchmark, metric in LOGLIK_METRIC.items()}
    generation = {benchmark: metrics for benchmark, metrics in GENERATION_METRICS.items()}
    per_seed = seed_rows(variants, loglik)
    tables = {
        "levels": level_rows(variants, loglik),
        "levels_english": level_rows(variants, loglik, [paired.ENGLISH]),
        "differences": paired_rows(variants, loglik),
        "differences_english": paired_rows(variants, loglik, [paired.ENGLISH]),
        "differences_per_seed": per_seed,
        "differences_across_seeds": across_seed_rows(per_seed),
        "generation_levels": level_rows(variants, generation),
        "generation_differences": paired_rows(variants, generation),
    }
    curves = plot_curves(trainings, output / "curves.png")
    sections = [
        f"# Multilingual SFT: {folder.name} ({evaluation_dir})\n",
        "Non-English items, a system's seeds averaged item by item (in a comparison of two trained systems, the seeds "
        "both have); mean ± standard error (an item index, in all its languages, is one unit). Gold NLL in nats per "
        "answer token (lower is better), accuracies in %.\n",
        "## Log-likelihood metrics, non-English\n",
        level_table(tables["levels"]),
        "## Paired differences, non-English (bold: beyond 2 standard errors)\n",
        difference_table(tables["differences"]),
        "## The same, one seed at a time (non-English)\n" if tables["differences_per_seed"] else "",
        difference_table(tables["differences_per_seed"], "seed") if tables["differences_per_seed"] else "",
        "## Across seeds: the per-seed differences' mean ± their standard error over seeds (non-English)\n\n"
        "With two seeds the standard error is half their gap; bold: beyond 2 of them, which with two seeds means both "
        "have the same sign and the smaller is more than a third of the larger (a consistency check, not a test).\n"
        if tables["differences_across_seeds"]
        else "",
        difference_table(tables["differences_across_seeds"]) if tables["differences_across_seeds"] else "",
        "## English\n",
        level_table(tables["levels_english"]),
        difference_table(tables["differences_english"]),
        "## Generation metrics, non-English (the generated subset)\n",
        level_table(tables["generation_levels"]),
        difference_table(tables["generation_differences"]),
        "## Training\n",
        training_table(trainings),
        "![training loss](curves.png)\n" if curves else "",
        "## Wall times\n",
        wall_times(trainings, variants),
    ]
    text = "\n".join(section for section in sections if section)
    (output / "report.md").write_text(text)
    (output / "report.json").write_text(json.dumps(tables, indent=1, ensure_ascii=False) + "\n")
    return text
