"""Where the connection lives in a decoder: its layers and the FFN contribution of each layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Name, inside a decoder layer, of the module whose output is added to the residual stream as the FFN's
# contribution. Post-FFN-norm architectures add the norm's output; Phi-3 adds the MLP output after a dropout.
FFN_OUTPUT_MODULES: dict[str, str] = {
    "llama": "mlp",
    "mistral": "mlp",
    "qwen2": "mlp",
    "qwen3": "mlp",
    "gemma2": "post_feedforward_layernorm",
    "gemma3": "post_feedforward_layernorm",
    "gemma3_text": "post_feedforward_layernorm",
    "phi3": "resid_mlp_dropout",
}


@dataclass(frozen=True)
class DecoderMap:
    """The modules of a decoder that CC-Tuning hooks into.

    Attributes:
        layers: the decoder layers, in order (`L` of them).
        ffn_outputs: for each layer, the module whose output (`[batch, seq, d]`) is that layer's FFN contribution to
            the residual stream.
        hidden_size: `d`, the width of the residual stream.
    """

    layers: tuple[nn.Module, ...]
    ffn_outputs: tuple[nn.Module, ...]
    hidden_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _find_decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The `nn.ModuleList` of `num_layers` decoder layers (named `layers`, as in every supported family)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" and len(module) == num_layers:
            return module
    raise ValueError(
        f"CC-Tuning could not find the decoder layers of {type(model).__name__}: no module list named `layers` "
        f"with config.num_hidden_layers={num_layers} entries."
    )


def map_decoder(model: nn.Module, ffn_output_module: str | None = None) -> DecoderMap:
    """Locate the decoder layers of `model` and the FFN contribution of each.

    Args:
        model: a transformers causal LM (optionally already wrapped with LoRA layers).
        ffn_output_module: overrides the inferred name of the FFN-output submodule of each layer.

    Raises:
        ValueError: for an architecture that cannot be mapped, with what to set to map it.
    """
    text_config = _text_config(model)
    model_type = getattr(text_config, "model_type", None)
    module_name = ffn_output_module or FFN_OUTPUT_MODULES.get(model_type)
    if module_name is None:
        raise ValueError(
            f"CC-Tuning does not know where the FFN contribution is in the decoder layers of model_type="
            f"{model_type!r} ({type(model).__name__}). Supported: {sorted(FFN_OUTPUT_MODULES)}. For another "
            "architecture, set `CCConfig(ffn_output_module=...)` to the name of the submodule of each decoder layer "
            "whose output is added to the residual stream as the FFN output (e.g. 'mlp')."
        )
    layers = _find_decoder_layers(model, text_config.num_hidden_layers)
    ffn_outputs = []
    for index, layer in enumerate(layers):
        ffn_output = getattr(layer, module_name, None)
        if not isinstance(ffn_output, nn.Module):
            raise ValueError(
                f"Decoder layer {index} of {type(model).__name__} has no submodule `{module_name}`, which CC-Tuning "
                "uses as the FFN output; set `CCConfig(ffn_output_module=...)` to the right name."
            )
        ffn_outputs.append(ffn_output)
    return DecoderMap(layers=tuple(layers), ffn_outputs=tuple(ffn_outputs), hidden_size=text_config.hidden_size)
