"""The connection on the real SmolLM2-135M-Instruct, with its real tokenizer and chat template."""

from __future__ import annotations

import pytest
import torch
from helpers import fit_random_transform, naive_greedy
from peft import get_peft_model

from peft_cc import CCConfig

pytestmark = pytest.mark.slow

QUESTION_FR = "Quelle est la capitale de la France ?"
QUESTION_EN = "What is the capital of France?"
ANSWER_FR = "La capitale de la France est Paris."


def _prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


def _pair(tokenizer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    prompt = _prompt_ids(tokenizer, QUESTION_FR)
    response = tokenizer(ANSWER_FR + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    english = _prompt_ids(tokenizer, QUESTION_EN)
    inputs = {
        "input_ids": torch.tensor([prompt + response]),
        "labels": torch.tensor([[-100] * len(prompt) + response]),
    }
    return inputs, {"english_input_ids": torch.tensor([english])}, len(prompt) - 1


def _randomize_lora(model, seed: int = 0) -> None:
    """Give LoRA B non-zero values so that the adapter is not the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)


def test_anchor_is_the_last_token_of_the_generation_prompt(smollm2_tokenizer):
    inputs, _, anchor = _pair(smollm2_tokenizer)
    prompt_text = smollm2_tokenizer.decode(inputs["input_ids"][0, : anchor + 1])
    assert prompt_text.endswith("<|im_start|>assistant\n")


def test_connection_changes_only_the_anchor_onward(smollm2_model, smollm2_tokenizer):
    model = get_peft_model(smollm2_model, CCConfig(r=8, target_modules="all-linear"))
    _randomize_lora(model)
    model.eval()
    inputs, english, anchor = _pair(smollm2_tokenizer)
    with torch.no_grad():
        plain = model(**inputs).logits
        connected = model(**inputs, **english)
    assert connected.connected_rows.tolist() == [True]
    assert torch.equal(connected.logits[:, :anchor], plain[:, :anchor])
    assert not torch.allclose(connected.logits[:, anchor], plain[:, anchor], atol=1e-4)
    assert not torch.allclose(connected.logits[:, -1], plain[:, -1], atol=1e-4)


def _ffn_output_of_layer(decoder_model, input_ids: torch.Tensor, layer_index: int, position: int) -> torch.Tensor:
    """The MLP output of decoder layer `layer_index` at `position`, computed layer by layer without hooks."""
    hidden = decoder_model.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
    rotary = decoder_model.rotary_emb(hidden, position_ids=position_ids)
    for layer in decoder_model.layers[:layer_index]:
        hidden = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=position_ids)
    layer = decoder_model.layers[layer_index]
    attention, _ = layer.self_attn(
        layer.input_layernorm(hidden), attention_mask=None, position_embeddings=rotary, position_ids=position_ids
    )
    hidden = hidden + attention
    return layer.mlp(layer.post_attention_layernorm(hidden))[0, position]


@pytest.mark.parametrize(("source_layer", "injection_layer"), [(29, 0), (12, 3)])
def test_connected_forward_equals_step_by_step_computation(
    smollm2_model, smollm2_tokenizer, source_layer, injection_layer
):
    model = get_peft_model(
        smollm2_model,
        CCConfig(r=8, target_modules="all-linear", source_layers=[source_layer], injection_layer=injection_layer),
    )
    _randomize_lora(model)
    model.eval()
    inputs, english, anchor = _pair(smollm2_tokenizer)
    with torch.no_grad():
        connected = model(**inputs, **english).logits

        decoder_model = model.base_model.model.model
        english_ids = english["english_input_ids"]
        english_activation = _ffn_output_of_layer(decoder_model, english_ids, source_layer, english_ids.shape[1] - 1)
        input_ids = inputs["input_ids"]
        hidden = decoder_model.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
        rotary = decoder_model.rotary_emb(hidden, position_ids=position_ids)
        for index, layer in enumerate(decoder_model.layers):
            hidden = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=position_ids)
            if index == injection_layer:
                hidden[0, anchor] += english_activation
        expected = model.base_model.model.lm_head(decoder_model.norm(hidden))
    torch.testing.assert_close(connected, expected, atol=2e-5, rtol=1e-5)


def test_generation_equals_naive_two_pass_method_on_real_text(smollm2_model, smollm2_tokenizer):
    """Left-padded French chat prompts of uneven length, greedy, shared cache vs full recomputation."""
    model = get_peft_model(smollm2_model, CCConfig(r=8, target_modules="all-linear"))
    _randomize_lora(model)
    fit_random_transform(model, scale=0.1)
    model.eval()
    smollm2_tokenizer.padding_side = "left"
    questions = [QUESTION_FR, "Combien de pattes a une araignée ? Réponds en une phrase."]
    prompts = [
        smollm2_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    batch = smollm2_tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
    expected = naive_greedy(model, batch["input_ids"], batch["attention_mask"], steps=8)
    # `generate` pads a row after its end-of-sequence token, the naive method goes on: compare up to that token.
    # (The LoRA initialisation draws from the global generator, so some orders of the suite end a row early.)
    new_tokens = generated[:, batch["input_ids"].shape[1] :]
    ended = (new_tokens == smollm2_tokenizer.eos_token_id).cumsum(dim=1) > 0
    after_end = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], dim=1)
    compared = torch.cat([torch.ones_like(batch["input_ids"], dtype=torch.bool), ~after_end], dim=1)
    assert torch.equal(generated[compared], expected[:, : generated.shape[1]][compared])
