"""The data root's six benchmarks as lm-eval tasks: their documents, their generative requests and their scores.

The task configurations of this folder (`peft_cc_<benchmark>_<language>.yaml`, groups `peft_cc_<benchmark>.yaml`,
shared settings `_<benchmark>_template`) name the functions of this module as `!function data_root_tasks.<name>`.
lm-eval loads this module by its file path, outside any package and without this folder on `sys.path`; so that its
siblings (:mod:`parallel_data`, :mod:`answer_metrics`, :mod:`text_normalization`) import by their bare names from any
working directory, it puts this folder on `sys.path` first. The data root (layout: :mod:`parallel_data`) is given at
run time, as lm-eval's `--metadata '{"data_root": "..."}'` (or `TaskManager(metadata=...)`), else by the environment
variable `PEFT_CC_DATA_ROOT`.

- XNLI, XStoryCloze, MMMLU: multiple choice over the option labels (`1`..`3`, `1`..`2`, `A`..`D`), scored by
  lm-eval's `acc` (the label with the highest log-likelihood after the prompt).
- XQuAD, MKQA, XLSum: greedy generation, scored here (lm-eval has no multilingual token F1, answer containment or
  ROUGE-L with one token per character of Chinese, Japanese and Thai; see :mod:`answer_metrics`), plus
  `answer_nll`: the negative log-likelihood of the (first) gold answer after the prompt, in nats per token of the
  answer, lower is better. It does not depend on decoding, so it moves long before a small
  model's generated answers do.

The tokens of `answer_nll`: the answer's own, those that the prompt followed by the answer has beyond the prompt's
(:func:`answer_token_count`). lm-eval's causal models also score the prompt's trailing white space, which they move
into the continuation (with a chat template, the newline of its generation prompt: at most 0.0024 nats on SmolLM2),
so the summed log-likelihood includes it, but it is not counted as an answer token. The tokens are counted with the
evaluated model's tokenizer, which the tasks read from their metadata (`tokenizer`, else `pretrained`): lm-eval's
command line puts the model args there; from Python, give them to the `TaskManager`.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import datasets
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

# lm-eval loads this module by its file path (see above): its siblings are imported from this folder, put first on
# the import path (once: lm-eval, a test or a script may each load this module).
TASKS_FOLDER = str(Path(__file__).resolve().parent)
if TASKS_FOLDER not in sys.path:
    sys.path.insert(0, TASKS_FOLDER)

from answer_metrics import contains_answer, exact_match, rouge_l_f1, token_f1  # noqa: E402
from parallel_data import CHOICES, load_parallel_items  # noqa: E402

DATA_ROOT_VARIABLE = "PEFT_CC_DATA_ROOT"

# The key of the gold-answer request's document that holds the number of tokens lm-eval scores for the answer.
GOLD_TOKENS = "gold_answer_tokens"


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

    Each document has `index` (the item's line number from 0, the same in every language), `prompt`,
    `english_prompt` (for the `cc` model's bilingual connection), `language`, `answers` (the acceptable gold answers;
    one but for MKQA) and `label` (the gold option's index for a multiple-choice benchmark, else -1).

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
                "index": item.index,
                "prompt": item.prompt,
                "english_prompt": item.english_prompt,
                "language": language,
                "answers": answers,
                "label": choices.index(item.answer) if choices else -1,
            }
        )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(documents)})


def answer_token_count(tokenizer, context: str, continuation: str) -> int:
    """The number of tokens of `continuation` after `context`: those of `context + continuation` beyond those of
    `context`. Where the context's trailing white space merges into the continuation's first token (`"Antwort: "` +
    `"Paris"`), that token counts: the tokens of `context + continuation` beyond those of the context without its
    trailing white space.

    Args:
        tokenizer: the evaluated model's tokenizer (a `transformers` tokenizer).
        context: the request's context (the templated prompt).
        continuation: the scored text (the gold answer).
    """

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    whole = length(context + continuation)
    return whole - length(context) or whole - length(context.rstrip())


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)


def metadata_tokenizer(metadata: Mapping):
    """The evaluated model's tokenizer, named by the task metadata's `tokenizer`, else `pretrained` (with its
    `revision` and `trust_remote_code`), as lm-eval's `hf` model chooses its own.

    Raises:
        ValueError: the metadata names none (e.g. a `TaskManager` made without the model args).
    """
    name = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(name, str) or not name:
        raise ValueError(
            "answer_nll is in nats per gold-answer token, counted with the evaluated model's tokenizer, which the "
            "peft_cc_* generative tasks read from their metadata (`tokenizer`, else `pretrained`). lm-eval's command "
            "line puts the model args there; from Python, name it in the TaskManager's metadata, e.g. "
            "TaskManager(include_path=..., metadata={'pretrained': 'HuggingFaceTB/SmolLM2-135M-Instruct', "
            "'data_root': ...})."
        )
    return _load_tokenizer(name, metadata.get("revision"), bool(metadata.get("trust_remote_code", False)))


class GenerationWithGoldLikelihood(ConfigurableTask):
    """A `generate_until` task that also asks for the log-likelihood of the first gold answer after the prompt: two
    requests per document, whose results the configuration's `process_results` receives in this order; this class
    adds `answer_nll`, in nats per answer token (see the module docstring).

    With `max_gen_toks` 0 (`--gen_kwargs max_gen_toks=0`) nothing is generated: each document asks only for the gold
    answer's log-likelihood, and `answer_nll` is its only metric (about half the cost where the prompts are long).
    """

    def __init__(self, config: dict) -> None:
        # lm-eval hands a `class:` task its whole configuration, the `class` key included.
        super().__init__(config={key: value for key, value in config.items() if key != "class"})
        self._gold_tokens: dict[int, int] = {}

    def construct_requests(self, doc: dict, ctx: str, metadata: tuple, **kwargs) -> list[Instance]:
        continuation = self.config.target_delimiter + doc["answers"][0]
        tokens = answer_token_count(metadata_tokenizer(self.config.metadata or {}), ctx, continuation)
        if tokens < 1:
            raise ValueError(f"{self.config.task} item {doc['index']}: the gold answer {continuation!r} has no token.")
        gold = Instance(
            request_type="loglikelihood",
            doc={**doc, GOLD_TOKENS: tokens},
            arguments=(ctx, continuation),
            idx=1,
            metadata=metadata,
        )
        if not self.generates:
            return [gold]
        return [super().construct_requests(doc, ctx, metadata=metadata, **kwargs), gold]

    @property
    def generates(self) -> bool:
        """Whether the documents ask for a generation (`max_gen_toks` is not 0), besides the gold log-likelihood."""
        return (self.config.generation_kwargs or {}).get("max_gen_toks") != 0

    def build_all_requests(self, **kwargs) -> None:
        super().build_all_requests(**kwargs)
        # The counts travel in the gold requests' documents, so requests read back from lm-eval's cache keep them.
        self._gold_tokens = {
            instance.doc["index"]: instance.doc[GOLD_TOKENS] for instance in self.instances if instance.idx == 1
        }

    def process_results(self, doc: dict, results: list) -> dict[str, float]:
        """The configuration's scores of the generated text (when it generates), plus `answer_nll` from the gold
        answer's `(log-likelihood, is_greedy)`, the last result: nats per answer token."""
        log_likelihood, _ = results[-1]
        answer_nll = -float(log_likelihood) / self._gold_tokens[doc["index"]]
        if not self.generates:
            return {"answer_nll": answer_nll}
        return {**super().process_results(doc, results), "answer_nll": answer_nll}


def score_extractive_qa(doc: dict, results: list) -> dict[str, float]:
    """XQuAD's item scores of the generated text `results[0]`: `exact_match`, `f1` (token F1) and `contains`."""
    output, answers, language = results[0], doc["answers"], doc["language"]
    return {
        "exact_match": exact_match(output, answers, language),
        "f1": token_f1(output, answers, language),
        "contains": contains_answer(output, answers, language),
    }


def score_open_qa(doc: dict, results: list) -> dict[str, float]:
    """MKQA's item scores of the generated text `results[0]`: `accuracy` (a gold answer occurs in the output),
    `exact_match` and `f1`."""
    output, answers, language = results[0], doc["answers"], doc["language"]
    return {
        "accuracy": contains_answer(output, answers, language),
        "exact_match": exact_match(output, answers, language),
        "f1": token_f1(output, answers, language),
    }


def score_summary(doc: dict, results: list) -> dict[str, float]:
    """XLSum's item score of the generated text `results[0]`: `rouge_l` (ROUGE-L F1)."""
    return {"rouge_l": rouge_l_f1(results[0], doc["answers"][0])}
