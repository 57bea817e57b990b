"""Generation with the cross-lingual connection, sharing the prompt's key-value cache.

The connection changes the hidden states at the anchor (the last prompt token) and at no earlier position, so the
prompt is processed once:

1. prefill the whole prompt into a `DynamicCache`, without the connection, recording the FFN activations `u_l` at
   the anchor (the monolingual connection simulates the English ones from them, `ê_l = u_l T`);
2. roll the cache back by one position, dropping the anchor's keys and values;
3. hand the cache to `generate`, whose first step re-runs only the anchor token, with the chosen English activation
   added after the injection layer; decoding then goes on as usual.

The extra work over plain generation is one token step. Where the cache cannot be rolled back (a static or
user-provided cache, or a model without dynamic caches), :func:`generate_with_connection` recomputes instead: a
first pass over the prompt records `u_l`, then `generate` runs from scratch with the connection applied in its
prefill. Both give the tokens of the naive method (two full passes over the prompt, then plain decoding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from transformers import DynamicCache

from .anchors import position_ids_from_attention_mask

if TYPE_CHECKING:
    from .model import CCModel

Connection = Literal["monolingual", "bilingual", "off"]
_CACHE_KWARGS = ("cache", "past_key_values")


def _expand_size(cc_model: CCModel, kwargs: dict) -> int:
    """How many sequences `generate` makes of each input row (beams or returned sequences)."""
    config = kwargs.get("generation_config") or cc_model.model.generation_config
    num_beams = kwargs.get("num_beams", config.num_beams) or 1
    num_return_sequences = kwargs.get("num_return_sequences", config.num_return_sequences) or 1
    return max(num_beams, num_return_sequences)


def _can_share_cache(cc_model: CCModel, kwargs: dict) -> bool:
    """Whether `generate` would build a `DynamicCache` itself (the one this module can roll back)."""
    config = kwargs.get("generation_config") or cc_model.model.generation_config
    return (
        not any(kwargs.get(name) is not None for name in _CACHE_KWARGS)
        and kwargs.get("use_cache", config.use_cache) is not False
        and kwargs.get("cache_implementation", config.cache_implementation) in (None, "dynamic")
        and cc_model.model._supports_default_dynamic_cache()
    )


def _prefill(
    cc_model: CCModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int]
) -> tuple[DynamicCache | None, torch.Tensor]:
    """Prefill the prompt into a rolled-back `DynamicCache`; return it (None if it cannot roll back) and `u`.

    Returns:
        `(cache, activations)`: the cache of every position but the anchor, and `[B, len(layers), d]` FFN
        activations at the anchor (the last position).
    """
    model = cc_model.model
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    # Sliding-window layers (Gemma 3) can only roll back if they keep the past beyond their window.
    cache.activate_past_recording()
    position_ids = position_ids_from_attention_mask(attention_mask)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    anchors = torch.full_like(rows, input_ids.shape[1] - 1)
    with cc_model.connection().capturing(rows, anchors, layers) as captured:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    activations = torch.stack([captured[layer] for layer in layers], dim=1) if layers else None
    try:
        cache.crop(-1)
    except (RuntimeError, ValueError):
        return None, activations
    return cache, activations


@torch.no_grad()
def generate_with_connection(
    cc_model: CCModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    english_input_ids: torch.LongTensor | None = None,
    english_attention_mask: torch.Tensor | None = None,
    connection: Connection | None = None,
    share_prompt_cache: bool = True,
    **kwargs,
) -> torch.LongTensor:
    """`generate` with the cross-lingual connection applied once, at the last prompt token of every row.

    Args:
        cc_model: the CC-Tuning tuner (`peft_model.base_model`).
        input_ids: `[B, T]` left-padded prompts (the anchor is the last position of every row).
        attention_mask: `[B, T]`; default all ones.
        english_input_ids: `[B, T_en]` English prompts for the bilingual connection.
        english_attention_mask: `[B, T_en]`.
        connection: `"monolingual"` (simulated English activations; needs a fitted Transform Matrix),
            `"bilingual"` (real English prompts), `"off"` (LoRA only). Default: bilingual when English prompts are
            given, else monolingual.
        share_prompt_cache: reuse the prompt's key-value cache (one extra token step). `False` recomputes: a first
            full pass over the prompt, then `generate` from scratch (the naive method; for comparisons).
        **kwargs: passed to `generate` (`max_new_tokens`, `do_sample`, `num_beams`, ...).

    Returns:
        What `generate` returns for these arguments.
    """
    connection = _resolve_connection(connection, english_input_ids)
    adapter_name = cc_model.connected_adapter()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if connection == "off" or adapter_name is None:
        return cc_model.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "Generation with the CC-Tuning connection needs left-padded prompts (the anchor is the last position of "
            "every row): set `tokenizer.padding_side = 'left'`."
        )
    cache, activations = _english_activations(
        cc_model,
        adapter_name,
        input_ids,
        attention_mask,
        english_input_ids,
        english_attention_mask,
        share_prompt_cache and _can_share_cache(cc_model, kwargs),
    )
    config = cc_model.peft_config[adapter_name]
    expand = _expand_size(cc_model, kwargs)
    choice = cc_model.connection_choice(activations.repeat_interleave(expand, dim=0), adapter_name)
    step_rows = torch.arange(input_ids.shape[0] * expand, device=input_ids.device)
    if cache is not None:
        if expand > 1:
            cache.batch_repeat_interleave(expand)
        kwargs["cache"] = cache
        step_anchor = 0  # the first step of generate runs the anchor token alone
    else:
        step_anchor = input_ids.shape[1] - 1  # the first step of generate runs the whole prompt
    step_anchors = torch.full_like(step_rows, step_anchor)
    with cc_model.connection(adapter_name).injecting(
        config.injection_layer, step_rows, step_anchors, choice.vectors_for, first_pass_only=True
    ) as injection:
        outputs = cc_model.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if not injection.applied:
        raise RuntimeError("generate() did not run the decoder, so the connection was not applied.")
    return outputs


def _resolve_connection(connection: Connection | None, english_input_ids: torch.Tensor | None) -> Connection:
    """The connection to apply (default: bilingual with English prompts, else monolingual), checked."""
    if connection is None:
        connection = "bilingual" if english_input_ids is not None else "monolingual"
    if connection not in ("monolingual", "bilingual", "off"):
        raise ValueError(f"`connection` must be 'monolingual', 'bilingual' or 'off', got {connection!r}.")
    if (connection == "bilingual") != (english_input_ids is not None):
        raise ValueError(
            "`english_input_ids` go with connection='bilingual' (and only with it): they give the real English "
            f"activations. Got connection={connection!r} with english_input_ids "
            f"{'given' if english_input_ids is not None else 'missing'}."
        )
    return connection


def _english_activations(
    cc_model: CCModel,
    adapter_name: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    english_input_ids: torch.Tensor | None,
    english_attention_mask: torch.Tensor | None,
    share_cache: bool,
) -> tuple[DynamicCache | None, torch.Tensor]:
    """`(cache, [B, S, d] English activations)` of the prompts: simulated from the prompt's own (monolingual, read
    during the prefill when the cache is shared) or real (bilingual). `cache` is the rolled-back prompt cache, or
    `None` when it is not shared."""
    monolingual = english_input_ids is None
    if monolingual:
        cc_model.require_fitted_transform_matrix(adapter_name)
    cache, prompt_activations = None, None
    if share_cache:
        prompt_layers = cc_model.source_layers(adapter_name) if monolingual else []
        cache, prompt_activations = _prefill(cc_model, input_ids, attention_mask, prompt_layers)
    if prompt_activations is not None:
        return cache, cc_model.simulated_english_activations(prompt_activations, adapter_name)
    anchors = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    rows, activations = cc_model.english_activations(
        input_ids, attention_mask, anchors, english_input_ids, english_attention_mask, adapter_name
    )
    if len(rows) != input_ids.shape[0]:
        raise ValueError("Every row needs a non-empty English prompt for the bilingual connection.")
    return cache, activations
