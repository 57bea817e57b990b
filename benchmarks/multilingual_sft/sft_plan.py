"""Sizing the multilingual SFT experiment from per-item results, and planning its invocations with their wall times.

Sizing. For a comparison of two systems on a benchmark, the standard error of the mean paired difference pooled
over `L` non-English languages is `sd / √n` over `n` item indices, where `sd` is the standard deviation of an item
index's difference averaged over its `L` languages (:mod:`paired_comparison`). With `s` the standard deviation of
one language's per-item differences and `ρ` the correlation between the differences of one item's translations,
`sd² = s² (1 + (L − 1) ρ) / L`. Results in two or more languages give `s` (the root mean square of the per-language
standard deviations) and `ρ` (from the pooled `sd` they have); results in one language give `s` only, and `ρ` is
then assumed. The items needed for twice the standard error to reach a target are `n = (2 sd / target)²` (targets
:data:`TARGET_TWO_SE`: 0.05 nats per token for gold NLL, 4 points for accuracy).

Wall times. An evaluation's time is modelled from its items' token counts (load-independent, exact) and three
rates per model: seconds per token of a forward pass, seconds per generated token, and a factor per connection
(:func:`evaluation_seconds`); a training's from seconds per step per system (:func:`training_seconds`). The rates
come from measurements (README.md, "Wall time"); :func:`rates` reads the per-part and per-step times of a
pilot's finished runs. `multilingual_sft.py plan` adds them up invocation by invocation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import paired_comparison as paired
from parallel_data import CHOICES, load_parallel_items
from sft_evaluate import EvaluationSettings, Part, evaluation_parts
from sft_mixture import EvaluationSizes
from sft_report import comparisons, load_evaluations, load_trainings, scores

GENERATED_TOKENS = 40  # the tasks' max_gen_toks

TARGET_TWO_SE = {"answer_nll": 0.05, "acc": 4.0, "accuracy_loglik": 4.0}
"""Twice the standard error that a pooled non-English paired difference should reach (accuracy in points)."""

EARLIER_RUN = Path(__file__).resolve().parent / "results"
# The comparisons of the earlier run (README.md, "Earlier run"), as paired_comparison's NAME=SOURCE:PATTERN, read from
# its stored records (its `cc-gated` system's Decision Maker has since left the package).
EARLIER_COMPARISONS = (
    ("lora", "multilingual_sft_smollm2.json:lora-", "base", "multilingual_sft_smollm2.json:base"),
    ("cc-paper", "multilingual_sft_smollm2.json:cc-mono-", "lora", "multilingual_sft_smollm2.json:lora-"),
    (
        "cc-gated",
        "multilingual_sft_smollm2_gated_default_gate_lr.json:cc-gated-mono-",
        "cc-paper",
        "multilingual_sft_smollm2.json:cc-mono-",
    ),
    (
        "cc-paper (bilingual)",
        "multilingual_sft_smollm2.json:cc-bi-seed0",
        "cc-paper",
        "multilingual_sft_smollm2.json:cc-mono-seed0",
    ),
)


def items_needed(sd: float, metric: str) -> int:
    """Item indices for which `2 sd / √n` reaches the metric's target."""
    return math.ceil((2 * sd / TARGET_TWO_SE[metric]) ** 2)


def pooled_sd(system: paired.Scores, baseline: paired.Scores, languages: int, assumed_correlation: float) -> dict:
    """The sd of an item index's difference pooled over `languages` non-English languages, from paired scores.

    Returns:
        `measured_languages`, `items` (indices), `sd_one_language` (`s`), `correlation` (`ρ`), `measured` (whether
        `ρ` was measured, else `assumed_correlation`) and `sd`.
    """
    non_english = sorted({language for language, _ in system.keys() & baseline.keys()} - {paired.ENGLISH})
    per_language = [
        paired.paired_difference(paired.select(system, [lang]), paired.select(baseline, [lang]))
        for lang in non_english
    ]
    sd_one = math.sqrt(statistics.fmean(row["sd"] ** 2 for row in per_language))
    correlation, measured = assumed_correlation, False
    if len(non_english) >= 2 and sd_one > 0:
        sd_measured = paired.paired_difference(paired.select(system), paired.select(baseline))["sd"]
        count = len(non_english)
        correlation = min(1.0, max(0.0, (count * sd_measured**2 / sd_one**2 - 1) / (count - 1)))
        measured = True
    return {
        "measured_languages": len(non_english),
        "items": min(row["units"] for row in per_language),
        "sd_one_language": sd_one,
        "correlation": correlation,
        "measured": measured,
        "sd": sd_one * math.sqrt((1 + (languages - 1) * correlation) / languages),
    }


def sizing_rows(
    pairs: Sequence[tuple[str, paired.SystemScores, str, paired.SystemScores]],
    languages: int = 4,
    assumed_correlation: float = 0.5,
) -> list[dict]:
    """Per comparison `(name, scores, baseline name, baseline scores)` and benchmark, on its log-likelihood metric
    (gold NLL, option accuracy): :func:`pooled_sd` for `languages` languages and the item indices needed."""
    rows = []
    for name, system, baseline_name, baseline in pairs:
        for (benchmark, metric), per_item in system.items():
            if metric not in TARGET_TWO_SE or (benchmark, metric) not in baseline:
                continue
            row = pooled_sd(per_item, baseline[benchmark, metric], languages, assumed_correlation)
            if metric in paired.PERCENT:
                row.update(sd_one_language=100 * row["sd_one_language"], sd=100 * row["sd"])
            row.update(comparison=f"{name} − {baseline_name}", benchmark=benchmark, metric=metric)
            rows.append(row | {"items_needed": items_needed(row["sd"], metric)})
    return rows


def pilot_sizing(folder: Path, languages: int = 4, assumed_correlation: float = 0.5) -> list[dict]:
    """:func:`sizing_rows` of every comparison a pilot's finished evaluations allow."""
    variants = load_evaluations(folder)
    pairs = []
    for variant, baseline in comparisons(variants):
        seeds = (
            sorted(variants[variant].keys() & variants[baseline].keys()) if variant.system == baseline.system else None
        )
        pairs.append(
            (variant.label, scores(variants[variant], seeds), baseline.label, scores(variants[baseline], seeds))
        )
    return sizing_rows(pairs, languages, assumed_correlation)


def earlier_sizing(languages: int = 4, assumed_correlation: float = 0.5) -> list[dict]:
    """:func:`sizing_rows` of the earlier run's comparisons (:data:`EARLIER_COMPARISONS`)."""
    pairs = []
    for name, source, baseline_name, baseline_source in EARLIER_COMPARISONS:
        _, system = paired.parse_system(f"{name}={EARLIER_RUN / source}")
        _, baseline = paired.parse_system(f"{baseline_name}={EARLIER_RUN / baseline_source}")
        pairs.append((name, system, baseline_name, baseline))
    return sizing_rows(pairs, languages, assumed_correlation)


def connection_kind(connection: str | None) -> str:
    return "none" if connection is None else connection


def rates(folder: Path, clock: str = "seconds", scale: float = 1.0) -> dict[str, dict[str, float]]:
    """`{"step": {system: seconds per step}, "fixed": {system: seconds besides the steps},
    "item": {"<part>|<connection kind>": seconds per item}, "loading": {"evaluation": seconds}}` of a pilot.

    Args:
        clock: `"seconds"` (wall time) or `"cpu_seconds"` (the process's CPU time).
        scale: a factor for every rate (e.g. from one thread's CPU time to an idle machine's wall time).
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
        group: {key: scale * statistics.fmean(values) for key, values in by_key.items()}
        for group, by_key in measured.items()
    }


def prompt_tokens(tokenizer, data_root: str, part: Part) -> float:
    """The mean number of tokens of a part's forward rows: the chat-templated prompt (with the generation prompt),
    plus the gold answer for a generative benchmark (its log-likelihood row), over the part's items and languages."""
    counts = []
    for language in part.languages:
        for item in load_parallel_items(data_root, part.benchmark, language)[part.start : part.stop]:
            messages = [{"role": "user", "content": item.prompt}]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            count = len(ids["input_ids"] if hasattr(ids, "keys") else ids)
            if part.benchmark not in CHOICES:
                count += len(tokenizer(item.first_answer, add_special_tokens=False)["input_ids"])
            counts.append(count)
    return statistics.fmean(counts)


def evaluation_seconds(
    settings: EvaluationSettings,
    sizes: EvaluationSizes,
    connection: str | None,
    model_rates: dict,
    tokens: Callable[[Part], float],
) -> float:
    """Expected seconds of one evaluation from its items' token counts.

    Per item (in one language): `forwards × tokens × token × connection factor`, plus `GENERATED_TOKENS × decode`
    when it is generated; `forwards` is 1 (a multiple-choice item's one-token options share one row; a generative
    benchmark's item not generated has only its gold answer's row), 2 for a generated item (the generation's prompt
    pass and the gold answer's row). Plus `loading`.

    Args:
        model_rates: `token` (seconds per token of a forward without gradients), `decode` (seconds per generated
            token of an item), `connection` (`{"none"|"monolingual"|"off"|"bilingual": factor}`), `loading`.
        tokens: a part's mean tokens per row (:func:`prompt_tokens` with the evaluation's tokenizer).
    """
    seconds = model_rates["loading"]
    factor = model_rates["connection"][connection_kind(connection)]
    for part in evaluation_parts(settings, sizes):
        forwards = 2 if part.generate else 1
        per_item = forwards * tokens(part) * model_rates["token"] * factor
        if part.generate:
            per_item += GENERATED_TOKENS * model_rates["decode"]
        seconds += per_item * (part.stop - part.start) * len(part.languages)
    return seconds


def training_seconds(system: str, steps: int, model_rates: dict) -> float:
    """Expected seconds of one training: steps × seconds per step, plus the fixed part (loading, the Transform Matrix
    fit)."""
    if system not in model_rates["step"]:
        raise ValueError(f"The rates have no training rate for {system}: measure it first.")
    return steps * model_rates["step"][system] + model_rates["fixed"][system]


def format_sizing(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`sizing_rows`."""
    lines = [
        "| comparison | benchmark | metric | languages × items | sd, one language | ρ | sd, pooled | items needed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        correlation = f"{row['correlation']:.2f}" + ("" if row["measured"] else " (assumed)")
        lines.append(
            f"| {row['comparison']} | {row['benchmark']} | {paired.LABELS[row['metric']]} | "
            f"{row['measured_languages']} × {row['items']} | {row['sd_one_language']:.3f} | {correlation} | "
            f"{row['sd']:.3f} | {row['items_needed']} |"
        )
    return "\n".join(lines)
