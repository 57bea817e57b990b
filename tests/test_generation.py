"""Generation with the connection: equal to the naive two-pass method, on shared and recomputed caches."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB_SIZE
from helpers import MAX_NEW_TOKENS, cc_tuner, fit_random_transform, make_cc_model, naive_greedy, randomize_lora_b
from transformers import StaticCache


def _left_padded_prompts(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(1, VOCAB_SIZE, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


def _prepared(architecture: str, **config):
    model = make_cc_model(architecture, train=False, **config)
    randomize_lora_b(model, std=0.05)
    fit_random_transform(model)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # run all MAX_NEW_TOKENS steps
    return model


def test_greedy_equals_naive_two_pass_method(architecture):
    """Shared-cache greedy generation, left-padded uneven prompts, every architecture (Gemma 3: sliding window 4)."""
    model = _prepared(architecture)
    input_ids, attention_mask = _left_padded_prompts([9, 5, 7])
    generated = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False
    )
    assert torch.equal(generated, naive_greedy(model, input_ids, attention_mask))


def test_connection_changes_the_generated_tokens():
    """Sanity check of the comparison above: the connection does change what is generated."""
    model = _prepared("llama")
    fit_random_transform(model, scale=3.0)
    input_ids, attention_mask = _left_padded_prompts([9, 5, 7, 8], seed=1)
    connected = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS)
    plain = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS, connection="off"
    )
    assert not torch.equal(connected, plain)


def test_recompute_fallback_with_a_static_cache_equals_shared_cache():
    """A static cache cannot be rolled back: the fallback recomputes and gives the same tokens."""
    model = _prepared("llama")
    input_ids, attention_mask = _left_padded_prompts([9, 5, 7])
    shared = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS)
    static = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=MAX_NEW_TOKENS,
        cache=StaticCache(config=model.config, max_cache_len=32),
    )
    assert torch.equal(shared, static)


def test_gemma3_prompt_longer_than_the_sliding_window():
    model = _prepared("gemma3")
    input_ids, attention_mask = _left_padded_prompts([12, 6])
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS)
    assert torch.equal(generated, naive_greedy(model, input_ids, attention_mask))


def test_bilingual_generation_uses_the_real_english_prompt():
    model = _prepared("llama")
    input_ids, attention_mask = _left_padded_prompts([9, 5])
    english_ids, english_mask = _left_padded_prompts([6, 4], seed=7)
    english = {"english_input_ids": english_ids, "english_attention_mask": english_mask}
    generated = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS, **english
    )
    assert torch.equal(generated, naive_greedy(model, input_ids, attention_mask, **english))


def test_beam_search_and_sampling_match_the_recompute_path():
    """Beams and returned sequences expand the shared cache the way generate expands the inputs."""
    model = _prepared("llama")
    input_ids, attention_mask = _left_padded_prompts([9, 5])
    static = dict(cache_implementation="static")
    for options in (
        dict(num_beams=3, num_return_sequences=2, do_sample=False),
        dict(do_sample=True, num_return_sequences=2, top_k=0),
    ):
        torch.manual_seed(3)
        shared = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, **options)
        torch.manual_seed(3)
        recomputed = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, **options, **static
        )
        assert shared.shape[0] == 4
        assert torch.equal(shared, recomputed), options


def test_forward_with_anchor_positions_applies_the_monolingual_connection():
    model = _prepared("llama")
    input_ids, attention_mask = _left_padded_prompts([9, 5])
    anchors = torch.tensor([8, 8])
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=attention_mask).logits
        connected = model(input_ids=input_ids, attention_mask=attention_mask, anchor_positions=anchors)
    assert connected.connected_rows.all()
    assert torch.equal(connected.logits[:, :8], plain[:, :8])
    assert not torch.allclose(connected.logits[:, 8], plain[:, 8])
    assert (connected.layer_choice.sum(-1) == 1).all()


def test_unfitted_transform_matrix_is_refused_with_what_to_call():
    model = make_cc_model("llama", train=False)
    input_ids, attention_mask = _left_padded_prompts([5])
    with pytest.raises(ValueError, match="fit_transform_matrix"):
        model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2)
    plain = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2, connection="off")
    with model.disable_adapter():
        reference = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2)
    assert torch.equal(plain, reference)  # LoRA B is zero: "off" is the base model here


def test_right_padding_and_inconsistent_connection_arguments_are_refused():
    model = _prepared("llama")
    input_ids, attention_mask = _left_padded_prompts([9, 5])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(input_ids=input_ids, attention_mask=attention_mask.flip(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="bilingual"):
        model.generate(input_ids=input_ids, attention_mask=attention_mask, connection="bilingual")
    with pytest.raises(ValueError, match="connection"):
        model.generate(input_ids=input_ids, attention_mask=attention_mask, connection="sometimes")


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_shared_cache_costs_one_token_step_more_than_plain_generation(architecture):
    """Tokens through the first decoder layer: plain generation + one anchor token per row (no second prefill)."""
    model = _prepared(architecture)
    input_ids, attention_mask = _left_padded_prompts([12, 6])
    first_layer = cc_tuner(model).decoder().layers[0]
    tokens = []
    handle = first_layer.register_forward_hook(lambda module, args, output: tokens.append(output.shape[:2].numel()))
    try:
        model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS)
        connected, tokens[:] = sum(tokens), []
        model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS, connection="off"
        )
        plain = sum(tokens)
    finally:
        handle.remove()
    assert connected == plain + input_ids.shape[0]


def _prompts_and_continuations(
    prompt_lengths: list[int], continuation_lengths: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Prompts left-padded to one width, continuations right-padded after them; also each row unpadded."""
    prompts, prompt_mask = _left_padded_prompts(prompt_lengths, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    width = max(continuation_lengths)
    continuations = torch.zeros(len(prompt_lengths), width, dtype=torch.long)
    continuation_mask = torch.zeros_like(continuations)
    for row, length in enumerate(continuation_lengths):
        continuations[row, :length] = torch.randint(1, VOCAB_SIZE, (length,), generator=generator)
        continuation_mask[row, :length] = 1
    input_ids = torch.cat([prompts, continuations], dim=1)
    attention_mask = torch.cat([prompt_mask, continuation_mask], dim=1)
    rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
    return input_ids, attention_mask, rows


@pytest.mark.parametrize("fallback", [False, True], ids=["shared-cache", "recomputed"])
def test_continuation_logits_equal_the_connected_forward_of_each_row(architecture, fallback, monkeypatch):
    """Scoring with a shared prompt cache: the logits from 2 positions before the anchor on equal those of each
    unpadded row's forward with `anchor_positions`, monolingual and bilingual; the unconnected positions too."""
    model = _prepared(architecture)
    fit_random_transform(model, scale=3.0)
    tuner = cc_tuner(model)
    if fallback:
        monkeypatch.setattr(tuner.model, "_supports_default_dynamic_cache", lambda: False)
    prompt_lengths, continuation_lengths = [12, 5, 7], [3, 1, 4]
    input_ids, attention_mask, rows = _prompts_and_continuations(prompt_lengths, continuation_lengths)
    english_ids, english_mask = _left_padded_prompts([6, 4, 8], seed=7)
    english_rows = [ids[mask.bool()] for ids, mask in zip(english_ids, english_mask)]
    prompt_width, earlier = max(prompt_lengths), 2
    for connection in ("monolingual", "bilingual"):
        english = {"english_input_ids": english_ids, "english_attention_mask": english_mask}
        logits = tuner.continuation_logits(
            input_ids,
            attention_mask,
            prompt_width,
            connection=connection,
            earlier_positions=earlier,
            **(english if connection == "bilingual" else {}),
        )
        assert logits.shape[:2] == (3, earlier + input_ids.shape[1] - prompt_width + 1)
        for row, (tokens, prompt_length, continuation_length) in enumerate(
            zip(rows, prompt_lengths, continuation_lengths)
        ):
            anchor = prompt_length - 1
            by_row = {"english_input_ids": english_rows[row][None]} if connection == "bilingual" else {}
            with torch.no_grad():
                expected = model(input_ids=tokens[None], anchor_positions=torch.tensor([anchor]), **by_row).logits[0]
            torch.testing.assert_close(
                logits[row, : earlier + 1 + continuation_length],
                expected[anchor - earlier :],
                atol=1e-5,
                rtol=1e-5,
                msg=f"{connection}, row {row}",
            )
    off = tuner.continuation_logits(input_ids, attention_mask, prompt_width, connection="off")
    assert not torch.allclose(off[:, 0], logits[:, earlier])  # the connection changes the anchor's logits


def test_continuation_logits_cost_one_token_step_more_than_unconnected_scoring():
    model = _prepared("llama")
    tuner = cc_tuner(model)
    input_ids, attention_mask, _ = _prompts_and_continuations([12, 6], [3, 2])
    tokens = []
    handle = (
        tuner.decoder()
        .layers[0]
        .register_forward_hook(lambda module, args, output: tokens.append(output.shape[:2].numel()))
    )
    try:
        tuner.continuation_logits(input_ids, attention_mask, 12)
        connected, tokens[:] = sum(tokens), []
        tuner.continuation_logits(input_ids, attention_mask, 12, connection="off")
        plain = sum(tokens)
    finally:
        handle.remove()
    assert connected == plain + input_ids.shape[0]


def test_continuation_logits_refuse_rows_whose_prompt_does_not_end_at_the_anchor_column():
    tuner = cc_tuner(_prepared("llama"))
    input_ids, attention_mask, _ = _prompts_and_continuations([9, 5], [3, 2])
    with pytest.raises(ValueError, match="left-pad the prompts"):
        tuner.continuation_logits(input_ids, attention_mask.flip(1), 9)
    with pytest.raises(ValueError, match="earlier_positions"):
        tuner.continuation_logits(input_ids, attention_mask, 9, earlier_positions=9)


def test_a_prompt_that_does_not_end_as_training_prompts_did_is_warned_about_once(caplog):
    """The connection lands on the last prompt token: a raw prompt (no chat template) puts it where training never
    did, which generation cannot see by itself but can tell from the generation prompt that training recorded."""
    model = _prepared("llama")
    cc_tuner(model).peft_config["default"].generation_prompt_ids = [7, 8]
    input_ids, attention_mask = _left_padded_prompts([6, 4])
    templated = input_ids.clone()
    templated[:, -2:] = torch.tensor([7, 8])
    with caplog.at_level("WARNING", logger="peft_cc.generation"):
        model.generate(input_ids=templated, attention_mask=attention_mask, max_new_tokens=2, do_sample=False)
        assert not caplog.records
        for _ in range(2):
            model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2, do_sample=False)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "does not end with the chat template's generation prompt (token ids [7, 8])" in warnings[0]
    assert "apply_chat_template(messages, add_generation_prompt=True" in warnings[0]
