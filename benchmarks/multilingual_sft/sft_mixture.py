"""The data of the multilingual SFT experiment: which items are evaluated, and the training mixture from the rest.

Items are parallel across languages (line `i` of every language file of a benchmark is the same item; XLSum's
articles differ per language but are held out all the same): an item index that is evaluated, in any language, is
never trained on, in any language. The evaluated items of a benchmark are its first `n` indices
(:class:`EvaluationSizes`); training draws from the indices `>= n`.

The training mixture carries answer text in every completion, so that fine-tuning does not teach the model to answer
open questions with an option label (the earlier run's mixture had 37% bare labels, and its fine-tuned models
answered open questions with "1"):

- MKQA, XQuAD: the gold answer (MKQA: the first acceptable one);
- XNLI, XStoryCloze, MMMLU: the gold option's label followed by its text as the prompt writes it, e.g. `2. Neutral`
  or `B. 4`. The label comes first, so the option log-likelihood accuracy (the label's likelihood right after the
  prompt) measures what training taught;
- XLSum is not trained on: its articles do not fit the training length; nor, by default, is XQuAD: within 256 tokens
  only short English contexts fit (:data:`TRAIN_BENCHMARKS`).

Each training benchmark gets an equal share of the pairs, drawn uniformly over its languages and items.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from parallel_data import CHOICES, ParallelItem, available_languages, load_parallel_items

ENGLISH = "en"
# XQuAD is not trained on by default: its contexts leave only short English items within the training length.
TRAIN_BENCHMARKS: tuple[str, ...] = ("MKQA", "XNLI", "XStoryCloze", "MMMLU")
# The non-English languages evaluated: the first `--languages-per-benchmark` of these that a benchmark has. Chinese,
# Arabic and Russian (non-Latin scripts) first: every benchmark has at least two of them.
LANGUAGE_PREFERENCE: tuple[str, ...] = ("zh", "ar", "ru", "de", "es", "hi", "tr", "fr", "pt", "sw")
# The option lines of a multiple-choice prompt: "(2) Neutral", "(B) 4".
OPTION_LINE = re.compile(r"^\((?P<label>[1-9A-Z])\)[ \t]*(?P<text>.*?)[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class EvaluationSizes:
    """How many items of each benchmark are evaluated (the first ones: indices `0 .. n-1`, in every language).

    Attributes:
        loglik_items: per benchmark, the items scored by log-likelihood (gold NLL or option accuracy).
        generation_items: per generative benchmark (MKQA, XQuAD, XLSum), how many of those items are also answered
            by greedy generation (the first ones); at most its `loglik_items`.
    """

    loglik_items: dict[str, int]
    generation_items: dict[str, int]

    def __post_init__(self) -> None:
        for benchmark, count in {**self.loglik_items, **self.generation_items}.items():
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"{benchmark}: the number of evaluated items must be an int >= 0, got {count!r}.")
        for benchmark, count in self.generation_items.items():
            if count > self.loglik_items.get(benchmark, 0):
                raise ValueError(
                    f"{benchmark}: {count} generated items but {self.loglik_items.get(benchmark, 0)} log-likelihood "
                    "items; the generated items are the first of the log-likelihood ones."
                )

    @property
    def benchmarks(self) -> list[str]:
        return [benchmark for benchmark, count in self.loglik_items.items() if count > 0]

    def held_out(self, benchmark: str) -> int:
        """The first item index of `benchmark` that may be trained on: every lower index is evaluated."""
        return self.loglik_items.get(benchmark, 0)


def evaluation_languages(data_root: str, benchmark: str, count: int) -> list[str]:
    """English and the first `count` languages of :data:`LANGUAGE_PREFERENCE` that `benchmark` has under
    `data_root`.

    Raises:
        ValueError: the benchmark has no English or fewer than `count` of the preferred languages.
    """
    present = available_languages(data_root, benchmark)
    chosen = [language for language in LANGUAGE_PREFERENCE if language in present][:count]
    if ENGLISH not in present or len(chosen) < count:
        raise ValueError(
            f"{benchmark} under {data_root} has the languages {present}: need English and {count} of "
            f"{', '.join(LANGUAGE_PREFERENCE)}."
        )
    return [ENGLISH, *chosen]


def option_text(prompt: str, label: str) -> str:
    """The text of option `label` in a multiple-choice prompt (its line `(label) text`).

    Raises:
        ValueError: the prompt has no such option line, or one with no text.
    """
    options = {match["label"]: match["text"] for match in OPTION_LINE.finditer(prompt)}
    if not options.get(label):
        raise ValueError(f"No option ({label}) with text in the prompt {prompt[-200:]!r}.")
    return options[label]


def completion(item: ParallelItem) -> str:
    """The training completion of `item`: its answer text; for a multiple-choice item, `<label>. <option text>`."""
    if item.benchmark in CHOICES:
        return f"{item.answer}. {option_text(item.prompt, item.answer)}"
    return item.first_answer


def conversation(item: ParallelItem) -> dict:
    """A conversational prompt-completion row of `item`, with its English prompt (`prompt_en`) and where it came
    from (`benchmark`, `language`, `index`)."""
    return {
        "prompt": [{"role": "user", "content": item.prompt}],
        "completion": [{"role": "assistant", "content": completion(item)}],
        "prompt_en": [{"role": "user", "content": item.english_prompt}],
        "benchmark": item.benchmark,
        "language": item.language,
        "index": item.index,
    }


def training_rows(
    data_root: str,
    sizes: EvaluationSizes,
    num_pairs: int,
    fits: Callable[[dict], bool],
    benchmarks: Sequence[str] = TRAIN_BENCHMARKS,
    seed: int = 0,
) -> list[dict]:
    """`num_pairs` conversational rows (:func:`conversation`), an equal share from each of `benchmarks`, shuffled.

    Each share is drawn uniformly from the benchmark's items of every language at indices `>= sizes.held_out(...)`
    that `fits` (a row that does not is left out rather than truncated: a truncated row loses its answer). The same
    `seed` gives the same rows.

    Args:
        data_root: the training data root (layout of :mod:`parallel_data`).
        sizes: the evaluated items, never trained on.
        num_pairs: how many rows.
        fits: `fits(row) -> bool`, whether a row fits the training length (both its prompts with the completion).
        benchmarks: the benchmarks to train on.
        seed: the sampling seed (the same rows for every system and training seed).

    Raises:
        ValueError: a benchmark has too few rows that fit for its share.
    """
    shares = Counter({benchmark: num_pairs // len(benchmarks) for benchmark in benchmarks})
    for benchmark in benchmarks[: num_pairs % len(benchmarks)]:
        shares[benchmark] += 1
    generator = random.Random(seed)
    rows: list[dict] = []
    for benchmark in benchmarks:
        candidates = [
            item
            for language in available_languages(data_root, benchmark)
            for item in load_parallel_items(data_root, benchmark, language)[sizes.held_out(benchmark) :]
        ]
        generator.shuffle(candidates)
        chosen = []
        for item in candidates:
            if len(chosen) == shares[benchmark]:
                break
            row = conversation(item)
            if row["completion"][0]["content"] and fits(row):
                chosen.append(row)
        if len(chosen) < shares[benchmark]:
            raise ValueError(
                f"{benchmark}: only {len(chosen)} training rows fit (of {len(candidates)} items at indices >= "
                f"{sizes.held_out(benchmark)}), {shares[benchmark]} needed: train on fewer pairs or longer rows."
            )
        rows.extend(chosen)
    generator.shuffle(rows)
    return rows


def token_budget_check(tokenizer, max_length: int) -> Callable[[dict], bool]:
    """`fits(row)`: whether the chat-templated prompt plus completion, and the templated English prompt, take at most
    `max_length` tokens of `tokenizer`."""

    def length(messages: list[dict], generation_prompt: bool) -> int:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5

    def fits(row: dict) -> bool:
        return (
            length(row["prompt"] + row["completion"], False) <= max_length
            and length(row["prompt_en"], True) <= max_length
        )

    return fits


def mixture_summary(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    """`{benchmark: {language: rows}}` of a mixture."""
    summary: dict[str, dict[str, int]] = {}
    for row in rows:
        per_language = summary.setdefault(row["benchmark"], {})
        per_language[row["language"]] = per_language.get(row["language"], 0) + 1
    return {benchmark: dict(sorted(languages.items())) for benchmark, languages in sorted(summary.items())}
