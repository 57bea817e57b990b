"""The CC-Tuning tuner: LoRA plus the Decision Maker, the Transform Matrix and the cross-lingual connection.

Where the connection is injected: :meth:`CCModel.forward` (training and scoring) and
:func:`peft_cc.generation.generate_with_connection` (generation) arm the adapter's hooks,
`CCModel.connection().injecting(...)` (:class:`peft_cc.connection.CrossLingualConnection`), which add the chosen
English activation after decoder layer `injection_layer`, at the anchor.
"""

from __future__ import annotations

import dataclasses
import functools
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
from .connection import FIRST_LAYER_INPUT, CrossLingualConnection
from .decision_maker import ConnectionChoice, DecisionMaker, completion_alignment_prior, english_variance_prior
from .generation import generate_with_connection

DECISION_MAKER_KEY = "cc_decision_maker"
TRANSFORM_MATRIX_KEY = "cc_transform_matrix"


@functools.cache
def _with_connection_fields(output_type: type[ModelOutput]) -> type[ModelOutput]:
    """`output_type` plus the fields of [`CCCausalLMOutputWithPast`] that say what the connection did."""
    names = ("connected_rows", "layer_choice", "layer_logits", "decision_maker_loss")
    fields = [(name, torch.Tensor | None, dataclasses.field(default=None)) for name in names]
    return dataclasses.make_dataclass(f"CC{output_type.__name__}", fields, bases=(output_type,))


@dataclass
class CCCausalLMOutputWithPast(CausalLMOutputWithPast):
    """A causal-LM output plus what the connection did in this forward call.

    Attributes:
        connected_rows: `[B]` bool, whether each row received the connection (False: no valid anchor).
        layer_choice: `[B, S]` float, the one-hot source-layer choice of each connected row (zeros for unconnected
            rows), detached; columns follow the adapter's candidate source layers.
        layer_logits: `[B, S]` float, the Decision Maker's logits (zeros for unconnected rows), detached.
        decision_maker_loss: the Decision Maker's auxiliary loss, a scalar to add to the training loss (see
            :meth:`CCModel.forward`); `None` when no gradient is computed.
    """

    connected_rows: torch.BoolTensor | None = None
    layer_choice: torch.FloatTensor | None = None
    layer_logits: torch.FloatTensor | None = None
    decision_maker_loss: torch.FloatTensor | None = None

    @property
    def num_unconnected_rows(self) -> int:
        """How many rows of the batch were left without the connection."""
        return int((~self.connected_rows).sum()) if self.connected_rows is not None else 0


class CCModel(LoraModel):
    """CC-Tuning (Cross-lingual Connection Tuning) on top of LoRA.

    Created by `peft.get_peft_model(model, CCConfig(...))` once `peft_cc` is imported. Next to LoRA it holds, per
    adapter, the Decision Maker (`cc_decision_maker`, `S×d`, and for the gated strategy a gate `S`; trained) and the
    Transform Matrix (`cc_transform_matrix`, `d×d`, fitted after training, never trained by gradient), and its own
    hooks on the decoder (inert unless the adapter is active and a forward or `generate` arms them).

    A forward call given the English prompt does one whole CC-Tuning step::

        outputs = model(
            input_ids=..., attention_mask=..., labels=..., english_input_ids=..., english_attention_mask=...
        )
        loss = outputs.loss + outputs.decision_maker_loss

    It runs the English prompt through the decoder and records its FFN activations at the English anchor (the last
    token of `english_input_ids`), lets the Decision Maker pick one source layer per row, and runs the non-English
    sequence with that activation added to the residual stream after layer `injection_layer`, at the anchor (the
    last prompt token: just before the first supervised label, or `anchor_positions`).
    """

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._connections: dict[str, CrossLingualConnection] = {}
        self._connection_enabled = True
        self.training_progress = 0.0
        # Adapters whose Decision Maker waits for `initialize_decision_maker` (the gated strategy's start).
        self._decision_makers_to_initialize: set[str] = set()
        # Per adapter, a running mean of the connected rows' losses: the REINFORCE baseline of one-row batches.
        self._running_row_loss: dict[str, float] = {}
        # What the adapter's model card reports beyond its configuration (see `peft_cc.model_card`).
        self.model_card_facts: dict[str, Any] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------------------------------------ adapters

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        config: CCConfig = self.peft_config[adapter_name]
        decoder = map_decoder(model, config.ffn_output_module)
        num_sources = len(config.resolve_source_layers(decoder.num_layers))
        super().inject_adapter(model, adapter_name, **kwargs)
        self._add_connection_parameters(adapter_name, config, decoder, num_sources)
        self._connections[adapter_name] = CrossLingualConnection(decoder)

    def _add_connection_parameters(
        self, adapter_name: str, config: CCConfig, decoder: DecoderMap, num_sources: int
    ) -> None:
        if DECISION_MAKER_KEY not in self._modules:
            self.cc_decision_maker = nn.ModuleDict()
            self.cc_transform_matrix = BufferDict(persistent=True)
        device = next(decoder.layers[0].parameters()).device
        strategy = config.variance_reinforce_config
        decision_maker = DecisionMaker(
            num_sources,
            decoder.hidden_size,
            init_std=getattr(self.model.config.get_text_config(), "initializer_range", 0.02),
            gate_init=strategy.gate_init if strategy is not None else None,
        )
        # PEFT creates adapter weights on the meta device when it loads with low_cpu_mem_usage=True.
        decision_maker = (
            decision_maker.to_empty(device=device) if decision_maker.weight.is_meta else decision_maker.to(device)
        )
        if config.decision_maker == "variance_reinforce_gated" and not config.inference_mode:
            self._decision_makers_to_initialize.add(adapter_name)
        decision_maker.requires_grad_(not config.inference_mode)
        self.cc_decision_maker[adapter_name] = decision_maker
        self.cc_transform_matrix[adapter_name] = torch.zeros(
            decoder.hidden_size, decoder.hidden_size, dtype=torch.float32, device=device
        )

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter: its LoRA weights, Decision Maker, Transform Matrix and hooks."""
        super().delete_adapter(adapter_name)
        del self.cc_decision_maker[adapter_name]
        del self.cc_transform_matrix[adapter_name]
        self._connections.pop(adapter_name).remove()
        self._decision_makers_to_initialize.discard(adapter_name)
        self._running_row_loss.pop(adapter_name, None)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._connection_enabled = enabled

    def _unload_and_optionally_merge(self, *args, **kwargs):
        warnings.warn(
            "Unloading a CC-Tuning adapter keeps (or merges) its LoRA weights only: the cross-lingual connection "
            "(Decision Maker and Transform Matrix) is not part of the base model's weights and is dropped.",
            stacklevel=3,
        )
        for connection in self._connections.values():
            connection.remove()
        self._connections.clear()
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def connected_adapter(self) -> str | None:
        """The adapter whose connection applies: the one active adapter, or `None` when adapters are disabled.

        Raises:
            ValueError: when several adapters are active (the connection of one adapter at a time applies).
        """
        if not self._connection_enabled or not self._connections:
            return None
        if len(self.active_adapters) != 1:
            raise ValueError(f"The CC-Tuning connection needs exactly one active adapter, got {self.active_adapters}.")
        return self.active_adapters[0]

    def decision_maker(self, adapter_name: str | None = None) -> DecisionMaker:
        """The Decision Maker of `adapter_name` (default: the active adapter)."""
        return self.cc_decision_maker[adapter_name or self.active_adapters[0]]

    def decoder(self, adapter_name: str | None = None) -> DecoderMap:
        """The decoder layers and FFN outputs that the connection of `adapter_name` (default: active) hooks."""
        return self.connection(adapter_name).decoder

    def source_layers(self, adapter_name: str | None = None) -> list[int]:
        """The candidate source layers of `adapter_name` (default: the active adapter), as layer indices."""
        adapter_name = adapter_name or self.active_adapters[0]
        return self.peft_config[adapter_name].resolve_source_layers(self.decoder(adapter_name).num_layers)

    def connection(self, adapter_name: str | None = None) -> CrossLingualConnection:
        """The hooks of `adapter_name` (default: the active adapter) on the decoder: `connection().capturing(...)`
        records FFN activations at anchors, `connection().injecting(...)` adds a vector after a layer (see
        :class:`~peft_cc.connection.CrossLingualConnection`)."""
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self._connections:
            raise ValueError(
                f"The CC-Tuning adapter {adapter_name!r} has no connection on this model (unknown adapter, or the "
                "model was unloaded)."
            )
        return self._connections[adapter_name]

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

        When the connection runs, the output also holds `connected_rows`, `layer_choice`, `layer_logits` (see
        [`CCCausalLMOutputWithPast`]) and, when gradients are computed, `decision_maker_loss`: the Decision Maker's
        auxiliary loss, which the caller adds to the loss, as for PEFT's `LoraModel._get_kasa_loss`
        (`CCSFTTrainer` does). Its value is 0; its gradient is the REINFORCE estimate of the gated strategy, and
        zero (keeping the Decision Maker in the graph, as distributed data parallel needs) otherwise.

        Args:
            english_input_ids: `[B, T_en]` the English prompt of each row, templated like the non-English prompt and
                ending with the generation prompt; right or left padded.
            english_attention_mask: `[B, T_en]` 1 for tokens, 0 for padding (default: all tokens).
            anchor_positions: `[B]` LongTensor, the anchor of each row (`-1`: do not connect this row). Default: the
                position before the first label that is not -100.
            **kwargs: passed to the model (`input_ids`, `attention_mask`, `labels`, TRL's `fused_lm_head`, ...).
        """
        adapter_name = self._adapter_to_connect(english_input_ids, anchor_positions)
        if adapter_name is None:
            return self.model(*args, **kwargs)
        kwargs = _as_keywords(args, kwargs)
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("The CC-Tuning connection needs `input_ids` (inputs_embeds alone are not supported).")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        anchors = _anchors(input_ids, attention_mask, kwargs.get("labels"), anchor_positions)
        rows, activations = self.english_activations(
            input_ids, attention_mask, anchors, english_input_ids, english_attention_mask, adapter_name
        )
        choice = self.connection_choice(activations, adapter_name)
        config: CCConfig = self.peft_config[adapter_name]
        with self.connection(adapter_name).injecting(config.injection_layer, rows, anchors[rows], choice.vectors_for):
            outputs = self.model(**kwargs)
        if not isinstance(outputs, ModelOutput):
            return outputs
        return self._with_connection_facts(
            outputs, choice, rows, input_ids.shape[0], kwargs.get("labels"), adapter_name
        )

    def _with_connection_facts(
        self,
        outputs: ModelOutput,
        choice: ConnectionChoice,
        rows: torch.Tensor,
        batch_size: int,
        labels: torch.Tensor | None,
        adapter_name: str,
    ) -> ModelOutput:
        """`outputs` with what the connection did: `connected_rows`, `layer_choice`, `layer_logits` and
        `decision_maker_loss` (a [`CCCausalLMOutputWithPast`] for a plain causal-LM output; the same keys added to
        another output type, e.g. TRL's fused LM head's)."""
        layer_choice, layer_logits = choice.per_row(rows, batch_size)
        connected = torch.zeros(batch_size, dtype=torch.bool, device=rows.device)
        connected[rows] = True
        facts = {
            "connected_rows": connected,
            "layer_choice": layer_choice,
            "layer_logits": layer_logits,
            "decision_maker_loss": self._decision_maker_loss(choice, outputs, labels, rows, adapter_name),
        }
        if type(outputs) is CausalLMOutputWithPast:
            return CCCausalLMOutputWithPast(**outputs, **facts)
        # Another output type (e.g. TRL's fused LM head's): a subclass with these fields, since torch's pytree, through
        # which DDP passes the output, rebuilds an output from the fields of its type.
        return _with_connection_fields(type(outputs))(**outputs, **facts)

    def _adapter_to_connect(
        self, english_input_ids: torch.Tensor | None, anchor_positions: torch.Tensor | None
    ) -> str | None:
        """The adapter whose connection this forward call applies, or `None` for the model with LoRA only."""
        adapter_name = self.connected_adapter()
        if adapter_name is None:
            return None
        training = self.training and torch.is_grad_enabled()
        if training and adapter_name in self._decision_makers_to_initialize:
            raise ValueError(
                f"The Decision Maker of adapter '{adapter_name}' (decision_maker='variance_reinforce_gated') starts "
                "from the variance of the English activations of training examples: call "
                "`model.base_model.initialize_decision_maker(batches)` before training (CCSFTTrainer does it)."
            )
        if english_input_ids is None and training:
            raise ValueError(
                "CC-Tuning trains with the English version of each prompt: pass `english_input_ids` (and "
                "`english_attention_mask`) to the forward call. To run without the connection, use "
                "`with model.disable_adapter():` or put the model in eval mode."
            )
        if english_input_ids is None and anchor_positions is None:
            return None
        return adapter_name

    def english_activations(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        anchors: torch.Tensor,
        english_input_ids: torch.LongTensor | None = None,
        english_attention_mask: torch.Tensor | None = None,
        adapter_name: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The English FFN activations of the candidate layers at each row's anchor: real or simulated.

        With `english_input_ids` (bilingual), the English prompts run through the decoder and their activations are
        read at their last token (with autograd when the adapter has `english_gradients` and gradients are on).
        Without (monolingual), the prompts' own activations at `anchors` are mapped by the fitted Transform Matrix
        (:meth:`simulated_english_activations`).

        Args:
            input_ids: `[B, T]` the (non-English) sequences.
            attention_mask: `[B, T]`.
            anchors: `[B]` the anchor of each row, `-1` for none.
            english_input_ids: `[B, T_en]` the English prompts, or `None`.
            english_attention_mask: `[B, T_en]` (default: all ones).
            adapter_name: default the active adapter.

        Returns:
            `(rows, activations)`: `[B']` the rows that can be connected (an anchor, and a non-empty English prompt
            when given), and their `[B', S, d]` activations (model dtype when real, float32 when simulated).
        """
        adapter_name = adapter_name or self.active_adapters[0]
        sources = self.source_layers(adapter_name)
        if english_input_ids is None:
            rows = (anchors >= 0).nonzero().squeeze(-1)
            prompt = self.anchor_activations(input_ids, attention_mask, rows, anchors[rows], sources)
            return rows, self.simulated_english_activations(prompt, adapter_name)
        if english_attention_mask is None:
            english_attention_mask = torch.ones_like(english_input_ids)
        if english_input_ids.shape[0] != input_ids.shape[0] or english_attention_mask.shape != english_input_ids.shape:
            raise ValueError(
                f"`english_input_ids` {tuple(english_input_ids.shape)} and `english_attention_mask` "
                f"{tuple(english_attention_mask.shape)} must have one row per row of `input_ids` "
                f"{tuple(input_ids.shape)}."
            )
        english_anchors = last_token_anchors(english_attention_mask.to(anchors.device))
        rows = ((anchors >= 0) & (english_anchors >= 0)).nonzero().squeeze(-1)
        with_autograd = self.peft_config[adapter_name].english_gradients
        activations = self.anchor_activations(
            english_input_ids, english_attention_mask, rows, english_anchors[rows], sources, with_autograd
        )
        return rows, activations

    def connection_choice(self, source_activations: torch.Tensor, adapter_name: str | None = None) -> ConnectionChoice:
        """The Decision Maker's choice over `[B', S, d]` source activations, as configured for the current mode.

        In training mode it samples a hard Gumbel-Softmax choice; with the gated strategy the Decision Maker learns
        by REINFORCE from `start_fraction` of training on (:meth:`set_training_progress`). In eval mode it takes
        the arg-max.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        config: CCConfig = self.peft_config[adapter_name]
        strategy = config.variance_reinforce_config
        return ConnectionChoice(
            self.cc_decision_maker[adapter_name],
            source_activations,
            temperature=config.gumbel_temperature,
            sample=self.training,
            learn=strategy is None or self.training_progress >= strategy.start_fraction,
            reinforce=self.training and config.learns_by_reinforce,
        )

    def _decision_maker_loss(
        self,
        choice: ConnectionChoice,
        outputs: ModelOutput,
        labels: torch.Tensor | None,
        rows: torch.Tensor,
        adapter_name: str,
    ) -> torch.Tensor | None:
        """The Decision Maker's auxiliary loss of this forward call (see :meth:`forward`), `None` without gradients."""
        if not torch.is_grad_enabled():
            return None
        # A zero gradient for every Decision Maker parameter, whatever else happens: DDP expects one for each.
        loss = sum(0.0 * parameter.sum() for parameter in self.cc_decision_maker[adapter_name].parameters())
        if not choice.reinforce or labels is None or not len(rows):
            return loss
        row_losses = _row_losses(outputs, labels)[rows]
        running = self._running_row_loss.get(adapter_name)
        reinforce = choice.reinforce_loss(row_losses, single_row_baseline=running)
        mean = float(row_losses.mean())
        self._running_row_loss[adapter_name] = mean if running is None else 0.9 * running + 0.1 * mean
        return loss if reinforce is None else loss + reinforce

    # ------------------------------------------------------------------------------------------------ the passes

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
        captured = self._run_decoder(input_ids, attention_mask, rows, anchors, layers, with_autograd)
        if len(rows) and layers:
            return torch.stack([captured[layer] for layer in layers], dim=1)
        embedding = self.model.get_input_embeddings().weight
        return embedding.new_zeros(len(rows), len(layers), embedding.shape[1])

    def _run_decoder(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor,
        anchors: torch.Tensor,
        layers: list[int],
        with_autograd: bool = False,
        first_layer_input: bool = False,
    ) -> dict[int, torch.Tensor]:
        """The activations :meth:`capturing` records while `rows` of the prompts run through the decoder alone."""
        decoder = self.model.get_decoder()
        batch_rows = torch.arange(len(rows), device=rows.device)
        with torch.set_grad_enabled(with_autograd and torch.is_grad_enabled()):
            connection = self.connection()
            with connection.capturing(batch_rows, anchors, layers, with_autograd, first_layer_input) as captured:
                if len(rows):
                    mask = attention_mask[rows]
                    decoder(
                        input_ids=input_ids[rows],
                        attention_mask=mask,
                        position_ids=position_ids_from_attention_mask(mask),
                        use_cache=False,
                    )
        return captured

    # ------------------------------------------------------------------------------------------------ training

    def set_training_progress(self, progress: float) -> None:
        """Tell the connection how far training is (0..1): the gated strategy's Decision Maker learns from its
        `start_fraction` on."""
        self.training_progress = min(max(float(progress), 0.0), 1.0)

    def needs_decision_maker_initialization(self, adapter_name: str | None = None) -> bool:
        """Whether the Decision Maker of `adapter_name` (default: the active adapter) waits for
        :meth:`initialize_decision_maker` before it can train (`decision_maker="variance_reinforce_gated"`)."""
        return (adapter_name or self.active_adapters[0]) in self._decision_makers_to_initialize

    @torch.no_grad()
    def initialize_decision_maker(self, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Favour, in the active adapter's Decision Maker, the layers that its strategy's `prior` picks.

        The data-dependent start of `decision_maker="variance_reinforce_gated"`, done once before training
        (CCSFTTrainer does it): from each batch, the English activations of the candidate layers and the Decision
        Maker's input `z` at the anchors are computed without gradients (in eval mode, LoRA as it is); the Decision
        Maker's logits are then shifted by the log of a prior over the layers
        (:meth:`~peft_cc.decision_maker.DecisionMaker.favour`). With `VarianceReinforceConfig.prior` at
        `"english_variance"` (the default) it is each layer's share of the variance of the English activations across
        the rows (:func:`~peft_cc.decision_maker.english_variance_prior`); with `"completion_alignment"`, each layer's
        share of the alignment between its English activations and the rows' completions, each the mean output
        embedding of its label tokens (:func:`~peft_cc.decision_maker.completion_alignment_prior`). Other adapters'
        Decision Makers are untouched.

        Args:
            batches: keyword arguments of training forward calls (`input_ids`, `attention_mask`, `labels`,
                `english_input_ids`, `english_attention_mask`); at least 2 connected rows in all.

        Returns:
            `[S]` float32, the prior: each candidate layer's share.
        """
        adapter_name = self.connected_adapter()
        if adapter_name is None:
            raise ValueError("initialize_decision_maker needs the CC-Tuning adapter enabled and active.")
        strategy = self.peft_config[adapter_name].variance_reinforce_config
        by_completion = strategy is not None and strategy.prior == "completion_alignment"
        statistics = []
        was_training = self.training
        self.eval()  # no dropout: the activations training starts from
        try:
            for batch in batches:
                if batch.get("english_input_ids") is None:
                    raise ValueError("initialize_decision_maker needs batches with `english_input_ids`.")
                statistics.append(self._initialization_statistics(batch, adapter_name, by_completion))
        finally:
            self.train(was_training)
        activations, summaries, completions, residual_norms = (torch.cat(parts) for parts in zip(*statistics))
        if len(activations) == 0:
            raise ValueError("initialize_decision_maker got no connected row (no English prompt or anchor).")
        if by_completion:
            log_prior = completion_alignment_prior(activations.float(), completions)
        else:
            log_prior = english_variance_prior(activations.float())
        decision_maker = self.cc_decision_maker[adapter_name]
        decision_maker.favour(log_prior, summaries)
        if strategy is not None and strategy.gate_init_ratio is not None:
            # Each layer's injection at `gate_init_ratio` times the residual stream's norm (mean norms at the anchors).
            activation_norms = activations.float().norm(dim=-1).mean(dim=0).clamp_min(1e-12)
            decision_maker.gate.copy_(strategy.gate_init_ratio * residual_norms.mean() / activation_norms)
        self._decision_makers_to_initialize.discard(adapter_name)
        return log_prior.exp()

    def _initialization_statistics(
        self, batch: dict[str, torch.Tensor], adapter_name: str, with_completions: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`([B', S, d] English activations, [B', d] Decision Maker inputs z, [B', d] or [0, d] completions, [B']
        residual norms)` of a batch's connected rows (:meth:`initialize_decision_maker`).

        A completion is the mean output embedding of the row's label tokens (only `with_completions`); a residual norm
        is that of the output of the injection layer at the row's anchor, where the connection adds its vector.
        """
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        anchors = _anchors(input_ids, attention_mask, batch.get("labels"), batch.get("anchor_positions"))
        rows, english = self.english_activations(
            input_ids,
            attention_mask,
            anchors,
            batch["english_input_ids"],
            batch.get("english_attention_mask"),
            adapter_name,
        )
        if not len(rows):
            empty = english.new_zeros(0, english.shape[-1])
            return english, empty, empty, english.new_zeros(0)
        residual_norms = []
        injection_layer = self.decoder(adapter_name).layers[self.peft_config[adapter_name].injection_layer]
        positions = (torch.arange(len(rows), device=rows.device), anchors[rows])
        handle = injection_layer.register_forward_hook(
            lambda module, args, output: residual_norms.append(
                (output[0] if isinstance(output, tuple) else output)[positions].float().norm(dim=-1)
            )
        )
        try:
            captured = self._run_decoder(input_ids, attention_mask, rows, anchors[rows], [], first_layer_input=True)
        finally:
            handle.remove()
        z = DecisionMaker.summarize(captured[FIRST_LAYER_INPUT], english)
        completions = english.new_zeros(0, english.shape[-1])
        if with_completions:
            completions = self._completion_embeddings(batch.get("labels"), rows)
        return english, z, completions, residual_norms[0]

    def _completion_embeddings(self, labels: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """`[B', d]` float32: the mean output embedding (the LM head's row) of the label tokens of each of `rows`."""
        if labels is None:
            raise ValueError(
                "The 'completion_alignment' prior needs `labels` in the batches of initialize_decision_maker."
            )
        weight = (self.model.get_output_embeddings() or self.model.get_input_embeddings()).weight
        labels = labels[rows].to(weight.device)
        supervised = labels != -100
        row, position = supervised.nonzero(as_tuple=True)
        sums = weight.new_zeros(len(rows), weight.shape[1], dtype=torch.float32)
        sums.index_add_(0, row, weight[labels[row, position]].float())
        return sums / supervised.sum(dim=1, keepdim=True).clamp_min(1)

    # ------------------------------------------------------------------------------------------------ inference

    def generate(self, *args, **kwargs):
        """`generate` with the connection at the last prompt token of every (left-padded) row.

        Takes the arguments of `transformers.GenerationMixin.generate`, plus `english_input_ids`,
        `english_attention_mask` and `connection` (`"monolingual"`, `"bilingual"` or `"off"`); see
        :func:`peft_cc.generation.generate_with_connection`.
        """
        kwargs = _as_keywords(args, kwargs)
        if kwargs.get("input_ids") is None:
            raise ValueError("Generation with the CC-Tuning connection needs `input_ids`.")
        return generate_with_connection(self, **kwargs)

    def transform_matrix(self, adapter_name: str | None = None) -> torch.Tensor:
        """The `[d, d]` float32 Transform Matrix of `adapter_name` (default: the active adapter)."""
        return self.cc_transform_matrix[adapter_name or self.active_adapters[0]]

    def set_transform_matrix(self, matrix: torch.Tensor, adapter_name: str | None = None) -> None:
        """Store a fitted `[d, d]` Transform Matrix in `adapter_name` (default: the active adapter), in place."""
        buffer = self.transform_matrix(adapter_name)
        if matrix.shape != buffer.shape:
            raise ValueError(f"The Transform Matrix must have shape {tuple(buffer.shape)}, got {tuple(matrix.shape)}.")
        buffer.copy_(matrix.to(device=buffer.device, dtype=buffer.dtype))

    def is_transform_matrix_fitted(self, adapter_name: str | None = None) -> bool:
        """Whether the Transform Matrix of `adapter_name` (default: the active adapter) was fitted.

        A new adapter's matrix is all zeros until :func:`~peft_cc.fit_transform_matrix` stores a fit; a least-squares
        fit is never exactly zero.
        """
        return bool(torch.any(self.transform_matrix(adapter_name)))

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

    def require_fitted_transform_matrix(self, adapter_name: str | None = None) -> torch.Tensor:
        """The `[d, d]` Transform Matrix of `adapter_name` (default: the active adapter), or an error that says how
        to fit it.

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

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, CCModel):  # a loaded Decision Maker has its trained weights: nothing to initialise
            tuner._decision_makers_to_initialize.discard(adapter_name)
        expected = {key: tensor.shape for key, tensor in model.state_dict().items() if _belongs_to(key, adapter_name)}
        _check_checkpoint_fits(adapter_name, expected, remapped)
        return remapped


def _belongs_to(key: str, adapter_name: str) -> bool:
    """Whether a model state-dict key is a parameter of CC-Tuning adapter `adapter_name` (LoRA or connection)."""
    return _is_adapter_weight(key) and (f".{adapter_name}." in key or key.endswith(f".{adapter_name}"))


def _is_adapter_weight(key: str) -> bool:
    """Whether a state-dict key names a LoRA or connection weight (of any adapter, or of a module a model lacks)."""
    return "lora_" in key or DECISION_MAKER_KEY in key or TRANSFORM_MATRIX_KEY in key


def _check_checkpoint_fits(
    adapter_name: str, expected: dict[str, torch.Size], checkpoint: dict[str, torch.Tensor]
) -> None:
    """Refuse a checkpoint made for another base model: missing or extra adapter weights, or other shapes.

    Args:
        expected: this model's adapter keys and shapes.
        checkpoint: the checkpoint's tensors, under this model's keys.
    """
    connection = [key for key in expected if DECISION_MAKER_KEY in key or TRANSFORM_MATRIX_KEY in key]
    missing = [key for key in connection if key not in checkpoint]
    if missing:
        raise ValueError(
            f"The checkpoint of adapter '{adapter_name}' has no `{missing[0]}`: it is not a complete CC-Tuning "
            "adapter (Decision Maker and Transform Matrix are missing)."
        )
    # Weights of modules this model lacks keep their checkpoint key (without the adapter name).
    unexpected = [key for key in checkpoint if _is_adapter_weight(key) and key not in expected]
    missing = [key for key in expected if key not in checkpoint]
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise ValueError(
            f"The CC-Tuning adapter '{adapter_name}' was trained for another base model: its checkpoint has "
            f"{len(unexpected)} adapter weights this model has no module for and lacks {len(missing)} this model "
            f"has (e.g. `{example}`). Load it onto the base model it was trained on (same depth and modules)."
        )
    shapes = {DECISION_MAKER_KEY: "[source layers, hidden size]", TRANSFORM_MATRIX_KEY: "[hidden size, hidden size]"}
    for key, shape in expected.items():
        if checkpoint[key].shape != shape:
            meaning = next((f" ({text})" for name, text in shapes.items() if name in key), "")
            raise ValueError(
                f"The CC-Tuning adapter '{adapter_name}' was trained for another base model: its `{key}` has "
                f"shape {tuple(checkpoint[key].shape)}, this model needs {tuple(shape)}{meaning}."
            )


def _as_keywords(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The inputs of a forward or generate call as keywords (`input_ids` may come first, positionally)."""
    if not args:
        return kwargs
    if len(args) > 1:
        raise TypeError(
            "Pass the inputs of a CC-Tuning model as keyword arguments (only `input_ids` may be positional)."
        )
    return {"input_ids": args[0], **kwargs}


def _anchors(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    anchor_positions: torch.Tensor | None,
) -> torch.Tensor:
    """`[B]` the anchor of each row (`-1`: none): `anchor_positions`, or the position before the first label."""
    seq_len = input_ids.shape[1]
    if anchor_positions is not None:
        return validate_anchors(anchor_positions.to(input_ids.device), attention_mask, seq_len)
    if labels is None:
        raise ValueError(
            "The CC-Tuning connection needs the anchor of each row: pass `labels` (the anchor is the position "
            "before the first label that is not -100) or `anchor_positions`."
        )
    return validate_anchors(anchors_from_labels(labels.to(input_ids.device)), attention_mask, seq_len)


@torch.no_grad()
def _row_losses(outputs: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
    """`[B]` float32 mean next-token cross-entropy of each row over its labels (0 for a row without any).

    Read from the per-token log-probabilities of TRL's fused LM head (`log_probs`, `label_mask`, `[B, T-1]`) when the
    output has them, otherwise from the `[B, T, V]` logits and the `[B, T]` labels (shifted here, -100 ignored).
    """
    log_probs = outputs.get("log_probs")
    if log_probs is not None:
        mask = outputs["label_mask"]
        return -log_probs.float().sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    logits = outputs.logits
    targets = labels[:, 1:].to(logits.device)
    supervised = targets != -100
    token_losses = nn.functional.cross_entropy(
        logits[:, :-1][supervised].float(), targets[supervised], reduction="none"
    )
    rows = supervised.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], device=logits.device).index_add_(0, rows, token_losses)
    return sums / supervised.sum(dim=1).clamp_min(1)
