"""CCModel on tiny models: trainable parameters, the training forward, padding, anchors, the Gumbel sample,
gradient checkpointing and 4-bit QLoRA."""

import math

import peft
import pytest
import torch
from conftest import HIDDEN_SIZE, NUM_LAYERS, make_tiny_model
from helpers import (
    ADAPTER,
    cc_config,
    cc_tuner,
    decision_maker_weight,
    expected_trainable_count,
    gradients,
    make_batch,
    make_cc_model,
    model_inputs,
    randomize_lora_b,
    select_row,
    train_step,
    trainable_parameters,
)
from transformers import GPT2Config, GPT2LMHeadModel

from peft_cc import CCCausalLMOutputWithPast
from peft_cc.architecture import map_decoder

DM_NAME = f"base_model.cc_decision_maker.{ADAPTER}.weight"


def _layer_index(name):
    """The decoder layer index in a parameter name like '...model.layers.2.mlp.down_proj.lora_B.default.weight'."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


def _plain_logits(model, batch):
    """Logits of the same model without the connection (eval mode, no English input): plain LoRA."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**model_inputs(batch, english=False)).logits
    model.train(was_training)
    return logits


# ---------------------------------------------------------------------------------------------- parameters


def test_trainable_parameters_are_lora_and_decision_maker(architecture):
    """Only lora_A/lora_B and the Decision Maker train; their count is LoRA's r*(in+out) per Linear plus S*d."""
    base = make_tiny_model(architecture)
    expected = expected_trainable_count(base, r=4, num_sources=NUM_LAYERS)
    model = make_cc_model(architecture, base=base)
    trainable = trainable_parameters(model)
    for name in trainable:
        assert name == DM_NAME or ".lora_A." in name or ".lora_B." in name, name
    assert DM_NAME in trainable
    assert sum(param.numel() for param in trainable.values()) == expected
    assert model.get_nb_trainable_parameters()[0] == expected

    # The Transform Matrix is a (saved) buffer, fitted after training, never a trained parameter.
    matrix = cc_tuner(model).cc_transform_matrix[ADAPTER]
    assert matrix.shape == (HIDDEN_SIZE, HIDDEN_SIZE) and matrix.dtype == torch.float32
    assert not matrix.requires_grad
    assert torch.count_nonzero(matrix) == 0
    assert all("cc_transform_matrix" not in name for name, _ in model.named_parameters())
    assert f"base_model.cc_transform_matrix.{ADAPTER}" in dict(model.named_buffers())


def test_decision_maker_initialisation():
    """The Decision Maker is float32 [S, d], normal with std = the model's initializer_range (also in bf16)."""
    model = make_cc_model("llama")
    weight = decision_maker_weight(model)
    assert weight.dtype == torch.float32 and weight.shape == (NUM_LAYERS, HIDDEN_SIZE)
    assert weight.requires_grad
    # 96 samples: the sample std lies within ~±25% of 0.02 with overwhelming probability.
    assert 0.015 < weight.std().item() < 0.025

    base = make_tiny_model("llama", dtype=torch.bfloat16)
    base.config.initializer_range = 0.5
    weight = decision_maker_weight(make_cc_model("llama", base=base))
    assert weight.dtype == torch.float32
    assert 0.375 < weight.std().item() < 0.625


# ---------------------------------------------------------------------------------------------- training forward


def test_forward_backward(architecture):
    """A training step: finite loss, gradients on the Decision Maker and LoRA of every layer, none on the base."""
    model = make_cc_model(architecture)
    batch = make_batch(prompt_lens=(4, 6, 3), response_lens=(3, 2, 4), english_lens=(5, 3, 6))
    output = train_step(model, batch)
    assert isinstance(output, CCCausalLMOutputWithPast)
    assert torch.isfinite(output.loss)
    assert output.connected_rows.tolist() == [True, True, True] and output.num_unconnected_rows == 0
    assert output.layer_choice.shape == (3, NUM_LAYERS) and output.layer_logits.shape == (3, NUM_LAYERS)
    assert torch.equal(output.layer_choice.sum(dim=1), torch.ones(3))
    assert set(output.layer_choice.unique().tolist()) <= {0.0, 1.0}

    grads = gradients(model)
    assert grads[DM_NAME].abs().sum() > 0
    for layer in range(NUM_LAYERS):
        lora_b = [g for name, g in grads.items() if ".lora_B." in name and _layer_index(name) == layer]
        assert lora_b and any(g.abs().sum() > 0 for g in lora_b), f"no lora_B gradient in layer {layer}"
    # lora_B starts at zero, so lora_A gets no gradient in the first step.
    assert all(g.abs().sum() == 0 for name, g in grads.items() if ".lora_A." in name)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name

    # After one optimizer step, both lora_A and lora_B of every layer get gradients.
    optimizer = torch.optim.SGD(trainable_parameters(model).values(), lr=0.5)
    optimizer.step()
    optimizer.zero_grad()
    train_step(model, batch, seed=1)
    grads = gradients(model)
    for layer in range(NUM_LAYERS):
        for kind in (".lora_A.", ".lora_B."):
            assert any(
                g.abs().sum() > 0 for name, g in grads.items() if kind in name and _layer_index(name) == layer
            ), f"no {kind} gradient in layer {layer} after one step"
    assert grads[DM_NAME].abs().sum() > 0


def test_english_gradients_switch():
    """english_gradients=False keeps loss and Decision Maker gradient, drops the English pass's LoRA gradient."""
    batch = make_batch(prompt_lens=(4, 6), response_lens=(3, 2), english_lens=(5, 3))
    results = {}
    for english_gradients in (True, False):
        model = make_cc_model("llama", english_gradients=english_gradients)
        randomize_lora_b(model)
        output = train_step(model, batch, seed=3)
        results[english_gradients] = (output, gradients(model))
    (out_on, grads_on), (out_off, grads_off) = results[True], results[False]
    assert torch.equal(out_on.loss, out_off.loss)
    assert torch.equal(out_on.layer_choice, out_off.layer_choice)
    torch.testing.assert_close(grads_on[DM_NAME], grads_off[DM_NAME], atol=1e-7, rtol=1e-5)
    # The chosen English activation enters the residual stream with a straight-through (value 1) weight, so the
    # English pass's LoRA weights get a gradient of the same order as the non-English pass's: layer 0's MLP feeds
    # every candidate activation.
    name = f"base_model.model.model.layers.0.mlp.down_proj.lora_B.{ADAPTER}.weight"
    assert (grads_on[name] - grads_off[name]).abs().max() > 0.1 * grads_off[name].abs().max()
    lora_diff = max((grads_on[n] - grads_off[n]).abs().max().item() for n in grads_on if "lora_" in n)
    assert lora_diff > 1e-6


# ---------------------------------------------------------------------------------------------- padding and anchors


def test_right_padding_rows_match_rows_alone(architecture):
    """In a right-padded batch of uneven rows, each row's logits equal those of the row run alone (forced choice)."""
    model = make_cc_model(architecture, source_layers=[1])  # one candidate: the Gumbel sample cannot matter
    randomize_lora_b(model)
    batch = make_batch(prompt_lens=(3, 6, 4), response_lens=(5, 1, 3), english_lens=(6, 2, 4), seed=1)
    with torch.no_grad():
        torch.manual_seed(0)
        output = model(**model_inputs(batch))
        assert output.connected_rows.all()
        plain = _plain_logits(model, batch)
        for i in range(3):
            row = select_row(batch, i)
            length = row["input_ids"].shape[1]
            torch.manual_seed(1)
            alone = model(**model_inputs(row))
            torch.testing.assert_close(output.logits[i : i + 1, :length], alone.logits, atol=1e-5, rtol=0)
            # ... and the connection really changed the row from its anchor on.
            anchor = int(batch["anchors"][i])
            assert (alone.logits[0, anchor] - plain[i, anchor]).abs().max() > 1e-4

    # The loss is the ordinary causal-LM loss over the response tokens of all rows.
    logits = output.logits[:, :-1].reshape(-1, output.logits.shape[-1])
    targets = batch["labels"][:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(output.loss, expected, atol=1e-5, rtol=1e-5)


def test_left_padded_english_prompts():
    """English prompts may be left padded: the anchor is their last token, and the result equals right padding."""
    model = make_cc_model("llama", train=False)
    randomize_lora_b(model)
    batch = make_batch(prompt_lens=(4, 6, 3), response_lens=(3, 2, 2), english_lens=(5, 2, 3), seed=8)
    left = dict(batch)
    left["english_input_ids"] = torch.zeros_like(batch["english_input_ids"])
    left["english_attention_mask"] = torch.zeros_like(batch["english_attention_mask"])
    for i, length in enumerate(batch["english_attention_mask"].sum(dim=1).tolist()):
        left["english_input_ids"][i, -length:] = batch["english_input_ids"][i, :length]
        left["english_attention_mask"][i, -length:] = 1
    with torch.no_grad():
        right_out = model(**model_inputs(batch))
        left_out = model(**model_inputs(left))
    assert left_out.connected_rows.all()
    assert torch.equal(left_out.layer_choice, right_out.layer_choice)
    torch.testing.assert_close(left_out.logits, right_out.logits, atol=1e-5, rtol=0)


def test_rows_without_anchor_are_not_connected():
    """A row without any label and a row with an empty English prompt are left unconnected, without crashing."""
    model = make_cc_model("llama")
    randomize_lora_b(model)
    batch = make_batch(prompt_lens=(4, 5, 3, 6), response_lens=(3, 2, 4, 2), english_lens=(5, 4, 0, 3), seed=2)
    batch["labels"][1] = -100  # e.g. truncation removed the whole response
    output = train_step(model, batch)
    assert torch.isfinite(output.loss)
    assert output.connected_rows.tolist() == [True, False, False, True]
    assert output.num_unconnected_rows == 2
    assert output.layer_choice[[1, 2]].abs().sum() == 0 and output.layer_logits[[1, 2]].abs().sum() == 0
    assert torch.equal(output.layer_choice[[0, 3]].sum(dim=1), torch.ones(2))
    assert decision_maker_weight(model).grad.abs().sum() > 0

    plain = _plain_logits(model, batch)
    torch.testing.assert_close(output.logits[[1, 2]], plain[[1, 2]], atol=1e-6, rtol=0)
    for i in (0, 3):
        anchor = int(batch["anchors"][i])
        assert (output.logits[i, anchor] - plain[i, anchor]).abs().max() > 1e-4


def test_batch_without_any_anchor():
    """A batch in which no row can be connected still trains (plain LoRA loss) and reports every row unconnected."""
    model = make_cc_model("llama")
    batch = make_batch(prompt_lens=(4, 5), response_lens=(3, 2), english_lens=(0, 0))
    output = train_step(model, batch)
    assert torch.isfinite(output.loss)
    assert output.num_unconnected_rows == 2
    assert output.layer_choice.shape == (2, NUM_LAYERS) and output.layer_choice.abs().sum() == 0
    torch.testing.assert_close(output.logits, _plain_logits(model, batch), atol=1e-6, rtol=0)


def test_label_at_position_zero_has_no_anchor():
    """A supervised label at position 0 has no prompt token before it: that row is not connected."""
    model = make_cc_model("llama")
    batch = make_batch(prompt_lens=(4, 4), response_lens=(3, 3))
    batch["labels"][1] = batch["input_ids"][1]
    output = train_step(model, batch)
    assert output.connected_rows.tolist() == [True, False]


def test_positions_before_the_anchor_are_unchanged(architecture):
    """The connection changes nothing before the anchor (bit-identical logits) and changes the anchor's logits."""
    model = make_cc_model(architecture, train=False)
    randomize_lora_b(model)
    batch = make_batch(prompt_lens=(5, 3, 7), response_lens=(3, 5, 1), english_lens=(4, 6, 2), seed=4)
    with torch.no_grad():
        connected = model(**model_inputs(batch)).logits
    plain = _plain_logits(model, batch)
    for i, anchor in enumerate(batch["anchors"].tolist()):
        assert torch.equal(connected[i, :anchor], plain[i, :anchor]), f"row {i} changed before its anchor"
        assert (connected[i, anchor] - plain[i, anchor]).abs().max() > 1e-4, f"row {i} not connected"


def test_explicit_anchor_positions_override_labels():
    """anchor_positions replaces the label-derived anchor; -1 leaves a row unconnected."""
    model = make_cc_model("llama", train=False)
    randomize_lora_b(model)
    batch = make_batch(prompt_lens=(6, 6), response_lens=(2, 2), english_lens=(4, 5))
    plain = _plain_logits(model, batch)
    with torch.no_grad():
        output = model(**model_inputs(batch), anchor_positions=torch.tensor([2, -1]))
    assert output.connected_rows.tolist() == [True, False]
    assert torch.equal(output.logits[0, :2], plain[0, :2])
    assert (output.logits[0, 2] - plain[0, 2]).abs().max() > 1e-4  # label-derived anchor would be 5
    torch.testing.assert_close(output.logits[1], plain[1], atol=1e-6, rtol=0)

    # int32 is accepted; an anchor on padding is not connected.
    batch = make_batch(prompt_lens=(6, 3), response_lens=(2, 2), english_lens=(4, 5))
    with torch.no_grad():
        output = model(**model_inputs(batch), anchor_positions=torch.tensor([3, 6], dtype=torch.int32))
    assert output.connected_rows.tolist() == [True, False]


@pytest.mark.parametrize(
    "anchors",
    [
        torch.tensor([0, 8]),  # == sequence length
        torch.tensor([0, 100]),
        torch.tensor([-2, 0]),
        torch.tensor([1.0, 2.0]),
        torch.tensor([[1, 2]]),
    ],
    ids=["at-length", "far-out", "below-minus-one", "float", "2d"],
)
def test_invalid_anchor_positions_raise(anchors):
    """Out-of-range, non-integer or wrongly shaped anchor_positions raise a ValueError naming the argument."""
    model = make_cc_model("llama")
    batch = make_batch(prompt_lens=(6, 6), response_lens=(2, 2))
    with pytest.raises(ValueError, match="anchor_positions"):
        model(**model_inputs(batch), anchor_positions=anchors)


def test_training_needs_the_english_prompt():
    """A training forward without english_input_ids is refused; eval mode without it is plain LoRA."""
    model = make_cc_model("llama")
    randomize_lora_b(model)
    batch = make_batch()
    with pytest.raises(ValueError, match="english_input_ids"):
        model(**model_inputs(batch, english=False))

    # The same LoRA weights in a plain LoRA adapter give the same eval output.
    lora_model = peft.get_peft_model(
        make_tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    ).eval()
    cc_state = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in lora_model.named_parameters():
            if "lora_" in name:
                param.copy_(cc_state[name])
        expected = lora_model(**model_inputs(batch, english=False)).logits
        with_grad_disabled = model(**model_inputs(batch, english=False))  # training mode, no autograd: allowed
    model.eval()
    output = model(**model_inputs(batch, english=False))
    assert not isinstance(output, CCCausalLMOutputWithPast) or output.connected_rows is None
    torch.testing.assert_close(output.logits, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_grad_disabled.logits, expected, atol=1e-6, rtol=0)


def test_malformed_connection_inputs_raise():
    """English inputs with another number of rows, or no way to find the anchor (no labels), raise ValueError."""
    model = make_cc_model("llama")
    batch = make_batch(prompt_lens=(4, 6), response_lens=(3, 2), english_lens=(5, 3))
    inputs = model_inputs(batch)
    with pytest.raises(ValueError, match="english_input_ids"):
        model(**{**inputs, "english_input_ids": inputs["english_input_ids"][:1]})
    with pytest.raises(ValueError, match="english_attention_mask"):
        model(**{**inputs, "english_attention_mask": inputs["english_attention_mask"][:, :2]})
    with pytest.raises(ValueError, match="labels.*anchor_positions"):
        model(**{key: value for key, value in inputs.items() if key != "labels"})
    # After a refused call the hooks are disarmed: a normal step still works.
    assert torch.isfinite(train_step(model, batch).loss)


# ---------------------------------------------------------------------------------------------- Gumbel sample


def test_gumbel_sample_is_reproducible():
    """The same seed gives the same layer choice and loss; different seeds give different choices; eval = argmax."""
    model = make_cc_model("llama")
    rows = 48
    batch = make_batch(prompt_lens=(3,) * rows, response_lens=(2,) * rows, english_lens=(3,) * rows, seed=5)
    choices = {}
    with torch.no_grad():
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            output = model(**model_inputs(batch))
            if seed in choices:
                assert torch.equal(output.layer_choice, choices[seed][0])
                assert torch.equal(output.loss, choices[seed][1])
            choices[seed] = (output.layer_choice, output.loss)
        assert not torch.equal(choices[0][0], choices[1][0])
        assert (choices[0][0].sum(dim=0) > 0).sum() > 1  # the sample does pick different layers

        model.eval()
        torch.manual_seed(0)
        first = model(**model_inputs(batch))
        torch.manual_seed(1)
        second = model(**model_inputs(batch))
    assert torch.equal(first.layer_choice, second.layer_choice)
    expected = torch.nn.functional.one_hot(first.layer_logits.argmax(dim=-1), NUM_LAYERS).float()
    assert torch.equal(first.layer_choice, expected)


# ---------------------------------------------------------------------------------------------- architectures


def _tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()


def test_unsupported_architecture_fails_clearly():
    """GPT-2 is not mapped: get_peft_model says to set ffn_output_module; with it, it says the layers are not found."""
    with pytest.raises(ValueError, match="ffn_output_module"):
        peft.get_peft_model(_tiny_gpt2(), cc_config(target_modules=["c_fc"]))
    # GPT-2's decoder layers are `transformer.h`, not `layers`.
    with pytest.raises(ValueError, match=r"decoder layers.*GPT2LMHeadModel|GPT2LMHeadModel.*decoder layers"):
        peft.get_peft_model(_tiny_gpt2(), cc_config(target_modules=["c_fc"], ffn_output_module="mlp"))


def test_unknown_ffn_output_module_fails_clearly():
    """A wrong ffn_output_module name on a supported model is refused, naming the module and the option."""
    with pytest.raises(ValueError, match="no_such_module.*ffn_output_module"):
        peft.get_peft_model(make_tiny_model("llama"), cc_config(ffn_output_module="no_such_module"))


def test_recorded_english_activation_is_the_ffn_contribution(architecture):
    """The recorded e_l is what layer l's FFN adds to the residual stream (Gemma 3: the post-FFN norm's output)."""
    model = make_cc_model(architecture, train=False)
    randomize_lora_b(model)
    decoder = map_decoder(model.base_model.model)
    batch = make_batch(prompt_lens=(4, 6), response_lens=(2, 2), english_lens=(5, 3), seed=10)
    ids, mask = batch["english_input_ids"], batch["english_attention_mask"]
    anchors = mask.sum(dim=1) - 1
    rows = torch.arange(2)
    with torch.no_grad():
        recorded = cc_tuner(model).anchor_activations(ids, mask, rows, anchors, list(range(NUM_LAYERS)))
    assert recorded.shape == (2, NUM_LAYERS, HIDDEN_SIZE)

    def layer_output(index, zero_ffn):
        captured = {}

        def on_layer(module, args, output):
            captured["out"] = output[0] if isinstance(output, tuple) else output

        def on_ffn(module, args, output):
            captured["ffn"] = output
            return torch.zeros_like(output) if zero_ffn else None

        handles = [
            decoder.layers[index].register_forward_hook(on_layer),
            decoder.ffn_outputs[index].register_forward_hook(on_ffn),
        ]
        try:
            with torch.no_grad():
                model.base_model.model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    for index in range(NUM_LAYERS):
        normal, without_ffn = layer_output(index, False), layer_output(index, True)
        # Removing the module's output removes exactly that vector from the layer's output: it is the FFN term.
        torch.testing.assert_close(normal["out"] - without_ffn["out"], normal["ffn"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(recorded[:, index], normal["ffn"][rows, anchors], atol=1e-6, rtol=0)


def test_disable_adapter_gives_the_base_model(architecture):
    """Inside model.disable_adapter(), a forward with English inputs is the base model's (LoRA and connection off)."""
    reference = make_tiny_model(architecture)
    model = make_cc_model(architecture)
    randomize_lora_b(model)
    batch = make_batch(prompt_lens=(4, 6), response_lens=(3, 2), english_lens=(5, 3))
    with torch.no_grad():
        expected = reference(**model_inputs(batch, english=False))
        with model.disable_adapter():
            output = model(**model_inputs(batch))
        connected = model(**model_inputs(batch))
    torch.testing.assert_close(output.logits, expected.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(output.loss, expected.loss, atol=1e-6, rtol=0)
    assert getattr(output, "connected_rows", None) is None
    # The adapter and the connection are back on afterwards.
    assert connected.connected_rows.all()
    assert (connected.logits - expected.logits).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- checkpointing

CHECKPOINTING = {
    "off": None,
    "non-reentrant": {"use_reentrant": False},
    "reentrant": {"use_reentrant": True},
}


def _checkpointing_run(architecture, mode, dtype, batch):
    base = make_tiny_model(architecture, dtype=dtype)
    kwargs = CHECKPOINTING[mode]
    if kwargs is not None:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"]:
            base.enable_input_require_grads()
    model = make_cc_model(architecture, base=base)
    randomize_lora_b(model, std=0.05)
    model.train()
    assert base.is_gradient_checkpointing == (kwargs is not None)
    output = train_step(model, batch, seed=7)
    return output, gradients(model)


def _assert_checkpointing_equivalent(architecture, dtype, atol, rtol, loss_atol):
    batch = make_batch(prompt_lens=(4, 6, 3), response_lens=(3, 2, 4), english_lens=(5, 3, 6), seed=6)
    runs = {mode: _checkpointing_run(architecture, mode, dtype, batch) for mode in CHECKPOINTING}
    reference_output, reference_grads = runs["off"]
    assert reference_grads[DM_NAME].abs().sum() > 0
    for mode in ("non-reentrant", "reentrant"):
        output, grads = runs[mode]
        assert torch.equal(output.layer_choice, reference_output.layer_choice), mode
        torch.testing.assert_close(output.loss, reference_output.loss, atol=loss_atol, rtol=0, msg=mode)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(
                grad.float(), reference_grads[name].float(), atol=atol, rtol=rtol, msg=f"{mode}: {name}"
            )


def test_gradient_checkpointing_equivalence(architecture):
    """Same seed and batch: same loss, choice and gradients with checkpointing off, non-reentrant and reentrant."""
    _assert_checkpointing_equivalent(architecture, torch.float32, atol=1e-6, rtol=1e-5, loss_atol=1e-6)


def test_gradient_checkpointing_equivalence_bf16():
    """The same holds for a bfloat16 model (loose tolerance); the Decision Maker stays float32."""
    _assert_checkpointing_equivalent("llama", torch.bfloat16, atol=1e-2, rtol=1e-2, loss_atol=1e-3)
    model = make_cc_model("llama", dtype=torch.bfloat16)
    assert decision_maker_weight(model).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- 4-bit QLoRA


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(path)
    return path


def _qlora_run(path, use_gradient_checkpointing, batch):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")
    linear = base.model.layers[0].self_attn.q_proj
    assert isinstance(linear, bnb.nn.Linear4bit)
    base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=use_gradient_checkpointing)
    assert base.is_gradient_checkpointing == use_gradient_checkpointing
    model = make_cc_model("llama", base=base)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    output = train_step(model, batch, seed=11)
    return model, output, gradients(model)


def test_qlora_4bit(tiny_llama_dir):
    """A 4-bit NF4 model trains with CC-Tuning; checkpointing on/off gives the same loss and gradients."""
    batch = make_batch(prompt_lens=(4, 6), response_lens=(3, 2), english_lens=(5, 3), seed=7)
    model, output, grads = _qlora_run(tiny_llama_dir, True, batch)
    assert torch.isfinite(output.loss)
    assert output.connected_rows.all()
    weight = decision_maker_weight(model)
    assert weight.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert grads[DM_NAME].abs().sum() > 0
    assert any(g.abs().sum() > 0 for name, g in grads.items() if ".lora_B." in name)

    _, output_off, grads_off = _qlora_run(tiny_llama_dir, False, batch)
    assert torch.equal(output.layer_choice, output_off.layer_choice)
    assert math.isclose(output.loss.item(), output_off.loss.item(), abs_tol=1e-4)
    assert grads.keys() == grads_off.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_off[name], atol=1e-4, rtol=1e-3, msg=name)
