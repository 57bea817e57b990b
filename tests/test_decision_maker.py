"""The Decision Maker strategies: the paper's, and `variance_reinforce_gated` (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from helpers import cc_config, cc_tuner, decision_maker_weight, make_cc_model, randomize_lora_b
from peft import PeftModel
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from trl.trainer.utils import FusedCausalLMOutput

from peft_cc import CCConfig, VarianceReinforceConfig
from peft_cc.decision_maker import (
    ConnectionChoice,
    DecisionMaker,
    completion_alignment,
    completion_alignment_prior,
    english_variance_prior,
)
from peft_cc.legacy_config import translate_legacy_fields
from peft_cc.model import _row_losses

GATED = "variance_reinforce_gated"


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


def _initialized_gated_model(**options):
    model = make_cc_model("llama", decision_maker=GATED, **options)
    cc_tuner(model).initialize_decision_maker([_batch(seed=5)])
    return model


def test_the_default_is_the_paper_and_the_strategy_gets_its_sub_config():
    assert CCConfig().decision_maker == "paper" and CCConfig().variance_reinforce_config is None
    assert CCConfig(decision_maker=GATED).variance_reinforce_config == VarianceReinforceConfig(
        start_fraction=0.25, gate_init=0.3, gate_init_ratio=None, prior="english_variance"
    )
    custom = CCConfig(decision_maker=GATED, variance_reinforce_config=VarianceReinforceConfig(gate_init=0.0))
    assert custom.variance_reinforce_config.gate_init == 0.0 and custom.learns_by_reinforce
    with pytest.raises(ValueError, match="variance_reinforce_config.*decision_maker"):
        CCConfig(variance_reinforce_config=VarianceReinforceConfig())


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"decision_maker": "zeros"}, "decision_maker"),
        ({"decision_maker": GATED, "variance_reinforce_config": {"start_fraction": 1.5}}, "start_fraction"),
        ({"decision_maker": GATED, "variance_reinforce_config": {"start_fraction": True}}, "start_fraction"),
        ({"decision_maker": GATED, "variance_reinforce_config": {"gate_init": float("nan")}}, "gate_init"),
        ({"decision_maker": GATED, "variance_reinforce_config": {"prior": "uniform"}}, "prior"),
    ],
)
def test_invalid_strategy_values_name_their_field(options, field):
    with pytest.raises(ValueError, match=field):
        CCConfig(**options)


def test_the_strategy_and_its_knobs_round_trip_through_adapter_config_json(tmp_path):
    model = _initialized_gated_model(variance_reinforce_config=VarianceReinforceConfig(start_fraction=0.5))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["decision_maker"] == GATED
    assert saved["variance_reinforce_config"] == {
        "start_fraction": 0.5,
        "gate_init": 0.3,
        "gate_init_ratio": None,
        "prior": "english_variance",
    }
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path, is_trainable=True)
    config = loaded.peft_config["default"]
    assert config.variance_reinforce_config == VarianceReinforceConfig(start_fraction=0.5, gate_init=0.3)
    assert not cc_tuner(loaded).needs_decision_maker_initialization()  # trained weights: nothing to initialise
    torch.testing.assert_close(decision_maker_weight(loaded), decision_maker_weight(model))
    loaded.train()
    output = loaded(**_batch())
    (output.loss + output.decision_maker_loss).backward()


def test_the_gate_scales_each_layer_and_learns_before_the_choice_does():
    decision_maker = DecisionMaker(num_sources=3, hidden_size=8, gate_init=0.5)
    assert DecisionMaker(num_sources=3, hidden_size=8).gate is None  # the paper: no gate
    sources = torch.randn(4, 3, 8)
    choice = ConnectionChoice(decision_maker, sources, sample=True, learn=False)
    vectors = choice.vectors_for(torch.randn(4, 8))
    chosen = choice.choice.argmax(dim=-1)
    torch.testing.assert_close(vectors, 0.5 * sources[torch.arange(4), chosen])
    vectors.sum().backward()
    assert not decision_maker.weight.grad.any()  # the choice does not learn yet ...
    expected = torch.zeros(3)  # ... the gate does: d(sum g_l e_l)/d g_l = sum e_l, for the chosen layers only
    expected.index_add_(0, chosen, sources[torch.arange(4), chosen].sum(dim=-1))
    torch.testing.assert_close(decision_maker.gate.grad, expected)


def test_the_gated_decision_maker_learns_from_its_start_fraction_on():
    model = _initialized_gated_model(variance_reinforce_config=VarianceReinforceConfig(start_fraction=0.5))
    tuner = cc_tuner(model)
    weight = decision_maker_weight(model)
    randomize_lora_b(model)
    tuner.set_training_progress(0.25)
    early = model(**_batch())
    (early.loss + early.decision_maker_loss).backward()
    assert weight.grad is not None and not weight.grad.any()  # a zero gradient, as data parallel expects
    assert tuner.decision_maker().gate.grad.abs().sum() > 0
    weight.grad = None
    tuner.set_training_progress(0.5)
    late = model(**_batch())
    (late.loss + late.decision_maker_loss).backward()
    assert weight.grad.abs().sum() > 0


def test_reinforce_trains_lora_like_a_frozen_choice_and_only_then_the_decision_maker():
    def step(progress):
        model = _initialized_gated_model()
        randomize_lora_b(model)
        cc_tuner(model).set_training_progress(progress)
        torch.manual_seed(3)
        output = model(**_batch())
        assert output.decision_maker_loss.item() == 0.0  # a term of value 0: no reported number changes
        (output.loss + output.decision_maker_loss).backward()
        return output, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    learning, learning_grads = step(progress=0.5)
    frozen, frozen_grads = step(progress=0.0)
    assert torch.equal(learning.layer_choice, frozen.layer_choice)
    torch.testing.assert_close(learning.loss, frozen.loss)
    weight = next(name for name in learning_grads if "cc_decision_maker" in name and name.endswith("weight"))
    assert learning_grads[weight].abs().sum() > 0 and not frozen_grads[weight].any()
    for name, grad in frozen_grads.items():
        if name != weight:
            torch.testing.assert_close(learning_grads[name], grad)


def test_the_paper_learns_straight_through_and_its_auxiliary_loss_only_keeps_the_graph():
    model = make_cc_model("llama")
    randomize_lora_b(model)
    output = model(**_batch())
    assert output.decision_maker_loss.item() == 0.0 and output.decision_maker_loss.requires_grad
    output.loss.backward()
    assert decision_maker_weight(model).grad.abs().sum() > 0  # straight through, without the auxiliary loss
    with torch.no_grad():
        assert model(**_batch()).decision_maker_loss is None


def test_the_gated_start_needs_initialize_decision_maker_and_favours_the_varying_layers():
    model = make_cc_model("llama", decision_maker=GATED)
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
    model.eval()
    activations = tuner.anchor_activations(english, torch.ones_like(english), rows, anchors, tuner.source_layers())
    model.train()
    torch.testing.assert_close(prior, english_variance_prior(activations).exp())
    assert prior.sum().item() == pytest.approx(1.0, rel=1e-5)
    assert not torch.equal(decision_maker_weight(model), before)
    assert not tuner.needs_decision_maker_initialization()
    assert model.training  # the training mode is restored


def test_the_decision_maker_input_of_the_initialisation_is_the_one_of_the_forward():
    """`initialize_decision_maker` computes z = h_in + mean e_l as the connected forward pass does."""
    model = make_cc_model("llama", decision_maker=GATED)
    tuner = cc_tuner(model)
    batch = _batch()
    recorded = []
    favour = tuner.decision_maker().favour
    tuner.decision_maker().favour = lambda log_prior, z: (recorded.append(z), favour(log_prior, z))
    tuner.initialize_decision_maker([batch])
    model.eval()
    choice_inputs = []
    original = DecisionMaker.summarize
    with pytest.MonkeyPatch.context() as patch:
        record = staticmethod(lambda *args: choice_inputs.append(original(*args)) or choice_inputs[-1])
        patch.setattr(DecisionMaker, "summarize", record)
        with torch.no_grad():
            model(**batch)
    torch.testing.assert_close(recorded[0], choice_inputs[0])


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
    same = english_variance_prior(torch.ones(4, 3, 2)).exp()  # identical prompts: nothing to favour
    torch.testing.assert_close(same, torch.full((3,), 1 / 3))


def test_completion_alignment_prior_favours_the_layer_that_varies_as_the_completions_not_the_one_that_varies_most():
    generator = torch.Generator().manual_seed(0)
    completions = torch.randn(40, 6, generator=generator)
    activations = torch.empty(40, 4, 8)
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=generator))[0][:6]  # [6, 8] orthonormal rows
    activations[:, 0] = 0.01 * completions @ rotation  # small, and a rotation of the completions
    activations[:, 1] = 0.01 * completions @ rotation + 0.01 * torch.randn(40, 8, generator=generator)
    activations[:, 2] = 10 * torch.randn(40, 8, generator=generator)  # varies most, unrelated to the completions
    activations[:, 3] = torch.arange(8.0)  # the same for every prompt
    alignment = completion_alignment(activations, completions)
    assert alignment[0].item() == pytest.approx(1.0, abs=1e-4)  # a rotation and rescaling of the completions
    assert 0.3 < alignment[1] < 0.95 and abs(alignment[2]) < 0.1 and alignment[3] == 0
    scaled = activations.clone()
    scaled[:, 1] *= 1000.0
    torch.testing.assert_close(completion_alignment(scaled, completions), alignment)  # the scale does not matter
    prior = completion_alignment_prior(activations, completions).exp()
    positive = alignment.clamp_min(0)
    torch.testing.assert_close(prior, (positive / positive.sum()).clamp_min(1e-8))
    assert prior[0] > prior[1] > 5 * prior[2] and prior[3] == pytest.approx(1e-8)
    assert english_variance_prior(activations).exp()[2] > 0.99  # what the variance start favours instead
    same = completion_alignment_prior(activations, torch.ones(40, 6)).exp()  # one completion: nothing to favour
    torch.testing.assert_close(same, torch.full((4,), 0.25))
    for bad_activations, bad_completions in ((activations[:3], completions[:3]), (activations, completions[:39])):
        with pytest.raises(ValueError, match="at least 4 prompts and one completion per prompt"):
            completion_alignment(bad_activations, bad_completions)


def test_the_completion_alignment_start_compares_english_activations_with_the_labels_output_embeddings():
    strategy = VarianceReinforceConfig(prior="completion_alignment")
    model = make_cc_model("llama", decision_maker=GATED, variance_reinforce_config=strategy)
    tuner = cc_tuner(model)
    batches = [_batch(seed=0), _batch(seed=1)]
    prior = tuner.initialize_decision_maker(batches)

    english = torch.cat([batch["english_input_ids"] for batch in batches])
    rows = torch.arange(len(english))
    model.eval()
    activations = tuner.anchor_activations(
        english, torch.ones_like(english), rows, torch.full((len(rows),), english.shape[1] - 1), tuner.source_layers()
    )
    model.train()
    labels = torch.cat([batch["labels"][:, 6:] for batch in batches])  # every row's 4 label tokens
    completions = model.get_output_embeddings().weight[labels].mean(dim=1)
    torch.testing.assert_close(prior, completion_alignment_prior(activations, completions).exp())
    assert model.training and not tuner.needs_decision_maker_initialization()
    unlabelled = {key: value for key, value in _batch().items() if key != "labels"}
    anchors = torch.full((len(unlabelled["input_ids"]),), 5)
    with pytest.raises(ValueError, match="needs `labels`"):
        tuner.initialize_decision_maker([{**unlabelled, "anchor_positions": anchors}])


def test_a_gate_init_ratio_starts_every_layers_injection_at_that_ratio_to_the_residual_stream():
    strategy = VarianceReinforceConfig(gate_init_ratio=10.0)
    model = make_cc_model("llama", decision_maker=GATED, variance_reinforce_config=strategy)
    tuner = cc_tuner(model)
    batch = _batch()
    model.eval()
    rows = torch.arange(len(batch["input_ids"]))
    english = batch["english_input_ids"]
    activations = tuner.anchor_activations(
        english, torch.ones_like(english), rows, torch.full((len(rows),), english.shape[1] - 1), tuner.source_layers()
    )
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[1]  # after layer 0
    residual_norm = hidden[rows, 5].norm(dim=-1).mean()  # at the anchors, before the first label
    model.train()
    tuner.initialize_decision_maker([batch])
    gate = tuner.decision_maker().gate.detach()
    torch.testing.assert_close(gate * activations.norm(dim=-1).mean(dim=0), 10.0 * residual_norm.expand(len(gate)))
    assert len(set(gate.tolist())) == len(gate)  # one start per layer, unlike gate_init
    with pytest.raises(ValueError, match="gate_init_ratio"):
        VarianceReinforceConfig(gate_init_ratio=0.0)


def test_favour_shifts_the_logits_at_the_mean_input_by_the_centred_prior():
    decision_maker = DecisionMaker(3, 4)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    log_prior = torch.tensor([0.0, -1.0, -5.0])
    before = z @ decision_maker.weight.detach().T
    decision_maker.favour(log_prior, z)
    after = z @ decision_maker.weight.detach().T
    torch.testing.assert_close((after - before).mean(dim=0), log_prior - log_prior.mean())


def test_row_losses_are_each_rows_mean_cross_entropy_from_logits_or_fused_log_probs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=generator)
    labels = torch.randint(0, 7, (3, 5), generator=generator)
    labels[0, :3] = -100
    labels[2] = -100  # no supervised token
    losses = _row_losses(CausalLMOutputWithPast(logits=logits), labels)
    expected = nn.functional.cross_entropy(logits[0, 2:4], labels[0, 3:5])
    assert losses[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses[1].item() == pytest.approx(nn.functional.cross_entropy(logits[1, :-1], labels[1, 1:]).item())
    assert losses[2].item() == 0.0
    # TRL's fused LM head gives the per-token log-probabilities of the shifted labels instead of logits.
    mask = labels[:, 1:] != -100
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    fused = FusedCausalLMOutput(log_probs=log_probs.masked_fill(~mask, 0.0), label_mask=mask)
    torch.testing.assert_close(_row_losses(fused, labels), losses)


def test_reinforce_gradient_uses_a_leave_one_out_baseline():
    generator = torch.Generator().manual_seed(0)
    decision_maker = DecisionMaker(3, 4)
    choice = ConnectionChoice(decision_maker, torch.randn(4, 3, 4, generator=generator), sample=True, reinforce=True)
    choice.vectors_for(torch.randn(4, 4, generator=generator)).sum().backward()
    assert not decision_maker.weight.grad.any()  # no straight-through gradient
    row_losses = torch.tensor([1.0, 2.0, 0.5, 3.0])
    term = choice.reinforce_loss(row_losses)
    assert term.item() == 0.0  # the reported loss does not change
    decision_maker.weight.grad = None
    term.backward()
    baseline = (row_losses.sum() - row_losses) / 3
    probabilities = torch.softmax(choice.logits, dim=-1)
    advantage = (row_losses - baseline)[:, None] * (choice.choice - probabilities)  # [B', S]
    torch.testing.assert_close(decision_maker.weight.grad, advantage.T @ choice.summary / 4)


def test_reinforce_compares_a_single_row_with_the_given_baseline():
    generator = torch.Generator().manual_seed(0)
    decision_maker = DecisionMaker(3, 4)
    choice = ConnectionChoice(decision_maker, torch.randn(1, 3, 4, generator=generator), sample=True, reinforce=True)
    choice.vectors_for(torch.randn(1, 4, generator=generator))
    assert choice.reinforce_loss(torch.tensor([1.5])) is None  # nothing to compare with
    choice.reinforce_loss(torch.tensor([1.5]), single_row_baseline=2.0).backward()
    expected = -0.5 * (choice.choice - torch.softmax(choice.logits, dim=-1)).T @ choice.summary
    torch.testing.assert_close(decision_maker.weight.grad, expected)


# ---------------------------------------------------------------------------------------------- peft-cc 0.1 adapters

OLD_PAPER = {
    "decision_maker_init": "normal",
    "injection_scaling": "none",
    "injection_gate_init": None,
    "gumbel_temperature_final": None,
    "soft_choice_fraction": 0.0,
    "soft_choice": "gumbel",
    "decision_maker_start_fraction": 0.0,
    "decision_maker_gradient": "straight_through",
    "choice_balance_weight": 0.0,
    "decoder_num_layers": 3,
    "decoder_hidden_size": 32,
}
OLD_GATED = {
    **OLD_PAPER,
    "decision_maker_init": "english_variance",
    "decision_maker_start_fraction": 0.25,
    "decision_maker_gradient": "score_function",
    "injection_gate_init": 0.3,
}


def test_old_settings_translate_to_the_remaining_strategies():
    assert translate_legacy_fields({"r": 4, **OLD_PAPER}) == {"r": 4, "decision_maker": "paper"}
    assert translate_legacy_fields({"r": 4, **OLD_GATED}) == {
        "r": 4,
        "decision_maker": GATED,
        "variance_reinforce_config": {"start_fraction": 0.25, "gate_init": 0.3},
    }
    current = {"r": 4, "decision_maker": GATED}
    assert translate_legacy_fields(current) == current


@pytest.mark.parametrize(
    "changed",
    [{"injection_scaling": "residual_norm"}, {"decision_maker_init": "zeros"}, {"injection_gate_init": None}],
)
def test_old_settings_that_were_removed_fail_saying_how_to_load_them(changed):
    with pytest.raises(ValueError, match=r"no longer exist.*commit e659d73"):
        translate_legacy_fields({**OLD_GATED, **changed})


@pytest.mark.parametrize(("old", "strategy"), [(OLD_PAPER, "paper"), (OLD_GATED, GATED)])
def test_an_adapter_saved_by_peft_cc_0_1_loads(tmp_path, old, strategy):
    model = make_cc_model("llama", train=False, **({} if strategy == "paper" else {"decision_maker": GATED}))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved.pop("variance_reinforce_config")
    saved.pop("decision_maker")
    path.write_text(json.dumps({**saved, **old}))
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
    assert loaded.peft_config["default"] == cc_config(
        decision_maker=strategy, inference_mode=True, **_saved_lora(saved)
    )
    torch.testing.assert_close(decision_maker_weight(loaded), decision_maker_weight(model))


def _saved_lora(saved: dict) -> dict:
    keys = ("base_model_name_or_path", "revision", "target_modules")
    return {key: saved[key] for key in keys if key in saved} | {"target_modules": set(saved["target_modules"])}
