"""CC-Tuning as a TRL trainer: supervised fine-tuning on multilingual prompt-completion data with English prompts.

[`CCSFTTrainer`] is a [`trl.SFTTrainer`] for a model with a CC-Tuning adapter (`peft_config=CCConfig(...)`, or a
`PeftModel` made with one). Every training example is a prompt-completion pair whose dataset row also holds the
English version of the prompt (the column `CCSFTConfig.english_prompt_field`). The trainer

- tokenizes the English prompt exactly like TRL tokenizes the prompt (the same chat template and generation prompt
  for conversational data, the same special tokens for plain text) into the column `english_input_ids`, which TRL's
  column pruning keeps;
- collates it with [`DataCollatorForCCLanguageModeling`] (right padding, `english_attention_mask`) and passes it to
  the model in the same forward call as the non-English sequence, so that the whole CC-Tuning step is one forward of
  the (possibly DDP-wrapped) model; the loss is the completion-only causal-LM loss of the non-English sequence;
- logs, with the usual Trainer logging, how often each source layer was chosen and how many rows could not be
  connected (`cc/...` keys);
- fits the Transform Matrix on a seeded sample of training pairs when training ends, so that `save_model()` and
  `push_to_hub()` store a ready-to-use adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import random
import textwrap
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from datasets import Dataset, IterableDataset
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments
from transformers.trainer_utils import EvalPrediction
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer
from trl.data_utils import get_dataset_column_names
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import pad

from .anchors import anchors_from_labels
from .config import CCConfig
from .model import DECISION_MAKER_KEY, CCCausalLMOutputWithPast, CCModel
from .model_card import write_model_card
from .sft_config import CCSFTConfig, unsupported_batching
from .transform_matrix import fit_transform_matrix

logger = logging.get_logger(__name__)

ENGLISH_INPUT_IDS = "english_input_ids"
ENGLISH_ATTENTION_MASK = "english_attention_mask"
LOG_PREFIX = "cc/"

_CITATION = textwrap.dedent("""\
    @inproceedings{ye2025cctuning,
        title        = {{CC-Tuning: A Cross-Lingual Connection Mechanism for Improving Joint Multilingual Supervised
                         Fine-Tuning}},
        author       = {Yangfan Ye and Xiaocheng Feng and Zekun Yuan and Xiachong Feng and Libo Qin and Lei Huang and
                        Weitao Ma and Yichong Huang and Zhirui Zhang and Yunfei Lu and Xiaohui Yan and Duyu Tang and
                        Dandan Tu and Bing Qin},
        year         = 2025,
        booktitle    = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics
                        (Volume 1: Long Papers)},
        url          = {https://aclanthology.org/2025.acl-long.933/},
    }""")


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


def _per_layer_logs(name: str, values: dict[int, float]) -> dict[str, float]:
    """`cc/<name>/<layer>` for each layer's value, the layer zero-padded to the widest (`07`) so that the keys sort."""
    width = len(str(max(values)))
    return {f"{LOG_PREFIX}{name}/{layer:0{width}d}": value for layer, value in values.items()}


class _ConnectionStatistics:
    """Per-log-window counts of the Decision Maker's choices, summed over processes.

    Holds one float64 vector: `[S]` choices per candidate source layer, then the number of unconnected rows, of
    connected rows, and the sum over connected rows of the entropy (nats) of the Decision Maker's softmax.
    """

    def __init__(self, source_layers: list[int]) -> None:
        self.source_layers = list(source_layers)
        self.counts = torch.zeros(len(self.source_layers) + 3, dtype=torch.float64)

    def batch_counts(self, outputs: CCCausalLMOutputWithPast) -> torch.Tensor:
        """`[S + 3]` float32 counts of one forward output (on the output's device, to be reduced over processes)."""
        connected = outputs.connected_rows
        choice = outputs.layer_choice[connected].float()  # [B', S] one-hot
        logits = outputs.layer_logits[connected].float()  # [B', S]
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum()
        extra = torch.stack([(~connected).sum().float(), connected.sum().float(), entropy])
        return torch.cat([choice.sum(dim=0), extra])

    def add(self, counts: torch.Tensor) -> None:
        self.counts += counts.detach().to("cpu", torch.float64)

    @property
    def num_rows(self) -> int:
        return int(self.counts[-3] + self.counts[-2])

    def summary(self, per_layer: bool) -> dict[str, float]:
        """The `cc/...` log entries of the window (see docs/training.md), then reset."""
        per_source = self.counts[: len(self.source_layers)]
        unconnected, connected, entropy_sum = (float(value) for value in self.counts[-3:])
        logs = {f"{LOG_PREFIX}unconnected_rows": unconnected}
        if connected > 0:
            frequency = per_source / connected
            nonzero = frequency[frequency > 0]
            logs[f"{LOG_PREFIX}choice_entropy"] = float(-(nonzero * nonzero.log()).sum())
            logs[f"{LOG_PREFIX}decision_entropy"] = entropy_sum / connected
            most = int(per_source.argmax())
            logs[f"{LOG_PREFIX}most_chosen_layer"] = self.source_layers[most]
            logs[f"{LOG_PREFIX}most_chosen_frequency"] = float(frequency[most])
            if per_layer:
                logs.update(_per_layer_logs("layer_frequency", dict(zip(self.source_layers, frequency.tolist()))))
        self.counts.zero_()
        return logs


class CCSFTTrainer(SFTTrainer):
    """
    Trainer for CC-Tuning (Cross-lingual Connection Tuning, ACL 2025): supervised fine-tuning with paired English
    prompts.

    A [`trl.SFTTrainer`] whose model carries a CC-Tuning adapter, used like its parent:

    ```python
    >>> import peft_cc
    >>> from datasets import Dataset

    >>> dataset = Dataset.from_list([
    ...     {"prompt": [{"role": "user", "content": "Quelle est la capitale de la France ?"}],
    ...      "completion": [{"role": "assistant", "content": "Paris."}],
    ...      "prompt_en": [{"role": "user", "content": "What is the capital of France?"}]},
    ...     # ...
    ... ])
    >>> trainer = peft_cc.CCSFTTrainer(
    ...     model="HuggingFaceTB/SmolLM2-135M-Instruct",
    ...     args=peft_cc.CCSFTConfig(output_dir="cc-smollm2"),
    ...     train_dataset=dataset,
    ...     peft_config=peft_cc.CCConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    ... )
    >>> trainer.train()        # trains, then fits the Transform Matrix on `transform_pairs` training pairs
    >>> trainer.save_model()   # a ready-to-use adapter (LoRA, Decision Maker, Transform Matrix)
    ```

    Each step runs, in one forward call of the model, the English prompts, the Decision Maker and the connected
    non-English sequences; the loss is the completion-only causal-LM loss of the non-English sequences (the model's own
    loss, normalized over the tokens of the whole accumulated batch). Training logs hold, next to TRL's metrics, the
    layer-choice statistics since the previous log:

    - `cc/unconnected_rows`: rows left without the connection (no anchor: an English prompt longer than
      `max_length`, or a sequence without any completion token);
    - `cc/choice_entropy`: entropy (nats) of the frequencies of the chosen source layers (0: always the same layer;
      `ln S`: uniform over the `S` candidates);
    - `cc/decision_entropy`: mean entropy (nats) of the Decision Maker's softmax per row (how sure it is of each row's
      choice; the Gumbel sample follows this distribution);
    - `cc/most_chosen_layer`, `cc/most_chosen_frequency`, and `cc/layer_frequency/<layer>` for every candidate;
    - with `injection_gate_init`: `cc/most_chosen_gate`, the learned gate of the most chosen layer, and
      `cc/injection_gate/<layer>` for every candidate.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The model to train: a model id or path (loaded as by [`trl.SFTTrainer`]) or a model, both with
            `peft_config`, or a `PeftModel` that already carries a CC-Tuning adapter (then without `peft_config`).
        args ([`CCSFTConfig`], *optional*):
            Configuration. A [`trl.SFTConfig`] or [`~transformers.TrainingArguments`] is converted to a
            [`CCSFTConfig`] with its values and the CC-Tuning defaults.
        data_collator ([`~transformers.DataCollator`], *optional*):
            Defaults to [`DataCollatorForCCLanguageModeling`]. A custom collator must produce `english_input_ids` and
            `english_attention_mask` (right-padded `input_ids` and `labels` with -100 on the prompt).
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Prompt-completion data (columns `prompt`, `completion` and `english_prompt_field`), plain text or
            conversational; or pre-tokenized data with `input_ids`, `labels` (or `completion_mask`) and
            `english_input_ids`.
        eval_dataset ([`~datasets.Dataset`], [`~datasets.IterableDataset`] or `dict[str, Dataset | IterableDataset]`):
            Evaluation data in the same form. Evaluation uses the connection with the real English prompts
            (bilingual: the Decision Maker takes its arg-max).
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The tokenizer. If `None`, it is loaded from the model's name.
        compute_loss_func (`Callable`, *optional*):
            Deprecated in TRL; applied to the model's outputs (with logits) if given.
        compute_metrics (`Callable[[EvalPrediction], dict]`, *optional*):
            As in [`trl.SFTTrainer`].
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            As in [`trl.SFTTrainer`].
        optimizers (`tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]`, *optional*):
            As in [`trl.SFTTrainer`].
        optimizer_cls_and_kwargs (`tuple[type[torch.optim.Optimizer], dict[str, Any]]`, *optional*):
            As in [`trl.SFTTrainer`].
        preprocess_logits_for_metrics (`Callable[[torch.Tensor, torch.Tensor], torch.Tensor]`, *optional*):
            As in [`trl.SFTTrainer`].
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
            Used when `model` is a model id or path (QLoRA). The Decision Maker is kept in float32.
        peft_config ([`CCConfig`], *optional*):
            The CC-Tuning adapter to add to `model`. Required unless `model` already carries one.

    Raises:
        ValueError: at construction, for a model without a CC-Tuning adapter (or a `peft_config` that is not a
            [`CCConfig`]), a dataset without the English prompt field or not in prompt-completion form, packing,
            padding-free batching, `completion_only_loss=False`, `loss_type="dft"` or a formatting function.
    """

    _tag_names = ["trl", "sft", "peft-cc", "cc-tuning"]
    _name = "CC-Tuning"
    _paper = {
        "title": "CC-Tuning: A Cross-Lingual Connection Mechanism for Improving Joint Multilingual Supervised "
        "Fine-Tuning",
        "id": "2506.00875",
        "citation": _CITATION,
    }

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        args: CCSFTConfig | SFTConfig | TrainingArguments | None = None,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        quantization_config: Any | None = None,
        peft_config: PeftConfig | None = None,
        formatting_func: Callable[[dict], str] | None = None,
    ):
        args = _as_cc_config(args, model)
        # Everything that can be checked before the model is loaded and the data tokenized fails here, early.
        _check_cc_model(model, peft_config)
        _check_training_options(args, formatting_func)
        skip_prepare = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset", False))
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        _check_dataset(train_dataset, "train", args, skip_prepare)
        eval_datasets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
        for name, dataset in eval_datasets.items():
            if dataset is not None:
                _check_dataset(dataset, name, args, skip_prepare)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        if self._is_vision_dataset:
            raise ValueError("CCSFTTrainer trains text-only causal language models; this dataset holds images.")

        tuner = self.cc_model
        if len(tuner.active_adapters) != 1:
            raise ValueError(f"CC-Tuning trains one active adapter, got {tuner.active_adapters}.")
        # TRL casts every trainable parameter of a quantized model to bfloat16 (QLoRA); the Decision Maker stays
        # float32, as CC-Tuning needs (its logits decide the layer choice).
        for decision_maker in tuner.cc_decision_maker.values():
            decision_maker.float()
        config: CCConfig = tuner.peft_config[tuner.active_adapters[0]]
        own_loss_terms = config.choice_balance_weight > 0 or config.decision_maker_gradient == "score_function"
        if own_loss_terms and (self.compute_loss_func is not None or self.label_smoother is not None):
            raise ValueError(
                "`choice_balance_weight` and `decision_maker_gradient='score_function'` add their terms to the "
                "model's own loss, which `compute_loss_func` and `label_smoothing_factor` replace: the Decision "
                "Maker would silently lose them. Use one or the other."
            )

        # The default collator of TRL, extended with the English prompts (same pad token, same padding options).
        if type(self.data_collator) is DataCollatorForLanguageModeling:
            parent = self.data_collator
            self.data_collator = DataCollatorForCCLanguageModeling(
                pad_token_id=parent.pad_token_id,
                padding_free=parent.padding_free,
                return_position_ids=parent.return_position_ids,
                pad_to_multiple_of=parent.pad_to_multiple_of,
                return_tensors=parent.return_tensors,
            )

        self._connection_statistics = _ConnectionStatistics(tuner.source_layers())
        # The same counts over the whole run, for the model card (summarised once, when training ends).
        self._run_connection_statistics = _ConnectionStatistics(tuner.source_layers())
        self._noise_step: int | None = None
        self._noise_micro_batch = 0
        self.transform_matrix_stats: dict[str, Any] | None = None
        self.decision_maker_prior: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ the model

    @property
    def cc_model(self) -> CCModel:
        """The CC-Tuning tuner (`CCModel`) of the model being trained."""
        tuner = getattr(self.accelerator.unwrap_model(self.model), "base_model", None)
        if not isinstance(tuner, CCModel):
            raise ValueError(_NO_CC_ADAPTER)
        return tuner

    # ------------------------------------------------------------------------------------------------ data

    def _prepare_dataset(
        self,
        dataset: Dataset | IterableDataset,
        processing_class: PreTrainedTokenizerBase,
        args: SFTConfig,
        packing: bool,
        formatting_func: Callable[[dict], str] | None,
        dataset_name: str,
    ) -> Dataset | IterableDataset:
        dataset = self._tokenize_english_prompts(dataset, processing_class, args, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _tokenize_english_prompts(
        self,
        dataset: Dataset | IterableDataset,
        processing_class: PreTrainedTokenizerBase,
        args: CCSFTConfig,
        dataset_name: str,
    ) -> Dataset | IterableDataset:
        """Add the column `english_input_ids`: each English prompt tokenized as TRL tokenizes the prompt.

        Conversational prompts get the chat template with the generation prompt (the same template, tools and
        `chat_template_kwargs` as the prompt of the row); plain-text prompts are tokenized by
        `processing_class(text=...)` with its default special tokens, as TRL does. An English prompt longer than
        `max_length` is emptied: its row is not connected (and counted in `cc/unconnected_rows`), rather than
        connected at a token that is not the end of the prompt.
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
                "chat_template": self.chat_template,
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

    def _set_signature_columns_if_needed(self):
        # TRL keeps the columns of the model inputs; CC-Tuning also needs the tokenized English prompt.
        super()._set_signature_columns_if_needed()
        if ENGLISH_INPUT_IDS not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ENGLISH_INPUT_IDS]

    # ------------------------------------------------------------------------------------------------ the loss

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, CCCausalLMOutputWithPast]:
        """The completion-only causal-LM loss of one CC-Tuning step (English pass, Decision Maker, connected pass).

        Args:
            model: the (possibly wrapped) model.
            inputs: the collated batch: `input_ids`, `attention_mask`, `labels` `[B, T]` (right-padded; the anchor of
                each row is the position before its first label), `english_input_ids`, `english_attention_mask`
                `[B, T_en]`.
            return_outputs: also return the model's [`CCCausalLMOutputWithPast`] (with `logits` `[B, T, V]`).
            num_items_in_batch: supervised tokens in the whole accumulated batch (over all processes), which the loss
                is normalized by.

        Returns:
            The scalar loss, or `(loss, outputs)`.
        """
        mode = "train" if self.model.training else "eval"
        if ENGLISH_INPUT_IDS not in inputs:
            raise ValueError(
                f"The batch has no `{ENGLISH_INPUT_IDS}` (keys: {sorted(inputs)}): CC-Tuning needs the English prompt "
                "of every row. Use the default collator, or make yours add `english_input_ids` and "
                "`english_attention_mask`."
            )
        inputs["use_cache"] = False
        if mode == "train":
            # The temperature schedule and the soft phase of the Decision Maker follow the progress of training.
            self.cc_model.set_training_progress(self._training_progress())
        labels = inputs["labels"]
        model_inputs = dict(inputs)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            model_inputs["num_items_in_batch"] = num_items_in_batch
        with self._connection_noise(mode):
            outputs = model(**model_inputs)
        if not isinstance(outputs, CCCausalLMOutputWithPast):
            raise ValueError(_NO_CC_ADAPTER)

        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif self.label_smoother is not None:
            loss = self.label_smoother(outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)
        else:
            loss = outputs.loss
        # Like `Trainer.compute_loss`: `num_items_in_batch` counts the tokens of every process, and DDP averages the
        # gradients over the processes.
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
            and num_items_in_batch is not None
        ):
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        self._record_token_metrics(mode, outputs.logits, labels, inputs["attention_mask"])
        if mode == "train":
            counts = self._connection_statistics.batch_counts(outputs)
            counts = self.accelerator.reduce(counts, reduction="sum")
            self._connection_statistics.add(counts)
            self._run_connection_statistics.add(counts)
        return (loss, outputs) if return_outputs else loss

    def _training_progress(self) -> float:
        """How far training is, in [0, 1): optimizer steps done over the total number of steps."""
        max_steps = self.state.max_steps or 0
        return self.state.global_step / max_steps if max_steps > 0 else 0.0

    @contextlib.contextmanager
    def _connection_noise(self, mode: str) -> Iterator[None]:
        """Seed the Gumbel noise of a training micro-batch by its place in the run (see `deterministic_gumbel_noise`).

        The micro-batch index counts across processes and accumulation steps the way the data is split: micro-step
        `m` of process `p` of `P` is micro-batch `m * P + p` of its optimizer step (accelerate hands the per-device
        batches of the sampler out to the processes in turn).
        """
        if mode != "train" or not getattr(self.args, "deterministic_gumbel_noise", True):
            yield
            return
        step = self.state.global_step
        if step != self._noise_step:
            self._noise_step, self._noise_micro_batch = step, 0
        micro_batch = self._noise_micro_batch * self.accelerator.num_processes + self.accelerator.process_index
        self._noise_micro_batch += 1
        seed = int(np.random.SeedSequence([self.args.seed, step, micro_batch]).generate_state(1, np.uint64)[0] >> 1)
        device = self.accelerator.device
        forked = [device.index if device.index is not None else 0] if device.type in ("cuda", "xpu") else []
        with torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cuda"):
            torch.manual_seed(seed)
            yield

    @torch.no_grad()
    def _record_token_metrics(
        self, mode: str, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor
    ) -> None:
        """TRL's `entropy`, `mean_token_accuracy` and `num_tokens` metrics, computed from the logits.

        Only the supervised positions are read, a chunk at a time, so no `[N, V]` float32 copy is made at once.
        """
        mask = labels[:, 1:] != -100
        rows, positions = mask.nonzero(as_tuple=True)
        entropy_sum = logits.new_zeros((), dtype=torch.float32)
        num_correct = logits.new_zeros((), dtype=torch.float32)
        targets = labels[:, 1:][rows, positions]
        for start in range(0, len(rows), 1024):
            chunk = slice(start, start + 1024)
            selected = logits[rows[chunk], positions[chunk]].float()  # [n, V], the logits predicting label t+1
            log_probs = torch.log_softmax(selected, dim=-1)
            entropy_sum += -(log_probs.exp() * log_probs).sum()
            num_correct += (selected.argmax(dim=-1) == targets[chunk]).sum()
        num_valid = self.accelerator.gather_for_metrics(mask.sum()).sum()
        entropy_sum = self.accelerator.gather_for_metrics(entropy_sum).sum()
        num_correct = self.accelerator.gather_for_metrics(num_correct).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        # The outputs carry the logits already (no fused LM head here), so no second forward pass is needed.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), outputs.logits, inputs.get("labels")

    # ------------------------------------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Layer-choice statistics go into training logs only (evaluation takes the arg-max, without sampling).
        if self.model.training and self._connection_statistics.num_rows > 0:
            logs.update(self._connection_statistics.summary(per_layer=self.args.log_layer_frequencies))
            config: CCConfig = self.cc_model.peft_config[self.cc_model.active_adapters[0]]
            progress = self.cc_model.training_progress
            if config.gumbel_temperature_final is not None:
                logs[f"{LOG_PREFIX}gumbel_temperature"] = config.temperature_at(progress)
            if config.soft_choice_fraction > 0:
                logs[f"{LOG_PREFIX}soft_choice"] = float(progress < config.soft_choice_fraction)
            logs.update(self._injection_gate_logs(logs.get(f"{LOG_PREFIX}most_chosen_layer")))
        super().log(logs, start_time)

    def _injection_gate_logs(self, most_chosen_layer: int | None) -> dict[str, float]:
        """`cc/most_chosen_gate` (the gate of the window's most chosen layer) and, with `log_layer_frequencies`,
        `cc/injection_gate/<layer>` for every candidate; nothing without `injection_gate_init`."""
        gate = self.cc_model.decision_maker().gate
        if gate is None:
            return {}
        values = dict(zip(self.cc_model.source_layers(), gate.detach().float().tolist()))
        logs = {} if most_chosen_layer is None else {f"{LOG_PREFIX}most_chosen_gate": values[most_chosen_layer]}
        if self.args.log_layer_frequencies:
            logs.update(_per_layer_logs("injection_gate", values))
        return logs

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The optimizer of [`~transformers.Trainer`], with the Decision Maker in a group of its own when
        `decision_maker_learning_rate` is set, and its injection gate in another when `injection_gate_learning_rate`
        is (no weight decay; the scheduler scales them like the other groups)."""
        given = self.optimizer is not None  # passed by the user, or made before: left as it is
        optimizer = super().create_optimizer(model)
        if given:
            return optimizer
        decision_maker_rate = self.args.decision_maker_learning_rate
        named = list((model or self.model).named_parameters())
        groups = (  # the gate last: it leaves the Decision Maker's group for its own
            (decision_maker_rate, {id(p) for n, p in named if DECISION_MAKER_KEY in n}),
            (
                self.args.injection_gate_learning_rate,
                {id(p) for n, p in named if DECISION_MAKER_KEY in n and n.endswith(".gate")},
            ),
        )
        for learning_rate, selected in groups:
            moved = [p for group in optimizer.param_groups for p in group["params"] if id(p) in selected]
            if learning_rate is None or not moved:
                continue
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in selected]
            optimizer.add_param_group({"params": moved, "lr": learning_rate, "weight_decay": 0.0})
        return optimizer

    # ------------------------------------------------------------------------------------------------ the end

    def train(self, *args: Any, **kwargs: Any):
        """Train as [`trl.SFTTrainer.train`] does, then fit the Transform Matrix on `transform_pairs` training pairs.

        Takes the arguments of [`~transformers.Trainer.train`] (`resume_from_checkpoint`, ...) and returns its
        `TrainOutput`. With `transform_pairs=0` no fit is done. An adapter with
        `decision_maker_init="english_variance"` first gets its Decision Maker initialised
        ([`~CCSFTTrainer.initialize_decision_maker`]), unless training resumes from a checkpoint.
        """
        resuming = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if not resuming and self.cc_model.needs_decision_maker_initialization():
            self.initialize_decision_maker()
        output = super().train(*args, **kwargs)
        self._record_training_facts()
        if self.args.transform_pairs > 0:
            self.fit_transform_matrix()
        return output

    def _record_training_facts(self) -> None:
        """Put the run's settings, languages and layer-choice statistics into the adapter's model card facts."""
        args = self.args
        facts = self.cc_model.model_card_facts
        facts["training"] = {
            "trainer": "peft_cc.CCSFTTrainer (TRL SFTTrainer)",
            "optimizer steps": self.state.global_step,
            "examples per step": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            "learning rate / schedule": f"{args.learning_rate:g} / {args.lr_scheduler_type}",
            "max length (tokens)": args.max_length,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "seed": args.seed,
        }
        columns = getattr(self.train_dataset, "column_names", None) or []
        if "language" in columns and not facts.get("languages"):
            facts["languages"] = sorted({str(language) for language in self.train_dataset["language"]})
        run = self._run_connection_statistics
        if run.num_rows == 0:
            return
        rows = run.num_rows
        summary = run.summary(per_layer=True)
        prefix = f"{LOG_PREFIX}layer_frequency/"
        frequency = {int(key[len(prefix) :]): value for key, value in summary.items() if key.startswith(prefix)}
        top = sorted(frequency.items(), key=lambda item: -item[1])[:5]
        facts["layer_choice"] = {
            "most_chosen": dict(top),
            "choice_entropy": summary[f"{LOG_PREFIX}choice_entropy"],
            "max_entropy": math.log(len(run.source_layers)),
            "num_source_layers": len(run.source_layers),
            "connected_rows": rows - int(summary[f"{LOG_PREFIX}unconnected_rows"]),
            "unconnected_rows": int(summary[f"{LOG_PREFIX}unconnected_rows"]),
        }

    def initialize_decision_maker(self) -> torch.Tensor:
        """Initialise the Decision Maker from the first `decision_maker_init_examples` training examples.

        See [`CCModel.initialize_decision_maker`]. Training then sees the same batches in the same order as without
        it, and the global random state is restored afterwards. With several processes, process 0's result is
        broadcast.

        Returns:
            `[S]` the prior over the candidate source layers (also kept as `decision_maker_prior`).
        """
        with torch.random.fork_rng(devices=[]):
            batches = list(self._first_training_batches(self.args.decision_maker_init_examples))
        prior = self.cc_model.initialize_decision_maker(batches)
        self._broadcast_from_main_process(self.cc_model.decision_maker().weight.data)
        self.decision_maker_prior = prior
        favoured = prior.topk(min(3, len(prior)))
        layers = self.cc_model.source_layers()
        logger.info(
            "Decision Maker initialised from %d training batches; most favoured source layers: %s",
            len(batches),
            ", ".join(f"{layers[i]} ({p:.0%})" for p, i in zip(favoured.values.tolist(), favoured.indices.tolist())),
        )
        return prior

    def _first_training_batches(self, num_examples: int) -> Iterator[dict[str, Any]]:
        """The first batches of the training data loader, on the device, until they hold `num_examples` rows."""
        rows = 0
        for batch in self.get_train_dataloader():
            yield self._prepare_inputs(batch)
            rows += len(batch["input_ids"])
            if rows >= num_examples:
                return

    def fit_transform_matrix(self, num_pairs: int | None = None) -> dict[str, Any] | None:
        """Fit the Transform Matrix of the adapter on a seeded sample of training pairs, and store it in the adapter.

        Samples `min(num_pairs, len(train_dataset))` rows with `random.Random(seed)` (the first `num_pairs` rows of an
        iterable dataset) and runs [`peft_cc.fit_transform_matrix`] on their token ids: the prompt of each row as the
        model saw it in training (`input_ids` up to the anchor) and its `english_input_ids`. Every process fits on the
        same pairs; the matrix of the main process is then broadcast, so all processes hold the same one. The
        statistics of the fit are logged (`cc/transform_...`) and kept in `self.transform_matrix_stats`.

        With parameters sharded over processes (FSDP, DeepSpeed ZeRO-3) the decoder cannot run outside the wrapped
        model: the fit is skipped with a warning; fit it afterwards from the saved adapter in one process.

        Args:
            num_pairs: how many pairs (default: `args.transform_pairs`).

        Returns:
            The statistics of [`peft_cc.fit_transform_matrix`], or `None` if the fit was skipped.
        """
        num_pairs = self.args.transform_pairs if num_pairs is None else num_pairs
        if num_pairs <= 0:
            raise ValueError(f"`num_pairs` must be >= 1, got {num_pairs}.")
        if self._parameters_are_sharded():
            warnings.warn(
                "The parameters are sharded over processes (FSDP or DeepSpeed ZeRO-3), so the Transform Matrix is not "
                "fitted at the end of training. Save the adapter, then fit it in one process: load it with "
                "`PeftModel.from_pretrained(base, path, is_trainable=False)`, call `peft_cc.fit_transform_matrix` on "
                "training pairs and `save_pretrained` again (see docs/training.md).",
                stacklevel=2,
            )
            return None
        batch_size = self.args.transform_batch_size or self.args.per_device_eval_batch_size
        stats = fit_transform_matrix(
            self.accelerator.unwrap_model(self.model),
            list(self._transform_pairs(num_pairs)),
            batch_size=batch_size,
            seed=self.args.seed,
            show_progress=self.is_local_process_zero() and not self.args.disable_tqdm,
        )
        self._broadcast_from_main_process(self.cc_model.transform_matrix())
        self.transform_matrix_stats = stats
        self.log(
            {
                f"{LOG_PREFIX}transform_{key}": float(value)
                for key, value in stats.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            }
        )
        return stats

    def _transform_pairs(self, num_pairs: int) -> Iterator[tuple[list[int], list[int]]]:
        """`(prompt ids, English prompt ids)` of a seeded sample of `num_pairs` training rows."""
        dataset = self.train_dataset
        if isinstance(dataset, Dataset):
            count = min(num_pairs, len(dataset))
            indices = random.Random(self.args.seed).sample(range(len(dataset)), count)
            rows: Iterable[dict[str, Any]] = dataset.select(indices).select_columns(
                ["input_ids", "labels", ENGLISH_INPUT_IDS]
            )
        else:
            rows = itertools.islice(iter(dataset), num_pairs)
        for row in rows:
            input_ids = list(row["input_ids"])
            anchor = int(anchors_from_labels(torch.tensor([row["labels"]]))[0])
            # A row without an anchor gives an empty prompt, which the fit skips (and counts).
            yield (input_ids[: anchor + 1] if anchor >= 0 else []), list(row[ENGLISH_INPUT_IDS])

    def _broadcast_from_main_process(self, tensor: torch.Tensor) -> None:
        """Give every process process 0's `tensor` (in place); nothing to do in a single process."""
        if self.accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
            dist.broadcast(tensor, src=0)

    def _parameters_are_sharded(self) -> bool:
        if self.is_fsdp_enabled:
            return True
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return bool(self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ):
        """Write the adapter's model card (:mod:`peft_cc.model_card`) into `output_dir`, as `Trainer.push_to_hub`
        and checkpoints do; `dataset_name` is recorded as the training data and `model_name` names the card."""
        if not self.is_world_process_zero():
            return
        if dataset_name:
            self.cc_model.model_card_facts["datasets"] = [dataset_name]
        config: CCConfig = self.cc_model.peft_config[self.cc_model.active_adapters[0]]
        repo_id = model_name or (self.hub_model_id if self.args.push_to_hub else None)
        write_model_card(self.args.output_dir, config, self.cc_model.model_card_facts, repo_id=repo_id)


# ---------------------------------------------------------------------------------------------------- checks

_NO_CC_ADAPTER = (
    "CCSFTTrainer trains a CC-Tuning adapter: pass `peft_config=peft_cc.CCConfig(...)` with a model (or model id), "
    "or a `PeftModel` made with `peft.get_peft_model(model, peft_cc.CCConfig(...))`. For plain LoRA, use "
    "`trl.SFTTrainer`."
)


def _as_cc_config(args: CCSFTConfig | SFTConfig | TrainingArguments | None, model: Any) -> CCSFTConfig:
    """`args` as a `CCSFTConfig` (the CC-Tuning defaults added to a `SFTConfig` or `TrainingArguments`)."""
    if isinstance(args, CCSFTConfig):
        return args
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model") or "model"
        return CCSFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-CC")
    unsupported_batching(args)
    # The values as set (`to_dict` would hide every `*_token` field, `eos_token` and `pad_token` included).
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(args) if field.init}
    return CCSFTConfig(**{key: value for key, value in values.items() if key in CCSFTConfig.__dataclass_fields__})


def _check_cc_model(model: Any, peft_config: PeftConfig | None) -> None:
    if peft_config is not None:
        if not isinstance(peft_config, CCConfig):
            raise ValueError(
                f"`peft_config` must be a `peft_cc.CCConfig`, got {type(peft_config).__name__}. " + _NO_CC_ADAPTER
            )
        return
    if not isinstance(getattr(model, "base_model", None), CCModel):
        raise ValueError(f"The model ({type(model).__name__}) has no CC-Tuning adapter. " + _NO_CC_ADAPTER)


def _check_training_options(args: CCSFTConfig, formatting_func: Callable | None) -> None:
    unsupported_batching(args)
    if formatting_func is not None:
        raise ValueError(
            "A `formatting_func` turns the data into plain language modeling, which has no prompt to connect: "
            "CC-Tuning needs prompt-completion data. Format the `prompt`, `completion` and English prompt columns "
            "before passing the dataset instead."
        )
    if args.completion_only_loss is False:
        raise ValueError(
            "CC-Tuning needs `completion_only_loss` (None or True): the connection is applied at the last prompt "
            "token, which the model finds as the position before the first label; with a loss on the prompt it "
            "would find none."
        )
    if args.loss_type != "nll":
        raise ValueError(f"CCSFTTrainer supports `loss_type='nll'` only, got {args.loss_type!r}.")


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
            f"version of every prompt, in the same form as `prompt`; name its column with "
            f"`CCSFTConfig(english_prompt_field=...)`."
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


# ---------------------------------------------------------------------------------------------------- tokenization


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
