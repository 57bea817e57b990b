"""Turning paired prompts into the tensors of a CC-Tuning forward call.

A prompt is one of:

- a list of chat messages (`[{"role": "user", "content": ...}, ...]`): the tokenizer's chat template is applied
  with the generation prompt, so the prompt ends where the response starts;
- a string: text that is already templated, tokenised as it is (no special tokens added);
- a list of token ids: used as it is.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


def prompt_token_ids(prompt: Prompt, tokenizer: Any | None = None, where: str = "The prompt") -> list[int]:
    """The token ids of `prompt` (see the module docstring for the accepted forms).

    Args:
        prompt: chat messages, templated text, or token ids (a list, a 1-D integer tensor or array).
        tokenizer: needed for text and chat messages.
        where: how error messages name the prompt, e.g. "Pair 3, English prompt".

    Raises:
        ValueError: text or messages without a tokenizer, or a message without `role` and `content`.
        TypeError: any other kind of prompt.
    """
    if isinstance(prompt, np.ndarray):
        prompt = torch.from_numpy(prompt) if prompt.dtype.kind in "iu" else prompt
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise TypeError(
                f"{where}: a tensor prompt must be a 1-D integer tensor, got {prompt.dtype} {tuple(prompt.shape)}."
            )
        return prompt.tolist()
    if isinstance(prompt, str):
        _require_tokenizer(tokenizer, where, "text")
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise TypeError(
            f"{where}: a prompt must be a list of chat messages, a string or a list of token ids, got "
            f"{type(prompt).__name__}."
        )
    if len(prompt) == 0:
        return []
    if all(isinstance(message, Mapping) for message in prompt):
        if not all("role" in message and "content" in message for message in prompt):
            raise ValueError(f"{where}: every chat message must have a `role` and a `content`.")
        _require_tokenizer(tokenizer, where, "chat messages")
        encoded = tokenizer.apply_chat_template(
            list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        if isinstance(encoded, torch.Tensor):
            encoded = encoded.reshape(-1).tolist()
        return list(encoded)
    if all(isinstance(token, numbers.Integral) and not isinstance(token, bool) for token in prompt):
        return [int(token) for token in prompt]
    raise TypeError(
        f"{where}: a list prompt must hold only chat messages (dicts with `role` and `content`) or only token ids "
        f"(ints), got element types {sorted({type(element).__name__ for element in prompt})}."
    )


def _require_tokenizer(tokenizer: Any | None, where: str, kind: str) -> None:
    if tokenizer is None:
        raise ValueError(f"{where} is given as {kind}: pass a `tokenizer`.")


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


def right_pad(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, attention_mask)`, each `[len(rows), width]` long: the rows right-padded with `value`.

    The width is the longest row, and at least 1, so that a batch of empty rows still has one (padding) column.
    """
    width = max(1, max((len(row) for row in rows), default=0))
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
    input_ids, attention_mask = right_pad([example["input_ids"] for example in examples], pad_token_id)
    labels, _ = right_pad([example["labels"] for example in examples], -100)
    english_ids, english_mask = right_pad([example["english_input_ids"] for example in examples], pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "english_input_ids": english_ids,
        "english_attention_mask": english_mask,
    }
