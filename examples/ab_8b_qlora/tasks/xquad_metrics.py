"""SQuAD v1.1 exact match and token F1 for the XQuAD tasks of this folder (`process_results` of `_xquad_common`).

They replace lm-eval's `xquad/utils.process_results_qa`, whose module imports `transformers.data.metrics.squad_metrics`
(gone in transformers 5), with the same definitions: the generation is compared with the *first* gold answer after
normalising both (lower case, ASCII punctuation removed, the English articles a/an/the removed, white space
collapsed); exact match is 1 when the normalised strings are equal, F1 is the harmonic mean of precision and recall of
the shared tokens (split on white space, counted with multiplicity). Standard library only.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """`text` in lower case without ASCII punctuation and English articles, its white space collapsed."""
    kept = "".join(character for character in text.lower() if character not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", kept).split())


def exact_match(gold: str, prediction: str) -> int:
    """1 if the normalised prediction equals the normalised gold answer, else 0."""
    return int(normalize_answer(gold) == normalize_answer(prediction))


def token_f1(gold: str, prediction: str) -> float:
    """SQuAD's token F1 of `prediction` against `gold`; two empty answers score 1, one empty answer 0."""
    gold_tokens, predicted_tokens = normalize_answer(gold).split(), normalize_answer(prediction).split()
    if not gold_tokens or not predicted_tokens:
        return float(gold_tokens == predicted_tokens)
    shared = sum((Counter(gold_tokens) & Counter(predicted_tokens)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted_tokens), shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def process_results_qa(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval's `process_results`: `exact_match` and `f1` of the generation `results[0]` against the document's
    first gold answer."""
    gold, prediction = doc["answers"]["text"][0], results[0]
    return {"exact_match": exact_match(gold, prediction), "f1": token_f1(gold, prediction)}
