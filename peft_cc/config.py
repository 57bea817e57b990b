"""Configuration of a CC-Tuning adapter: LoRA's options plus those of the cross-lingual connection."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import LoraConfig

from .legacy_config import translate_legacy_fields
from .registration import cc_peft_type

DecisionMakerStrategy = Literal["paper", "variance_reinforce_gated"]
DECISION_MAKER_STRATEGIES: tuple[str, ...] = DecisionMakerStrategy.__args__
DecisionMakerPrior = Literal["english_variance", "completion_alignment"]
DECISION_MAKER_PRIORS: tuple[str, ...] = DecisionMakerPrior.__args__


@dataclass
class VarianceReinforceConfig:
    """The knobs of the `"variance_reinforce_gated"` Decision Maker (see `docs/decision_maker.md`).

    The strategy starts the Decision Maker favouring some candidate layers, by a prior computed from training examples
    before the first step (`prior`; by default the layers whose English activation varies most across the prompts).
    For the first `start_fraction` of training its sampled choice is applied but not learned, while LoRA learns to read
    the injected activations; then it learns by REINFORCE: each row's loss, compared with the other rows' of the batch,
    rewards the layer that row injected. A learned gate per candidate layer, starting at `gate_init`, scales the
    injected activation.
    """

    start_fraction: float = field(
        default=0.25,
        metadata={
            "help": (
                "Fraction of training (0..1) before the Decision Maker starts learning; until then its choice is "
                "applied but receives no gradient (the gate learns from the first step)."
            )
        },
    )
    gate_init: float = field(
        default=0.3,
        metadata={
            "help": (
                "Initial value of the learned gate `[S]` that multiplies the chosen layer's activation before it is "
                "added; 0 would start as LoRA alone."
            )
        },
    )
    gate_init_ratio: float | None = field(
        default=None,
        metadata={
            "help": (
                "If set (> 0), each candidate layer's gate starts, instead of at `gate_init`, so that its injection "
                "has this ratio to the norm of the residual stream it is added to, both measured as mean norms at the "
                "anchors of the initialisation batches."
            )
        },
    )
    prior: DecisionMakerPrior = field(
        default="english_variance",
        metadata={
            "help": (
                "What the Decision Maker's start favours. 'english_variance': each candidate layer's share of the "
                "variance of its English activation across training prompts. 'completion_alignment': each layer's "
                "share of the alignment (debiased linear CKA) between its English activation and the completion "
                "(the mean output embedding of its tokens) across training prompts, which does not depend on the "
                "activation's scale; it needs `labels` in the initialisation batches."
            )
        },
    )

    def __post_init__(self) -> None:
        if not _is_number(self.start_fraction) or not 0 <= self.start_fraction <= 1:
            raise ValueError(f"`start_fraction` must lie in [0, 1], got {self.start_fraction!r}.")
        if self.prior not in DECISION_MAKER_PRIORS:
            raise ValueError(
                f"`prior` must be one of {', '.join(map(repr, DECISION_MAKER_PRIORS))}, got {self.prior!r}."
            )
        if not _is_number(self.gate_init) or not math.isfinite(self.gate_init):
            raise ValueError(f"`gate_init` must be a finite number, got {self.gate_init!r}.")
        ratio = self.gate_init_ratio
        if ratio is not None and not (_is_number(ratio) and math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"`gate_init_ratio` must be a finite number > 0 or None, got {ratio!r}.")


@dataclass
class CCConfig(LoraConfig):
    """Configuration of a [`CCModel`]: LoRA plus CC-Tuning's cross-lingual connection.

    Every [`peft.LoraConfig`] option keeps its meaning (`r`, `lora_alpha`, `target_modules` including
    `"all-linear"`, `lora_dropout`, `use_rslora`, ...). The defaults of the fields below are the method of the paper
    (CC-Tuning, ACL 2025, arXiv 2506.00875): the English FFN activation that the Decision Maker chooses among all
    layers is added to the residual stream at the anchor right after the first decoder layer, the choice is a hard
    Gumbel-Softmax sample at temperature 1 with straight-through gradients, and gradients flow through the English
    pass. `decision_maker="variance_reinforce_gated"` selects the strategy built to find one informative layer, whose
    knobs are in `variance_reinforce_config` (`docs/decision_maker.md` says when it helps).

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
        decision_maker (`Literal["paper", "variance_reinforce_gated"]`, defaults to `"paper"`):
            How the Decision Maker starts and learns: `"paper"` (normal initialisation, straight-through Gumbel-Softmax
            gradients) or `"variance_reinforce_gated"` (see [`VarianceReinforceConfig`]).
        variance_reinforce_config ([`VarianceReinforceConfig`], *optional*):
            The knobs of `"variance_reinforce_gated"`; `None` uses their defaults.
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
    decision_maker: DecisionMakerStrategy = field(
        default="paper",
        metadata={
            "help": (
                "How the Decision Maker starts and learns. 'paper': normal initialisation (std "
                "`initializer_range`) and the straight-through gradient of the Gumbel-Softmax sample. "
                "'variance_reinforce_gated' (docs/decision_maker.md): starts favouring the layers "
                "whose English activation varies most across training prompts, by default (see "
                "`variance_reinforce_config.prior`; the trainer computes this from training examples; without it, "
                "call `CCModel.initialize_decision_maker`), learns by REINFORCE "
                "after `variance_reinforce_config.start_fraction` of training, and scales the injection by a "
                "learned gate per layer. Its forward returns `decision_maker_loss`, which the caller adds to the loss."
            )
        },
    )
    variance_reinforce_config: VarianceReinforceConfig | None = field(
        default=None,
        metadata={
            "help": (
                "The knobs of decision_maker='variance_reinforce_gated' (start_fraction, gate_init, gate_init_ratio, "
                "prior); None uses their defaults."
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
        if self.decision_maker not in DECISION_MAKER_STRATEGIES:
            raise ValueError(
                f"`decision_maker` must be one of {', '.join(map(repr, DECISION_MAKER_STRATEGIES))}, "
                f"got {self.decision_maker!r}."
            )
        if isinstance(self.variance_reinforce_config, dict):  # as read back from adapter_config.json
            self.variance_reinforce_config = VarianceReinforceConfig(**self.variance_reinforce_config)
        if self.variance_reinforce_config is not None and self.decision_maker != "variance_reinforce_gated":
            raise ValueError(
                "`variance_reinforce_config` configures decision_maker='variance_reinforce_gated', but "
                f"`decision_maker` is {self.decision_maker!r}: select the strategy, or leave the sub-config None."
            )
        if self.decision_maker == "variance_reinforce_gated" and self.variance_reinforce_config is None:
            self.variance_reinforce_config = VarianceReinforceConfig()
        if self.ffn_output_module is not None and not (
            isinstance(self.ffn_output_module, str) and self.ffn_output_module
        ):
            raise ValueError(f"`ffn_output_module` must be a module name or None, got {self.ffn_output_module!r}.")

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """The saved fields of an adapter, with those of adapters saved by peft-cc 0.1 translated (see
        :func:`~peft_cc.legacy_config.translate_legacy_fields`); PEFT calls this when it loads a config."""
        return super().check_kwargs(**translate_legacy_fields(kwargs))

    @property
    def learns_by_reinforce(self) -> bool:
        """Whether the Decision Maker learns from `decision_maker_loss` (REINFORCE) rather than straight through."""
        return self.decision_maker == "variance_reinforce_gated"

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
