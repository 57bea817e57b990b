"""Anchors: the position of the last prompt token of each row, where the connection is applied.

An anchor is a LongTensor `[B]` of positions; `-1` marks a row without a valid anchor (such a row is left
unconnected).
"""

from __future__ import annotations

import torch

NO_ANCHOR = -1


def anchors_from_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The position just before the first supervised label of each row.

    Labels are aligned with `input_ids` (transformers shifts them inside the loss), so the token at that position
    is the last prompt token, whose output predicts the first response token.

    Args:
        labels: `[B, T]` labels, `ignore_index` on prompt and padding positions.

    Returns:
        `[B]` anchors; `-1` for rows with no supervised label or a label at position 0.
    """
    supervised = labels != ignore_index
    first = supervised.int().argmax(dim=1)
    valid = supervised.any(dim=1) & (first > 0)
    return torch.where(valid, first - 1, NO_ANCHOR)


def last_token_anchors(attention_mask: torch.Tensor) -> torch.Tensor:
    """The last attended position of each row (right or left padding).

    Args:
        attention_mask: `[B, T]` 1 for tokens, 0 for padding.

    Returns:
        `[B]` anchors; `-1` for rows without any token.
    """
    attended = attention_mask.bool()
    positions = torch.arange(attended.shape[1], device=attended.device).expand_as(attended)
    last = torch.where(attended, positions, NO_ANCHOR).max(dim=1).values
    return last


def validate_anchors(anchors: torch.Tensor, attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor:
    """Check caller-given anchors and mark those on padding as invalid.

    Args:
        anchors: `[B]` positions (`-1` allowed for "no anchor").
        attention_mask: `[B, T]` or `None`.
        seq_len: `T`.

    Returns:
        `[B]` anchors, with `-1` where the position is padding.

    Raises:
        ValueError: for a wrong shape, dtype or a position outside `[-1, T)`.
    """
    if anchors.dtype not in (torch.int64, torch.int32) or anchors.dim() != 1:
        raise ValueError(f"`anchor_positions` must be a 1-D LongTensor, got {anchors.dtype} of shape {anchors.shape}.")
    if ((anchors < NO_ANCHOR) | (anchors >= seq_len)).any():
        raise ValueError(f"`anchor_positions` must lie in [-1, {seq_len}), got {anchors.tolist()}.")
    anchors = anchors.long()
    if attention_mask is None:
        return anchors
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    on_token = attention_mask[rows, anchors.clamp(min=0)].bool()
    return torch.where(on_token, anchors, NO_ANCHOR)


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[B, T]` positions counted over attended tokens only (as `generate` does), 0 on padding.

    With right padding they equal `arange(T)` on the tokens; with left padding each row starts at 0.
    """
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
