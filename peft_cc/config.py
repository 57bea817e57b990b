"""Configuration of a CC-Tuning adapter: LoRA's options plus those of the cross-lingual connection."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig

from .registration import cc_peft_type


@dataclass
class CCConfig(LoraConfig):
    """Configuration of a [`CCModel`]: LoRA plus CC-Tuning's cross-lingual connection.

    Every [`peft.LoraConfig`] option keeps its meaning (`r`, `lora_alpha`, `target_modules` including
    `"all-linear"`, `lora_dropout`, `use_rslora`, ...). The defaults of the fields below are the method of the paper
    (CC-Tuning, ACL 2025, arXiv 2506.00875): the English FFN activation that the Decision Maker chooses among all
    layers is added to the residual stream at the anchor right after the first decoder layer, the choice is a hard
    Gumbel-Softmax sample at temperature 1 with straight-through gradients, and gradients flow through the English
    pass.

    Args:
        injection_layer (`int`, defaults to `0`):
            Index of the decoder layer after which the chosen English activation is added (0 = after the first).
        source_layers (`list[int]`, *optional*):
            Candidate layers whose English FFN activation the Decision Maker chooses from (negative indices count
            from the last layer). `None` means all layers.
        gumbel_temperature (`float`, defaults to `1.0`):
            Temperature of the Gumbel-Softmax that samples the layer choice during training.
        english_gradients (`bool`, defaults to `True`):
            Whether gradients flow through the English pass (as in the paper). `False` runs it without autograd,
            which saves the memory and time of its backward.
        ffn_output_module (`str`, *optional*):
            Name, inside each decoder layer, of the module whose output is the FFN's contribution to the residual
            stream. `None` infers it for the supported architectures.
        generation_prompt_ids (`list[int]`, *optional*):
            The token ids that ended every training prompt (the chat template's generation prompt), recorded by
            [`CCSFTTrainer`]; `generate` warns when a prompt does not end with them.
    """

    task_type: str | None = field(
        default="CAUSAL_LM",
        metadata={"help": "Always 'CAUSAL_LM': CC-Tuning adapts decoder-only causal language models."},
    )
    injection_layer: int = field(
        default=0,
        metadata={
            "help": (
                "Index of the decoder layer after which the chosen English activation is added to the residual "
                "stream at the anchor (0 = after the first decoder layer, as in the paper)."
            )
        },
    )
    source_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": (
                "Candidate decoder layers whose English FFN activation the Decision Maker chooses from, e.g. "
                "[29] or [0, 10, 20, 29]. Negative indices count from the last layer. None (default) means all "
                "layers, as in the paper."
            )
        },
    )
    gumbel_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature of the hard Gumbel-Softmax that samples the layer choice in training (> 0)."},
    )
    english_gradients: bool = field(
        default=True,
        metadata={
            "help": (
                "Whether gradients flow through the English pass (True, as in the paper). False runs the English "
                "pass without autograd: less memory and time, and LoRA then learns only from the non-English pass."
            )
        },
    )
    ffn_output_module: str | None = field(
        default=None,
        metadata={
            "help": (
                "Name, inside each decoder layer, of the submodule whose output is the FFN contribution to the "
                "residual stream (e.g. 'mlp', or 'post_feedforward_layernorm' for Gemma 2/3). None infers it for "
                "Llama, Mistral, Qwen2, Qwen3, Gemma 2/3 and Phi-3."
            )
        },
    )

    generation_prompt_ids: list[int] | None = field(
        default=None,
        metadata={
            "help": (
                "Token ids of the chat template's generation prompt (e.g. those of '<|im_start|>assistant\\n'), with "
                "which every training prompt ended: the connection's anchor is its last token. CCSFTTrainer records "
                "them from the tokenizer for conversational data; `generate` warns once when a prompt does not end "
                "with them. None: not checked."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = cc_peft_type()
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        if self.task_type != "CAUSAL_LM":
            raise ValueError(f"`task_type` must be 'CAUSAL_LM' for CC-Tuning, got {self.task_type!r}.")
        if isinstance(self.injection_layer, bool) or not isinstance(self.injection_layer, int):
            raise ValueError(f"`injection_layer` must be an int, got {self.injection_layer!r}.")
        if self.injection_layer < 0:
            raise ValueError(f"`injection_layer` must be >= 0, got {self.injection_layer}.")
        if self.source_layers is not None:
            self.source_layers = list(self.source_layers)
            if not self.source_layers:
                raise ValueError("`source_layers` must name at least one layer, or be None for all layers.")
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.source_layers):
                raise ValueError(f"`source_layers` must be a list of ints, got {self.source_layers!r}.")
            if len(set(self.source_layers)) != len(self.source_layers):
                raise ValueError(f"`source_layers` must not repeat a layer, got {self.source_layers}.")
        if not _is_number(self.gumbel_temperature) or not self.gumbel_temperature > 0:
            raise ValueError(f"`gumbel_temperature` must be a number > 0, got {self.gumbel_temperature!r}.")
        if not isinstance(self.english_gradients, bool):
            raise ValueError(f"`english_gradients` must be True or False, got {self.english_gradients!r}.")
        if self.generation_prompt_ids is not None:
            self.generation_prompt_ids = list(self.generation_prompt_ids)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.generation_prompt_ids):
                raise ValueError(
                    f"`generation_prompt_ids` must be a list of token ids, got {self.generation_prompt_ids!r}."
                )
        if self.ffn_output_module is not None and not (
            isinstance(self.ffn_output_module, str) and self.ffn_output_module
        ):
            raise ValueError(f"`ffn_output_module` must be a module name or None, got {self.ffn_output_module!r}.")

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """The saved fields of an adapter, checked when PEFT loads its config.

        Adapters saved while the package also offered another Decision Maker hold `decision_maker="paper"` (this
        method, whose fields are dropped here) or `"variance_reinforce_gated"`, which is refused: that setting was
        measured, did not help, and left the package after commit 735790f.
        """
        strategy = kwargs.pop("decision_maker", "paper")
        kwargs.pop("variance_reinforce_config", None)
        if strategy != "paper":
            raise ValueError(
                f"This CC-Tuning adapter was trained with decision_maker={strategy!r}, which peft-cc no longer has "
                "(it was measured against the paper's Decision Maker and removed; see benchmarks/connection_capacity/"
                "README.md). Load it with peft-cc at commit 735790f, or retrain it with the paper's settings."
            )
        return super().check_kwargs(**kwargs)

    def resolve_source_layers(self, num_layers: int) -> list[int]:
        """Candidate source layers as non-negative indices for a decoder of `num_layers` layers.

        Raises:
            ValueError: if `injection_layer` or a source layer is out of range.
        """
        if self.injection_layer >= num_layers:
            raise ValueError(
                f"`injection_layer` is {self.injection_layer}, but the model has only {num_layers} decoder layers."
            )
        if self.source_layers is None:
            return list(range(num_layers))
        resolved = []
        for layer in self.source_layers:
            if not -num_layers <= layer < num_layers:
                raise ValueError(
                    f"`source_layers` contains {layer}, outside the model's {num_layers} decoder layers "
                    f"(valid: {-num_layers}..{num_layers - 1})."
                )
            resolved.append(layer % num_layers)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"`source_layers` {self.source_layers} names a layer twice for {num_layers} layers.")
        return resolved


def _is_number(value: Any) -> bool:
    """An int or a float, and not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
