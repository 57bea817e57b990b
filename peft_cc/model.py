"""The CC-Tuning tuner: LoRA plus the Decision Maker, the Transform Matrix and the cross-lingual connection.

Where the connection is injected: :meth:`CCModel.forward` (training and scoring) and
:class:`~peft_cc.generation.ConnectedDecodingMixin` (generation and continuation scoring) arm the adapter's hooks with
`CCModel.connection().injecting(...)`; :class:`peft_cc.connection.CrossLingualConnection` adds the chosen English
activation to the output of decoder layer `injection_layer`, at the anchor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
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
from .checkpoint import DECISION_MAKER_KEY, check_checkpoint_fits, is_weight_of
from .config import CCConfig
from .connection import CrossLingualConnection, non_reentrant_checkpointing
from .decision_maker import ConnectionChoice, DecisionMaker
from .generation import ConnectedDecodingMixin

CONNECTION_FIELDS = ("connected_rows", "layer_choice", "layer_logits")


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


@functools.cache
def _with_connection_fields(output_type: type[ModelOutput]) -> type[ModelOutput]:
    """`output_type` plus the fields of [`CCCausalLMOutputWithPast`] that say what the connection did."""
    fields = [(name, torch.Tensor | None, dataclasses.field(default=None)) for name in CONNECTION_FIELDS]
    return dataclasses.make_dataclass(f"CC{output_type.__name__}", fields, bases=(output_type,))


class CCModel(ConnectedDecodingMixin, LoraModel):
    """CC-Tuning (Cross-lingual Connection Tuning) on top of LoRA.

    Created by `peft.get_peft_model(model, CCConfig(...))` once `peft_cc` is imported. Next to LoRA it holds, per
    adapter, the Decision Maker (`cc_decision_maker`, `S×d`, trained) and the Transform Matrix (`cc_transform_matrix`,
    `d×d`, fitted after training, never trained by gradient), and its own hooks on the decoder (inert unless the
    adapter is active and a forward or `generate` arms them).

    A forward call given the English prompt does one whole CC-Tuning step::

        loss = model(
            input_ids=..., attention_mask=..., labels=..., english_input_ids=..., english_attention_mask=...
        ).loss

    It runs the English prompt through the decoder and records its FFN activations at the English anchor (the last
    token of `english_input_ids`), lets the Decision Maker pick one source layer per row, and runs the non-English
    sequence with that activation added to the residual stream after layer `injection_layer`, at the anchor (the
    last prompt token: just before the first supervised label, or `anchor_positions`).
    """

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._connections: dict[str, CrossLingualConnection] = {}
        self._connection_enabled = True
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
        init_std = getattr(self.model.config.get_text_config(), "initializer_range", 0.02)
        decision_maker = DecisionMaker(num_sources, decoder.hidden_size, init_std=init_std)
        # PEFT creates adapter weights on the meta device when it loads with low_cpu_mem_usage=True.
        decision_maker = (
            decision_maker.to_empty(device=device) if decision_maker.weight.is_meta else decision_maker.to(device)
        )
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

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {key: tensor.shape for key, tensor in model.state_dict().items() if is_weight_of(key, adapter_name)}
        check_checkpoint_fits(adapter_name, expected, remapped)
        return remapped

    # ------------------------------------------------------------------------------------------------ accessors

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

        When the connection runs, the output also holds `connected_rows`, `layer_choice` and `layer_logits` (see
        [`CCCausalLMOutputWithPast`]).

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
        # The layers run a second time with gradients when the English pass had them: reentrant checkpointing would
        # backpropagate this run on its own, so each parameter's gradient hook would fire twice in one backward, which
        # DeepSpeed ZeRO-3 refuses (and TRL forces reentrant checkpointing on PEFT models under ZeRO-3). Like the
        # English pass (`capturing`), this pass switches the layers to the non-reentrant kind.
        english_graph = english_input_ids is not None and config.english_gradients and torch.is_grad_enabled()
        layers = self.decoder(adapter_name).layers
        checkpointing = non_reentrant_checkpointing(layers) if english_graph else contextlib.nullcontext()
        # Even without a connectable row, the (empty) injection runs the Decision Maker, which keeps it in the
        # autograd graph with a zero gradient, as distributed data parallel expects of every trainable parameter.
        with self.connection(adapter_name).injecting(config.injection_layer, rows, anchors[rows], choice.vectors_for):
            with checkpointing:
                outputs = self.model(**kwargs)
        if not isinstance(outputs, ModelOutput):
            return outputs
        return _with_connection_facts(outputs, choice, rows, input_ids.shape[0])

    def _adapter_to_connect(
        self, english_input_ids: torch.Tensor | None, anchor_positions: torch.Tensor | None
    ) -> str | None:
        """The adapter whose connection this forward call applies, or `None` for the model with LoRA only."""
        adapter_name = self.connected_adapter()
        if adapter_name is None:
            return None
        if english_input_ids is None and self.training and torch.is_grad_enabled():
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
        """The Decision Maker's choice over `[B', S, d]` source activations: a hard Gumbel-Softmax sample in training
        mode, the arg-max in eval mode."""
        adapter_name = adapter_name or self.active_adapters[0]
        return ConnectionChoice(
            self.cc_decision_maker[adapter_name],
            source_activations,
            temperature=self.peft_config[adapter_name].gumbel_temperature,
            sample=self.training,
        )

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
        if not layers:
            dtype = self.model.get_input_embeddings().weight.dtype
            return torch.zeros(len(rows), 0, self.decoder().hidden_size, dtype=dtype, device=input_ids.device)
        placeholder = not len(rows)
        if placeholder:
            # No row to run: the decoder runs on one token all the same, and its activations are dropped (a slice of
            # no row, which backward still visits). Under FSDP2 and DeepSpeed ZeRO-3 every process must call the same
            # modules in the same order, since each call gathers the module's parameters with a collective.
            input_ids, attention_mask = input_ids[:1, :1], torch.ones_like(input_ids[:1, :1])
            rows = anchors = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        batch_rows = torch.arange(len(rows), device=rows.device)
        mask = attention_mask[rows]
        with torch.set_grad_enabled(with_autograd and torch.is_grad_enabled()):
            with self.connection().capturing(batch_rows, anchors, layers, with_autograd) as captured:
                self.model.get_decoder()(
                    input_ids=input_ids[rows],
                    attention_mask=mask,
                    position_ids=position_ids_from_attention_mask(mask),
                    use_cache=False,
                )
        if with_autograd and torch.is_grad_enabled():
            top = max(layers)
            _gather_before_backward(self.decoder().layers[top], captured[top])
        activations = torch.stack([captured[layer] for layer in layers], dim=1)
        return activations[:0] if placeholder else activations

    # ------------------------------------------------------------------------------------------------ Transform Matrix

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


def _gather_before_backward(layer: nn.Module, activation: torch.Tensor) -> None:
    """Under FSDP2, all-gather the parameters of `layer` again when the gradient of `activation`, an FFN activation
    captured inside it, arrives.

    FSDP2 (`fully_shard` on each decoder layer) re-gathers a layer's sharded parameters in backward when the gradient
    of the layer's output arrives. In the English pass, the gradient enters the top captured layer through its FFN
    output only (nothing reads that layer's output), so FSDP would run its backward on freed parameters. Layers below
    it get the gradient of their output first, from the layer above. The gather is FSDP's public `unshard`; FSDP's own
    post-backward hook reduces the gradients and reshards the layer afterwards, as after any backward of the layer.
    """
    if not activation.requires_grad or not torch.distributed.is_available():  # FSDP needs torch.distributed
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(layer, FSDPModule):
        activation.register_hook(lambda grad: layer.unshard())


def _with_connection_facts(
    outputs: ModelOutput, choice: ConnectionChoice, rows: torch.Tensor, batch_size: int
) -> ModelOutput:
    """`outputs` with what the connection did: `connected_rows`, `layer_choice` and `layer_logits` (a
    [`CCCausalLMOutputWithPast`] for a plain causal-LM output; the same keys added to another output type, e.g. TRL's
    fused LM head's)."""
    layer_choice, layer_logits = choice.per_row(rows, batch_size)
    connected = torch.zeros(batch_size, dtype=torch.bool, device=rows.device)
    connected[rows] = True
    facts = {"connected_rows": connected, "layer_choice": layer_choice, "layer_logits": layer_logits}
    if type(outputs) is CausalLMOutputWithPast:
        return CCCausalLMOutputWithPast(**outputs, **facts)
    # Another output type (e.g. TRL's fused LM head's): a subclass with these fields, since torch's pytree, through
    # which DDP passes the output, rebuilds an output from the fields of its type.
    return _with_connection_fields(type(outputs))(**outputs, **facts)


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
