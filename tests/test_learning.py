"""Information crosses the connection: a task whose answer only the English prompt contains.

The English prompt names one of twelve words; the French prompt only asks which word was named; the completion is
the word (see `benchmarks/capacity_task.py`). A model that sees only the French prompt cannot do better than the
prior over the twelve words: its inputs before the completion are the same whichever word was named (checked
below). CC-Tuning, with the source restricted to the last layer, can read the word from the injected English
activation; given another word's English prompt, it answers with that word instead.
"""

from __future__ import annotations

import pytest
import torch
from capacity_task import WORDS, heldout_batch, training_batches, without_english
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_cc import CCConfig

STEPS = 20
LEARNING_RATE = 1e-3
TEMPLATES_PER_WORD = 2


def test_without_the_english_prompt_nothing_tells_the_words_apart(smollm2_tokenizer):
    batch = without_english(heldout_batch(smollm2_tokenizer, templates_per_word=TEMPLATES_PER_WORD))
    prompts = [
        tuple(ids[(labels == -100) & (mask == 1)].tolist())
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])
    ]
    # rows: every word with the same TEMPLATES_PER_WORD wordings, in that order
    by_wording = [set(prompts[template::TEMPLATES_PER_WORD]) for template in range(TEMPLATES_PER_WORD)]
    assert [len(prompts_of_wording) for prompts_of_wording in by_wording] == [1] * TEMPLATES_PER_WORD


def _loss_and_first_answer_tokens(model, batch: dict[str, torch.Tensor]) -> tuple[float, list[int]]:
    """The held-out loss (nats per completion token) and each row's greedy first completion token."""
    model.eval()
    with torch.no_grad():
        output = model(**batch)
    first_label = (batch["labels"] != -100).int().argmax(dim=1)  # [B]
    predicted = output.logits[torch.arange(len(first_label)), first_label - 1].argmax(dim=-1)
    return output.loss.item(), predicted.tolist()


def _with_english_of_the_next_word(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each row's English prompt replaced by the same wording naming the next word (rows ordered as in
    `heldout_batch`: word by word, TEMPLATES_PER_WORD wordings each)."""
    return {
        key: value.roll(-TEMPLATES_PER_WORD, dims=0) if key.startswith("english_") else value
        for key, value in batch.items()
    }


@pytest.mark.slow
# A hang guard, not a speed check: ~60 s on 2 idle cores, several times that on a loaded machine.
@pytest.mark.timeout(1200)
def test_connection_carries_what_only_the_english_prompt_knows(smollm2_id, smollm2_tokenizer):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_id, dtype=torch.float32)
    config = CCConfig(source_layers=[-1], r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model.train()
    for _, batch in zip(range(STEPS), training_batches(smollm2_tokenizer)):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    heldout = heldout_batch(smollm2_tokenizer, templates_per_word=TEMPLATES_PER_WORD)
    own_english, own_answers = _loss_and_first_answer_tokens(model, heldout)
    other_english, other_answers = _loss_and_first_answer_tokens(model, _with_english_of_the_next_word(heldout))
    first_token_of = {word: smollm2_tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in WORDS}
    first_tokens = [first_token_of[word] for word in WORDS for _ in range(TEMPLATES_PER_WORD)]
    next_first_tokens = first_tokens[TEMPLATES_PER_WORD:] + first_tokens[:TEMPLATES_PER_WORD]
    print(f"held-out loss after {STEPS} steps: own English {own_english:.3f}, another word's {other_english:.3f}")
    assert own_english < 0.3
    assert other_english > 0.7
    assert sum(map(int.__eq__, own_answers, first_tokens)) >= 0.9 * len(first_tokens)
    # given another word's English prompt, the model answers with that word
    assert sum(map(int.__eq__, other_answers, next_first_tokens)) >= 0.75 * len(first_tokens)
