"""The CC-Tuning tuner: LoRA plus the Decision Maker, the Transform Matrix and the cross-lingual connection."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import LoraModel
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .anchors import anchors_from_labels, last_token_anchors, position_ids_from_attention_mask, validate_anchors
from .architecture import DecoderMap, map_decoder
from .config import CCConfig
from .connection import CrossLingualConnection
from .decision_maker import ConnectionChoice, DecisionMaker, english_variance_prior
from .generation import generate_with_connection

DECISION_MAKER_KEY = "cc_decision_maker"
TRANSFORM_MATRIX_KEY = "cc_transform_matrix"


def _record_decoder_shape(config: CCConfig, decoder: DecoderMap) -> None:
    """Fill in the decoder shape of a new adapter; refuse a loaded adapter made for another shape."""
    for field_name, actual in (
        ("decoder_num_layers", decoder.num_layers),
        ("decoder_hidden_size", decoder.hidden_size),
    ):
        recorded = getattr(config, field_name)
        if recorded is None:
            setattr(config, field_name, actual)
        elif recorded != actual:
            raise ValueError(
                f"This CC-Tuning adapter was made for another base model: it expects {field_name}={recorded}, "
                f"this model has {actual}. Load it onto the base model it was trained on."
            )


@dataclass
class CCCausalLMOutputWithPast(CausalLMOutputWithPast):
    """A causal-LM output plus what the connection did in this forward call.

    Attributes:
        connected_rows: `[B]` bool, whether each row received the connection (False: no valid anchor).
        layer_choice: `[B, S]` float, the one-hot source-layer choice of each connected row (zeros for unconnected
            rows), detached; columns follow the adapter's candidate source layers.
        layer_logits: `[B, S]` float, the Decision Maker's logits (zeros for unconnected rows), detached.
    """

    connected_rows: torch.BoolTensor | None = None
    layer_choice: torch.FloatTensor | None = None
    layer_logits: torch.FloatTensor | None = None

    @property
    def num_unconnected_rows(self) -> int:
        """How many rows of the batch were left without the connection."""
        return int((~self.connected_rows).sum()) if self.connected_rows is not None else 0


class CCModel(LoraModel):
    """CC-Tuning (Cross-lingual Connection Tuning) on top of LoRA.

    Created by `peft.get_peft_model(model, CCConfig(...))` once `peft_cc` is imported. Next to LoRA it holds, per
    adapter, the Decision Maker (`cc_decision_maker`, `S×d`, and with `injection_gate_init` a gate `S`, trained) and
    the Transform Matrix (`cc_transform_matrix`, `d×d`, fitted after training, never trained by gradient).

    A forward call given the English prompt does one whole CC-Tuning step::

        model(input_ids=..., attention_mask=..., labels=..., english_input_ids=..., english_attention_mask=...)

    It runs the English prompt through the decoder and records its FFN activations at the English anchor (the last
    token of `english_input_ids`), lets the Decision Maker pick one source layer per row, and runs the non-English
    sequence with that activation added to the residual stream after layer `injection_layer`, at the anchor (the
    last prompt token: just before the first supervised label, or `anchor_positions`). It returns a
    [`CCCausalLMOutputWithPast`].
    """

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._decoder: DecoderMap | None = None
        self._connection: CrossLingualConnection | None = None
        self._connection_enabled = True
        self.training_progress = 0.0
        # Adapters whose `decision_maker_init` needs training examples (see `initialize_decision_maker`).
        self._decision_makers_to_initialize: set[str] = set()
        self._recorded_choices: list[ConnectionChoice] | None = None
        # Per adapter, a running mean of the connected rows' losses: the score-function baseline of one-row batches.
        self._running_row_loss: dict[str, float] = {}
        # What the adapter's model card reports beyond its configuration (see `peft_cc.model_card`).
        self.model_card_facts: dict[str, Any] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------------------------------------ adapters

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        config: CCConfig = self.peft_config[adapter_name]
        decoder = map_decoder(model, config.ffn_output_module)
        _record_decoder_shape(config, decoder)
        sources = config.resolve_source_layers(decoder.num_layers)
        super().inject_adapter(model, adapter_name, **kwargs)
        self._add_connection_parameters(adapter_name, config, decoder, num_sources=len(sources))
        if self._connection is None:
            self._decoder = decoder
            self._connection = CrossLingualConnection(decoder)

    def _add_connection_parameters(
        self, adapter_name: str, config: CCConfig, decoder: DecoderMap, num_sources: int
    ) -> None:
        if DECISION_MAKER_KEY not in self._modules:
            self.cc_decision_maker = nn.ModuleDict()
            self.cc_transform_matrix = BufferDict(persistent=True)
        device = next(decoder.layers[0].parameters()).device
        text_config = self.model.config.get_text_config()
        decision_maker = DecisionMaker(
            num_sources,
            decoder.hidden_size,
            init_std=getattr(text_config, "initializer_range", 0.02),
            gate_init=config.injection_gate_init,
        )
        # PEFT creates adapter weights on the meta device when it loads with low_cpu_mem_usage=True.
        decision_maker = (
            decision_maker.to_empty(device=device) if decision_maker.weight.is_meta else decision_maker.to(device)
        )
        if config.decision_maker_init == "zeros":
            nn.init.zeros_(decision_maker.weight)
        if config.decision_maker_init == "english_variance" and not config.inference_mode:
            self._decision_makers_to_initialize.add(adapter_name)
        decision_maker.requires_grad_(not config.inference_mode)
        self.cc_decision_maker[adapter_name] = decision_maker
        self.cc_transform_matrix[adapter_name] = torch.zeros(
            decoder.hidden_size, decoder.hidden_size, dtype=torch.float32, device=device
        )

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._connection_enabled = enabled

    def _unload_and_optionally_merge(self, *args, **kwargs):
        warnings.warn(
            "Unloading a CC-Tuning adapter keeps (or merges) its LoRA weights only: the cross-lingual connection "
            "(Decision Maker and Transform Matrix) is not part of the base model's weights and is dropped.",
            stacklevel=3,
        )
        if self._connection is not None:
            self._connection.remove()
            self._connection = None
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _active_cc_adapter(self) -> str | None:
        """The adapter whose connection applies, or `None` when adapters are disabled."""
        if not self._connection_enabled or self._connection is None:
            return None
        if len(self.active_adapters) != 1:
            raise ValueError(f"The CC-Tuning connection needs exactly one active adapter, got {self.active_adapters}.")
        return self.active_adapters[0]

    def decision_maker(self, adapter_name: str | None = None) -> DecisionMaker:
        """The Decision Maker of `adapter_name` (default: the active adapter)."""
        return self.cc_decision_maker[adapter_name or self.active_adapters[0]]

    def transform_matrix(self, adapter_name: str | None = None) -> torch.Tensor:
        """The `[d, d]` float32 Transform Matrix of `adapter_name` (default: the active adapter)."""
        return self.cc_transform_matrix[adapter_name or self.active_adapters[0]]

    def source_layers(self, adapter_name: str | None = None) -> list[int]:
        """The candidate source layers of `adapter_name` (default: the active adapter), as layer indices."""
        config: CCConfig = self.peft_config[adapter_name or self.active_adapters[0]]
        return config.resolve_source_layers(self._decoder.num_layers)

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        *args,
        english_input_ids: torch.LongTensor | None = None,
        english_attention_mask: torch.Tensor | None = None,
        anchor_positions: torch.LongTensor | None = None,
        **kwargs,
    ):
        """Forward pass with the cross-lingual connection.

        - With `english_input_ids`: the whole CC-Tuning step (see the class docstring); bilingual in eval mode.
        - In eval mode with `anchor_positions` and no English prompt: the monolingual connection, with English
          activations simulated by the fitted Transform Matrix.
        - Otherwise, in eval mode (or with adapters disabled): the model with LoRA only.

        Args:
            english_input_ids: `[B, T_en]` the English prompt of each row, templated like the non-English prompt and
                ending with the generation prompt; right or left padded.
            english_attention_mask: `[B, T_en]` 1 for tokens, 0 for padding (default: all tokens).
            anchor_positions: `[B]` LongTensor, the anchor of each row (`-1`: do not connect this row). Default: the
                position before the first label that is not -100.
            **kwargs: passed to the model (`input_ids`, `attention_mask`, `labels`, ...).
        """
        adapter_name = self._active_cc_adapter()
        if adapter_name is None:
            return self.model(*args, **kwargs)
        if self.training and torch.is_grad_enabled() and adapter_name in self._decision_makers_to_initialize:
            raise ValueError(
                f"The Decision Maker of adapter '{adapter_name}' has `decision_maker_init='english_variance'`, which "
                "is computed from training examples: call `model.base_model.initialize_decision_maker(batches)` "
                "before training (CCSFTTrainer does it)."
            )
        if english_input_ids is None:
            if self.training and torch.is_grad_enabled():
                raise ValueError(
                    "CC-Tuning trains with the English version of each prompt: pass `english_input_ids` (and "
                    "`english_attention_mask`) to the forward call. To run without the connection, use "
                    "`with model.disable_adapter():` or put the model in eval mode."
                )
            if anchor_positions is None:
                return self.model(*args, **kwargs)
        if args:
            kwargs["input_ids"], *rest = args
            if rest:
                raise TypeError("Pass the inputs of a CC-Tuning forward call as keyword arguments.")
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("The CC-Tuning connection needs `input_ids` (inputs_embeds alone are not supported).")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        anchors = self._anchors(input_ids, attention_mask, kwargs.get("labels"), anchor_positions)
        config: CCConfig = self.peft_config[adapter_name]
        sources = self.source_layers(adapter_name)

        if english_input_ids is None:
            rows = (anchors >= 0).nonzero().squeeze(-1)
            activations = self.simulated_english_activations(
                self.anchor_activations(input_ids, attention_mask, rows, anchors[rows], sources), adapter_name
            )
        else:
            english_attention_mask = self._check_english_inputs(input_ids, english_input_ids, english_attention_mask)
            english_anchors = last_token_anchors(english_attention_mask.to(anchors.device))
            rows = ((anchors >= 0) & (english_anchors >= 0)).nonzero().squeeze(-1)
            activations = self.anchor_activations(
                english_input_ids,
                english_attention_mask,
                rows,
                english_anchors[rows],
                sources,
                config.english_gradients,
            )

        choice = self.connection_choice(activations, adapter_name)
        with self._connection.injecting(config.injection_layer, rows, anchors[rows], choice.vectors_for):
            outputs = self.model(**kwargs)
        if self._recorded_choices is not None:
            self._recorded_choices.append(choice)
        if not isinstance(outputs, ModelOutput):
            return outputs
        labels = kwargs.get("labels")
        if choice.score_function and outputs.loss is not None and labels is not None and len(rows):
            row_losses = _row_losses(outputs.logits, labels)[rows]
            running = self._running_row_loss.get(adapter_name)
            reinforce = choice.score_function_loss(row_losses, single_row_baseline=running)
            if reinforce is not None:
                outputs.loss = outputs.loss + reinforce
            mean = float(row_losses.mean())
            self._running_row_loss[adapter_name] = mean if running is None else 0.9 * running + 0.1 * mean
        balance_loss = choice.balance_loss() if self.training and config.choice_balance_weight > 0 else None
        if balance_loss is not None and outputs.loss is not None:
            outputs.loss = outputs.loss + config.choice_balance_weight * balance_loss
        if len(rows) == 0 and outputs.loss is not None and torch.is_grad_enabled():
            # No row was connected, so the Decision Maker took no part in the loss. Keep it in the graph with a zero
            # gradient: distributed data parallel expects every trainable parameter to receive one in every step.
            outputs.loss = outputs.loss + 0.0 * self.cc_decision_maker[adapter_name].weight.sum()
        connected = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        connected[rows] = True
        layer_choice, layer_logits = choice.per_row(rows, input_ids.shape[0])
        return CCCausalLMOutputWithPast(
            **outputs, connected_rows=connected, layer_choice=layer_choice, layer_logits=layer_logits
        )

    def needs_decision_maker_initialization(self, adapter_name: str | None = None) -> bool:
        """Whether the Decision Maker of `adapter_name` (default: the active adapter) waits for
        :meth:`initialize_decision_maker` before it can train (`decision_maker_init="english_variance"`)."""
        return (adapter_name or self.active_adapters[0]) in self._decision_makers_to_initialize

    @torch.no_grad()
    def initialize_decision_maker(self, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Favour, in the active adapter's Decision Maker, the layers whose English activation varies most.

        The data-dependent step of `decision_maker_init="english_variance"`, done once before training
        (CCSFTTrainer does it): each batch goes through the bilingual connection without gradients, and the
        Decision Maker's logits are shifted by the log of each layer's share of the variance of the English
        activations across the rows (:func:`~peft_cc.decision_maker.english_variance_prior`,
        :meth:`~peft_cc.decision_maker.DecisionMaker.favour`). Other adapters' Decision Makers are untouched.

        Args:
            batches: keyword arguments of training forward calls (`input_ids`, `attention_mask`, `labels`,
                `english_input_ids`, `english_attention_mask`); at least 2 connected rows in all.

        Returns:
            `[S]` float32, the prior: each candidate layer's share of the variance.
        """
        adapter_name = self._active_cc_adapter()
        if adapter_name is None:
            raise ValueError("initialize_decision_maker needs the CC-Tuning adapter enabled and active.")
        was_training = self.training
        self._recorded_choices = choices = []
        self.eval()
        try:
            for batch in batches:
                if batch.get("english_input_ids") is None:
                    raise ValueError("initialize_decision_maker needs batches with `english_input_ids`.")
                self.forward(**batch)
        finally:
            self._recorded_choices = None
            self.train(was_training)
        connected = [choice for choice in choices if choice.summary is not None and len(choice.summary)]
        if not connected:
            raise ValueError("initialize_decision_maker got no connected row (no English prompt or anchor).")
        activations = torch.cat([choice.source_activations for choice in connected]).float()
        if self.peft_config[adapter_name].injection_scaling == "residual_norm":
            # What is injected then is each activation's direction, at the residual stream's norm.
            activations = activations / activations.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        log_prior = english_variance_prior(activations)
        self.cc_decision_maker[adapter_name].favour(log_prior, torch.cat([choice.summary for choice in connected]))
        self._decision_makers_to_initialize.discard(adapter_name)
        return log_prior.exp()

    def set_training_progress(self, progress: float) -> None:
        """Tell the connection how far training is (0..1): the temperature schedule and soft phase depend on it."""
        self.training_progress = min(max(float(progress), 0.0), 1.0)

    def connection_choice(self, source_activations: torch.Tensor, adapter_name: str | None = None) -> ConnectionChoice:
        """The Decision Maker's choice over `[B', S, d]` source activations, as configured for the current mode.

        In training mode it samples (hard Gumbel-Softmax, or during `soft_choice_fraction` the soft mixture of
        `soft_choice`), at the temperature of the current training progress, and the Decision Maker learns from
        `decision_maker_start_fraction` on; in eval mode it takes the arg-max.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        config: CCConfig = self.peft_config[adapter_name]
        hard = not self.training or self.training_progress >= config.soft_choice_fraction
        return ConnectionChoice(
            self.cc_decision_maker[adapter_name],
            source_activations,
            temperature=config.temperature_at(self.training_progress),
            sample=self.training and (hard or config.soft_choice == "gumbel"),
            hard=hard,
            scale_to_residual=config.injection_scaling == "residual_norm",
            learn=self.training_progress >= config.decision_maker_start_fraction,
            score_function=self.training and hard and config.decision_maker_gradient == "score_function",
        )

    def generate(self, *args, **kwargs):
        """`generate` with the connection at the last prompt token of every (left-padded) row.

        Takes the arguments of `transformers.GenerationMixin.generate`, plus `english_input_ids`,
        `english_attention_mask` and `connection` (`"monolingual"`, `"bilingual"` or `"off"`); see
        :func:`peft_cc.generation.generate_with_connection`.
        """
        if args:
            kwargs["input_ids"], *rest = args
            if rest:
                raise TypeError("Pass the inputs of generate() as keyword arguments.")
        if kwargs.get("input_ids") is None:
            raise ValueError("Generation with the CC-Tuning connection needs `input_ids`.")
        return generate_with_connection(self, **kwargs)

    @staticmethod
    def _check_english_inputs(
        input_ids: torch.Tensor, english_input_ids: torch.Tensor, english_attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Validate the English inputs against `input_ids`; return the English attention mask (default: all ones)."""
        if english_attention_mask is None:
            english_attention_mask = torch.ones_like(english_input_ids)
        if english_input_ids.shape[0] != input_ids.shape[0] or english_attention_mask.shape != english_input_ids.shape:
            raise ValueError(
                f"`english_input_ids` {tuple(english_input_ids.shape)} and `english_attention_mask` "
                f"{tuple(english_attention_mask.shape)} must have one row per row of `input_ids` "
                f"{tuple(input_ids.shape)}."
            )
        return english_attention_mask

    @staticmethod
    def _anchors(
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        anchor_positions: torch.Tensor | None,
    ) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if anchor_positions is not None:
            return validate_anchors(anchor_positions.to(input_ids.device), attention_mask, seq_len)
        if labels is None:
            raise ValueError(
                "The CC-Tuning connection needs the anchor of each row: pass `labels` (the anchor is the position "
                "before the first label that is not -100) or `anchor_positions`."
            )
        return validate_anchors(anchors_from_labels(labels.to(input_ids.device)), attention_mask, seq_len)

    def anchor_activations(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor,
        anchors: torch.Tensor,
        layers: list[int],
        with_autograd: bool = False,
    ) -> torch.Tensor:
        """Run prompts through the decoder (no LM head, no connection) and return their FFN activations at the anchor.

        This is the English pass of a training step, and the source of the rows of the Transform Matrix fit.

        Args:
            input_ids: `[B, T]` prompts.
            attention_mask: `[B, T]`.
            rows: `[B']` rows to run.
            anchors: `[B']` anchor of each of those rows.
            layers: the layers to record, in the order of the result.
            with_autograd: keep the autograd graph (gradients flow through this pass).

        Returns:
            `[B', len(layers), d]` activations in the model's dtype.
        """
        decoder = self.model.get_decoder()
        batch_rows = torch.arange(len(rows), device=rows.device)
        with torch.set_grad_enabled(with_autograd and torch.is_grad_enabled()):
            with self._connection.capturing(batch_rows, anchors, layers, with_autograd) as captured:
                if len(rows):
                    mask = attention_mask[rows]
                    decoder(
                        input_ids=input_ids[rows],
                        attention_mask=mask,
                        position_ids=position_ids_from_attention_mask(mask),
                        use_cache=False,
                    )
        if not len(rows):
            embedding = self.model.get_input_embeddings().weight
            return embedding.new_zeros(0, len(layers), self._decoder.hidden_size)
        return torch.stack([captured[layer] for layer in layers], dim=1)

    def is_transform_matrix_fitted(self, adapter_name: str | None = None) -> bool:
        """Whether the Transform Matrix of `adapter_name` (default: the active adapter) was fitted (it starts at 0)."""
        return bool(torch.any(self.transform_matrix(adapter_name)))

    def require_fitted_transform_matrix(self, adapter_name: str | None = None) -> torch.Tensor:
        """The `[d, d]` Transform Matrix, or an error that says how to fit it.

        Raises:
            ValueError: if the Transform Matrix of the adapter was never fitted.
        """
        if not self.is_transform_matrix_fitted(adapter_name):
            raise ValueError(
                "The Transform Matrix of this CC-Tuning adapter was never fitted, so the monolingual connection "
                "cannot simulate the English activations. Fit it with `peft_cc.fit_transform_matrix(model, pairs, "
                "tokenizer)` on (non-English, English) prompt pairs, pass `english_input_ids` for the bilingual "
                "connection, or generate without the connection with `connection='off'`."
            )
        return self.transform_matrix(adapter_name)

    def simulated_english_activations(
        self, activations: torch.Tensor, adapter_name: str | None = None
    ) -> torch.Tensor:
        """`ê = u T`: English activations simulated from the model's own, with the fitted Transform Matrix.

        Args:
            activations: `[..., d]` FFN activations `u` of the non-English prompt at its anchor.

        Returns:
            `[..., d]` float32.

        Raises:
            ValueError: if the Transform Matrix of the adapter was never fitted.
        """
        matrix = self.require_fitted_transform_matrix(adapter_name)
        with torch.autocast(activations.device.type, enabled=False):  # float32 under mixed precision too
            return activations.float() @ matrix.float()

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, CCModel):  # a loaded Decision Maker has its trained weights: nothing to initialise
            tuner._decision_makers_to_initialize.discard(adapter_name)
        expected = {
            key: tensor.shape
            for key, tensor in model.state_dict().items()
            if f"{DECISION_MAKER_KEY}.{adapter_name}." in key or key.endswith(f"{TRANSFORM_MATRIX_KEY}.{adapter_name}")
        }
        for key, shape in expected.items():
            if key not in remapped:
                raise ValueError(
                    f"The checkpoint of adapter '{adapter_name}' has no `{key}`: it is not a complete CC-Tuning "
                    "adapter (Decision Maker and Transform Matrix are missing)."
                )
            if remapped[key].shape != shape:
                raise ValueError(
                    f"The CC-Tuning adapter '{adapter_name}' was trained for another base model: its `{key}` has "
                    f"shape {tuple(remapped[key].shape)}, this model needs {tuple(shape)} "
                    "([source layers, hidden size] for the Decision Maker, [hidden size, hidden size] for the "
                    "Transform Matrix)."
                )
        return remapped


@torch.no_grad()
def _row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`[B]` float32 mean next-token cross-entropy of each row over its labels (-100: ignored; 0 for a row without).

    Args:
        logits: `[B, T, V]` the model's logits.
        labels: `[B, T]` labels aligned with the inputs (shifted here, as the causal-LM loss does).
    """
    targets = labels[:, 1:].to(logits.device)
    supervised = targets != -100
    token_losses = nn.functional.cross_entropy(
        logits[:, :-1][supervised].float(), targets[supervised], reduction="none"
    )
    rows = supervised.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], device=logits.device).index_add_(0, rows, token_losses)
    return sums / supervised.sum(dim=1).clamp_min(1)
