"""Evaluate one system of the multilingual SFT experiment item by item, with the lm-eval tasks of benchmarks/tasks/.

The model runs as lm-eval's `cc` model type (:class:`peft_cc.lm_eval.model.CCLM`: the base model, a LoRA adapter,
or a CC-Tuning adapter with its connection) on the tasks `peft_cc_<benchmark>_<language>` (:data:`TASKS_DIR`) of the
evaluation data root, with the chat template. Every item's metrics are kept (`log_samples`), so that systems can be
compared item by item (:mod:`paired_comparison`):

- log-likelihood metrics, on `EvaluationSizes.loglik_items` items of each benchmark: `answer_nll` for MKQA, XQuAD and
  XLSum (the gold answer's negative log-likelihood after the prompt, nats per answer token, lower is better) and
  `acc` for XNLI, XStoryCloze and MMMLU (the option label with the highest log-likelihood is the gold one);
- generation metrics, on the first `EvaluationSizes.generation_items` of those items (greedy, at most 40 new
  tokens): MKQA `accuracy` (a gold answer occurs in the output), `exact_match`, `f1`; XQuAD `exact_match`, `f1`,
  `contains`; XLSum `rouge_l`; the generated text is kept too.

The tasks of the generative benchmarks ask for a generation and the gold answer's log-likelihood for every item; the
items past the generation subset are run with `gen_kwargs={"max_gen_toks": 0}`, under which the tasks ask for the gold
answer's log-likelihood alone.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sft_mixture import EvaluationSizes, evaluation_languages
from sft_runs import read_finished, write_finished

# The lm-eval tasks over the benchmark data layout, beside this experiment's folder.
TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
LOGLIK_METRIC: dict[str, str] = {
    "MKQA": "answer_nll",
    "XQuAD": "answer_nll",
    "XLSum": "answer_nll",
    "XNLI": "acc",
    "XStoryCloze": "acc",
    "MMMLU": "acc",
}
GENERATION_METRICS: dict[str, tuple[str, ...]] = {
    "MKQA": ("accuracy", "exact_match", "f1"),
    "XQuAD": ("exact_match", "f1", "contains"),
    "XLSum": ("rouge_l",),
}


@dataclass(frozen=True)
class EvaluationSettings:
    """How a system is evaluated (the same for every system of a model).

    Attributes:
        model: the base model (Hub id or folder).
        tokenizer: the tokenizer's folder, when not the model's (a chat template of its own).
        data_root: the evaluation data root (the layout of `parallel_data`; may differ from the training one:
            items are chosen by index).
        languages_per_benchmark: non-English languages per benchmark (besides English).
        batch_size: lm-eval's batch size.
    """

    model: str
    tokenizer: str | None
    data_root: str
    languages_per_benchmark: int
    batch_size: int


@dataclass(frozen=True)
class Part:
    """One lm-eval call: the items `start .. stop-1` of `benchmark` in `languages`, generated or not."""

    benchmark: str
    languages: tuple[str, ...]
    start: int
    stop: int
    generate: bool

    @property
    def name(self) -> str:
        kind = "generation" if self.generate else "loglik"
        return f"{self.benchmark} {kind}"

    @property
    def metrics(self) -> tuple[str, ...]:
        return (LOGLIK_METRIC[self.benchmark], *(GENERATION_METRICS[self.benchmark] if self.generate else ()))

    def task(self, language: str) -> str:
        return f"peft_cc_{self.benchmark.lower()}_{language}"


def evaluation_parts(settings: EvaluationSettings, sizes: EvaluationSizes) -> list[Part]:
    """The lm-eval calls of one evaluation: per benchmark, its generated items, then its other items."""
    parts = []
    for benchmark in sizes.benchmarks:
        languages = tuple(evaluation_languages(settings.data_root, benchmark, settings.languages_per_benchmark))
        generated = sizes.generation_items.get(benchmark, 0)
        if generated:
            parts.append(Part(benchmark, languages, 0, generated, generate=True))
        if sizes.loglik_items[benchmark] > generated:
            parts.append(Part(benchmark, languages, generated, sizes.loglik_items[benchmark], generate=False))
    return parts


def check_held_out(sizes: EvaluationSizes, held_out: dict[str, int] | None) -> None:
    """Refuse to evaluate an item that the adapter may have been trained on.

    Args:
        held_out: per benchmark, the first item index the adapter's training could draw from
            (:func:`sft_train.trainable_from`); a benchmark not in it was not trained on; `None` for the base model.

    Raises:
        ValueError: a benchmark is evaluated on more items than the adapter's training held out.
    """
    for benchmark in sizes.benchmarks:
        if held_out is not None and benchmark in held_out and sizes.loglik_items[benchmark] > held_out[benchmark]:
            raise ValueError(
                f"{benchmark}: {sizes.loglik_items[benchmark]} items to evaluate, but the adapter was trained on "
                f"items from index {held_out[benchmark]} on: evaluate at most {held_out[benchmark]}."
            )


def evaluate(
    adapter: Path | None,
    connection: str | None,
    settings: EvaluationSettings,
    sizes: EvaluationSizes,
    path: Path,
    held_out: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Evaluate the base model, or it with `adapter` and `connection`, and write the record `path` (unless a finished
    one with the same settings is there); returns the record.

    The record's `items` is `{benchmark: {language: {item index: {metric: value}}}}`, its `outputs` the generated
    texts in the same layout, its `seconds` (wall) and `cpu_seconds` (this process's CPU time, which depends less on
    what else the machine runs) of every part (`"<benchmark> loglik|generation"`) with its `item_counts` (items ×
    languages), so that times per item can be read off.
    """
    check_held_out(sizes, held_out)
    run_settings = {
        **asdict(settings),
        **asdict(sizes),
        "adapter": str(adapter) if adapter else None,
        "connection": connection,
    }
    finished = read_finished(path, run_settings)
    if finished is not None:
        print(f"{path.stem}: evaluated already ({path})", flush=True)
        return finished
    from lm_eval.tasks import TaskManager

    from peft_cc.lm_eval.model import CCLM

    began, began_cpu = time.perf_counter(), time.process_time()
    lm = CCLM(
        pretrained=settings.model,
        tokenizer=settings.tokenizer,
        peft=str(adapter) if adapter else None,
        connection=connection,
        device="cuda" if torch.cuda.is_available() else "cpu",
        dtype="float32",
        batch_size=settings.batch_size,
    )
    # Only the data root's tasks: indexing lm-eval's whole catalogue costs seconds per evaluation.
    task_manager = TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=False,
        # The generative tasks count answer_nll's tokens with the model's tokenizer, which they read from here.
        metadata={"data_root": settings.data_root, "pretrained": settings.model, "tokenizer": settings.tokenizer},
    )
    items: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    outputs: dict[str, dict[str, dict[int, str]]] = {}
    seconds: dict[str, float] = {"loading": time.perf_counter() - began}
    cpu_seconds: dict[str, float] = {"loading": time.process_time() - began_cpu}
    item_counts: dict[str, int] = {}
    for part in evaluation_parts(settings, sizes):
        started, started_cpu = time.perf_counter(), time.process_time()
        for language, samples in _run_part(lm, task_manager, part).items():
            for sample in samples:
                index = int(sample["doc_id"])
                scores = items.setdefault(part.benchmark, {}).setdefault(language, {}).setdefault(index, {})
                scores.update({metric: float(sample[metric]) for metric in part.metrics})
                if part.generate:
                    outputs.setdefault(part.benchmark, {}).setdefault(language, {})[index] = _generated(sample)
        seconds[part.name] = time.perf_counter() - started
        cpu_seconds[part.name] = time.process_time() - started_cpu
        item_counts[part.name] = (part.stop - part.start) * len(part.languages)
        print(f"{path.stem}: {part.name}, {item_counts[part.name]} items, {seconds[part.name]:.0f} s", flush=True)
    seconds["total"] = time.perf_counter() - began
    cpu_seconds["total"] = time.process_time() - began_cpu
    result = {
        "items": items,
        "outputs": outputs,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "item_counts": item_counts,
        "cpu_threads": torch.get_num_threads(),
    }
    return write_finished(path, run_settings, result)


def _run_part(lm, task_manager, part: Part) -> dict[str, list[dict]]:
    """lm-eval's logged samples of one part, per language."""
    from lm_eval import simple_evaluate

    tasks = {part.task(language): language for language in part.languages}
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=task_manager,
        samples={task: list(range(part.start, part.stop)) for task in tasks},
        apply_chat_template=True,
        log_samples=True,
        gen_kwargs=None if part.generate else {"max_gen_toks": 0},
        bootstrap_iters=0,
    )
    return {language: results["samples"][task] for task, language in tasks.items()}


def _generated(sample: dict) -> str:
    """The generated text of a logged sample of a generative task (its first request's filtered response)."""
    response = sample["filtered_resps"][0]
    return response[0] if isinstance(response, list) else response
