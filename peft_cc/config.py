"""Configuration of a CC-Tuning adapter: LoRA's options plus those of the cross-lingual connection."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from peft import LoraConfig

from .registration import PEFT_TYPE_NAME, _add_peft_type_member

DECISION_MAKER_INITS = ("normal", "zeros", "english_variance")

# Named sets of CCConfig options for the Decision Maker (docs/decision_maker.md): `CCConfig(r=16, ...,
# **DECISION_MAKER_PRESETS["variance_reinforce_gated"])`. "paper" is the method as published (the defaults);
# "variance_reinforce" found and kept the informative layer for every seed measured on the connection-capacity task;
# "variance_reinforce_gated" (the recommended setting) does so too, with the injection scaled by a learned gate that
# starts at 0.3, and was not worse than "paper" in the multilingual experiment, where "variance_reinforce" was.
_VARIANCE_REINFORCE = {
    "decision_maker_init": "english_variance",
    "decision_maker_start_fraction": 0.25,
    "decision_maker_gradient": "score_function",
}
DECISION_MAKER_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "paper": MappingProxyType({}),
        "variance_reinforce": MappingProxyType(_VARIANCE_REINFORCE),
        "variance_reinforce_gated": MappingProxyType({**_VARIANCE_REINFORCE, "injection_gate_init": 0.3}),
    }
)


@dataclass
class CCConfig(LoraConfig):
    """Configuration of a [`CCModel`]: LoRA plus CC-Tuning's cross-lingual connection.

    Every [`peft.LoraConfig`] option keeps its meaning (`r`, `lora_alpha`, `target_modules` including
    `"all-linear"`, `lora_dropout`, `use_rslora`, ...). The fields below configure the connection; their defaults
    reproduce the method of the paper (CC-Tuning, ACL 2025): the English activation chosen by the Decision Maker
    among all layers is added to the residual stream at the anchor right after the first decoder layer, with a
    hard Gumbel-Softmax at temperature 1, and gradients flow through the English pass. `decision_maker_init`,
    `injection_scaling`, `gumbel_temperature_final`, `soft_choice_fraction`, `soft_choice`,
    `decision_maker_start_fraction`, `decision_maker_gradient` and `choice_balance_weight` are options beyond the paper
    that change how the Decision Maker learns (see `docs/decision_maker.md`); their defaults leave the method as
    published.

    Args:
        injection_layer (`int`, defaults to `0`):
            Index of the decoder layer after which the chosen English activation is added (0 = after the first).
        source_layers (`list[int]`, *optional*):
            Candidate layers whose English FFN activation the Decision Maker chooses from. `None` means all layers.
        gumbel_temperature (`float`, defaults to `1.0`):
            Temperature of the Gumbel-Softmax that samples the layer choice during training.
        english_gradients (`bool`, defaults to `True`):
            Whether gradients flow through the English pass (as in the paper). `False` runs it without autograd,
            which saves the memory and time of its backward.
        decision_maker_init (`str`, defaults to `"normal"`):
            `"zeros"` starts the Decision Maker at a uniform choice over the candidate layers; `"english_variance"`
            starts it favouring the layers whose English activation varies most across training prompts.
        injection_scaling (`str`, defaults to `"none"`):
            `"residual_norm"` rescales each source activation to the norm of the residual stream at the anchor.
        injection_gate_init (`float`, *optional*):
            A learned gate per candidate layer, starting at this value, multiplies the injected activation (the
            recommended setting starts it at 0.3).
        gumbel_temperature_final (`float`, *optional*):
            Anneal the temperature geometrically to this value over training.
        soft_choice_fraction (`float`, defaults to `0.0`):
            Fraction of training that injects the soft mixture instead of a one-hot choice.
        soft_choice (`str`, defaults to `"gumbel"`):
            The soft mixture: a soft Gumbel-Softmax sample, or `"expected"`, the noise-free softmax of the logits.
        decision_maker_start_fraction (`float`, defaults to `0.0`):
            Fraction of training during which the Decision Maker's choice is applied but not learned.
        decision_maker_gradient (`str`, defaults to `"straight_through"`):
            How the Decision Maker learns: the straight-through Gumbel-Softmax gradient, or `"score_function"`, a
            REINFORCE estimate from the per-row losses of the layers actually injected.
        choice_balance_weight (`float`, defaults to `0.0`):
            Weight of the load-balancing term KL(mean choice probabilities || uniform) added to the loss.
        ffn_output_module (`str`, *optional*):
            Name, inside each decoder layer, of the module whose output is the FFN's contribution to the residual
            stream. `None` infers it for the supported architectures.
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
    decision_maker_init: str = field(
        default="normal",
        metadata={
            "help": (
                "Initialisation of the Decision Maker: 'normal' (std `initializer_range`, as in the paper), 'zeros' "
                "(every candidate layer equally likely at the start, whatever the activations' norms) or "
                "'english_variance' (the normal initialisation, then, from the first training examples, each layer "
                "made as likely as its share of the variance of the English activations across prompts, of their "
                "directions with `injection_scaling='residual_norm'`: a layer whose activation at the anchor is the "
                "same for every prompt carries nothing about the prompt). "
                "'english_variance' needs `CCModel.initialize_decision_maker` before training; CCSFTTrainer calls "
                "it on `decision_maker_init_examples` training examples."
            )
        },
    )
    injection_scaling: str = field(
        default="none",
        metadata={
            "help": (
                "How the chosen English activation is scaled before it is added: 'none' (as in the paper) or "
                "'residual_norm' (every source activation is rescaled to the norm of the residual stream at the "
                "anchor it is added to, so that layers of very different activation norms perturb it equally)."
            )
        },
    )
    injection_gate_init: float | None = field(
        default=None,
        metadata={
            "help": (
                "If set, the Decision Maker also holds a learned gate per candidate layer, `[S]` float32, that "
                "multiplies the chosen activation before it is added, starting at this value: 0 starts as LoRA "
                "alone and lets the loss decide how much of each layer to inject (it learns from the first step; "
                "the trainer's `injection_gate_learning_rate` sets its rate); 0.3 is the recommended setting's "
                "(`DECISION_MAKER_PRESETS['variance_reinforce_gated']`). None (the paper) injects the activation as "
                "it is."
            )
        },
    )
    gumbel_temperature_final: float | None = field(
        default=None,
        metadata={
            "help": (
                "If set, the Gumbel-Softmax temperature anneals geometrically from `gumbel_temperature` to this "
                "value over training (the trainer reports the progress). None keeps it constant, as in the paper."
            )
        },
    )
    soft_choice_fraction: float = field(
        default=0.0,
        metadata={
            "help": (
                "Fraction of training (0..1) during which the connection injects the soft Gumbel-Softmax mixture of "
                "all candidate layers instead of a one-hot choice. 0 (the paper) is hard from the start."
            )
        },
    )
    soft_choice: str = field(
        default="gumbel",
        metadata={
            "help": (
                "The mixture injected during `soft_choice_fraction`: 'gumbel' (a soft Gumbel-Softmax sample, new "
                "noise every step) or 'expected' (softmax(logits / temperature) without noise: every candidate "
                "layer in proportion to its probability, the same mixture for the same prompt)."
            )
        },
    )
    decision_maker_start_fraction: float = field(
        default=0.0,
        metadata={
            "help": (
                "Fraction of training (0..1) before the Decision Maker starts learning: until then its choice is "
                "applied but receives no gradient, so that LoRA can first learn to read the injected activations. "
                "0 (the paper) trains it from the first step."
            )
        },
    )
    decision_maker_gradient: str = field(
        default="straight_through",
        metadata={
            "help": (
                "How the Decision Maker learns from a hard choice: 'straight_through' (the paper: the gradient of "
                "the soft Gumbel-Softmax sample, a first-order estimate of what mixing in another layer would do) or "
                "'score_function' (REINFORCE: each row's loss minus the mean loss of the other rows of the batch, "
                "times the gradient of the log-probability of the layer it injected; it compares what the injected "
                "layers actually did; a batch of one row is compared with a running mean of past losses). "
                "'score_function' needs `labels` in the forward call and a hard choice (`soft_choice_fraction=0`)."
            )
        },
    )
    choice_balance_weight: float = field(
        default=0.0,
        metadata={
            "help": (
                "Weight of a load-balancing term added to the training loss: KL(mean choice probabilities over the "
                "batch || uniform), which keeps the Decision Maker from collapsing early. 0 (the paper) adds nothing."
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

    decoder_num_layers: int | None = field(
        default=None,
        metadata={
            "help": (
                "Number of decoder layers of the model the adapter was made for. Filled in by get_peft_model; "
                "loading onto a model of another depth fails."
            )
        },
    )
    decoder_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": (
                "Hidden size of the model the adapter was made for. Filled in by get_peft_model; loading onto a "
                "model of another hidden size fails."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = _add_peft_type_member(PEFT_TYPE_NAME)
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
        if self.decision_maker_init not in DECISION_MAKER_INITS:
            raise ValueError(
                f"`decision_maker_init` must be one of {', '.join(map(repr, DECISION_MAKER_INITS))}, "
                f"got {self.decision_maker_init!r}."
            )
        if self.injection_scaling not in ("none", "residual_norm"):
            raise ValueError(f"`injection_scaling` must be 'none' or 'residual_norm', got {self.injection_scaling!r}.")
        if self.injection_gate_init is not None and (
            not _is_number(self.injection_gate_init) or not math.isfinite(self.injection_gate_init)
        ):
            raise ValueError(
                f"`injection_gate_init` must be a finite number or None, got {self.injection_gate_init!r}."
            )
        if self.gumbel_temperature_final is not None and (
            not _is_number(self.gumbel_temperature_final) or not self.gumbel_temperature_final > 0
        ):
            raise ValueError(
                f"`gumbel_temperature_final` must be a number > 0 or None, got {self.gumbel_temperature_final!r}."
            )
        if isinstance(self.soft_choice_fraction, bool) or not 0 <= self.soft_choice_fraction <= 1:
            raise ValueError(f"`soft_choice_fraction` must lie in [0, 1], got {self.soft_choice_fraction!r}.")
        if self.soft_choice not in ("gumbel", "expected"):
            raise ValueError(f"`soft_choice` must be 'gumbel' or 'expected', got {self.soft_choice!r}.")
        if isinstance(self.decision_maker_start_fraction, bool) or not 0 <= self.decision_maker_start_fraction <= 1:
            raise ValueError(
                f"`decision_maker_start_fraction` must lie in [0, 1], got {self.decision_maker_start_fraction!r}."
            )
        if self.decision_maker_gradient not in ("straight_through", "score_function"):
            raise ValueError(
                "`decision_maker_gradient` must be 'straight_through' or 'score_function', "
                f"got {self.decision_maker_gradient!r}."
            )
        if self.decision_maker_gradient == "score_function" and self.soft_choice_fraction > 0:
            raise ValueError(
                "`decision_maker_gradient='score_function'` learns from the layer each row injected, so it needs a "
                f"hard choice from the start: set `soft_choice_fraction=0` (got {self.soft_choice_fraction})."
            )
        if isinstance(self.choice_balance_weight, bool) or not self.choice_balance_weight >= 0:
            raise ValueError(f"`choice_balance_weight` must be >= 0, got {self.choice_balance_weight!r}.")
        if self.ffn_output_module is not None and not (
            isinstance(self.ffn_output_module, str) and self.ffn_output_module
        ):
            raise ValueError(f"`ffn_output_module` must be a module name or None, got {self.ffn_output_module!r}.")

    def temperature_at(self, progress: float) -> float:
        """The Gumbel-Softmax temperature at `progress` (0..1) of training."""
        if self.gumbel_temperature_final is None:
            return float(self.gumbel_temperature)
        return float(self.gumbel_temperature * (self.gumbel_temperature_final / self.gumbel_temperature) ** progress)

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
