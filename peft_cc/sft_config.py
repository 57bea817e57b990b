"""Configuration of the [`CCSFTTrainer`]: TRL's `SFTConfig` plus the options of CC-Tuning."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from trl import SFTConfig


@dataclass
class CCSFTConfig(SFTConfig):
    r"""
    Configuration class for the [`CCSFTTrainer`]: every [`trl.SFTConfig`] option, plus the options of CC-Tuning.

    The trainer trains on [prompt-completion](https://huggingface.co/docs/trl/dataset_formats#prompt-completion)
    data, plain text or conversational, in which every example also holds the English version of its prompt (in the
    column `english_prompt_field`, in the same form as `prompt`). Packing and padding-free batching are not supported:
    the cross-lingual connection needs one prompt, with one anchor, per row; nor are `completion_only_loss=False` and
    `label_smoothing_factor` (see [`check_supported_options`]).

    Parameters:
        > Parameters that control the data

        english_prompt_field (`str`, *optional*, defaults to `"prompt_en"`):
            Name of the column that holds the English version of each prompt, in the same form as `prompt`: a string
            for plain-text data, a list of messages for conversational data. It is tokenized like the prompt (the
            same chat template, with the generation prompt), into the column `english_input_ids`. A pre-tokenized
            dataset (with `input_ids`) must hold `english_input_ids` itself.

        > Parameters that control the Transform Matrix

        transform_pairs (`int`, *optional*, defaults to `1000`):
            How many training pairs (non-English prompt, English prompt) to fit the Transform Matrix on when training
            ends, sampled with `seed`; the paper uses 1000. `0` turns the fit off (fit it later with
            [`CCSFTTrainer.fit_transform_matrix`] or [`peft_cc.fit_transform_matrix`]).
        transform_batch_size (`int`, *optional*):
            Pairs per forward pass of the Transform Matrix fit. `None` uses `per_device_eval_batch_size`.

        > Parameters that control the training

        deterministic_gumbel_noise (`bool`, *optional*, defaults to `True`):
            Whether to draw the Decision Maker's Gumbel noise (and any dropout) of each micro-batch from torch's
            generator re-seeded with (`seed`, optimizer step, index of the micro-batch among the processes and
            accumulation steps of that step), inside a forked RNG state. The noise then depends only on where the
            micro-batch sits in the run, so a run resumed from a checkpoint, or the same global batch split over more
            processes and fewer accumulation steps, draws the same noise. `False` draws from torch's global generator
            as it stands.

        > Parameters that control the logging

        log_layer_frequencies (`bool`, *optional*, defaults to `True`):
            Whether training logs hold, next to the summary of the layer choice (`cc/choice_entropy`,
            `cc/most_chosen_layer`, ...), one key `cc/layer_frequency/<layer>` per candidate source layer: the fraction
            of the connected rows since the previous log whose Decision Maker chose that layer.
    """

    english_prompt_field: str = field(
        default="prompt_en",
        metadata={
            "help": "Name of the column that holds the English version of each prompt, in the same form as `prompt` "
            "(a string, or a list of messages for conversational data). It is tokenized like the prompt: the same "
            "chat template, with the generation prompt."
        },
    )
    transform_pairs: int = field(
        default=1000,
        metadata={
            "help": "How many training pairs to fit the Transform Matrix on when training ends (a seeded sample; the "
            "paper uses 1000). 0 turns the fit off."
        },
    )
    transform_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Pairs per forward pass of the Transform Matrix fit. None uses `per_device_eval_batch_size`."
        },
    )
    deterministic_gumbel_noise: bool = field(
        default=True,
        metadata={
            "help": "Whether to draw the Gumbel noise (and any dropout) of each micro-batch from torch's generator "
            "re-seeded with (seed, optimizer step, micro-batch index across processes and accumulation steps), in a "
            "forked RNG state, so that resuming from a checkpoint or splitting a global batch over processes draws "
            "the same noise. False draws from torch's global generator as it stands."
        },
    )
    log_layer_frequencies: bool = field(
        default=True,
        metadata={
            "help": "Whether training logs hold one key `cc/layer_frequency/<layer>` per candidate source layer (the "
            "fraction of connected rows whose Decision Maker chose it since the previous log)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.english_prompt_field, str) or not self.english_prompt_field:
            raise ValueError(
                f"`english_prompt_field` must be a non-empty column name, got {self.english_prompt_field!r}."
            )
        if not _is_int(self.transform_pairs):
            raise ValueError(f"`transform_pairs` must be an int >= 0, got {self.transform_pairs!r}.")
        if self.transform_pairs < 0:
            raise ValueError(f"`transform_pairs` must be >= 0 (0 turns the fit off), got {self.transform_pairs}.")
        if self.transform_batch_size is not None and (
            not _is_int(self.transform_batch_size) or self.transform_batch_size < 1
        ):
            raise ValueError(f"`transform_batch_size` must be None or an int >= 1, got {self.transform_batch_size!r}.")
        check_supported_options(self)


def _is_int(value: Any) -> bool:
    """An integer, and not a bool (which Python counts as one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Why `label_smoothing_factor` and `compute_loss_func` are refused.
REPLACED_LOSS = (
    "TRL computes that loss from a second forward call without the labels, from which the CC-Tuning connection "
    "finds its anchors and the Decision Maker its reward, and whose layer choice is another sample than the one the "
    "logged statistics count. Use `loss_type` ('nll' or 'dft'), or subclass CCSFTTrainer and override `compute_loss`."
)


def check_supported_options(args: SFTConfig) -> None:
    """Refuse the TRL options that break CC-Tuning's one anchor per row, or its loss.

    Raises:
        ValueError: for `packing`, `eval_packing`, `padding_free`, `completion_only_loss=False` or
            `label_smoothing_factor`.
    """
    for name in ("packing", "eval_packing", "padding_free"):
        if getattr(args, name, None):
            raise ValueError(
                f"CC-Tuning does not support `{name}=True`. The cross-lingual connection is applied at the last "
                "prompt token of each row, with the English version of that row's prompt; packing several examples "
                "into one row, or flattening a batch into one sequence (padding-free), leaves no single anchor per "
                f"row. Set `{name}=False`."
            )
    if args.completion_only_loss is False:
        raise ValueError(
            "CC-Tuning needs `completion_only_loss` (None or True): the connection is applied at the last prompt "
            "token, which the model finds as the position before the first label; with a loss on the prompt it "
            "would find none."
        )
    if args.label_smoothing_factor > 0:
        raise ValueError(f"`label_smoothing_factor` is not supported: {REPLACED_LOSS}")


def as_cc_sft_config(args: TrainingArguments | None, model: Any) -> CCSFTConfig:
    """`args` as a `CCSFTConfig`: the CC-Tuning defaults added to a `SFTConfig` or `TrainingArguments`, or, for `None`,
    the defaults with `output_dir` named after `model` (a model id or a model)."""
    if isinstance(args, CCSFTConfig):
        return args
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model") or "model"
        return CCSFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-CC")
    # The values as set (`to_dict` would hide every `*_token` field, `eos_token` and `pad_token` included).
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(args) if field.init}
    return CCSFTConfig(**{key: value for key, value in values.items() if key in CCSFTConfig.__dataclass_fields__})
