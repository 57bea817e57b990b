"""Scores of one generated answer against its gold answers, for the generative tasks (:mod:`data_root_tasks`).

lm-eval's own metrics lack what multilingual answers need (Unicode normalisation, one token per character in
Chinese, Japanese and Thai, answer containment). Every score is a float in [0, 1]; a task's score is the mean over
its documents. Text is compared after :func:`~text_normalization.normalize_text` and split into tokens by
:func:`~text_normalization.tokenize` (words; characters for Chinese, Japanese, Thai and other scripts
written without spaces).

- :func:`exact_match`: the normalised output equals a normalised gold answer.
- :func:`token_f1`: SQuAD's token-overlap F1, the best over the gold answers.
- :func:`contains_answer`: a normalised gold answer occurs in the normalised output, as a whole run of tokens.
- :func:`rouge_l_f1`: ROUGE-L F1 (longest common token subsequence).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from text_normalization import normalize_text, normalized_tokens

Answers = str | Sequence[str]


def _as_list(answers: Answers) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(prediction: str, answers: Answers, language: str | None = None) -> float:
    """1.0 if the normalised `prediction` equals one of the normalised `answers`, else 0.0."""
    predicted = normalize_text(prediction, language)
    return float(any(predicted == normalize_text(answer, language) for answer in _as_list(answers)))


def _f1_of_matches(matches: int, predicted_length: int, gold_length: int) -> float:
    """F1: the harmonic mean of precision `matches / predicted_length` and recall `matches / gold_length` (both
    lengths positive); 0.0 when nothing matches."""
    if matches == 0:
        return 0.0
    precision, recall = matches / predicted_length, matches / gold_length
    return 2 * precision * recall / (precision + recall)


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)
    overlap = sum((Counter(predicted) & Counter(gold)).values())
    return _f1_of_matches(overlap, len(predicted), len(gold))


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
    return _f1_of_matches(_lcs_length(predicted, gold), len(predicted), len(gold))
