"""The section of an adapter's model card that says it is a CC-Tuning adapter and how to load it."""

from __future__ import annotations

import os

MODEL_CARD_MARKER = "<!-- peft-cc model card section -->"


def model_card_section(source_layers: list[int] | None, injection_layer: int) -> str:
    """The Markdown section for an adapter with these connection settings."""
    sources = "all layers" if source_layers is None else f"layers {source_layers}"
    return f"""
{MODEL_CARD_MARKER}
## CC-Tuning adapter

This is a [CC-Tuning](https://arxiv.org/abs/2506.00875) adapter (PEFT type `CC`): LoRA plus a Decision Maker
and a Transform Matrix that connect the model's processing of a non-English prompt with its processing of
the same prompt in English (FFN activations of {sources}, injected after decoder layer {injection_layer}).

Loading it needs the `peft-cc` package, imported before PEFT reads the adapter:

```python
import peft_cc  # registers the CC method with PEFT
from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("<this repository>")
```
"""


def add_model_card_section(
    directory: str | os.PathLike, source_layers: list[int] | None, injection_layer: int
) -> None:
    """Append the CC-Tuning section to `directory/README.md`, once; nothing happens if there is no card."""
    card_path = os.path.join(directory, "README.md")
    if not os.path.isfile(card_path):
        return
    with open(card_path, encoding="utf-8") as card_file:
        if MODEL_CARD_MARKER in card_file.read():
            return
    with open(card_path, "a", encoding="utf-8") as card_file:
        card_file.write(model_card_section(source_layers, injection_layer))
