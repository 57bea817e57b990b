"""Multiple-choice answers by log-likelihood: which option label the model finds most likely after the prompt.

Each option label (`"1"`, `"B"`, ...) is scored as the completion of the templated prompt: the sum of the
log-probabilities of its tokens, each given the prompt and the label tokens before it. No text is generated. The
prediction is the option with the highest sum (the first one on ties). This measures what a model knows even when
its generated text names no option, or always the same one, as small models often do.

Options that share all tokens but their last one share one forward pass, so labels of one token each (the usual
case) cost a single forward over the prompt, whose last-position distribution scores them all. With a CC-Tuning
adapter, the forward applies the connection at the last prompt token, as generation does for the first token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..anchors import position_ids_from_attention_mask
from .connection import Connection, forward_kwargs
from .prompts import left_pad


@torch.no_grad()
def option_log_likelihoods(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    options: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
    connection: Connection | None = None,
    english_prompts: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Log-likelihood of every option's tokens as the continuation of every prompt.

    Args:
        model: a causal LM in eval mode (a PEFT model included).
        prompts: `N` prompts, as token ids (non-empty).
        options: `K` options, as token ids (non-empty), the same for every prompt.
        pad_id: the padding token id.
        batch_size: rows per forward pass.
        connection: a CC-Tuning adapter's connection (see :mod:`peft_cc.evaluation.connection`).
        english_prompts: `N` English prompts as token ids; needed for the bilingual connection.

    Returns:
        `[N, K]` float32: `sum_j log p(option_k[j] | prompt_i, option_k[:j])` in nats.
    """
    if any(len(option) == 0 for option in options) or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("Every prompt and every option needs at least one token.")
    if connection == "bilingual" and english_prompts is None:
        raise ValueError("The bilingual connection needs `english_prompts`.")
    # One row per (prompt, option tokens but the last): its last len(option) positions predict the option's tokens.
    row_of: dict[tuple[int, tuple[int, ...]], int] = {}
    scored_by_row: list[list[int]] = []  # the options each row scores
    for prompt_index in range(len(prompts)):
        for option_index, option in enumerate(options):
            row = row_of.setdefault((prompt_index, tuple(option[:-1])), len(row_of))
            if row == len(scored_by_row):
                scored_by_row.append([])
            scored_by_row[row].append(option_index)
    rows = list(row_of)
    device = next(model.parameters()).device
    scores = torch.empty(len(prompts), len(options), dtype=torch.float32)
    order = sorted(range(len(rows)), key=lambda row: -(len(prompts[rows[row][0]]) + len(rows[row][1])))
    for start in range(0, len(order), batch_size):
        batch_rows = order[start : start + batch_size]
        tokens = [list(prompts[rows[row][0]]) + list(rows[row][1]) for row in batch_rows]
        counts = [len(rows[row][1]) + 1 for row in batch_rows]  # positions each row scores
        batch = left_pad(tokens, pad_id, device)
        width, keep = batch["input_ids"].shape[1], max(counts)
        english = left_pad(
            [english_prompts[rows[row][0]] for row in batch_rows] if english_prompts is not None else [],
            pad_id,
            device,
        )
        logits = model(
            **batch,
            position_ids=position_ids_from_attention_mask(batch["attention_mask"]),
            logits_to_keep=keep,
            **forward_kwargs(
                connection,
                torch.tensor([width - count for count in counts], device=device),  # the last prompt token
                english["input_ids"],
                english["attention_mask"],
            ),
        ).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [B, keep, V]
        for index, (row, count) in enumerate(zip(batch_rows, counts)):
            prompt_index = rows[row][0]
            for option_index in scored_by_row[row]:
                targets = torch.tensor(list(options[option_index]), device=log_probs.device)
                position_log_probs = log_probs[index, keep - count :]  # [count, V]
                scores[prompt_index, option_index] = position_log_probs.gather(-1, targets[:, None]).sum().item()
    return scores
