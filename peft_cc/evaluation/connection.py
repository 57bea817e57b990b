"""How the evaluator applies a CC-Tuning adapter's cross-lingual connection, in generation and in scoring forwards.

- `"monolingual"` (the default for a CC-Tuning adapter): English activations simulated from the model's own with
  the fitted Transform Matrix; the deployment setting, where only the non-English prompt exists.
- `"bilingual"`: the real English prompt of every item is run too (the training-time setting; an upper bound).
- `"off"`: LoRA only, no connection.

Any other model (a base model, a LoRA adapter) has no connection: its connection is `None`.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..model import CCModel

Connection = Literal["monolingual", "bilingual", "off"]
CONNECTIONS: tuple[str, ...] = ("monolingual", "bilingual", "off")


def is_cc_model(model: torch.nn.Module) -> bool:
    """Whether `model` is a PEFT model whose adapter is a CC-Tuning adapter."""
    return isinstance(getattr(model, "base_model", None), CCModel)


def resolve_connection(model: torch.nn.Module, connection: str | None) -> Connection | None:
    """The connection to evaluate `model` with: `connection`, or the default for the model (see the module docstring).

    Raises:
        ValueError: an unknown connection; a connection other than "off" for a model without a CC-Tuning adapter; the
            monolingual connection with a Transform Matrix that was never fitted.
    """
    if connection is not None and connection not in CONNECTIONS:
        raise ValueError(f"`connection` must be one of {', '.join(CONNECTIONS)}, got {connection!r}.")
    if not is_cc_model(model):
        if connection in ("monolingual", "bilingual"):
            raise ValueError(
                f"connection={connection!r} needs a CC-Tuning adapter; this model has none (load one with --adapter)."
            )
        return None
    connection = connection or "monolingual"
    if connection == "monolingual" and not model.base_model.is_transform_matrix_fitted():
        raise ValueError(
            "The monolingual connection needs the adapter's Transform Matrix, which was never fitted: fit it with "
            "`peft_cc.fit_transform_matrix` and save the adapter again, or evaluate with connection 'bilingual' "
            "(real English prompts) or 'off' (LoRA only)."
        )
    return connection


def generate_kwargs(
    connection: Connection | None, english_input_ids: torch.Tensor, english_attention_mask: torch.Tensor
) -> dict[str, object]:
    """Keyword arguments that make `model.generate` apply `connection` (none for a model without one).

    Args:
        english_input_ids: `[B, T_en]` the English prompts of the batch (used by the bilingual connection only).
        english_attention_mask: `[B, T_en]`.
    """
    if connection is None:
        return {}
    if connection == "bilingual":
        return {
            "connection": connection,
            "english_input_ids": english_input_ids,
            "english_attention_mask": english_attention_mask,
        }
    return {"connection": connection}


def forward_kwargs(
    connection: Connection | None,
    anchors: torch.Tensor,
    english_input_ids: torch.Tensor,
    english_attention_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Keyword arguments that make an eval-mode forward call apply `connection` at `anchors`.

    The forward then computes what generation computes for its first token: the connection added at the last prompt
    token (see `CCModel.forward`).

    Args:
        anchors: `[B]` the position of the last prompt token of every row.
        english_input_ids: `[B, T_en]` the English prompt of every row (bilingual connection only).
        english_attention_mask: `[B, T_en]`.
    """
    if connection in (None, "off"):
        return {}
    if connection == "bilingual":
        return {
            "anchor_positions": anchors,
            "english_input_ids": english_input_ids,
            "english_attention_mask": english_attention_mask,
        }
    return {"anchor_positions": anchors}
