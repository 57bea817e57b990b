"""Information crosses the connection: a task whose answer only the English prompt contains.

The English prompt names one of twelve words; the French prompt only asks which word was named; the completion is
the word (see `benchmarks/capacity_task.py`). LoRA alone cannot do better than the prior over the twelve words.
CC-Tuning, with the source restricted to the last layer, can read the word from the injected English activation.
"""

from __future__ import annotations

import pytest
import torch
from capacity_task import heldout_batch, training_batches, without_english
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peft_cc import CCConfig

pytestmark = pytest.mark.slow

STEPS = 20
LEARNING_RATE = 1e-3
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)


def _train_and_evaluate(model, tokenizer, use_connection: bool) -> float:
    """Train for STEPS steps on the same seeded batches for every model; return the held-out loss."""
    select = (lambda batch: batch) if use_connection else without_english
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model.train()
    for _, batch in zip(range(STEPS), training_batches(tokenizer)):
        model(**select(batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        return model(**select(heldout_batch(tokenizer))).loss.item()


# A hang guard, not a speed check: ~90 s on 2 idle cores, several times that on a loaded machine.
@pytest.mark.timeout(1800)
def test_connection_carries_what_only_the_english_prompt_knows(smollm2_id, smollm2_tokenizer):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_id, dtype=torch.float32)
    lora_alone = _train_and_evaluate(
        get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **LORA)), smollm2_tokenizer, use_connection=False
    )

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_id, dtype=torch.float32)
    cc_tuning = _train_and_evaluate(
        get_peft_model(base, CCConfig(source_layers=[-1], **LORA)), smollm2_tokenizer, use_connection=True
    )

    print(f"held-out loss after {STEPS} steps: LoRA alone {lora_alone:.3f}, CC-Tuning (last layer) {cc_tuning:.3f}")
    assert lora_alone > 0.7, "LoRA alone cannot know the word: its loss stays near the prior over the 12 words"
    assert cc_tuning < 0.3
    assert cc_tuning < lora_alone / 4
