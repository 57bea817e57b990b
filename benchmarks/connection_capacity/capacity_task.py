"""A diagnostic task whose answer only the English prompt contains: does information cross the connection?

The English prompt names one of a few words; the non-English (French) prompt only asks which word was named; the
completion is the word. Without the connection a model can do no better than the prior over the words (held-out
loss ≈ the entropy of that prior per completion token); with a connection from an informative layer it can read the
word from the injected English activation. Prompt wordings are split so that the held-out examples pair French and
English wordings never seen together in training.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from peft_cc.tokenization import collate_pairs, encode_pair

WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "piano",
    "garden",
    "silver",
    "candle",
    "rocket",
    "forest",
    "window",
)
FRENCH_QUESTIONS = (
    "Quel mot a été nommé ?",
    "Quel est le mot mentionné ?",
    "Dis-moi le mot qui a été donné.",
    "Quel mot ai-je dit ?",
)
ENGLISH_STATEMENTS = (
    "The word is {word}. Which word was named?",
    "I named the word {word}. What is the word?",
    "Remember this word: {word}. Which word was it?",
    "My word is {word}. Tell me the word.",
)
SYSTEM_PROMPT = "Answer with one word."


def _templates(heldout: bool) -> list[tuple[int, int]]:
    """(French question, English statement) index pairs: even sums for training, odd ones held out."""
    parity = 1 if heldout else 0
    return [
        (i, j) for i in range(len(FRENCH_QUESTIONS)) for j in range(len(ENGLISH_STATEMENTS)) if (i + j) % 2 == parity
    ]


def capacity_example(tokenizer, word: str, french: int, english: int) -> dict[str, list[int]]:
    """One encoded example (see :func:`peft_cc.tokenization.encode_pair`) with the model's chat template."""
    system = {"role": "system", "content": SYSTEM_PROMPT}
    return encode_pair(
        [system, {"role": "user", "content": FRENCH_QUESTIONS[french]}],
        word,
        [system, {"role": "user", "content": ENGLISH_STATEMENTS[english].format(word=word)}],
        tokenizer,
    )


def training_batches(
    tokenizer, batch_size: int = 8, words: Sequence[str] = WORDS, seed: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless, seeded stream of right-padded training batches (keyword arguments of a forward call)."""
    rng = random.Random(seed)
    templates = _templates(heldout=False)
    while True:
        examples = [
            capacity_example(tokenizer, rng.choice(list(words)), *rng.choice(templates)) for _ in range(batch_size)
        ]
        yield collate_pairs(examples, tokenizer.pad_token_id)


def heldout_batch(tokenizer, words: Sequence[str] = WORDS, templates_per_word: int = 2) -> dict[str, torch.Tensor]:
    """Every word with `templates_per_word` held-out wordings, as one batch."""
    templates = _templates(heldout=True)[:templates_per_word]
    examples = [capacity_example(tokenizer, word, *pair) for word in words for pair in templates]
    return collate_pairs(examples, tokenizer.pad_token_id)


def without_english(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its English prompts (for a model without the connection)."""
    return {key: value for key, value in batch.items() if not key.startswith("english_")}
