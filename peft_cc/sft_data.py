"""The data of CC-Tuning's supervised fine-tuning: the English prompt of every row, next to TRL's data.

- [`check_datasets`]: refuses, before anything is loaded or tokenized, data that cannot be connected;
- [`tokenize_english_prompts`]: the column `english_input_ids`, each English prompt tokenized exactly as TRL
  tokenizes the prompt of its row;
- [`DataCollatorForCCLanguageModeling`]: TRL's collator plus the English prompts;
- [`training_pairs`]: `(prompt, English prompt)` token ids of prepared training rows, for the Transform Matrix fit;
- [`generation_prompt_ids`]: the chat template's generation prompt that ends every prompt, where the anchor is.
"""

from __future__ import annotations

import itertools
import json
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import get_dataset_column_names
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import pad

from .anchors import anchors_from_labels
from .sft_config import CCSFTConfig

ENGLISH_INPUT_IDS = "english_input_ids"
ENGLISH_ATTENTION_MASK = "english_attention_mask"


@dataclass
class DataCollatorForCCLanguageModeling(DataCollatorForLanguageModeling):
    """TRL's language-modeling collator plus the English prompts of CC-Tuning.

    Each example holds `input_ids`, `labels` (-100 on the prompt) and `english_input_ids` (the tokenized English
    prompt, possibly empty). `input_ids`, `attention_mask` and `labels` are collated as by
    [`trl.trainer.sft_trainer.DataCollatorForLanguageModeling`] (right padding, -100 on padded labels), so that every
    row keeps its own anchor: the position just before its first label. The English prompts are right-padded
    separately. Padding-free collation is refused.

    Returns (from a list of `B` examples):

    - `input_ids`, `attention_mask`, `labels`: `[B, T]`;
    - `english_input_ids`, `english_attention_mask`: `[B, T_en]` (`T_en >= 1`; a row with an empty English prompt is
      all padding, and the model leaves it unconnected).

    Args:
        pad_token_id (`int`):
            Token id used to pad both the sequences and the English prompts.
        padding_free (`bool`, *optional*, defaults to `False`):
            Must be `False`: CC-Tuning needs one anchor per row.
        return_position_ids (`bool`, *optional*, defaults to `False`):
            As in the parent class.
        pad_to_multiple_of (`int`, *optional*):
            If set, both `T` and `T_en` are padded to a multiple of this value.
        return_tensors (`str`, *optional*, defaults to `"pt"`):
            Only `"pt"` is supported.

    Example:
    ```python
    >>> collator = DataCollatorForCCLanguageModeling(pad_token_id=0)
    >>> collator([
    ...     {"input_ids": [5, 6, 7], "labels": [-100, -100, 7], "english_input_ids": [8, 9]},
    ...     {"input_ids": [5, 7], "labels": [-100, 7], "english_input_ids": [8, 9, 10]},
    ... ])
    {'input_ids': tensor([[5, 6, 7], [5, 7, 0]]),
     'labels': tensor([[-100, -100, 7], [-100, 7, -100]]),
     'attention_mask': tensor([[1, 1, 1], [1, 1, 0]]),
     'english_input_ids': tensor([[8, 9, 0], [8, 9, 10]]),
     'english_attention_mask': tensor([[1, 1, 0], [1, 1, 1]])}
    ```
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.padding_free:
            raise ValueError("CC-Tuning needs one anchor per row: padding-free collation is not supported.")
        missing = [index for index, example in enumerate(examples) if ENGLISH_INPUT_IDS not in example]
        if missing:
            raise KeyError(
                f"Examples {missing} have no `{ENGLISH_INPUT_IDS}`: CC-Tuning needs the tokenized English prompt of "
                "every example. Prepare the dataset with `CCSFTTrainer`, or add the column yourself."
            )
        english = [torch.as_tensor(example[ENGLISH_INPUT_IDS], dtype=torch.long).reshape(-1) for example in examples]
        output = super().torch_call([{k: v for k, v in ex.items() if k != ENGLISH_INPUT_IDS} for ex in examples])
        # A batch whose English prompts are all empty still gets one (padding) column: the model needs a width >= 1.
        widths = [max(1, len(ids)) for ids in english]
        output[ENGLISH_INPUT_IDS] = pad(
            [
                torch.cat([ids, ids.new_full((width - len(ids),), self.pad_token_id)])
                for ids, width in zip(english, widths)
            ],
            padding_value=self.pad_token_id,
            padding_side="right",
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        output[ENGLISH_ATTENTION_MASK] = pad(
            [
                torch.cat([torch.ones_like(ids), ids.new_zeros(width - len(ids))])
                for ids, width in zip(english, widths)
            ],
            padding_value=0,
            padding_side="right",
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        return output


def check_datasets(
    train_dataset: Dataset | IterableDataset | None,
    eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None,
    args: CCSFTConfig,
) -> None:
    """Check the columns (and the form of the first example) of the training and evaluation datasets.

    Raises:
        ValueError: for a missing training dataset, a dataset without the English prompt field, language-modeling
            data, an English prompt in another form than the prompt, images, or untokenized data with
            `skip_prepare_dataset`.
    """
    if train_dataset is None:
        raise ValueError("`train_dataset` is required")
    skip_prepare = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset", False))
    datasets = {"train": train_dataset}
    datasets.update(eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset})
    for name, dataset in datasets.items():
        if dataset is not None:
            _check_dataset(dataset, name, args, skip_prepare)


def _check_columns(columns: list[str], dataset_name: str, args: CCSFTConfig) -> None:
    field = args.english_prompt_field
    if "input_ids" in columns:
        raise ValueError(
            f"The {dataset_name} dataset is pre-tokenized (`input_ids`) but has no `{ENGLISH_INPUT_IDS}` column: add "
            "the token ids of each English prompt, templated like the prompt and ending with the generation prompt."
        )
    if "prompt" not in columns or "completion" not in columns:
        raise ValueError(
            f"The {dataset_name} dataset has the columns {columns}: CC-Tuning needs prompt-completion data (columns "
            f"`prompt`, `completion` and `{field}`, the English version of the prompt). Language-modeling data "
            "(`text` or `messages`) has no prompt to connect."
        )
    if field not in columns:
        raise ValueError(
            f"The {dataset_name} dataset has no `{field}` column (columns: {columns}). CC-Tuning needs the English "
            f"version of every prompt, in the same form as `prompt`. If your data has it under another name, name "
            f"that column: `--english_prompt_field NAME` (peft-cc sft) or `CCSFTConfig(english_prompt_field=...)`. "
            "To build the columns from parallel data (a table with an English column, parallel chats, two tables "
            "joined on an id), see examples/load_parallel_dataset.py. To train plain LoRA without English prompts, "
            "use `peft-cc sft --method lora`."
        )


def _check_dataset(dataset: Any, dataset_name: str, args: CCSFTConfig, skip_prepare: bool) -> None:
    """Check the columns (and the form of the first example) of a dataset before anything is tokenized."""
    if not isinstance(dataset, (Dataset, IterableDataset)):
        return  # TRL reports unsupported dataset types itself
    example = next(iter(dataset))
    columns = list(example.keys())
    if "image" in columns or "images" in columns:
        raise ValueError("CCSFTTrainer trains text-only causal language models; this dataset holds images.")
    if ENGLISH_INPUT_IDS in columns:
        return
    if skip_prepare:
        raise ValueError(
            f"With `skip_prepare_dataset=True` the {dataset_name} dataset must be tokenized already, with "
            f"`input_ids`, `labels` and `{ENGLISH_INPUT_IDS}`."
        )
    _check_columns(columns, dataset_name, args)
    field = args.english_prompt_field
    prompt_chat = _is_messages(example["prompt"])
    english_chat = _is_messages(example[field]) if example[field] else prompt_chat
    if prompt_chat != english_chat:
        forms = {True: "a list of messages", False: "a string"}
        raise ValueError(
            f"In the {dataset_name} dataset, `prompt` is {forms[prompt_chat]} but `{field}` is {forms[english_chat]}: "
            "the English prompt must have the same form as the prompt, so that it is templated the same way."
        )


def tokenize_english_prompts(
    dataset: Dataset | IterableDataset,
    processing_class: PreTrainedTokenizerBase,
    args: CCSFTConfig,
    chat_template: str | None,
    dataset_name: str,
) -> Dataset | IterableDataset:
    """Add the column `english_input_ids`: each English prompt tokenized as TRL tokenizes the prompt.

    Conversational prompts get the chat template with the generation prompt (the same template, tools and
    `chat_template_kwargs` as the prompt of the row); plain-text prompts are tokenized by `processing_class(text=...)`
    with its default special tokens, as TRL does. An English prompt longer than `max_length` is emptied: its row is
    not connected (and counted in `cc/unconnected_rows`), rather than connected at a token that is not the end of the
    prompt. A dataset that has the column already is returned as it is.
    """
    columns = get_dataset_column_names(dataset)
    if ENGLISH_INPUT_IDS in columns:
        return dataset
    _check_columns(columns, dataset_name, args)
    map_kwargs: dict[str, Any] = {}
    if isinstance(dataset, Dataset):  # IterableDataset.map takes neither `num_proc` nor `desc`
        map_kwargs["num_proc"] = args.dataset_num_proc
        map_kwargs["desc"] = f"Tokenizing the English prompts of the {dataset_name} dataset"
    dataset = dataset.map(
        _tokenize_english_prompt,
        fn_kwargs={
            "processing_class": processing_class,
            "field": args.english_prompt_field,
            "chat_template": chat_template,
            "max_length": args.max_length,
        },
        **map_kwargs,
    )
    if isinstance(dataset, Dataset):
        emptied = sum(1 for ids in dataset[ENGLISH_INPUT_IDS] if not ids)
        if emptied:
            warnings.warn(
                f"{emptied} of the {len(dataset)} English prompts of the {dataset_name} dataset are longer than "
                f"`max_length` ({args.max_length}) or empty: their rows are trained without the connection (and "
                "counted in `cc/unconnected_rows`). Raise `max_length` to connect them.",
                stacklevel=3,
            )
    return dataset


def _is_messages(value: Any) -> bool:
    """Whether a prompt is a list of chat messages (`role`/`content` or `from`/`value` dicts), not plain text."""
    return isinstance(value, list) and bool(value) and all(isinstance(message, dict) for message in value)


def _as_chatml(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with `from`/`value` keys renamed to `role`/`content` (as TRL converts the prompt)."""
    renamed = []
    for message in messages:
        message = dict(message)
        if "from" in message:
            message["role"] = message.pop("from")
        if "value" in message:
            message["content"] = message.pop("value")
        renamed.append(message)
    return renamed


def _tokenize_english_prompt(
    example: dict[str, Any],
    processing_class: PreTrainedTokenizerBase,
    field: str,
    chat_template: str | None,
    max_length: int | None,
) -> dict[str, list[int]]:
    """`{"english_input_ids": [...]}` for one example; mirrors how `SFTTrainer` tokenizes `example["prompt"]`."""
    english = example[field]
    if isinstance(english, list):  # conversational: the prompt's chat template, tools and kwargs, generation prompt
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        ids = processing_class.apply_chat_template(
            _as_chatml(english),
            tokenize=True,
            return_dict=True,
            add_generation_prompt=True,
            chat_template=chat_template,
            tools=tools,
            **example.get("chat_template_kwargs", {}),
        )["input_ids"]
    elif isinstance(
        english, str
    ):  # plain text: tokenized with the tokenizer's default special tokens, like the prompt
        ids = processing_class(text=english)["input_ids"]
    else:
        raise ValueError(f"`{field}` must be a string or a list of messages, got {type(english).__name__}.")
    ids = list(ids)
    if max_length is not None and len(ids) > max_length:
        ids = []
    return {ENGLISH_INPUT_IDS: ids}


def training_pairs(
    dataset: Dataset | IterableDataset, num_pairs: int, seed: int
) -> Iterator[tuple[list[int], list[int]]]:
    """`(prompt ids, English prompt ids)` of a seeded sample of `num_pairs` rows of a prepared training dataset.

    A [`~datasets.Dataset`] is sampled with `random.Random(seed)` (`min(num_pairs, len(dataset))` rows); of an
    iterable dataset, the first `num_pairs` rows are taken. The prompt is the row's `input_ids` up to its anchor (the
    position before its first label), as the model saw it in training; a row without an anchor gives an empty
    prompt, which the Transform Matrix fit skips (and counts).
    """
    if isinstance(dataset, Dataset):
        indices = random.Random(seed).sample(range(len(dataset)), min(num_pairs, len(dataset)))
        yield from _prompt_pairs(dataset.select(indices))
    else:
        yield from itertools.islice(_prompt_pairs(dataset), num_pairs)


def _prompt_pairs(dataset: Dataset | IterableDataset) -> Iterator[tuple[list[int], list[int]]]:
    """`(prompt ids, English prompt ids)` of each row of a prepared dataset, in order (see :func:`training_pairs`)."""
    rows = dataset.select_columns(["input_ids", "labels", ENGLISH_INPUT_IDS])
    for row in rows:
        anchor = int(anchors_from_labels(torch.tensor([row["labels"]]))[0])
        yield (list(row["input_ids"][: anchor + 1]) if anchor >= 0 else []), list(row[ENGLISH_INPUT_IDS])


def generation_prompt_ids(
    dataset: Dataset | IterableDataset, processing_class: PreTrainedTokenizerBase, chat_template: str | None = None
) -> list[int] | None:
    """The token ids of the chat template's generation prompt, where every prompt of the prepared `dataset` ends with
    them (conversational data; checked on its first 64 rows), else `None` (plain-text data, no chat template).

    The connection's anchor is the last of these tokens: :meth:`peft_cc.CCModel.generate` warns when a prompt does
    not end with them.
    """
    if not (chat_template or getattr(processing_class, "chat_template", None)):
        return None
    conversation = [{"role": "user", "content": "?"}]

    def templated(add_generation_prompt: bool) -> list[int]:
        return list(
            processing_class.apply_chat_template(
                conversation,
                tokenize=True,
                return_dict=True,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
            )["input_ids"]
        )

    without, with_prompt = templated(False), templated(True)
    if len(with_prompt) <= len(without) or with_prompt[: len(without)] != without:
        return None
    ending = with_prompt[len(without) :]
    prompts = [prompt for prompt, _ in itertools.islice(_prompt_pairs(dataset), 64) if prompt]
    if prompts and all(prompt[-len(ending) :] == ending for prompt in prompts):
        return ending
    return None
