"""CCConfig: LoRA's options keep working, CC-Tuning's options have the paper's defaults and are validated."""

import json
import math

import peft
import pytest
import torch
from conftest import HIDDEN_SIZE, NUM_LAYERS, make_tiny_model
from helpers import ADAPTER, cc_config, cc_tuner, decision_maker_weight, make_batch, make_cc_model, model_inputs
from peft import PeftConfig, PeftType
from peft.tuners.lora import LoraLayer
from torch import nn

from peft_cc import CCConfig


def _lora_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def test_defaults_reproduce_the_paper():
    """Injection after the first layer, all layers as candidates, temperature 1, gradients through the English pass."""
    config = CCConfig()
    assert config.injection_layer == 0
    assert config.source_layers is None
    assert config.gumbel_temperature == 1.0
    assert config.english_gradients is True
    assert config.ffn_output_module is None
    assert config.task_type == "CAUSAL_LM"
    assert config.peft_type is PeftType.CC
    assert isinstance(config, peft.LoraConfig)


def test_lora_rank_alpha_and_target_list():
    """r, lora_alpha and a list of target modules mean what they mean for LoRA."""
    model = peft.get_peft_model(
        make_tiny_model("llama"), CCConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    )
    layers = _lora_layers(model)
    assert sorted({name.rsplit(".", 1)[-1] for name in layers}) == ["q_proj", "v_proj"]
    assert len(layers) == 2 * NUM_LAYERS
    for layer in layers.values():
        assert layer.r[ADAPTER] == 8
        assert layer.scaling[ADAPTER] == pytest.approx(32 / 8)
        assert layer.lora_A[ADAPTER].weight.shape == (8, layer.in_features)
        assert layer.lora_B[ADAPTER].weight.shape == (layer.out_features, 8)


def test_all_linear_targets_every_linear_but_the_lm_head():
    """target_modules="all-linear" wraps every Linear layer of the decoder and leaves the LM head alone."""
    base = make_tiny_model("qwen2")
    linear_names = {name for name, module in base.named_modules() if isinstance(module, nn.Linear)}
    model = peft.get_peft_model(base, CCConfig(target_modules="all-linear"))
    wrapped = {name.removeprefix("base_model.model.") for name in _lora_layers(model)}
    assert wrapped == linear_names - {"lm_head"}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rslora_scaling(use_rslora):
    """use_rslora scales LoRA by alpha/sqrt(r) instead of alpha/r."""
    model = peft.get_peft_model(
        make_tiny_model("llama"), CCConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=use_rslora)
    )
    expected = 8 / math.sqrt(4) if use_rslora else 8 / 4
    layers = _lora_layers(model)
    assert layers
    for layer in layers.values():
        assert layer.scaling[ADAPTER] == pytest.approx(expected)
    assert model.peft_config[ADAPTER].use_rslora is use_rslora


def test_lora_dropout():
    """lora_dropout puts a Dropout of that probability on every LoRA layer (Identity for 0)."""
    model = peft.get_peft_model(make_tiny_model("llama"), CCConfig(target_modules="all-linear", lora_dropout=0.25))
    for layer in _lora_layers(model).values():
        dropout = layer.lora_dropout[ADAPTER]
        assert isinstance(dropout, nn.Dropout) and dropout.p == 0.25
    model = peft.get_peft_model(make_tiny_model("llama"), CCConfig(target_modules="all-linear", lora_dropout=0.0))
    for layer in _lora_layers(model).values():
        assert isinstance(layer.lora_dropout[ADAPTER], nn.Identity)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("injection_layer", -1),
        ("injection_layer", "a"),
        ("injection_layer", True),
        ("injection_layer", 1.0),
        ("source_layers", []),
        ("source_layers", [1, 1]),
        ("source_layers", ["x"]),
        ("source_layers", [True]),
        ("gumbel_temperature", 0),
        ("gumbel_temperature", -1),
        ("gumbel_temperature", "1"),
        ("gumbel_temperature", True),
        ("english_gradients", "yes"),
        ("english_gradients", 1),
        ("task_type", "SEQ_CLS"),
        ("ffn_output_module", ""),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value):
    """An invalid option raises ValueError when the config is built, and the message names the option."""
    with pytest.raises(ValueError, match=field):
        CCConfig(**{field: value})


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (dict(injection_layer=NUM_LAYERS), "injection_layer"),
        (dict(injection_layer=10), "injection_layer"),
        (dict(source_layers=[5]), "source_layers"),
        (dict(source_layers=[NUM_LAYERS]), "source_layers"),
        (dict(source_layers=[-NUM_LAYERS - 1]), "source_layers"),
        (dict(source_layers=[2, -1]), "source_layers"),  # the same layer twice once resolved
    ],
)
def test_out_of_range_layers_fail_at_get_peft_model(options, field):
    """Layer indices are checked against the model's depth when the adapter is created, naming the option."""
    with pytest.raises(ValueError, match=field):
        peft.get_peft_model(make_tiny_model("llama"), cc_config(**options))


def test_negative_source_layer_is_the_last_layer():
    """source_layers=[-1] resolves to the last decoder layer and connects exactly like source_layers=[L-1]."""
    batch = make_batch()
    outputs = {}
    for source in (-1, NUM_LAYERS - 1):
        model = make_cc_model("llama", source_layers=[source])
        assert cc_tuner(model).source_layers() == [NUM_LAYERS - 1]
        assert decision_maker_weight(model).shape == (1, HIDDEN_SIZE)
        with torch.no_grad():
            outputs[source] = model(**model_inputs(batch))
    assert torch.equal(outputs[-1].logits, outputs[NUM_LAYERS - 1].logits)
    assert outputs[-1].connected_rows.all()


def test_config_json_round_trip(tmp_path):
    """save_pretrained writes peft_type "CC" and every option; PeftConfig.from_pretrained gives back a CCConfig."""
    config = CCConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.05,
        use_rslora=True,
        injection_layer=1,
        source_layers=[0, -1],
        gumbel_temperature=0.5,
        english_gradients=False,
        ffn_output_module="mlp",
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CC"
    assert saved["task_type"] == "CAUSAL_LM"
    assert saved["source_layers"] == [0, -1]

    for loader in (PeftConfig, CCConfig):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is CCConfig
        assert loaded.peft_type is PeftType.CC
        for name in (
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "injection_layer",
            "source_layers",
            "gumbel_temperature",
            "english_gradients",
            "ffn_output_module",
            "task_type",
        ):
            assert getattr(loaded, name) == getattr(config, name), name
        assert set(loaded.target_modules) == {"q_proj", "v_proj"}
