"""Mechanics of the Decision Maker options beyond the paper (tiny models)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model
from helpers import cc_tuner, decision_maker_weight, make_cc_model, randomize_lora_b
from peft import PeftModel
from torch import nn

from peft_cc import DECISION_MAKER_PRESETS, CCConfig
from peft_cc.decision_maker import ConnectionChoice, DecisionMaker, english_variance_prior
from peft_cc.model import _row_losses


def _batch(rows: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 96, (rows, 10), generator=generator)
    labels = input_ids.clone()
    labels[:, :6] = -100
    return {
        "input_ids": input_ids,
        "labels": labels,
        "english_input_ids": torch.randint(1, 96, (rows, 7), generator=generator),
    }


def test_defaults_are_the_paper_method():
    config = CCConfig()
    assert config.decision_maker_init == "normal"
    assert config.injection_scaling == "none"
    assert config.gumbel_temperature_final is None
    assert config.soft_choice_fraction == 0.0
    assert config.choice_balance_weight == 0.0
    assert config.soft_choice == "gumbel"
    assert config.decision_maker_start_fraction == 0.0
    assert config.injection_gate_init is None
    assert [config.temperature_at(p) for p in (0.0, 0.5, 1.0)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("injection_scaling", "layer_norm"),
        ("decision_maker_init", "ones"),
        ("gumbel_temperature_final", 0),
        ("gumbel_temperature_final", True),
        ("soft_choice_fraction", 1.5),
        ("soft_choice_fraction", -0.1),
        ("choice_balance_weight", -1.0),
        ("soft_choice", "mean"),
        ("decision_maker_start_fraction", 1.01),
        ("decision_maker_start_fraction", True),
        ("injection_gate_init", float("nan")),
        ("injection_gate_init", True),
    ],
)
def test_invalid_option_values_name_their_field(field, value):
    with pytest.raises(ValueError, match=field):
        CCConfig(**{field: value})


def test_temperature_anneals_geometrically():
    config = CCConfig(gumbel_temperature=2.0, gumbel_temperature_final=0.5)
    assert config.temperature_at(0.0) == pytest.approx(2.0)
    assert config.temperature_at(0.5) == pytest.approx(1.0)
    assert config.temperature_at(1.0) == pytest.approx(0.5)


def test_training_progress_is_clamped_and_drives_the_choice():
    model = make_cc_model("llama", soft_choice_fraction=0.5, gumbel_temperature=2.0, gumbel_temperature_final=0.5)
    tuner = cc_tuner(model)
    tuner.set_training_progress(-3)
    assert tuner.training_progress == 0.0
    tuner.set_training_progress(7)
    assert tuner.training_progress == 1.0

    activations = torch.randn(4, 3, 32)
    tuner.set_training_progress(0.25)
    early = tuner.connection_choice(activations)
    assert (early.temperature, early.hard, early.noise is not None) == (pytest.approx(2.0**0.5), False, True)
    tuner.set_training_progress(0.75)
    assert tuner.connection_choice(activations).hard
    model.eval()
    assert tuner.connection_choice(activations).noise is None  # arg-max at inference, whatever the progress


def test_soft_phase_injects_a_mixture_then_one_hot():
    model = make_cc_model("llama", soft_choice_fraction=0.5)
    tuner = cc_tuner(model)
    tuner.set_training_progress(0.1)
    soft = model(**_batch()).layer_choice
    assert torch.allclose(soft.sum(-1), torch.ones(6))
    assert ((soft > 0) & (soft < 1)).any()
    tuner.set_training_progress(0.9)
    hard = model(**_batch()).layer_choice
    assert torch.equal(hard.sum(-1), torch.ones(6)) and set(hard.unique().tolist()) == {0.0, 1.0}


def test_residual_norm_scaling_injects_a_vector_of_the_residual_norm():
    """The injected vector keeps the source activation's direction and takes the residual stream's norm."""
    sources = torch.randn(3, 1, 8) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    residual = torch.randn(3, 8) * 5
    choice = ConnectionChoice(DecisionMaker(num_sources=1, hidden_size=8), sources, scale_to_residual=True)
    vectors = choice.vectors_for(torch.zeros(3, 8), residual)
    torch.testing.assert_close(vectors.norm(dim=-1), residual.norm(dim=-1))
    torch.testing.assert_close(
        vectors / vectors.norm(dim=-1, keepdim=True), sources[:, 0] / sources[:, 0].norm(dim=-1, keepdim=True)
    )
    unscaled = ConnectionChoice(DecisionMaker(num_sources=1, hidden_size=8), sources).vectors_for(
        torch.zeros(3, 8), residual
    )
    torch.testing.assert_close(unscaled, sources[:, 0])


def test_injection_gate_scales_each_layer_and_learns_before_the_choice_does():
    decision_maker = DecisionMaker(num_sources=3, hidden_size=8, gate_init=0.5)
    assert DecisionMaker(num_sources=3, hidden_size=8).gate is None  # the paper: no gate
    sources = torch.randn(4, 3, 8)
    choice = ConnectionChoice(decision_maker, sources, sample=True, learn=False)
    vectors = choice.vectors_for(torch.randn(4, 8), torch.randn(4, 8))
    chosen = choice.choice.argmax(dim=-1)
    torch.testing.assert_close(vectors, 0.5 * sources[torch.arange(4), chosen])
    vectors.sum().backward()
    assert not decision_maker.weight.grad.any()  # the choice does not learn yet ...
    expected = torch.zeros(3)  # ... the gate does: d(sum g_l e_l)/d g_l = sum e_l, for the chosen layers only
    expected.index_add_(0, chosen, sources[torch.arange(4), chosen].sum(dim=-1))
    torch.testing.assert_close(decision_maker.gate.grad, expected)


def test_a_closed_gate_starts_as_lora_alone_and_opens_by_gradient(tmp_path):
    model = make_cc_model("llama", train=False, injection_gate_init=0.0)
    randomize_lora_b(model)
    batch = _batch()
    without_connection = {key: batch[key] for key in ("input_ids", "labels")}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, model(**without_connection).logits)
    model.train()
    model(**batch).loss.backward()
    gate = cc_tuner(model).decision_maker().gate
    assert gate.shape == (3,) and gate.grad.abs().sum() > 0
    with torch.no_grad():
        gate.copy_(torch.tensor([0.5, -1.0, 2.0]))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
    torch.testing.assert_close(cc_tuner(loaded).decision_maker().gate, gate.detach())


def test_residual_norm_scaling_changes_the_forward_but_not_the_prefix():
    plain = make_cc_model("llama", train=False, source_layers=[2])
    scaled = make_cc_model("llama", train=False, source_layers=[2], injection_scaling="residual_norm")
    randomize_lora_b(plain)
    randomize_lora_b(scaled)
    batch = _batch()
    with torch.no_grad():
        a, b = plain(**batch).logits, scaled(**batch).logits
    assert torch.equal(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5], b[:, 5])


def test_balance_loss_is_added_and_reaches_the_decision_maker():
    weight = 0.5
    balanced = make_cc_model("llama", choice_balance_weight=weight)
    plain = make_cc_model("llama")
    torch.manual_seed(3)
    with_term = balanced(**_batch())
    torch.manual_seed(3)
    without_term = plain(**_batch())
    difference = (with_term.loss - without_term.loss).item()
    probabilities = torch.softmax(with_term.layer_logits, dim=-1).mean(0)
    expected = weight * (probabilities * (probabilities * 3).log()).sum().item()
    assert difference == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert difference >= 0
    with_term.loss.backward()
    assert decision_maker_weight(balanced).grad.abs().sum() > 0


def test_balance_loss_is_zero_for_uniform_probabilities():
    choice = ConnectionChoice(DecisionMaker(3, 4), torch.randn(2, 3, 4))
    choice.probabilities = torch.full((2, 3), 1 / 3)
    assert choice.balance_loss().item() == pytest.approx(0.0, abs=1e-7)
    choice.probabilities = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert choice.balance_loss().item() == pytest.approx(math.log(3), rel=1e-5)


def test_zero_initialised_decision_maker_starts_uniform():
    model = make_cc_model("llama", decision_maker_init="zeros")
    assert not decision_maker_weight(model).any()
    output = model(**_batch())
    assert torch.equal(output.layer_logits, torch.zeros(6, 3))
    output.loss.backward()
    assert decision_maker_weight(model).grad.abs().sum() > 0  # it learns from there
    with pytest.raises(ValueError, match="decision_maker_init"):
        CCConfig(decision_maker_init="uniform")


def test_expected_soft_choice_is_the_noise_free_softmax_and_arg_max_at_inference():
    model = make_cc_model("llama", soft_choice_fraction=0.5, soft_choice="expected", gumbel_temperature=2.0)
    tuner = cc_tuner(model)
    tuner.set_training_progress(0.1)
    first, second = model(**_batch()), model(**_batch())
    assert torch.equal(first.layer_choice, second.layer_choice)  # no noise: the same mixture for the same batch
    torch.testing.assert_close(first.layer_choice, torch.softmax(first.layer_logits / 2.0, dim=-1))
    assert tuner.connection_choice(torch.randn(2, 3, 32)).noise is None
    first.loss.backward()
    assert decision_maker_weight(model).grad.abs().sum() > 0
    tuner.set_training_progress(0.6)
    assert tuner.connection_choice(torch.randn(2, 3, 32)).noise is not None  # the hard phase samples
    model.eval()
    tuner.set_training_progress(0.1)
    choice = model(**_batch()).layer_choice
    assert set(choice.unique().tolist()) == {0.0, 1.0}  # arg-max at inference, even in the soft phase


def test_decision_maker_starts_learning_at_its_start_fraction():
    model = make_cc_model("llama", decision_maker_start_fraction=0.5)
    tuner = cc_tuner(model)
    weight = decision_maker_weight(model)
    randomize_lora_b(model)
    tuner.set_training_progress(0.25)
    early = model(**_batch())
    early.loss.backward()
    assert weight.grad is not None and not weight.grad.any()  # a zero gradient, as data parallel expects
    assert any(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if "lora_" in n)
    weight.grad = None
    tuner.set_training_progress(0.5)
    model(**_batch()).loss.backward()
    assert weight.grad.abs().sum() > 0


def test_english_variance_prior_is_each_layers_share_of_the_variance():
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(5, 3, 4, generator=generator)
    activations[:, 0] = torch.tensor([1.0, -2.0, 3.0, 0.5])  # the same for every prompt: carries nothing
    activations[:, 2] *= 3.0
    prior = english_variance_prior(activations).exp()
    variance = [activations[:, layer].var(dim=0, unbiased=False).sum() for layer in range(3)]
    assert prior[0] == pytest.approx(1e-8)
    assert prior[2] / prior[1] == pytest.approx(float(variance[2] / variance[1]), rel=1e-5)
    assert prior[1:].sum() == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        english_variance_prior(activations[:1])


def test_favour_shifts_the_logits_at_the_mean_input_by_the_centred_prior():
    decision_maker = DecisionMaker(3, 4)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    log_prior = torch.tensor([0.0, -1.0, -5.0])
    before = z @ decision_maker.weight.detach().T
    decision_maker.favour(log_prior, z)
    after = z @ decision_maker.weight.detach().T
    torch.testing.assert_close((after - before).mean(dim=0), log_prior - log_prior.mean())


@pytest.mark.parametrize("scaling", ["none", "residual_norm"])
def test_english_variance_init_favours_the_varying_layers_before_training(scaling):
    model = make_cc_model("llama", decision_maker_init="english_variance", injection_scaling=scaling)
    tuner = cc_tuner(model)
    assert tuner.needs_decision_maker_initialization()
    with pytest.raises(ValueError, match="initialize_decision_maker"):
        model(**_batch())  # training before the data-dependent step would silently skip it
    batches = [_batch(seed=0), _batch(seed=1)]
    before = decision_maker_weight(model).detach().clone()
    prior = tuner.initialize_decision_maker(batches)

    # The prior is computed from the English activations at the English anchors of every row of both batches.
    english = torch.cat([batch["english_input_ids"] for batch in batches])
    rows = torch.arange(len(english))
    anchors = torch.full((len(english),), english.shape[1] - 1)
    activations = tuner.anchor_activations(english, torch.ones_like(english), rows, anchors, tuner.source_layers())
    if scaling == "residual_norm":  # the injected activations are the directions, rescaled
        activations = activations / activations.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(prior, english_variance_prior(activations).exp())
    assert prior.sum().item() == pytest.approx(1.0, rel=1e-5)
    assert not torch.equal(decision_maker_weight(model), before)
    assert not tuner.needs_decision_maker_initialization()
    assert model.training  # the training mode is restored
    output = model(**_batch(seed=2))
    output.loss.backward()
    assert decision_maker_weight(model).grad.abs().sum() > 0


def test_a_loaded_english_variance_adapter_trains_without_initialization(tmp_path):
    model = make_cc_model("llama", decision_maker_init="english_variance")
    cc_tuner(model).initialize_decision_maker([_batch()])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path, is_trainable=True)
    assert not cc_tuner(loaded).needs_decision_maker_initialization()
    torch.testing.assert_close(decision_maker_weight(loaded), decision_maker_weight(model))
    loaded.train()
    loaded(**_batch()).loss.backward()


def test_row_losses_are_each_rows_mean_cross_entropy_over_its_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=generator)
    labels = torch.randint(0, 7, (3, 5), generator=generator)
    labels[0, :3] = -100
    labels[2] = -100  # no supervised token
    losses = _row_losses(logits, labels)
    expected = nn.functional.cross_entropy(logits[0, 2:4], labels[0, 3:5])
    assert losses[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses[1].item() == pytest.approx(nn.functional.cross_entropy(logits[1, :-1], labels[1, 1:]).item())
    assert losses[2].item() == 0.0


def test_score_function_gradient_is_reinforce_with_a_leave_one_out_baseline():
    generator = torch.Generator().manual_seed(0)
    decision_maker = DecisionMaker(3, 4)
    choice = ConnectionChoice(
        decision_maker, torch.randn(4, 3, 4, generator=generator), sample=True, score_function=True
    )
    vectors = choice.vectors_for(torch.randn(4, 4, generator=generator), torch.randn(4, 4))
    vectors.sum().backward()
    assert not decision_maker.weight.grad.any()  # no straight-through gradient
    row_losses = torch.tensor([1.0, 2.0, 0.5, 3.0])
    term = choice.score_function_loss(row_losses)
    assert term.item() == 0.0  # the reported loss does not change
    decision_maker.weight.grad = None
    term.backward()
    baseline = (row_losses.sum() - row_losses) / 3
    advantage = (row_losses - baseline)[:, None] * (choice.choice - choice.probabilities.detach())  # [B', S]
    torch.testing.assert_close(decision_maker.weight.grad, advantage.T @ choice.summary / 4)


def test_score_function_compares_a_single_row_with_the_given_baseline():
    generator = torch.Generator().manual_seed(0)
    decision_maker = DecisionMaker(3, 4)
    choice = ConnectionChoice(
        decision_maker, torch.randn(1, 3, 4, generator=generator), sample=True, score_function=True
    )
    choice.vectors_for(torch.randn(1, 4, generator=generator), torch.randn(1, 4))
    assert choice.score_function_loss(torch.tensor([1.5])) is None  # nothing to compare with
    choice.score_function_loss(torch.tensor([1.5]), single_row_baseline=2.0).backward()
    expected = -0.5 * (choice.choice - choice.probabilities.detach()).T @ choice.summary
    torch.testing.assert_close(decision_maker.weight.grad, expected)


def test_score_function_trains_lora_like_a_frozen_choice_and_only_then_the_decision_maker():
    def step(**options):
        model = make_cc_model("llama", **options)
        randomize_lora_b(model)
        torch.manual_seed(3)
        output = model(**_batch())
        output.loss.backward()
        return output, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reinforce, reinforce_grads = step(decision_maker_gradient="score_function")
    frozen, frozen_grads = step(decision_maker_start_fraction=1.0)
    assert torch.equal(reinforce.layer_choice, frozen.layer_choice)
    torch.testing.assert_close(reinforce.loss, frozen.loss)
    dm = next(name for name in reinforce_grads if "cc_decision_maker" in name)
    assert reinforce_grads[dm].abs().sum() > 0 and not frozen_grads[dm].any()
    for name, grad in frozen_grads.items():
        if name != dm:
            torch.testing.assert_close(reinforce_grads[name], grad)
    with pytest.raises(ValueError, match="soft_choice_fraction"):
        CCConfig(decision_maker_gradient="score_function", soft_choice_fraction=0.5)
    with pytest.raises(ValueError, match="decision_maker_gradient"):
        CCConfig(decision_maker_gradient="reinforce")


def test_presets_are_valid_and_the_paper_preset_is_the_default():
    assert CCConfig(**DECISION_MAKER_PRESETS["paper"]) == CCConfig()
    paper = CCConfig()
    for name in ("variance_reinforce", "variance_reinforce_gated"):
        preset = CCConfig(**DECISION_MAKER_PRESETS[name])
        for field, value in DECISION_MAKER_PRESETS[name].items():
            assert getattr(preset, field) == value != getattr(paper, field)
    gated = DECISION_MAKER_PRESETS["variance_reinforce_gated"]
    assert {**DECISION_MAKER_PRESETS["variance_reinforce"], "injection_gate_init": 0.3} == gated
    with pytest.raises(TypeError):
        DECISION_MAKER_PRESETS["variance_reinforce"]["injection_gate_init"] = 0.0  # read-only: the presets are shared
