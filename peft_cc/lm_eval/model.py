"""The `cc` model type of lm-evaluation-harness: a model with a CC-Tuning adapter, evaluated with its connection.

It is lm-eval's `hf` model (:class:`lm_eval.models.huggingface.HFLM`, same model arguments) plus:

- `connection`: how the adapter's cross-lingual connection applies (default: `monolingual` for a CC-Tuning
  adapter; a base model or another adapter has none):

  - `monolingual`: English activations simulated from the model's own with the fitted Transform Matrix (the
    deployment setting, where only the non-English prompt exists);
  - `bilingual`: the real English prompt of every document runs too (the training setting; an upper bound);
  - `off`: LoRA only.

- `english_field` (default `english_prompt`) and `prompt_field` (default `prompt`), for `bilingual`: the document
  fields that hold the English prompt and the prompt it translates. A request's English context is its context with
  the document's prompt replaced by the English one, so that it is templated exactly alike (chat template, system
  prompt, few-shot examples).

Where the connection applies, as in :meth:`peft_cc.CCModel.generate` and in training: at the last token of each
request's context (for a chat template, the newline that ends its generation prompt, which lm-eval moves into a
log-likelihood request's continuation; see :func:`context_end_in_continuation`). Log-likelihood requests run as
rows (context and continuation) aligned on their anchors, through
:meth:`peft_cc.CCModel.continuation_logits`: the contexts are prefilled once, recording what the
monolingual connection needs, and the anchors and continuations run on that cache with the connection, so a
connected score costs about what an unconnected one does and equals the log-likelihood that `CCModel` computes for
the continuation after that context (`CCModel.forward(..., anchor_positions=...)`). Generation runs
`generate(..., connection=...)`. Rolling log-likelihoods (perplexity tasks) have no context to anchor
the connection to: they run with `connection=off` only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..generation import CONNECTIONS, Connection
from ..model import CCModel


def resolve_connection(model: torch.nn.Module, connection: str | None) -> Connection | None:
    """The connection to evaluate `model` with: `connection`, by default `monolingual` for a CC-Tuning adapter.

    Returns:
        `None` for a model without a CC-Tuning adapter (a base model, a LoRA adapter).

    Raises:
        ValueError: an unknown connection; `monolingual` or `bilingual` for a model without a CC-Tuning adapter;
            `monolingual` with a Transform Matrix that was never fitted.
    """
    if connection is not None and connection not in CONNECTIONS:
        raise ValueError(f"`connection` must be one of {', '.join(CONNECTIONS)}, got {connection!r}.")
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, CCModel):
        if connection in ("monolingual", "bilingual"):
            raise ValueError(
                f"connection={connection} needs a CC-Tuning adapter; this model has none (give one with peft=...)."
            )
        return None
    connection = connection or "monolingual"
    if connection == "monolingual" and not tuner.is_transform_matrix_fitted():
        raise ValueError(
            "The monolingual connection needs the adapter's Transform Matrix, which was never fitted: fit it with "
            "`peft_cc.fit_transform_matrix` and save the adapter again, or evaluate with connection=bilingual (real "
            "English prompts) or connection=off (LoRA only)."
        )
    return connection


def english_context(context: str, doc: dict, prompt_field: str, english_field: str) -> str:
    """`context` with the document's prompt (its last occurrence) replaced by the document's English prompt.

    Raises:
        ValueError: the document lacks either field, or its prompt does not occur in `context`.
    """
    missing = [field for field in (prompt_field, english_field) if not isinstance(doc.get(field), str)]
    if missing:
        raise ValueError(
            f"The bilingual connection needs every document's prompt and its English version as text fields; this "
            f"document has no text field {' or '.join(map(repr, missing))} (its fields: {', '.join(doc)}). Name them "
            "with the model args prompt_field=... and english_field=..., or evaluate with connection=monolingual or "
            "connection=off."
        )
    prompt = doc[prompt_field]
    if prompt not in context:
        prompt = prompt.strip()
    if not prompt or prompt not in context:
        raise ValueError(
            f"The document's {prompt_field!r} does not occur in the request's context, so its English version cannot "
            f"take its place: the task's prompt (doc_to_text) must contain the field {prompt_field!r} verbatim."
        )
    head, _, tail = context.rpartition(prompt)
    return head + doc[english_field] + tail


@dataclass(frozen=True)
class _Row:
    """One forward row of log-likelihood scoring: its tokens, the anchor (last context token), the English context."""

    tokens: tuple[int, ...]
    anchor: int
    english: tuple[int, ...]


@register_model("cc")
class CCLM(HFLM):
    """lm-eval's `hf` model with a CC-Tuning adapter's connection (see the module docstring).

    Args:
        pretrained: the base model (Hub id or folder), or a loaded model (a `PeftModel` with a CC-Tuning adapter).
        connection: `monolingual`, `bilingual` or `off` (default: `monolingual` for a CC-Tuning adapter).
        english_field: the document field holding the English prompt (bilingual connection).
        prompt_field: the document field holding the prompt that `english_field` translates (bilingual connection).
        **kwargs: the arguments of lm-eval's `hf` model (`peft`, `dtype`, `tokenizer`, `batch_size`, `device`, ...).
    """

    def __init__(
        self,
        pretrained,
        connection: str | None = None,
        english_field: str = "english_prompt",
        prompt_field: str = "prompt",
        **kwargs,
    ) -> None:
        super().__init__(pretrained, **kwargs)
        self.connection = resolve_connection(self.model, connection)
        self.english_field = english_field
        self.prompt_field = prompt_field
        self._english_contexts: dict[str, str] = {}
        self._batch_contexts: list[str] = []

    # ------------------------------------------------------------------------------------------- requests

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._remember_english_contexts(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        self._remember_english_contexts(requests)
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        if self._connects:
            raise ValueError(
                "Rolling log-likelihoods (perplexity tasks) have no prompt whose last token could anchor the "
                f"connection; evaluate them with connection=off (this model has connection={self.connection})."
            )
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    @property
    def _connects(self) -> bool:
        return self.connection in ("monolingual", "bilingual")

    def _remember_english_contexts(self, requests: list[Instance]) -> None:
        """For the bilingual connection: the English context of every request's context (see the module docstring)."""
        self._english_contexts = {}
        if self.connection != "bilingual":
            return
        for request in requests:
            context = request.args[0]
            english = english_context(context, request.doc, self.prompt_field, self.english_field)
            if self._english_contexts.setdefault(context, english) != english:
                raise ValueError(
                    f"Two documents of {request.task_name} have the same context but different English prompts "
                    f"(field {self.english_field!r}); the bilingual connection needs one English prompt per context."
                )

    # ------------------------------------------------------------------------------------------- generation

    def tok_batch_encode(self, strings: list[str], *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        # generate_until encodes each batch of contexts here just before `_model_generate` runs it: the batch's
        # contexts name their English contexts there.
        self._batch_contexts = list(strings)
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """`generate` with the connection at the last token of every (left-padded) context row."""
        if self.connection is not None:
            generation_kwargs["connection"] = self.connection
        if self.connection == "bilingual":
            english = [self._english_contexts[text] for text in self._batch_contexts]
            english_ids, english_mask = super().tok_batch_encode(english, left_truncate_len=self.max_length)
            generation_kwargs["english_input_ids"] = english_ids.to(self.device)
            generation_kwargs["english_attention_mask"] = english_mask.to(self.device)
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # ------------------------------------------------------------------------------------------- log-likelihood

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str | None, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """`(log-likelihood, whether greedy)` of every request's continuation, with the connection at its context's
        last token. Requests with the same tokens and anchor share one forward row (the options of a
        multiple-choice question of one token each: one row)."""
        if not self._connects:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        requests_of_row: dict[_Row, list[int]] = defaultdict(list)
        before_anchor_of_row: dict[_Row, int] = defaultdict(int)  # how far before its anchor a continuation starts
        for index, request in enumerate(requests):
            row, continuation = self._row(request), request[2]
            if len(continuation) > len(row.tokens):
                raise ValueError(
                    f"A log-likelihood request's continuation ({len(continuation)} tokens) does not fit in the "
                    f"model's {self.max_length} tokens with its context: nothing to anchor the connection to."
                )
            requests_of_row[row].append(index)
            before_anchor = row.anchor - (len(row.tokens) - len(continuation))
            before_anchor_of_row[row] = max(before_anchor_of_row[row], before_anchor)
        rows = sorted(requests_of_row, key=lambda row: (-row.anchor, -len(row.tokens)))
        batch_size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 0)
        batch_size = batch_size or self._detect_batch_size()
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Connected log-likelihoods")
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            before_anchor = max(before_anchor_of_row[row] for row in batch)
            log_probs = self._connected_log_probs(batch, before_anchor)  # [B, before_anchor + T_after, V]
            for row_log_probs, row in zip(log_probs, batch):
                # the row's positions from `before_anchor` before its anchor on; its continuations end with it
                row_log_probs = row_log_probs[: before_anchor + len(row.tokens) - row.anchor]
                for index in requests_of_row[row]:
                    (request_strings, _, continuation) = requests[index]
                    results[index] = _continuation_score(row_log_probs, continuation)
                    if request_strings is not None:
                        self.cache_hook.add_partial("loglikelihood", request_strings, results[index])
                    progress.update(1)
        progress.close()
        return results

    def _row(self, request: tuple[tuple[str | None, str], list[int], list[int]]) -> _Row:
        """The forward row of a request: context and continuation but its last token, left-truncated to the model's
        length as lm-eval's `hf` model does; the anchor is the last token of the context (see
        :func:`context_end_in_continuation`)."""
        (context, _), context_ids, continuation_ids = request
        tokens = tuple((context_ids + continuation_ids)[-(self.max_length + 1) :][:-1])
        moved = context_end_in_continuation(self.tok_encode(context), context_ids, continuation_ids)
        english: tuple[int, ...] = ()
        if self.connection == "bilingual":
            english_text = self._english_contexts[context]
            english = tuple(self.tok_encode(english_text, left_truncate_len=self.max_length))
        return _Row(tokens, len(tokens) - len(continuation_ids) + moved, english)

    @torch.no_grad()
    def _connected_log_probs(self, rows: Sequence[_Row], before_anchor: int) -> torch.Tensor:
        """`[B, before_anchor + T_after, V]` log-probabilities of the rows' positions from `before_anchor` before
        their anchor on, with the connection at each row's anchor (`T_after`: the most positions from an anchor to
        its row's end). The rows are aligned on their anchors, so that their contexts share one prefill; where a row
        has fewer than `before_anchor` tokens before its anchor (at most the largest anchor), its first positions
        are padding."""
        anchor_column = max(row.anchor for row in rows)
        input_ids, attention_mask = self._pad([row.tokens for row in rows], [anchor_column - r.anchor for r in rows])
        inputs = {}
        if self.connection == "bilingual":
            english = [row.english for row in rows]
            inputs["english_input_ids"], inputs["english_attention_mask"] = self._pad(english, [0] * len(english))
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            logits = self.model.base_model.continuation_logits(
                input_ids,
                attention_mask,
                prompt_length=anchor_column + 1,
                connection=self.connection,
                earlier_positions=before_anchor,
                **inputs,
            )
        return F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)

    def _pad(self, rows: Sequence[Sequence[int]], offsets: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids` and `attention_mask`, `[B, T]` on the model's device, of token rows each starting at its
        offset (padding before and after it)."""
        width = max(offset + len(row) for row, offset in zip(rows, offsets))
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, (row, offset) in enumerate(zip(rows, offsets)):
            input_ids[index, offset : offset + len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, offset : offset + len(row)] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)


def context_end_in_continuation(
    full_context_ids: Sequence[int], context_ids: Sequence[int], continuation_ids: Sequence[int]
) -> int:
    """How many of the continuation's first tokens belong to the request's context.

    lm-eval moves the context's trailing white space into the continuation before it tokenises (`context_ids` lack
    it, `continuation_ids` start with it): with a chat template, the newline that ends the generation prompt. The
    connection's anchor is the last token of the whole context, as in :meth:`peft_cc.CCModel.generate` and in
    training, so it lies that many tokens into the continuation. Where the white space merged into a continuation
    token (`" Paris"`), no token ends where the context does and the anchor stays at the last token of `context_ids`.

    Args:
        full_context_ids: the tokens of the whole context (its trailing white space included), tokenised alone.
        context_ids, continuation_ids: lm-eval's split of the request.

    Returns:
        A count in `[0, len(continuation_ids) - 1]` (the last continuation token is never an anchor).
    """
    whole = [*context_ids, *continuation_ids]
    moved = len(full_context_ids) - len(context_ids)
    if moved <= 0 or whole[: len(full_context_ids)] != list(full_context_ids):
        return 0
    return min(moved, len(continuation_ids) - 1)


def _continuation_score(log_probs: torch.Tensor, continuation: Sequence[int]) -> tuple[float, bool]:
    """`(sum of the continuation's log-probabilities, whether each of its tokens is the arg-max)` from the `[T, V]`
    log-probabilities of its row, whose last `len(continuation)` positions predict it."""
    predicting = log_probs[-len(continuation) :]
    targets = torch.tensor(continuation, device=log_probs.device)
    score = predicting.gather(-1, targets[:, None]).sum()
    return float(score), bool((predicting.argmax(-1) == targets).all())
