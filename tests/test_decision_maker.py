"""The Decision Maker of the paper: a straight-through hard Gumbel-Softmax choice over the candidate layers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from helpers import decision_maker_weight, make_batch, make_cc_model, randomize_lora_b
from peft import PeftModel

from peft_cc.decision_maker import ConnectionChoice, DecisionMaker, sample_gumbel_noise


def test_the_training_choice_is_one_hot_with_the_gradient_of_the_soft_sample():
    decision_maker = DecisionMaker(num_sources=3, hidden_size=4)
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    noise = sample_gumbel_noise(5, 3, torch.device("cpu"))
    choice, logits = decision_maker(z, noise, temperature=0.5)
    assert torch.equal(choice.detach().sum(dim=-1), torch.ones(5))
    assert set(choice.detach().unique().tolist()) <= {0.0, 1.0}
    weights = torch.randn(5, 3)
    (choice * weights).sum().backward()
    straight_through = decision_maker.weight.grad.clone()
    decision_maker.weight.grad = None
    soft = torch.softmax((decision_maker.logits(z) + noise) / 0.5, dim=-1)
    (soft * weights).sum().backward()
    torch.testing.assert_close(straight_through, decision_maker.weight.grad)
    torch.testing.assert_close(logits, z @ decision_maker.weight.detach().T)


def test_without_noise_the_choice_is_the_arg_max():
    decision_maker = DecisionMaker(num_sources=4, hidden_size=6)
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    choice, logits = decision_maker(z)
    assert torch.equal(choice.argmax(dim=-1), logits.argmax(dim=-1))
    assert not choice.requires_grad


def test_the_injected_vector_is_the_chosen_layers_activation_and_z_adds_the_mean_activation():
    decision_maker = DecisionMaker(num_sources=3, hidden_size=8)
    sources = torch.randn(4, 3, 8)
    first_layer_input = torch.randn(4, 8)
    choice = ConnectionChoice(decision_maker, sources, sample=True)
    vectors = choice.vectors_for(first_layer_input)
    chosen = choice.choice.argmax(dim=-1)
    torch.testing.assert_close(vectors, sources[torch.arange(4), chosen])
    expected_logits = (first_layer_input + sources.mean(dim=1)) @ decision_maker.weight.detach().T
    torch.testing.assert_close(choice.logits, expected_logits)


def test_the_decision_maker_learns_straight_through_in_a_training_step():
    model = make_cc_model("llama")
    randomize_lora_b(model)
    model(**make_batch()).loss.backward()
    assert decision_maker_weight(model).grad.abs().sum() > 0


def test_a_batch_without_a_connected_row_still_gives_the_decision_maker_a_zero_gradient():
    """Distributed data parallel expects a gradient for every trainable parameter in every step."""
    model = make_cc_model("llama")
    batch = make_batch(english_lens=(0, 0))  # no English prompt: no row can be connected
    output = model(**batch)
    assert not output.connected_rows.any()
    output.loss.backward()
    weight = decision_maker_weight(model)
    assert weight.grad is not None and not weight.grad.any()


def test_an_adapter_saved_with_the_paper_decision_maker_named_loads_and_another_is_refused(tmp_path):
    """Adapters saved while the package offered a second Decision Maker name the one they used."""
    model = make_cc_model("llama")
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "decision_maker": "paper", "variance_reinforce_config": None}))
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
    torch.testing.assert_close(decision_maker_weight(loaded), decision_maker_weight(model))
    config_file.write_text(json.dumps({**config, "decision_maker": "variance_reinforce_gated"}))
    with pytest.raises(ValueError, match="variance_reinforce_gated.*735790f"):
        PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
