"""An adapter's life the PEFT way, on the six architectures: add, switch, disable, delete, unload, merge."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import make_tiny_model
from helpers import cc_config, cc_tuner, make_batch, make_cc_model, model_inputs, randomize_lora_b

from peft_cc.checkpoint import DECISION_MAKER_KEY, TRANSFORM_MATRIX_KEY


def _hooks(model: torch.nn.Module) -> int:
    """How many forward hooks and pre-hooks the modules of `model` carry."""
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def _batch():
    return model_inputs(make_batch(prompt_lens=(4, 6), response_lens=(3, 2), english_lens=(5, 3)))


def _connected_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**_batch()).logits


def test_delete_adapter_removes_its_weights_connection_and_hooks(architecture):
    base = make_tiny_model(architecture)
    hooks_before = _hooks(base)
    model = make_cc_model(architecture, base=base)
    model.add_adapter("other", cc_config(source_layers=[-1]))
    assert _hooks(base) > hooks_before
    model.delete_adapter("default")
    assert not [key for key in model.state_dict() if ".default" in key]
    assert set(cc_tuner(model).cc_decision_maker) == set(cc_tuner(model).cc_transform_matrix) == {"other"}
    assert model.active_adapters == ["other"]
    model.train()
    output = model(**_batch())  # the remaining adapter works, with its own connection
    assert output.connected_rows.all() and output.layer_choice.shape[1] == 1
    model.delete_adapter("other")
    assert _hooks(base) == hooks_before
    assert not [key for key in model.state_dict() if DECISION_MAKER_KEY in key or TRANSFORM_MATRIX_KEY in key]


def test_each_adapter_uses_its_own_connection(architecture, tmp_path):
    """With two adapters on one model, each active one gives exactly what it gives loaded alone."""
    model = make_cc_model(architecture, train=False)
    randomize_lora_b(model)
    first_alone = _connected_logits(model)
    model.add_adapter("second", cc_config(source_layers=[0, -1], inference_mode=True))
    model.set_adapter("second")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B.second" in name:
                parameter.normal_(std=0.1)
    second = _connected_logits(model)
    assert model(**_batch()).layer_choice.shape[1] == 2
    model.set_adapter("default")
    torch.testing.assert_close(_connected_logits(model), first_alone)

    model.save_pretrained(tmp_path, selected_adapters=["second"])
    alone = peft.PeftModel.from_pretrained(make_tiny_model(architecture), tmp_path / "second")
    torch.testing.assert_close(_connected_logits(alone), second)


def test_adapters_with_different_ffn_outputs_hook_their_own_modules():
    """Gemma 3 adds the post-FFN norm's output; an adapter told to read `mlp` instead hooks the MLPs."""
    base = make_tiny_model("gemma3")
    model = peft.get_peft_model(base, cc_config())
    model.add_adapter("mlp", cc_config(ffn_output_module="mlp"))
    assert cc_tuner(model).decoder("default").ffn_outputs[0] is base.model.layers[0].post_feedforward_layernorm
    assert cc_tuner(model).decoder("mlp").ffn_outputs[0] is base.model.layers[0].mlp
    layers = [0]
    rows, anchors = torch.tensor([0]), torch.tensor([2])
    ids = torch.randint(1, 96, (1, 4))
    seen = []
    for name, module in (("default", "post_feedforward_layernorm"), ("mlp", "mlp")):
        model.set_adapter(name)
        handle = getattr(base.model.layers[0], module).register_forward_hook(lambda m, a, out: seen.append(out[0, 2]))
        with torch.no_grad():
            recorded = cc_tuner(model).anchor_activations(ids, torch.ones_like(ids), rows, anchors, layers)
        handle.remove()
        torch.testing.assert_close(recorded[0, 0], seen[-1])


def test_disabled_adapters_give_the_base_model_and_come_back(architecture):
    reference = make_tiny_model(architecture)
    model = make_cc_model(architecture)
    randomize_lora_b(model)
    with torch.no_grad():
        expected = reference(**model_inputs(make_batch(), english=False)).logits
        with model.disable_adapter():
            disabled = model(**_batch())
        assert getattr(disabled, "connected_rows", None) is None
        torch.testing.assert_close(disabled.logits, expected)
        assert model(**_batch()).connected_rows.all()


def test_unload_warns_that_the_connection_is_dropped_and_leaves_the_base_model(architecture):
    base = make_tiny_model(architecture)
    hooks_before = _hooks(base)
    reference = make_tiny_model(architecture)
    model = make_cc_model(architecture, base=base)
    randomize_lora_b(model)
    with pytest.warns(UserWarning, match="connection .* is dropped"):
        unloaded = model.unload()
    assert _hooks(unloaded) == hooks_before
    with torch.no_grad():
        inputs = model_inputs(make_batch(), english=False)
        torch.testing.assert_close(unloaded(**inputs).logits, reference(**inputs).logits)


def test_merge_and_unload_keeps_lora_without_the_connection(architecture):
    model = make_cc_model(architecture, train=False)
    randomize_lora_b(model)
    inputs = model_inputs(make_batch(), english=False)
    with torch.no_grad():
        lora_only = model(**inputs).logits  # eval mode, no English prompt: LoRA without the connection
    with pytest.warns(UserWarning, match="connection .* is dropped"):
        merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, lora_only, atol=1e-5, rtol=1e-5)
    assert not any(DECISION_MAKER_KEY in key for key in merged.state_dict())
