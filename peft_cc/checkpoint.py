"""Whether a saved CC-Tuning adapter fits the model it is loaded onto: its keys and the shapes of its weights."""

from __future__ import annotations

import torch

DECISION_MAKER_KEY = "cc_decision_maker"
TRANSFORM_MATRIX_KEY = "cc_transform_matrix"
_SHAPES = {DECISION_MAKER_KEY: "[source layers, hidden size]", TRANSFORM_MATRIX_KEY: "[hidden size, hidden size]"}


def is_adapter_weight(key: str) -> bool:
    """Whether a state-dict key names a LoRA or connection weight (of any adapter, or of a module a model lacks)."""
    return "lora_" in key or DECISION_MAKER_KEY in key or TRANSFORM_MATRIX_KEY in key


def is_weight_of(key: str, adapter_name: str) -> bool:
    """Whether a model state-dict key is a parameter of CC-Tuning adapter `adapter_name` (LoRA or connection)."""
    return is_adapter_weight(key) and (f".{adapter_name}." in key or key.endswith(f".{adapter_name}"))


def check_checkpoint_fits(
    adapter_name: str, expected: dict[str, torch.Size], checkpoint: dict[str, torch.Tensor]
) -> None:
    """Refuse a checkpoint made for another base model: missing or extra adapter weights, or other shapes.

    Args:
        adapter_name: the adapter being loaded.
        expected: this model's adapter keys and their shapes.
        checkpoint: the checkpoint's tensors, under this model's keys (weights of modules this model lacks keep their
            checkpoint key, without the adapter name).

    Raises:
        ValueError: naming the first key that does not fit and what to do.
    """
    connection = [key for key in expected if DECISION_MAKER_KEY in key or TRANSFORM_MATRIX_KEY in key]
    missing = [key for key in connection if key not in checkpoint]
    if missing:
        raise ValueError(
            f"The checkpoint of adapter '{adapter_name}' has no `{missing[0]}`: it is not a complete CC-Tuning "
            "adapter (Decision Maker and Transform Matrix are missing)."
        )
    unexpected = [key for key in checkpoint if is_adapter_weight(key) and key not in expected]
    missing = [key for key in expected if key not in checkpoint]
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise ValueError(
            f"The CC-Tuning adapter '{adapter_name}' was trained for another base model: its checkpoint has "
            f"{len(unexpected)} adapter weights this model has no module for and lacks {len(missing)} this model "
            f"has (e.g. `{example}`). Load it onto the base model it was trained on (same depth and modules)."
        )
    for key, shape in expected.items():
        if checkpoint[key].shape != shape:
            meaning = next((f" ({text})" for name, text in _SHAPES.items() if name in key), "")
            raise ValueError(
                f"The CC-Tuning adapter '{adapter_name}' was trained for another base model: its `{key}` has "
                f"shape {tuple(checkpoint[key].shape)}, this model needs {tuple(shape)}{meaning}."
            )
