"""Benchmark prompts as model inputs: the chat template, and left-padded batches.

With a chat template, a prompt becomes one user message followed by the generation prompt (exactly as
`peft_cc.tokenization.prompt_token_ids` builds training prompts), so the last token is the one whose output predicts
the first answer token. Without one (or with `chat_template=False`), the prompt is tokenised as plain text with the
tokenizer's special tokens (a base model's beginning-of-sequence token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..tokenization import prompt_token_ids


def uses_chat_template(tokenizer, chat_template: bool = True) -> bool:
    """Whether prompts are wrapped in `tokenizer`'s chat template: asked for, and the tokenizer has one."""
    return chat_template and bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    """The token ids of `prompt`, in the chat template if `chat_template` (see :func:`uses_chat_template`)."""
    if chat_template:
        return prompt_token_ids([{"role": "user", "content": prompt}], tokenizer)
    return list(tokenizer(prompt)["input_ids"])


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's padding token, else its end-of-sequence token, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Left-pad token id rows into a batch, so that the last position of every row is its last token.

    Returns:
        `input_ids` and `attention_mask`, both `[B, T]` with `T` the longest row (at least 1).
    """
    width = max(1, max((len(row) for row in rows), default=0))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            input_ids[index, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[index, width - len(row) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
