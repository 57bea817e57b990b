"""Fitting the Transform Matrix: a least-squares map from non-English to English FFN activations.

After training, CC-Tuning learns one `d×d` matrix `T` that turns the model's FFN activation at the anchor of a
non-English prompt into an approximation of the activation the English version of the prompt would give, so that
the connection can be simulated when no English prompt is available (`ê_l = u_l T`). For `N` parallel prompt pairs
and every decoder layer `l = 0..L-1`, the rows `u = f_l(x, a(x))` and `v = f_l(x_en, a(x_en))` are stacked into
`U, V ∈ R^{N·L × d}` (one matrix shared by all layers) and `T = argmin ||U T − V||²`.

The reference solves this with `numpy.linalg.lstsq` on the stacked rows in memory. Here the normal equations
`(UᵀU + λI) T = UᵀV` are accumulated batch by batch in float64 (:class:`NormalEquations`), so memory is `O(d²)`
whatever `N`, and the rows are never stored. The same accumulator, filled with held-out pairs, gives the held-out
`R²` of the fit without storing those rows either.
"""

from __future__ import annotations

import itertools
import math
import numbers
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .anchors import last_token_anchors
from .least_squares import DEFAULT_RIDGE, NormalEquations
from .model import CCModel
from .tokenization import prompt_token_ids, right_pad

DEFAULT_HOLDOUT_FRACTION = 0.1

Prompt = Sequence[Mapping[str, Any]] | str | Sequence[int] | torch.Tensor


@dataclass
class _Counts:
    consumed: int = 0
    fitted: int = 0
    heldout: int = 0
    skipped: int = 0


def fit_transform_matrix(
    model: nn.Module,
    pairs: Iterable[tuple[Prompt, Prompt]],
    tokenizer: Any | None = None,
    *,
    batch_size: int = 8,
    max_pairs: int | None = None,
    ridge: float = DEFAULT_RIDGE,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    seed: int = 0,
    show_progress: bool = True,
    adapter_name: str | None = None,
) -> dict[str, Any]:
    """Fit the Transform Matrix of a trained CC-Tuning adapter on parallel prompts, and store it in the adapter.

    For each pair `(x, x_en)` the model (in eval mode, without gradients and without the connection, with the
    adapter's LoRA weights active) runs both prompts and records, for every decoder layer `l = 0..L-1`, the FFN
    activation at the anchor (the last prompt token): `u_l = f_l(x, a(x))`, `v_l = f_l(x_en, a(x_en))`, each a
    `[d]` vector in the units of the residual stream. All `N·L` rows are stacked into `U, V` `[N·L, d]` and

        T = argmin_T ||U T − V||² + λ ||T||²,  so that  ê = u @ T  (row vectors),

    one `[d, d]` matrix shared by all layers, solved from the normal equations accumulated batch by batch in float64
    (memory `O(d²)`, independent of `N`; no row is kept). `T` is written, as float32, into the adapter's
    `cc_transform_matrix` buffer in place; it is saved and loaded with the adapter.

    Args:
        model: the `PeftModel` of a CC-Tuning adapter (or its `CCModel`, `peft_model.base_model`).
        pairs: an iterable (a generator is fine: it is consumed lazily, at most `max_pairs` items) of
            `(non_english_prompt, english_prompt)`. Each prompt is one of

            - a list of chat messages (dicts with `role` and `content`): templated with
              `tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`;
            - a string: the already templated prompt text (ending with the generation prompt), tokenized with
              `tokenizer(text, add_special_tokens=False)` since the template already holds the special tokens;
            - a list (or 1-D integer tensor or numpy array) of token ids, used as they are.

            The anchor is the last token of the prompt. A pair in which either prompt is empty has no anchor: it is
            skipped and counted in `num_skipped_pairs`.
        tokenizer: needed for messages and strings; its pad token pads the batches (0 without a tokenizer or pad
            token; padding is masked, so its id does not matter).
        batch_size: pairs per forward pass (the non-English and the English prompts of a batch run as two
            right-padded passes).
        max_pairs: read at most this many pairs from `pairs` (skipped pairs included); `None` reads them all.
        ridge: ridge strength relative to the mean diagonal of `UᵀU`: `λ = ridge · tr(UᵀU) / d` is added to the
            diagonal. The default `1e-4` barely changes a well-posed fit and keeps an ill-conditioned one stable;
            `0` gives plain least squares (the reference's `numpy.linalg.lstsq`).
        holdout_fraction: fraction of the pairs kept out of the solve to measure `R²` on unseen pairs (in
            `[0, 1)`; `0` uses every pair and reports `r2_heldout=None`). The held-out pairs are drawn by pair index
            with `random.Random(seed)`, before the prompts are read: when the number of pairs is known (`len(pairs)`
            or `max_pairs`), exactly `max(1, round(fraction · n))` of them (at most `n − 1`, none if `n < 2`),
            otherwise each pair independently with probability `holdout_fraction`.
        seed: seed of the held-out split.
        show_progress: show a tqdm progress bar over the pairs.
        adapter_name: the adapter to fit (default: the active adapter). It must be the one active adapter, since
            the activations are those of the model with its LoRA weights.

    Returns:
        Statistics of the fit:

        - `num_pairs`: pairs used in the solve; `num_heldout_pairs`: pairs used for `R²` only;
          `num_skipped_pairs`: pairs without an anchor (an empty prompt);
        - `num_rows`: rows of the solve (`num_pairs · num_layers`); `num_heldout_rows`;
        - `r2_heldout`: `R² = 1 − SSE/SST` of `U T` against `V` over the held-out rows (`SST` around their mean),
          or `None` without held-out pairs; `r2_train`: the same over the rows of the solve;
        - `ridge`: the absolute `λ` added to the diagonal of `UᵀU`; `ridge_relative`: the `ridge` argument;
        - `hidden_size` (`d`), `num_layers` (`L`), `adapter_name`, `seconds` (wall-clock time of the whole fit).

    Raises:
        ValueError: for invalid arguments, a prompt given as messages or text without a tokenizer, a malformed pair
            (naming its index), or no usable pair to fit on.
        TypeError: for a prompt of an unsupported type (naming the pair index).
    """
    start = time.perf_counter()
    _check_fit_arguments(batch_size, max_pairs, ridge, holdout_fraction)
    tuner = _cc_tuner(model)
    adapter_name = _adapter_to_fit(tuner, adapter_name)
    with _eval_mode(model), torch.no_grad():
        fit, heldout, counts = _accumulate_pairs(
            tuner, adapter_name, pairs, tokenizer, batch_size, max_pairs, holdout_fraction, seed, show_progress
        )
    transform, lam = _solve(fit, counts, ridge, num_layers=tuner.decoder(adapter_name).num_layers)
    tuner.set_transform_matrix(transform, adapter_name)
    return {
        **_fit_statistics(counts, fit, heldout, transform),
        "ridge": lam,
        "ridge_relative": float(ridge),
        "hidden_size": fit.in_features,
        "num_layers": tuner.decoder(adapter_name).num_layers,
        "adapter_name": adapter_name,
        "seconds": time.perf_counter() - start,
    }


def _accumulate_pairs(
    tuner: CCModel,
    adapter_name: str,
    pairs: Iterable,
    tokenizer: Any | None,
    batch_size: int,
    max_pairs: int | None,
    holdout_fraction: float,
    seed: int,
    show_progress: bool,
) -> tuple[NormalEquations, NormalEquations, _Counts]:
    """The normal equations of the fitted pairs and of the held-out ones, and the counts of pairs read."""
    hidden_size = tuner.decoder(adapter_name).hidden_size
    device = tuner.model.get_input_embeddings().weight.device
    stats_device = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
    fit = NormalEquations(hidden_size, device=stats_device)
    heldout = NormalEquations(hidden_size, device=stats_device)
    total = _known_length(pairs, max_pairs)
    is_heldout = _holdout_split(total, holdout_fraction, seed)
    stream = pairs if max_pairs is None else itertools.islice(pairs, max_pairs)
    with tqdm(total=total, disable=not show_progress, desc="Fitting the Transform Matrix", unit="pair") as progress:
        counts = _accumulate(tuner, adapter_name, stream, tokenizer, batch_size, is_heldout, (fit, heldout), progress)
    return fit, heldout, counts


def _solve(fit: NormalEquations, counts: _Counts, ridge: float, num_layers: int) -> tuple[torch.Tensor, float]:
    """`(T, λ)` from the fitted pairs' normal equations; refuses a fit without pairs or with a non-finite result, and
    warns when there are fewer rows than `d` (the ridge then decides part of `T`)."""
    if counts.fitted == 0:
        raise ValueError(
            f"No pair to fit the Transform Matrix on: {counts.consumed} pairs read, {counts.skipped} skipped (an "
            f"empty prompt), {counts.heldout} held out."
        )
    hidden_size = fit.in_features
    if fit.num_rows < hidden_size:
        warnings.warn(
            f"Fitting the {hidden_size}×{hidden_size} Transform Matrix on only {fit.num_rows} rows ({counts.fitted} "
            f"pairs × {num_layers} layers): the problem is underdetermined and the ridge (or, with ridge=0, the "
            "minimum-norm choice) decides the rest. Use more pairs.",
            stacklevel=3,
        )
    transform, lam = fit.solve(ridge)
    if not torch.isfinite(transform).all():
        raise ValueError("The Transform Matrix fit is not finite (non-finite activations?); nothing was stored.")
    return transform, lam


def _fit_statistics(
    counts: _Counts, fit: NormalEquations, heldout: NormalEquations, transform: torch.Tensor
) -> dict[str, Any]:
    """The pairs and rows of a fit, and its `R²` on them and on the held-out ones (see `fit_transform_matrix`)."""
    return {
        "num_pairs": counts.fitted,
        "num_heldout_pairs": counts.heldout,
        "num_skipped_pairs": counts.skipped,
        "num_rows": fit.num_rows,
        "num_heldout_rows": heldout.num_rows,
        "r2_heldout": heldout.r_squared(transform),
        "r2_train": fit.r_squared(transform),
    }


def _check_fit_arguments(batch_size: Any, max_pairs: Any, ridge: Any, holdout_fraction: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 0):
        raise ValueError(f"`max_pairs` must be None or an int >= 0, got {max_pairs!r}.")
    if not isinstance(ridge, numbers.Real) or not ridge >= 0 or math.isinf(ridge):
        raise ValueError(f"`ridge` must be a finite number >= 0, got {ridge!r}.")
    if not isinstance(holdout_fraction, numbers.Real) or not 0 <= holdout_fraction < 1:
        raise ValueError(f"`holdout_fraction` must be in [0, 1), got {holdout_fraction!r}.")


def _accumulate(
    tuner: CCModel,
    adapter_name: str,
    stream: Iterable,
    tokenizer: Any | None,
    batch_size: int,
    is_heldout: Callable[[int], bool],
    targets: tuple[NormalEquations, NormalEquations],
    progress: tqdm,
) -> _Counts:
    """Run the pairs of `stream` through the model, batch by batch, and add each pair's `L` rows `(u_l, v_l)` to the
    fit's normal equations (`targets[0]`), or to the held-out ones (`targets[1]`) for a held-out pair."""
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = 0 if pad_id is None else int(pad_id)
    layers = list(range(tuner.decoder(adapter_name).num_layers))
    counts = _Counts()
    for batch in _batches(stream, batch_size):
        sources, englishes, held = [], [], []
        for index, pair in batch:
            source, english = _tokenize_pair(index, pair, tokenizer)
            if source and english:
                sources.append(source)
                englishes.append(english)
                held.append(is_heldout(index))
            else:
                counts.skipped += 1
        if sources:
            u = _anchor_activations(tuner, sources, layers, pad_id)  # [B', L, d]
            v = _anchor_activations(tuner, englishes, layers, pad_id)
            mask = torch.tensor(held, device=u.device)
            for target, rows in zip(targets, (~mask, mask)):
                if rows.any():
                    target.add(u[rows].flatten(0, 1), v[rows].flatten(0, 1))
        counts.consumed += len(batch)
        counts.heldout += sum(held)
        counts.fitted += len(held) - sum(held)
        progress.update(len(batch))
    return counts


def _cc_tuner(model: nn.Module) -> CCModel:
    tuner = model if isinstance(model, CCModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, CCModel):
        raise ValueError(
            f"fit_transform_matrix needs a CC-Tuning model (a PeftModel made with CCConfig, or its CCModel), got "
            f"{type(model).__name__}."
        )
    return tuner


def _adapter_to_fit(tuner: CCModel, adapter_name: str | None) -> str:
    active = list(tuner.active_adapters)
    if adapter_name is None:
        if len(active) != 1:
            raise ValueError(f"Pass `adapter_name`: the Transform Matrix is fitted for one adapter, active: {active}.")
        adapter_name = active[0]
    if adapter_name not in tuner.cc_transform_matrix:
        raise ValueError(f"Unknown CC-Tuning adapter {adapter_name!r}; adapters: {list(tuner.peft_config)}.")
    if active != [adapter_name]:
        raise ValueError(
            f"The Transform Matrix of adapter {adapter_name!r} must be fitted with that adapter active alone (the "
            f"activations depend on its LoRA weights); active: {active}. Call `model.set_adapter({adapter_name!r})` "
            "first."
        )
    if tuner.connected_adapter() is None:
        warnings.warn(
            "The adapters are disabled: the Transform Matrix is fitted on the activations of the base model, "
            "without the adapter's LoRA weights.",
            stacklevel=3,
        )
    return adapter_name


def _known_length(pairs: Iterable, max_pairs: int | None) -> int | None:
    """The number of pairs that will be read, when known without consuming `pairs` (`max_pairs` for a stream)."""
    try:
        length = len(pairs)  # type: ignore[arg-type]
    except TypeError:
        return max_pairs
    return length if max_pairs is None else min(length, max_pairs)


def _holdout_split(total: int | None, fraction: float, seed: int):
    """A function `pair index -> held out?`, decided by the seed and the index alone (not by the prompts)."""
    if fraction == 0:
        return lambda index: False
    if total is not None:
        count = 0 if total < 2 else min(total - 1, max(1, round(fraction * total)))
        return frozenset(random.Random(seed).sample(range(total), count)).__contains__
    # Unknown number of pairs: an independent seeded draw per pair index (string seeds are hashed deterministically).
    return lambda index: random.Random(f"{seed}:{index}").random() < fraction


def _batches(stream: Iterable, batch_size: int) -> Iterator[list[tuple[int, Any]]]:
    iterator = enumerate(stream)
    while batch := list(itertools.islice(iterator, batch_size)):
        yield batch


def _tokenize_pair(index: int, pair: Any, tokenizer: Any | None) -> tuple[list[int], list[int]]:
    if isinstance(pair, (str, bytes, Mapping)) or not isinstance(pair, Sequence) or len(pair) != 2:
        raise ValueError(
            f"Pair {index} must be a (non_english_prompt, english_prompt) tuple, got {type(pair).__name__}"
            + (f" of length {len(pair)}." if isinstance(pair, Sequence) else ".")
        )
    return (
        prompt_token_ids(pair[0], tokenizer, f"pair {index} (non-English prompt)"),
        prompt_token_ids(pair[1], tokenizer, f"pair {index} (English prompt)"),
    )


def _anchor_activations(tuner: CCModel, prompts: list[list[int]], layers: list[int], pad_id: int) -> torch.Tensor:
    """`[B, L, d]` FFN activations at the last token of each (non-empty) prompt, in the model's dtype."""
    device = tuner.model.get_input_embeddings().weight.device
    input_ids, attention_mask = (tensor.to(device) for tensor in right_pad(prompts, pad_id))
    anchors = last_token_anchors(attention_mask)
    rows = torch.arange(len(prompts), device=device)
    return tuner.anchor_activations(input_ids, attention_mask, rows, anchors, layers)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, and restore each one's own training flag afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
