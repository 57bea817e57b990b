"""Evaluate a causal LM (a base model, a LoRA or a CC-Tuning adapter) on the multilingual benchmarks.

For every benchmark and language: the items `offset .. offset + limit - 1` (line order) are prompted (in the chat
template where the tokenizer has one), answered by greedy decoding (at most `max_new_tokens` new tokens, 40 as in
the paper) in left-padded batches, and scored (see :mod:`peft_cc.evaluation.benchmarks`). Multiple-choice
benchmarks are also scored by option log-likelihood (:mod:`peft_cc.evaluation.option_scoring`).

The result is a JSON-ready dict; see :func:`evaluate` and `docs/evaluation.md` for its layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
import transformers
from tqdm.auto import tqdm

from .. import __version__
from ..parallel_data import ParallelItem, available_languages, load_parallel_items
from .benchmarks import BENCHMARKS, Benchmark, get_benchmark
from .connection import Connection, generate_kwargs, resolve_connection
from .metrics import extract_choice, majority_rate, mean
from .option_scoring import option_log_likelihoods
from .prompts import encode_prompt, left_pad, pad_token_id, uses_chat_template

logger = logging.getLogger(__name__)

ENGLISH = "en"


@dataclass
class EvaluationConfig:
    """What to evaluate and how (the model is given separately)."""

    data_root: str = field(
        metadata={"help": "Root of the benchmark layout: <root>/<Benchmark>/{prompts,answers}/<lang>.jsonl."}
    )
    benchmarks: list[str] | None = field(
        default=None, metadata={"help": "Benchmarks to evaluate (default: every known one under the data root)."}
    )
    languages: list[str] | None = field(
        default=None,
        metadata={
            "help": "Languages to evaluate (default: all of each benchmark); those a benchmark lacks are skipped."
        },
    )
    limit: int | None = field(
        default=None, metadata={"help": "Items per language: the first N from --offset, in line order (default: all)."}
    )
    offset: int = field(default=0, metadata={"help": "Index of the first item of each language to evaluate."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch and rows per scoring forward."})
    max_new_tokens: int = field(default=40, metadata={"help": "Most tokens generated per answer (40 in the paper)."})
    connection: Connection | None = field(
        default=None,
        metadata={
            "help": "A CC-Tuning adapter's connection: monolingual (default; needs the fitted Transform Matrix), "
            "bilingual (real English prompts) or off (LoRA only). Not for other models."
        },
    )
    chat_template: bool = field(
        default=True, metadata={"help": "Wrap prompts in the tokenizer's chat template, where it has one."}
    )
    option_log_likelihood: bool = field(
        default=True, metadata={"help": "Also score multiple-choice options by log-likelihood (accuracy_loglik)."}
    )
    answer_log_likelihood: bool = field(
        default=True,
        metadata={"help": "Also score the gold answer of generative benchmarks by its log-likelihood (answer_nll)."},
    )
    show_progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"`limit` must be at least 1, got {self.limit}.")
        if self.offset < 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("`offset` must be >= 0, `batch_size` and `max_new_tokens` >= 1.")


def _benchmarks(config: EvaluationConfig) -> list[Benchmark]:
    if config.benchmarks is not None:
        return [get_benchmark(name) for name in config.benchmarks]
    present = [benchmark for name, benchmark in BENCHMARKS.items() if (Path(config.data_root) / name).is_dir()]
    if not present:
        raise FileNotFoundError(f"No known benchmark ({', '.join(BENCHMARKS)}) under {config.data_root}.")
    return present


def _average(language_scores: dict[str, dict[str, float]], languages: Sequence[str]) -> dict[str, float] | None:
    """The mean of every score over `languages` (`None` if there are none)."""
    if not languages:
        return None
    keys = language_scores[languages[0]]
    return {key: mean([language_scores[language][key] for language in languages]) for key in keys}


class _Evaluator:
    """Holds the model, tokenizer and settings while one evaluation runs."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: EvaluationConfig, connection: Connection | None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.connection = connection
        self.chat_template = uses_chat_template(tokenizer, config.chat_template)
        self.pad_id = pad_token_id(tokenizer)
        self.device = next(model.parameters()).device

    def _progress(self, total: int, description: str) -> tqdm:
        return tqdm(total=total, desc=description, unit="item", leave=False, disable=not self.config.show_progress)

    def _batches(self, prompts: list[list[int]]) -> list[list[int]]:
        """Item positions in batches of similar length (longest first), to waste little on padding."""
        order = sorted(range(len(prompts)), key=lambda position: -len(prompts[position]))
        size = self.config.batch_size
        return [order[start : start + size] for start in range(0, len(order), size)]

    def generate(self, prompts: list[list[int]], english: list[list[int]], description: str) -> list[str]:
        """Greedy answers to `prompts` (token ids), in their order."""
        outputs: list[str] = [""] * len(prompts)
        with self._progress(len(prompts), description) as progress:
            for batch_positions in self._batches(prompts):
                batch = left_pad([prompts[position] for position in batch_positions], self.pad_id, self.device)
                english_batch = left_pad([english[position] for position in batch_positions], self.pad_id, self.device)
                generated = self.model.generate(
                    **batch,
                    max_new_tokens=self.config.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=self.pad_id,
                    **generate_kwargs(self.connection, english_batch["input_ids"], english_batch["attention_mask"]),
                )
                new_tokens = generated[:, batch["input_ids"].shape[1] :]
                for position, tokens in zip(batch_positions, new_tokens):
                    outputs[position] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                progress.update(len(batch_positions))
        return outputs

    def option_choices(
        self, benchmark: Benchmark, prompts: list[list[int]], english: list[list[int]], description: str
    ) -> tuple[list[str], list[list[float]]]:
        """The log-likelihood choice of every prompt, and the log-likelihoods of all options (nats)."""
        options = [self.tokenizer(label, add_special_tokens=False)["input_ids"] for label in benchmark.labels]
        choices: list[str] = [""] * len(prompts)
        log_likelihoods: list[list[float]] = [[] for _ in prompts]
        with self._progress(len(prompts), description) as progress:
            for batch_positions in self._batches(prompts):
                scores = option_log_likelihoods(
                    self.model,
                    [prompts[position] for position in batch_positions],
                    options,
                    self.pad_id,
                    batch_size=self.config.batch_size,
                    connection=self.connection,
                    english_prompts=[english[position] for position in batch_positions],
                )
                for position, row in zip(batch_positions, scores):
                    choices[position] = benchmark.labels[int(row.argmax())]
                    log_likelihoods[position] = [round(value, 4) for value in row.tolist()]
                progress.update(len(batch_positions))
        return choices, log_likelihoods

    def answer_nlls(
        self, prompts: list[list[int]], english: list[list[int]], answers: list[str], description: str
    ) -> list[float]:
        """Negative log-likelihood of every gold answer after its prompt, in nats per answer token."""
        values: list[float] = []
        with self._progress(len(prompts), description) as progress:
            for prompt, english_prompt, answer in zip(prompts, english, answers):
                tokens = self.tokenizer(answer, add_special_tokens=False)["input_ids"] or [self.pad_id]
                log_likelihood = option_log_likelihoods(
                    self.model,
                    [prompt],
                    [tokens],
                    self.pad_id,
                    connection=self.connection,
                    english_prompts=[english_prompt],
                )
                values.append(-float(log_likelihood[0, 0]) / len(tokens))
                progress.update(1)
        return values

    def language(self, benchmark: Benchmark, language: str, items: list[ParallelItem]) -> dict:
        """Scores, per-item records and timings of one benchmark in one language."""
        for item in items:
            benchmark.check_answer(item.answer, f"{benchmark.name}/answers/{language}.jsonl line {item.index + 1}")
        prompts = [encode_prompt(self.tokenizer, item.prompt, self.chat_template) for item in items]
        english = [encode_prompt(self.tokenizer, item.english_prompt, self.chat_template) for item in items]
        started = time.perf_counter()
        outputs = self.generate(prompts, english, f"{benchmark.name} {language}: generate")
        seconds = {"generation": time.perf_counter() - started}
        records = [
            {
                "index": item.index,
                "answer": item.answer,
                "output": output,
                "scores": benchmark.score(output, item.answer, language),
            }
            for item, output in zip(items, outputs)
        ]
        result: dict = {"num_items": len(items), "indices": [item.index for item in items]}
        if benchmark.is_multiple_choice:
            for record in records:
                record["choice"] = extract_choice(record["output"], benchmark.labels)
            result["label_counts"] = {
                "gold": _counts(item.answer for item in items),
                "generated": _counts(record["choice"] for record in records),
            }
            if self.config.option_log_likelihood:
                started = time.perf_counter()
                choices, log_likelihoods = self.option_choices(
                    benchmark, prompts, english, f"{benchmark.name} {language}: log-likelihood"
                )
                seconds["option_scoring"] = time.perf_counter() - started
                for record, choice, scores in zip(records, choices, log_likelihoods):
                    record["scores"]["accuracy_loglik"] = float(choice == record["answer"])
                    record["loglik_choice"] = choice
                    record["option_log_likelihoods"] = scores
                result["label_counts"]["log_likelihood"] = _counts(choices)
        if not benchmark.is_multiple_choice and self.config.answer_log_likelihood:
            started = time.perf_counter()
            gold = [item.first_answer for item in items]
            nlls = self.answer_nlls(prompts, english, gold, f"{benchmark.name} {language}: gold answer")
            seconds["answer_scoring"] = time.perf_counter() - started
            for record, nll in zip(records, nlls):
                record["scores"]["answer_nll"] = round(nll, 4)
        result["scores"] = {key: mean([record["scores"][key] for record in records]) for key in records[0]["scores"]}
        if benchmark.is_multiple_choice:
            result["scores"]["majority_rate"] = majority_rate([item.answer for item in items])
        result["seconds"] = seconds
        result["items"] = records
        return result


def _counts(labels: Iterable[str | None]) -> dict[str, int]:
    """How often each label occurs, most common first; `None` (no label) counts as `"none"`."""
    return dict(Counter("none" if label is None else label for label in labels).most_common())


def _selected_items(config: EvaluationConfig, benchmark: Benchmark, language: str) -> list[ParallelItem]:
    items = load_parallel_items(config.data_root, benchmark.name, language)
    stop = None if config.limit is None else config.offset + config.limit
    return items[config.offset : stop]


def _library_versions() -> dict[str, str]:
    return {
        "peft_cc": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    config: EvaluationConfig | None = None,
    settings: dict | None = None,
    **options,
) -> dict:
    """Evaluate `model` on the benchmarks of `config`.

    Args:
        model: a causal LM, a PEFT model included; it is put in eval mode and stays there.
        tokenizer: its tokenizer.
        config: what to evaluate; or give its fields as keyword `options` (`data_root=...`, `limit=...`); options
            given with a config override its fields.
        settings: extra entries for the result's `settings` (e.g. the model's name and the adapter's path).

    Returns:
        A JSON-ready dict:

        - `settings`: the config (with `connection` resolved and `chat_template` as used), the device, the dtype,
          library versions, the date, and `settings`;
        - `benchmarks`: per benchmark, `kind`, `primary_metric`, `table_metrics`, `labels`, `seconds`,
          `skipped_languages` (language -> reason), `average_non_english` and `average_all` (the mean of every score
          over the evaluated languages other than English, and over all), and `languages`: per language `num_items`,
          `indices` (the item indices evaluated), `scores` (means over items, fractions in [0, 1]; for multiple
          choice also `majority_rate`), `label_counts` (multiple choice: gold, generated and log-likelihood labels),
          `seconds` and `items` (per item: `index`, `answer`, `output`, `scores`, and for multiple choice `choice`
          (the label found in the output, or null), `loglik_choice` and `option_log_likelihoods` in nats);
        - `seconds`: the wall time of the whole evaluation.
    """
    if config is None:
        config = EvaluationConfig(**options)
    elif options:
        config = dataclasses.replace(config, **options)
    connection = resolve_connection(model, config.connection)
    benchmarks = _benchmarks(config)
    model.eval()
    evaluator = _Evaluator(model, tokenizer, config, connection)
    first_parameter = next(model.parameters())
    resolved = dataclasses.replace(
        config,
        benchmarks=[benchmark.name for benchmark in benchmarks],
        connection=connection,
        chat_template=evaluator.chat_template,
    )
    results: dict = {
        "settings": {
            **dataclasses.asdict(resolved),
            "data_root": os.path.abspath(config.data_root),
            "decoding": "greedy",
            "device": str(first_parameter.device),
            "dtype": str(first_parameter.dtype).removeprefix("torch."),
            "versions": _library_versions(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(settings or {}),
        },
        "benchmarks": {},
    }
    started = time.perf_counter()
    with torch.no_grad():
        for benchmark in benchmarks:
            results["benchmarks"][benchmark.name] = _evaluate_benchmark(evaluator, benchmark)
    results["seconds"] = time.perf_counter() - started
    return results


def _evaluate_benchmark(evaluator: _Evaluator, benchmark: Benchmark) -> dict:
    config = evaluator.config
    started = time.perf_counter()
    available = available_languages(config.data_root, benchmark.name)
    requested = config.languages if config.languages is not None else available
    skipped = {language: "not in this benchmark" for language in requested if language not in available}
    languages: dict[str, dict] = {}
    for language in (language for language in requested if language in available):
        items = _selected_items(config, benchmark, language)
        if not items:
            skipped[language] = f"no items from index {config.offset}"
            continue
        languages[language] = evaluator.language(benchmark, language, items)
        scores = languages[language]["scores"]
        logger.info(
            "%s %s: %s = %.3f over %d items%s",
            benchmark.name,
            language,
            benchmark.primary_metric,
            scores[benchmark.primary_metric],
            len(items),
            f" (majority rate {scores['majority_rate']:.3f})" if benchmark.is_multiple_choice else "",
        )
    for language, reason in skipped.items():
        logger.warning("%s %s skipped: %s.", benchmark.name, language, reason)
    language_scores = {language: result["scores"] for language, result in languages.items()}
    return {
        "kind": benchmark.kind,
        "primary_metric": benchmark.primary_metric,
        "table_metrics": list(benchmark.table_metrics),
        "labels": list(benchmark.labels),
        "average_non_english": _average(language_scores, [language for language in languages if language != ENGLISH]),
        "average_all": _average(language_scores, list(languages)),
        "skipped_languages": skipped,
        "seconds": time.perf_counter() - started,
        "languages": languages,
    }
