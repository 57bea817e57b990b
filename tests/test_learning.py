"""Information crosses the connection: a task whose answer only the English prompt contains.

The English prompt names one of twelve words; the French prompt only asks which word was named; the completion is
the word. LoRA alone cannot do better than the prior over the twelve words. CC-Tuning, with the source restricted
to the last layer, can read the word from the injected English activation.
"""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_cc import CCConfig
from peft_cc.tokenization import collate_pairs, encode_pair

pytestmark = pytest.mark.slow

WORDS = [
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
]
FRENCH_QUESTIONS = [
    "Quel mot a été nommé ?",
    "Quel est le mot mentionné ?",
    "Dis-moi le mot qui a été donné.",
    "Quel mot ai-je dit ?",
]
ENGLISH_STATEMENTS = [
    "The word is {word}. Which word was named?",
    "I named the word {word}. What is the word?",
    "Remember this word: {word}. Which word was it?",
    "My word is {word}. Tell me the word.",
]
# French question i is paired with English statement j: (i + j) even for training, odd for the held-out set.
TRAIN_TEMPLATES = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
HELDOUT_TEMPLATES = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 1][:2]
STEPS = 20
BATCH_SIZE = 8
LEARNING_RATE = 1e-3


def _example(tokenizer, word: str, french: int, english: int) -> dict[str, list[int]]:
    system = {"role": "system", "content": "Answer with one word."}
    return encode_pair(
        [system, {"role": "user", "content": FRENCH_QUESTIONS[french]}],
        word,
        [system, {"role": "user", "content": ENGLISH_STATEMENTS[english].format(word=word)}],
        tokenizer,
    )


def _train_and_evaluate(model, tokenizer, use_connection: bool) -> float:
    """Train for STEPS steps (same batches for every model), return the held-out loss."""
    pad_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    rng = random.Random(1)

    def forward(batch: dict[str, torch.Tensor]):
        if not use_connection:
            batch = {key: value for key, value in batch.items() if not key.startswith("english_")}
        return model(**batch)

    model.train()
    for _ in range(STEPS):
        examples = [_example(tokenizer, rng.choice(WORDS), *rng.choice(TRAIN_TEMPLATES)) for _ in range(BATCH_SIZE)]
        forward(collate_pairs(examples, pad_id)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    heldout = [_example(tokenizer, word, *templates) for word in WORDS for templates in HELDOUT_TEMPLATES]
    with torch.no_grad():
        return forward(collate_pairs(heldout, pad_id)).loss.item()


def test_connection_carries_what_only_the_english_prompt_knows(smollm2_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    lora = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    lora_alone = _train_and_evaluate(
        get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora)), smollm2_tokenizer, use_connection=False
    )

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    cc_tuning = _train_and_evaluate(
        get_peft_model(base, CCConfig(source_layers=[-1], **lora)), smollm2_tokenizer, use_connection=True
    )

    print(f"held-out loss after {STEPS} steps: LoRA alone {lora_alone:.3f}, CC-Tuning (last layer) {cc_tuning:.3f}")
    assert lora_alone > 0.7, "LoRA alone cannot know the word: its loss stays near the prior over the 12 words"
    assert cc_tuning < 0.3
    assert cc_tuning < lora_alone / 4
