"""The cross-lingual connection: capturing FFN activations at the anchor, and injecting one into the residual stream.

:class:`CrossLingualConnection` puts three kinds of forward hooks on a decoder, all inert until a context
manager arms them for one forward pass:

- on the FFN-output module of every layer, :meth:`~CrossLingualConnection.capturing` records `f_l(x, a(x))`, the
  FFN contribution at each row's anchor (used on the English prompt, and on the non-English prompt at inference);
- on the first decoder layer (pre-hook) and on the injection layer `k`,
  :meth:`~CrossLingualConnection.injecting` reads `h_in(x, a(x))`, asks the caller for the vector to inject (the
  Decision Maker's choice needs `h_in`), and adds it to the output of layer `k` at the anchor. No other position
  changes.

transformers checkpoints a decoder layer's `forward`, not its `__call__`, so the hooks on the layers themselves
run exactly once per forward, also under gradient checkpointing: the injected vector and its autograd graph are
built once. The capture hooks sit inside the checkpointed region; they are disarmed by the time a backward pass
recomputes a layer, so a recomputation records nothing (and their indexing saves no tensor, which the
non-reentrant checkpoint's consistency check requires).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .architecture import DecoderMap


@dataclass
class _Capture:
    positions: list[tuple[int, int]]  # (row, anchor) to record, as Python ints
    layers: frozenset[int]
    activations: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B', d]


@dataclass
class _Injection:
    layer: int
    rows: torch.Tensor  # [B'] rows to connect
    anchors: torch.Tensor  # [B'] anchor of each of those rows
    vector_for: Callable[[torch.Tensor], torch.Tensor]  # h_in [B', d] -> vectors [B', d]
    first_pass_only: bool = False
    first_layer_input: torch.Tensor | None = None
    applied: bool = False


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class CrossLingualConnection:
    """Hooks on one decoder that capture and inject FFN activations at anchors.

    Args:
        decoder: the layers and FFN-output modules to hook (see :func:`~peft_cc.architecture.map_decoder`).
    """

    def __init__(self, decoder: DecoderMap) -> None:
        self.decoder = decoder
        self._capture: _Capture | None = None
        self._injection: _Injection | None = None
        self._handles = [
            ffn.register_forward_hook(functools.partial(self._on_ffn_output, index))
            for index, ffn in enumerate(decoder.ffn_outputs)
        ]
        self._handles.append(decoder.layers[0].register_forward_pre_hook(self._on_first_layer_input, with_kwargs=True))
        self._handles += [
            layer.register_forward_hook(functools.partial(self._on_layer_output, index))
            for index, layer in enumerate(decoder.layers)
        ]

    def remove(self) -> None:
        """Remove every hook from the decoder."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def capturing(
        self,
        rows: torch.Tensor,
        anchors: torch.Tensor,
        layers: Sequence[int],
        with_autograd: bool = False,
    ) -> Iterator[dict[int, torch.Tensor]]:
        """Record the FFN contribution of `layers` at `(rows, anchors)` during the forward passes in this context.

        Args:
            rows: `[B']` batch rows to record.
            anchors: `[B']` position to record in each of those rows.
            layers: layer indices to record.
            with_autograd: keep the recorded activations in the autograd graph. Gradient checkpointing of the
                reentrant kind runs the first forward without autograd; in this context it is switched to the
                non-reentrant kind, which records the graph.

        Yields:
            A dict filled during the forward pass: layer index -> `[B', d]` activation (model dtype).
        """
        if self._capture is not None:
            raise RuntimeError("CrossLingualConnection.capturing() is already active.")
        positions = list(zip(rows.tolist(), anchors.tolist()))
        self._capture = _Capture(positions=positions, layers=frozenset(layers))
        checkpointing = non_reentrant_checkpointing(self.decoder.layers) if with_autograd else nullcontext()
        try:
            with checkpointing:
                yield self._capture.activations
        finally:
            self._capture = None

    @contextmanager
    def injecting(
        self,
        layer: int,
        rows: torch.Tensor,
        anchors: torch.Tensor,
        vector_for: Callable[[torch.Tensor], torch.Tensor],
        first_pass_only: bool = False,
    ) -> Iterator[_Injection]:
        """Add a vector to the output of decoder layer `layer` at `(rows, anchors)` during the forward pass.

        Args:
            layer: index `k` of the decoder layer after which to inject.
            rows: `[B']` batch rows to connect.
            anchors: `[B']` anchor position of each of those rows.
            vector_for: called once per forward pass with `h_in` at the anchors (`[B', d]`, the hidden state entering
                the first decoder layer); returns the `[B', d]` vectors to add.
            first_pass_only: disarm after the first forward pass (generation: only the prompt's pass is connected).

        Yields:
            The injection; its `applied` attribute tells whether a forward pass received it.
        """
        if self._injection is not None:
            raise RuntimeError("CrossLingualConnection.injecting() is already active.")
        self._injection = _Injection(
            layer=layer, rows=rows, anchors=anchors, vector_for=vector_for, first_pass_only=first_pass_only
        )
        try:
            yield self._injection
        finally:
            self._injection = None

    def _on_ffn_output(self, index: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        capture = self._capture
        if capture is not None and index in capture.layers and capture.positions:
            # Integer indexing saves no tensor for backward, so a checkpointed layer whose recomputation records
            # nothing still saves the same tensors as its first forward.
            capture.activations[index] = torch.stack([output[row, anchor] for row, anchor in capture.positions])

    def _on_first_layer_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        injection = self._injection
        if injection is not None:
            injection.first_layer_input = _hidden_states(args, kwargs)[injection.rows, injection.anchors]

    def _on_layer_output(self, index: int, module: nn.Module, args: tuple, output):
        injection = self._injection
        if injection is None or index != injection.layer:
            return None
        if injection.first_layer_input is None:
            raise RuntimeError("The first decoder layer did not run before the injection layer.")
        hidden = output[0] if isinstance(output, tuple) else output
        vectors = injection.vector_for(injection.first_layer_input).to(hidden.dtype)
        hidden = hidden.index_put((injection.rows, injection.anchors), vectors, accumulate=True)
        injection.applied = True
        if injection.first_pass_only:
            self._injection = None
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def non_reentrant_checkpointing(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Switch the layers' gradient checkpointing to the non-reentrant kind for the duration of the context."""
    saved = {}
    for layer in layers:
        function = getattr(layer, "_gradient_checkpointing_func", None)
        if not getattr(layer, "gradient_checkpointing", False) or function is None:
            continue
        keywords = dict(getattr(function, "keywords", {}))
        if keywords.get("use_reentrant") is False:
            continue
        saved[layer] = function
        base = function.func if isinstance(function, functools.partial) else checkpoint
        layer._gradient_checkpointing_func = functools.partial(base, **{**keywords, "use_reentrant": False})
    try:
        yield
    finally:
        for layer, function in saved.items():
            layer._gradient_checkpointing_func = function
