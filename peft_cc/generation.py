"""Decoding with the cross-lingual connection, sharing the prompt's key-value cache: generation and scoring.

The connection changes the hidden states at the anchor (the last prompt token) and at no earlier position, so the
prompt is processed once:

1. prefill the whole prompt into a `DynamicCache`, without the connection, recording the FFN activations `u_l` at
   the anchor (the monolingual connection simulates the English ones from them, `ê_l = u_l T`);
2. roll the cache back by one position, dropping the anchor's keys and values;
3. run the anchor token again on that cache, with the chosen English activation added after the injection layer,
   followed by what comes after the prompt: :meth:`ConnectedDecodingMixin.generate` hands the cache to `generate`,
   whose first step is the anchor, and decodes on; :meth:`ConnectedDecodingMixin.continuation_logits` runs the anchor
   and a given continuation in one pass, for its log-likelihood.

The extra work over the same decoding without the connection is one token step. Where the cache cannot be rolled
back (a static or user-provided cache, or a model without dynamic caches), the functions recompute instead: a first
pass over the prompt records `u_l`, then the whole sequence runs again with the connection at the anchor. Both give
the results of the naive method (two full passes over the prompt).
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import DynamicCache
from transformers.utils import logging

from .anchors import position_ids_from_attention_mask

logger = logging.get_logger(__name__)

Connection = Literal["monolingual", "bilingual", "off"]
CONNECTIONS: tuple[str, ...] = Connection.__args__
_CACHE_KWARGS = ("cache", "past_key_values")


class ConnectedDecodingMixin:
    """Generation and continuation scoring with the cross-lingual connection, for :class:`~peft_cc.CCModel`.

    The methods use the tuner's `model`, `peft_config`, `connected_adapter()`, `connection()`, `source_layers()`,
    `english_activations()`, `connection_choice()`, `simulated_english_activations()` and
    `require_fitted_transform_matrix()`.
    """

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        english_input_ids: torch.LongTensor | None = None,
        english_attention_mask: torch.Tensor | None = None,
        connection: Connection | None = None,
        share_prompt_cache: bool = True,
        **kwargs,
    ) -> torch.LongTensor:
        """`generate` with the cross-lingual connection applied once, at the last prompt token of every row.

        Args:
            input_ids: `[B, T]` left-padded prompts (the anchor is the last position of every row), templated as in
                training: with a chat template, ending with its generation prompt.
            attention_mask: `[B, T]`; default all ones.
            english_input_ids: `[B, T_en]` English prompts for the bilingual connection.
            english_attention_mask: `[B, T_en]`.
            connection: `"monolingual"` (simulated English activations; needs a fitted Transform Matrix),
                `"bilingual"` (real English prompts), `"off"` (LoRA only). Default: bilingual when English prompts are
                given, else monolingual.
            share_prompt_cache: reuse the prompt's key-value cache (one extra token step). `False` recomputes: a first
                full pass over the prompt, then `generate` from scratch (the naive method; for comparisons).
            **kwargs: passed to `transformers.GenerationMixin.generate` (`max_new_tokens`, `do_sample`, `num_beams`,
                ...).

        Returns:
            What `generate` returns for these arguments.
        """
        if input_ids is None:
            raise ValueError("Generation with the CC-Tuning connection needs `input_ids`.")
        connection = _resolve_connection(connection, english_input_ids)
        adapter_name = self.connected_adapter()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if connection == "off" or adapter_name is None:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "Generation with the CC-Tuning connection needs left-padded prompts (the anchor is the last position "
                "of every row): set `tokenizer.padding_side = 'left'`."
            )
        self._warn_if_prompts_do_not_end_as_in_training(input_ids, adapter_name)
        cache, activations, _ = self._decoding_english_activations(
            adapter_name,
            input_ids,
            attention_mask,
            english_input_ids,
            english_attention_mask,
            share_prompt_cache and self._can_share_cache(kwargs),
        )
        expand = self._expand_size(kwargs)
        choice = self.connection_choice(activations.repeat_interleave(expand, dim=0), adapter_name)
        step_rows = torch.arange(input_ids.shape[0] * expand, device=input_ids.device)
        if cache is not None:
            if expand > 1:
                cache.batch_repeat_interleave(expand)
            kwargs["cache"] = cache
            step_anchor = 0  # the first step of generate runs the anchor token alone
        else:
            step_anchor = input_ids.shape[1] - 1  # the first step of generate runs the whole prompt
        step_anchors = torch.full_like(step_rows, step_anchor)
        injection_layer = self.peft_config[adapter_name].injection_layer
        with self.connection(adapter_name).injecting(
            injection_layer, step_rows, step_anchors, choice.vectors_for, first_pass_only=True
        ) as injection:
            outputs = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if not injection.applied:
            raise RuntimeError("generate() did not run the decoder, so the connection was not applied.")
        return outputs

    @torch.no_grad()
    def continuation_logits(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        prompt_length: int,
        english_input_ids: torch.LongTensor | None = None,
        english_attention_mask: torch.Tensor | None = None,
        connection: Connection | None = None,
        earlier_positions: int = 0,
    ) -> torch.Tensor:
        """The logits from the anchor on of prompts followed by continuations, with the connection at every anchor.

        Every row's prompt ends at column `prompt_length - 1` (its anchor): prompts left-padded to `prompt_length`
        columns, continuations after them, right-padded. The prompts are prefilled once into a key-value cache that
        the anchor and the continuations then run on (see the module docstring), so scoring a continuation costs
        about what it costs without the connection; the logits equal those of `CCModel`'s forward with
        `anchor_positions`.

        Args:
            input_ids: `[B, T]` prompts and continuations, laid out as above.
            attention_mask: `[B, T]`, 0 on the padding.
            prompt_length: the number of prompt columns (`1 <= prompt_length <= T`).
            english_input_ids, english_attention_mask, connection: as in :meth:`generate`.
            earlier_positions: also return the logits of this many positions before the anchor (unconnected: the
                connection changes nothing before the anchor), e.g. where a continuation starts inside the prompt.

        Returns:
            `[B, earlier_positions + T - prompt_length + 1, V]` logits of the columns from
            `prompt_length - 1 - earlier_positions` on.
        """
        connection = _resolve_connection(connection, english_input_ids)
        adapter_name = self.connected_adapter()
        anchor = prompt_length - 1
        if not 0 <= anchor - earlier_positions <= anchor < input_ids.shape[1]:
            raise ValueError(
                f"prompt_length={prompt_length} and earlier_positions={earlier_positions} must lie within the "
                f"{input_ids.shape[1]} columns of `input_ids`, and earlier_positions must not be negative."
            )
        if not bool(attention_mask[:, anchor].all()):
            raise ValueError(
                "Every row's prompt must end at column prompt_length - 1 (the anchor), which the attention mask "
                "leaves out of some rows: left-pad the prompts and right-pad the continuations."
            )
        position_ids = position_ids_from_attention_mask(attention_mask)
        keep = input_ids.shape[1] - anchor + earlier_positions
        if connection == "off" or adapter_name is None:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep
            ).logits
        cache, activations, earlier = self._decoding_english_activations(
            adapter_name,
            input_ids[:, :prompt_length],
            attention_mask[:, :prompt_length],
            english_input_ids,
            english_attention_mask,
            self.model._supports_default_dynamic_cache(),
            logits_to_keep=earlier_positions + 1,
        )
        choice = self.connection_choice(activations, adapter_name)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if cache is None:
            step_anchor, inputs = (
                anchor,
                {"input_ids": input_ids, "position_ids": position_ids, "logits_to_keep": keep},
            )
        else:
            step_anchor = 0  # the pass starts at the anchor
            inputs = {"input_ids": input_ids[:, anchor:], "position_ids": position_ids[:, anchor:], "cache": cache}
        injection_layer = self.peft_config[adapter_name].injection_layer
        with self.connection(adapter_name).injecting(
            injection_layer, rows, torch.full_like(rows, step_anchor), choice.vectors_for
        ) as injection:
            logits = self.model(attention_mask=attention_mask, **inputs).logits
        if not injection.applied:
            raise RuntimeError("The model did not run its decoder, so the connection was not applied.")
        if cache is None:
            return logits
        return torch.cat([earlier[:, :earlier_positions], logits], dim=1)

    def _warn_if_prompts_do_not_end_as_in_training(self, input_ids: torch.Tensor, adapter_name: str) -> None:
        """Warn once when a prompt does not end with the generation prompt that ended every training prompt."""
        ending = self.peft_config[adapter_name].generation_prompt_ids
        if not ending or input_ids.shape[1] < len(ending):
            ends_as_trained = not ending
        else:
            expected = torch.tensor(ending, device=input_ids.device)
            ends_as_trained = bool((input_ids[:, -len(ending) :] == expected).all())
        if not ends_as_trained:
            logger.warning_once(
                "A prompt given to generate() does not end with the chat template's generation prompt (token ids "
                f"{ending}), which ended every prompt this CC-Tuning adapter was trained on. The connection is "
                "applied at the last prompt token, so it now lands where training never put it, and the output may be "
                "unrelated to the prompt. Template prompts as in training: `tokenizer.apply_chat_template(messages, "
                "add_generation_prompt=True, return_tensors='pt', return_dict=True)`."
            )

    def _expand_size(self, kwargs: dict) -> int:
        """How many sequences `generate` makes of each input row (beams or returned sequences)."""
        config = kwargs.get("generation_config") or self.model.generation_config
        num_beams = kwargs.get("num_beams", config.num_beams) or 1
        num_return_sequences = kwargs.get("num_return_sequences", config.num_return_sequences) or 1
        return max(num_beams, num_return_sequences)

    def _can_share_cache(self, kwargs: dict) -> bool:
        """Whether `generate` would build a `DynamicCache` itself (the one this module can roll back)."""
        config = kwargs.get("generation_config") or self.model.generation_config
        return (
            not any(kwargs.get(name) is not None for name in _CACHE_KWARGS)
            and kwargs.get("use_cache", config.use_cache) is not False
            and kwargs.get("cache_implementation", config.cache_implementation) in (None, "dynamic")
            and self.model._supports_default_dynamic_cache()
        )

    def _prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int], logits_to_keep: int
    ) -> tuple[DynamicCache | None, torch.Tensor | None, torch.Tensor]:
        """Prefill the prompt into a rolled-back `DynamicCache`; return it (None if it cannot roll back), `u`, logits.

        Returns:
            `(cache, activations, logits)`: the cache of every position but the anchor, `[B, len(layers), d]` FFN
            activations at the anchor (the last position; `None` without layers), and the `[B, logits_to_keep, V]`
            logits of the last positions (without the connection).
        """
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        # Sliding-window layers (Gemma 3) can only roll back if they keep the past beyond their window.
        cache.activate_past_recording()
        position_ids = position_ids_from_attention_mask(attention_mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        anchors = torch.full_like(rows, input_ids.shape[1] - 1)
        with self.connection().capturing(rows, anchors, layers) as captured:
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
            ).logits
        activations = torch.stack([captured[layer] for layer in layers], dim=1) if layers else None
        try:
            cache.crop(-1)
        except (RuntimeError, ValueError):
            return None, activations, logits
        return cache, activations, logits

    def _decoding_english_activations(
        self,
        adapter_name: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        english_input_ids: torch.Tensor | None,
        english_attention_mask: torch.Tensor | None,
        share_cache: bool,
        logits_to_keep: int = 1,
    ) -> tuple[DynamicCache | None, torch.Tensor, torch.Tensor | None]:
        """`(cache, [B, S, d] English activations, logits)` of the prompts: the activations simulated from the prompt's
        own (monolingual, read during the prefill when the cache is shared) or real (bilingual). `cache` is the
        rolled-back prompt cache (`None` when it is not shared or cannot roll back) and `logits` the prefill's
        `[B, logits_to_keep, V]` last logits (`None` without a prefill)."""
        monolingual = english_input_ids is None
        if monolingual:
            self.require_fitted_transform_matrix(adapter_name)
        cache, prompt_activations, logits = None, None, None
        if share_cache:
            prompt_layers = self.source_layers(adapter_name) if monolingual else []
            cache, prompt_activations, logits = self._prefill(input_ids, attention_mask, prompt_layers, logits_to_keep)
        if prompt_activations is not None:
            return cache, self.simulated_english_activations(prompt_activations, adapter_name), logits
        anchors = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        rows, activations = self.english_activations(
            input_ids, attention_mask, anchors, english_input_ids, english_attention_mask, adapter_name
        )
        if len(rows) != input_ids.shape[0]:
            raise ValueError("Every row needs a non-empty English prompt for the bilingual connection.")
        return cache, activations, logits


def _resolve_connection(connection: Connection | None, english_input_ids: torch.Tensor | None) -> Connection:
    """The connection to apply (default: bilingual with English prompts, else monolingual), checked."""
    if connection is None:
        connection = "bilingual" if english_input_ids is not None else "monolingual"
    if connection not in CONNECTIONS:
        raise ValueError(f"`connection` must be 'monolingual', 'bilingual' or 'off', got {connection!r}.")
    if (connection == "bilingual") != (english_input_ids is not None):
        raise ValueError(
            "`english_input_ids` go with connection='bilingual' (and only with it): they give the real English "
            f"activations. Got connection={connection!r} with english_input_ids "
            f"{'given' if english_input_ids is not None else 'missing'}."
        )
    return connection
