"""The data root's six benchmarks as lm-eval tasks: their documents, their generative requests and their scores.

The task configurations (`tasks/peft_cc_<benchmark>_<language>.yaml`, groups `tasks/peft_cc_<benchmark>.yaml`) name
the functions of this module. The data root (layout: :mod:`peft_cc.parallel_data`) is given at run time, as lm-eval's
`--metadata '{"data_root": "..."}'` (or `TaskManager(metadata=...)`), else by the environment variable
`PEFT_CC_DATA_ROOT`.

- XNLI, XStoryCloze, MMMLU: multiple choice over the option labels (`1`..`3`, `1`..`2`, `A`..`D`), scored by
  lm-eval's `acc` (the label with the highest log-likelihood after the prompt).
- XQuAD, MKQA, XLSum: greedy generation, scored here (lm-eval has no multilingual token F1, answer containment or
  ROUGE-L with one token per character of Chinese, Japanese and Thai; see :mod:`peft_cc.lm_eval.metrics`), plus
  `answer_nll`: the negative log-likelihood of the (first) gold answer after the prompt, in nats per answer, lower is
  better. It does not depend on decoding, so it moves long before a small model's generated answers do.
"""

from __future__ import annotations

import os

import datasets
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

from ..parallel_data import load_parallel_items
from .metrics import contains_answer, exact_match, rouge_l_f1, token_f1

DATA_ROOT_VARIABLE = "PEFT_CC_DATA_ROOT"

# The option labels of the multiple-choice benchmarks, as prompts and gold answers write them.
CHOICES: dict[str, tuple[str, ...]] = {
    "XNLI": ("1", "2", "3"),
    "XStoryCloze": ("1", "2"),
    "MMMLU": ("A", "B", "C", "D"),
}


def resolve_data_root(metadata_root: str | None) -> str:
    """The benchmark data root: lm-eval's metadata `data_root`, else `$PEFT_CC_DATA_ROOT`.

    Raises:
        ValueError: neither is set.
    """
    root = metadata_root or os.environ.get(DATA_ROOT_VARIABLE)
    if not root:
        raise ValueError(
            "The peft_cc_* tasks read the benchmark data root (layout <root>/<Benchmark>/prompts/<lang>.jsonl): give "
            f'it as --metadata \'{{"data_root": "..."}}\' or in the environment variable {DATA_ROOT_VARIABLE}.'
        )
    return root


def load_benchmark(benchmark: str, language: str, data_root: str | None = None, **_metadata) -> datasets.DatasetDict:
    """lm-eval's `custom_dataset`: the items of `benchmark` in `language` as the split `test`.

    Each document has `prompt`, `english_prompt` (for the `cc` model's bilingual connection), `language`,
    `answers` (the acceptable gold answers; one but for MKQA) and `label` (the gold option's index for a
    multiple-choice benchmark, else -1).

    Args:
        benchmark: the benchmark folder name, e.g. `"XNLI"`.
        language: the language code, e.g. `"zh"`.
        data_root: the data root (see :func:`resolve_data_root`).
        **_metadata: the rest of lm-eval's task metadata (its version, the model arguments), unused.
    """
    choices = CHOICES.get(benchmark)
    documents = []
    for item in load_parallel_items(resolve_data_root(data_root), benchmark, language):
        answers = [item.answer] if isinstance(item.answer, str) else list(item.answer)
        if choices is not None and item.answer not in choices:
            raise ValueError(f"{benchmark}/{language} line {item.index + 1}: {item.answer!r} is not one of {choices}.")
        if not answers:
            raise ValueError(f"{benchmark}/{language} line {item.index + 1}: no gold answer.")
        documents.append(
            {
                "prompt": item.prompt,
                "english_prompt": item.english_prompt,
                "language": language,
                "answers": answers,
                "label": choices.index(item.answer) if choices else -1,
            }
        )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(documents)})


class GenerationWithGoldLikelihood(ConfigurableTask):
    """A `generate_until` task that also asks for the log-likelihood of the first gold answer after the prompt:
    two requests per document, whose results the task's `process_results` receives in this order."""

    def __init__(self, config: dict) -> None:
        # lm-eval hands a `class:` task its whole configuration, the `class` key included.
        super().__init__(config={key: value for key, value in config.items() if key != "class"})

    def construct_requests(self, doc: dict, ctx: str, metadata: tuple, **kwargs) -> list[Instance]:
        generation = super().construct_requests(doc, ctx, metadata=metadata, **kwargs)
        gold = Instance(
            request_type="loglikelihood",
            doc=doc,
            arguments=(ctx, self.config.target_delimiter + doc["answers"][0]),
            idx=1,
            metadata=metadata,
        )
        return [generation, gold]


def _answer_nll(results: list) -> float:
    _, (log_likelihood, _) = results
    return -float(log_likelihood)


def score_extractive_qa(doc: dict, results: list) -> dict[str, float]:
    """XQuAD's item scores: `exact_match`, `f1` (token F1), `contains` and `answer_nll`."""
    output, answers, language = results[0], doc["answers"], doc["language"]
    return {
        "exact_match": exact_match(output, answers, language),
        "f1": token_f1(output, answers, language),
        "contains": contains_answer(output, answers, language),
        "answer_nll": _answer_nll(results),
    }


def score_open_qa(doc: dict, results: list) -> dict[str, float]:
    """MKQA's item scores: `accuracy` (a gold answer occurs in the output), `exact_match`, `f1` and `answer_nll`."""
    output, answers, language = results[0], doc["answers"], doc["language"]
    return {
        "accuracy": contains_answer(output, answers, language),
        "exact_match": exact_match(output, answers, language),
        "f1": token_f1(output, answers, language),
        "answer_nll": _answer_nll(results),
    }


def score_summary(doc: dict, results: list) -> dict[str, float]:
    """XLSum's item scores: `rouge_l` (ROUGE-L F1) and `answer_nll`."""
    return {"rouge_l": rouge_l_f1(results[0], doc["answers"][0]), "answer_nll": _answer_nll(results)}
