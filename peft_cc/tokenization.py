"""Turning paired prompts into the tensors of a CC-Tuning forward call.

A prompt is one of:

- a list of chat messages (`[{"role": "user", "content": ...}, ...]`): the tokenizer's chat template is applied
  with the generation prompt, so the prompt ends where the response starts;
- a string: text that is already templated, tokenised as it is (no special tokens added);
- a list of token ids: used as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


def prompt_token_ids(prompt: Prompt, tokenizer=None) -> list[int]:
    """The token ids of `prompt` (see the module docstring for the accepted forms).

    Raises:
        ValueError: a string or messages without a tokenizer.
        TypeError: any other kind of prompt.
    """
    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict)):
        if tokenizer is None:
            raise ValueError("A tokenizer is needed to tokenise a prompt given as text or chat messages.")
        if isinstance(prompt, str):
            return tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return tokenizer.apply_chat_template(
            list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if isinstance(prompt, Sequence) and all(
        isinstance(token, int) and not isinstance(token, bool) for token in prompt
    ):
        return list(prompt)
    raise TypeError(
        f"A prompt must be chat messages, a string or a list of token ids, got {type(prompt).__name__}: {prompt!r:.80}"
    )


def encode_pair(
    prompt: Prompt,
    completion: str,
    english_prompt: Prompt,
    tokenizer,
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """Token ids of one training example: the prompt and its completion, and the English prompt.

    The completion is followed by the tokenizer's end-of-sequence token. Truncation to `max_length` cuts the end
    of the sequence (and of the English prompt); a row left without any completion token has no anchor and is
    not connected.

    Returns:
        `{"input_ids", "labels", "english_input_ids"}`; `labels` is -100 on the prompt.
    """
    prompt_ids = prompt_token_ids(prompt, tokenizer)
    completion_ids = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + completion_ids)[:max_length]
    english_ids = prompt_token_ids(english_prompt, tokenizer)[:max_length]
    return {"input_ids": input_ids, "labels": labels, "english_input_ids": english_ids}


def _right_pad(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, : len(row)] = 1
    return ids, mask


def collate_pairs(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples (see :func:`encode_pair`) into the keyword arguments of a CC-Tuning forward call.

    Returns:
        `input_ids`, `attention_mask`, `labels` (`[B, T]`, -100 on padding), `english_input_ids` and
        `english_attention_mask` (`[B, T_en]`).
    """
    input_ids, attention_mask = _right_pad([example["input_ids"] for example in examples], pad_token_id)
    labels, _ = _right_pad([example["labels"] for example in examples], -100)
    english_ids, english_mask = _right_pad([example["english_input_ids"] for example in examples], pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "english_input_ids": english_ids,
        "english_attention_mask": english_mask,
    }
