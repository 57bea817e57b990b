"""Scores of one model output against its gold answer, and aggregates over items.

Every item score is a float in [0, 1]; a benchmark's score in a language is the mean over its items. Text is
compared after :func:`~peft_cc.evaluation.normalization.normalize_text` and split into tokens by
:func:`~peft_cc.evaluation.normalization.tokenize` (words; characters for Chinese, Japanese, Thai and other scripts
written without spaces).

- :func:`extract_choice`: the first option label in a generated text (multiple-choice accuracy).
- :func:`exact_match`: the normalised output equals a normalised gold answer.
- :func:`token_f1`: SQuAD's token-overlap F1, the best over the gold answers.
- :func:`contains_answer`: a normalised gold answer occurs in the normalised output, as a whole run of tokens.
- :func:`rouge_l_f1`: ROUGE-L F1 (longest common token subsequence).
- :func:`majority_rate`: the frequency of the most common gold label.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

from .normalization import normalize_text, normalized_tokens

Answers = str | Sequence[str]


def _as_list(answers: Answers) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def extract_choice(text: str, labels: Sequence[str]) -> str | None:
    """The first option label that occurs in `text` as a label, or `None` when there is none.

    A label counts where it stands alone: not inside a longer run of digits (`"12"` holds no label 1 or 2) or of
    Latin letters (`"Based"` holds no label B). Letter labels are matched in upper case only, so the English
    article "a" is not read as option A. Full-width forms (`"２"`, `"Ｂ"`) count as their ASCII labels.

    Examples with labels `1..3`: `"The answer is 2"` → `"2"`, `"(3) Contradict"` → `"3"`, `"答案是1"` → `"1"`,
    `"Neutral"` → `None`. With labels `A..D`: `"B."` → `"B"`, `"(C)"` → `"C"`, `"a cat"` → `None`.

    Args:
        text: the generated text.
        labels: the option labels, e.g. `["1", "2", "3"]` or `["A", "B", "C", "D"]`.
    """
    text = unicodedata.normalize("NFKC", text)
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    match = re.search(rf"(?<![0-9A-Za-z])({alternatives})(?![0-9A-Za-z])", text)
    return match.group(1) if match else None


def exact_match(prediction: str, answers: Answers, language: str | None = None) -> float:
    """1.0 if the normalised `prediction` equals one of the normalised `answers`, else 0.0."""
    predicted = normalize_text(prediction, language)
    return float(any(predicted == normalize_text(answer, language) for answer in _as_list(answers)))


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)
    overlap = sum((Counter(predicted) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Answers, language: str | None = None) -> float:
    """SQuAD's F1 of token overlap (bag of tokens) between `prediction` and each answer; the best one.

    Two empty token lists score 1.0; one empty list against a non-empty one scores 0.0.
    """
    predicted = normalized_tokens(prediction, language)
    return max(_f1(predicted, normalized_tokens(answer, language)) for answer in _as_list(answers))


def _contains_run(tokens: list[str], run: list[str]) -> bool:
    width = len(run)
    return any(tokens[start : start + width] == run for start in range(len(tokens) - width + 1))


def contains_answer(prediction: str, answers: Answers, language: str | None = None) -> float:
    """1.0 if the tokens of a (non-empty) normalised answer occur, consecutively, in the normalised prediction.

    Token boundaries are respected in spaced scripts (`"1999"` is not found in `"19990"`, nor `"art"` in
    `"start"`); in scripts without spaces, tokens are characters, so this is a substring test there.
    """
    predicted = normalized_tokens(prediction, language)
    for answer in _as_list(answers):
        gold = normalized_tokens(answer, language)
        if gold and _contains_run(predicted, gold):
            return 1.0
    return 0.0


def _lcs_length(first: list[str], second: list[str]) -> int:
    """Length of the longest common subsequence, `O(len(first) * len(second))` time, `O(len(second))` memory."""
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0]
        for position, other in enumerate(second):
            current.append(previous[position] + 1 if token == other else max(previous[position + 1], current[-1]))
        previous = current
    return previous[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (β = 1) between `prediction` and `reference`.

    With `l` the length of the longest common subsequence of their tokens: precision `l / len(prediction)`, recall
    `l / len(reference)`, F1 their harmonic mean; 0.0 if either is empty. Tokens are those of :func:`token_f1`
    without removing English articles (words; characters in scripts without spaces), without stemming, so the
    score means the same in every language (the `rouge_score` package's default tokeniser drops all non-Latin
    letters).
    """
    predicted = normalized_tokens(prediction)
    gold = normalized_tokens(reference)
    if not predicted or not gold:
        return 0.0
    common = _lcs_length(predicted, gold)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def majority_rate(gold_labels: Sequence[str]) -> float:
    """The frequency of the most common gold label: the accuracy of always answering it (0.0 for no items)."""
    if not gold_labels:
        return 0.0
    return Counter(gold_labels).most_common(1)[0][1] / len(gold_labels)


def mean(values: Sequence[float]) -> float | None:
    """The arithmetic mean, or `None` for no values."""
    return sum(values) / len(values) if values else None
