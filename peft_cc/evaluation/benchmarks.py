"""The benchmarks the evaluator knows, and how one output of each is scored.

Item scores (a language's score is their mean over its items):

- XNLI, XStoryCloze, MMMLU (multiple choice): `accuracy`, whether the first option label in the output is the gold
  one, and `unparsed`, whether the output holds no label at all. Besides, the evaluator scores every option by its
  log-likelihood (`accuracy_loglik`) and reports the `majority_rate` of the gold labels. Main figure: `accuracy`.
- XQuAD (extractive QA): `exact_match`, `f1` (token F1) and `contains` (the answer occurs in the output). Main
  figure: `f1`.
- MKQA (open QA): `accuracy` (a gold answer occurs in the output, as in `contains`), `exact_match` and `f1`, each the
  best over the gold answers. Main figure: `accuracy`.
- XLSum (summarisation): `rouge_l` (ROUGE-L F1). Main figure: `rouge_l`.

For the generative benchmarks (XQuAD, MKQA, XLSum) the evaluator also reports `answer_nll`: the negative
log-likelihood of the (first) gold answer after the prompt, in nats per answer token, lower is better. It does not
depend on decoding, so it moves long before a small model's generated answers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import metrics

BenchmarkKind = Literal["multiple_choice", "extractive_qa", "open_qa", "summarization"]

# How the Markdown report and the plot name each score.
METRIC_LABELS: dict[str, str] = {
    "accuracy": "acc",
    "accuracy_loglik": "acc (log-lik.)",
    "majority_rate": "majority",
    "unparsed": "no label",
    "exact_match": "EM",
    "f1": "F1",
    "contains": "contains",
    "rouge_l": "ROUGE-L",
    "answer_nll": "gold NLL",
}

# Scores that are not fractions in [0, 1] (the report prints them as they are, not in %).
UNBOUNDED_METRICS = frozenset({"answer_nll"})


@dataclass(frozen=True)
class Benchmark:
    """What a benchmark is and how its outputs are scored.

    Attributes:
        name: the folder name under the data root, e.g. `"XNLI"`.
        kind: multiple choice, extractive QA, open QA or summarisation.
        primary_metric: the score the plot shows and the summary table compares.
        table_metrics: the scores of the per-language Markdown table, per system.
        labels: the option labels of a multiple-choice benchmark, as they appear in prompts and gold answers.
    """

    name: str
    kind: BenchmarkKind
    primary_metric: str
    table_metrics: tuple[str, ...]
    labels: tuple[str, ...] = ()

    @property
    def is_multiple_choice(self) -> bool:
        return self.kind == "multiple_choice"

    def check_answer(self, answer: str | list[str], where: str) -> None:
        """Refuse a gold answer this benchmark cannot score (`where` names the item in the message)."""
        if self.is_multiple_choice and answer not in self.labels:
            raise ValueError(f"{where}: the gold answer {answer!r} is not one of the labels {list(self.labels)}.")
        if not self.is_multiple_choice and not (isinstance(answer, str) or isinstance(answer, list) and answer):
            raise ValueError(f"{where}: expected a gold answer string or a non-empty list of strings, got {answer!r}.")

    def score(self, output: str, answer: str | list[str], language: str) -> dict[str, float]:
        """The item scores of one generated `output` against its gold `answer` (see the module table)."""
        if self.kind == "multiple_choice":
            choice = metrics.extract_choice(output, self.labels)
            return {"accuracy": float(choice == answer), "unparsed": float(choice is None)}
        if self.kind == "extractive_qa":
            return {
                "exact_match": metrics.exact_match(output, answer, language),
                "f1": metrics.token_f1(output, answer, language),
                "contains": metrics.contains_answer(output, answer, language),
            }
        if self.kind == "open_qa":
            return {
                "accuracy": metrics.contains_answer(output, answer, language),
                "exact_match": metrics.exact_match(output, answer, language),
                "f1": metrics.token_f1(output, answer, language),
            }
        return {"rouge_l": metrics.rouge_l_f1(output, answer)}


BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (
        Benchmark("XNLI", "multiple_choice", "accuracy", ("accuracy", "accuracy_loglik"), ("1", "2", "3")),
        Benchmark("XStoryCloze", "multiple_choice", "accuracy", ("accuracy", "accuracy_loglik"), ("1", "2")),
        Benchmark("MMMLU", "multiple_choice", "accuracy", ("accuracy", "accuracy_loglik"), ("A", "B", "C", "D")),
        Benchmark("XQuAD", "extractive_qa", "f1", ("exact_match", "f1", "contains", "answer_nll")),
        Benchmark("MKQA", "open_qa", "accuracy", ("accuracy", "f1", "answer_nll")),
        Benchmark("XLSum", "summarization", "rouge_l", ("rouge_l", "answer_nll")),
    )
}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name` (case-insensitive)."""
    by_lower = {known.lower(): benchmark for known, benchmark in BENCHMARKS.items()}
    if name.lower() not in by_lower:
        raise ValueError(f"Unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}.")
    return by_lower[name.lower()]
