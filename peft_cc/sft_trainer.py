"""CC-Tuning as a TRL trainer: supervised fine-tuning on multilingual prompt-completion data with English prompts.

[`CCSFTTrainer`] keeps the data (the English prompts, tokenized like TRL's prompts and collated by
[`DataCollatorForCCLanguageModeling`]; see `peft_cc.sft_data`) and the loss (TRL's, from its fused LM head, plus the
Decision Maker's auxiliary loss). The rest of a run is done by the callbacks of `peft_cc.callbacks`, which it adds to
itself: the training progress, the Decision Maker's initialisation, the layer-choice statistics (`cc/...` log keys),
the model card facts and the Transform Matrix fit when training ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import textwrap
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from peft import PeftConfig, PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments
from transformers.trainer_utils import EvalPrediction
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from .anchors import anchors_from_labels
from .callbacks import (
    DecisionMakerInitializationCallback,
    LayerChoiceCallback,
    TrainingFactsCallback,
    TrainingProgressCallback,
    TransformMatrixCallback,
    fit_transform_matrix_on_training_pairs,
    initialize_decision_maker_from_training_data,
)
from .config import CCConfig
from .model import CCModel
from .model_card import write_model_card
from .sft_config import REPLACED_LOSS, CCSFTConfig, as_cc_sft_config, check_supported_options
from .sft_data import ENGLISH_INPUT_IDS, DataCollatorForCCLanguageModeling, check_datasets, tokenize_english_prompts

__all__ = ["CCSFTTrainer", "DataCollatorForCCLanguageModeling", "decision_maker_parameters"]

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


def decision_maker_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the Decision Makers of a CC-Tuning model, from its `cc_decision_maker` modules.

    These are the weight `[S, d]` of each Decision Maker and, for `decision_maker="variance_reinforce_gated"`, its gate
    `[S]`. [`CCSFTTrainer`] gives them an optimizer parameter group of their own when `decision_maker_learning_rate`
    is set; a custom optimizer can do the same:

    ```python
    >>> decision_maker = peft_cc.sft_trainer.decision_maker_parameters(model)
    >>> others = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in decision_maker)]
    >>> torch.optim.AdamW([{"params": others}, {"params": decision_maker, "lr": 1e-3, "weight_decay": 0.0}])
    ```

    Args:
        model: a `PeftModel` with a CC-Tuning adapter, or its `CCModel`.
    """
    tuner = model if isinstance(model, CCModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, CCModel):
        raise ValueError(f"The model ({type(model).__name__}) has no CC-Tuning adapter. " + _NO_CC_ADAPTER)
    return [p for module in tuner.cc_decision_maker.values() for p in module.parameters() if p.requires_grad]


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
    non-English sequences. The loss is TRL's: the completion-only loss of the non-English sequences (`loss_type`
    `"nll"` or `"dft"`, computed by TRL's fused LM head without the `[B, T, V]` logits, normalized over the tokens of
    the whole accumulated batch), plus the Decision Maker's auxiliary loss (`decision_maker_loss` of the model's
    output, value 0). The callbacks of `peft_cc.callbacks` do the rest: the Decision Maker's initialisation when
    training begins, the layer-choice statistics in every training log, next to TRL's metrics (see
    [`~peft_cc.callbacks.LayerChoiceCallback`] and docs/training.md), and the Transform Matrix fit when it ends.

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
            Refused (see Raises).
        compute_metrics (`Callable[[EvalPrediction], dict]`, *optional*):
            As in [`trl.SFTTrainer`] (the logits it gets take an extra forward pass).
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            As in [`trl.SFTTrainer`]; the trainer adds those of `peft_cc.callbacks` after them.
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
        formatting_func (`Callable`, *optional*):
            Refused (see Raises).

    Raises:
        ValueError: at construction, for a model without a CC-Tuning adapter (or a `peft_config` that is not a
            [`CCConfig`]), a dataset without the English prompt field or not in prompt-completion form, packing,
            padding-free batching, `completion_only_loss=False`, a formatting function, `compute_loss_func` or
            `label_smoothing_factor`.
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
        # Everything that can be checked before the model is loaded and the data tokenized fails here, early.
        args = as_cc_sft_config(args, model)
        _check_cc_model(model, peft_config)
        _check_trainer_options(args, formatting_func, compute_loss_func)
        check_datasets(train_dataset, eval_dataset, args)
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
        if type(self.data_collator) is DataCollatorForLanguageModeling:
            # TRL's default collator, extended with the English prompts (the same pad token and padding options).
            options = {
                field.name: getattr(self.data_collator, field.name) for field in dataclasses.fields(self.data_collator)
            }
            self.data_collator = DataCollatorForCCLanguageModeling(**options)
        self._layer_choice = LayerChoiceCallback(self)
        for callback in (
            TrainingProgressCallback(self),
            DecisionMakerInitializationCallback(self),
            self._layer_choice,
            TrainingFactsCallback(self),
            TransformMatrixCallback(self),
        ):
            self.add_callback(callback)
        self._noise_step: int | None = None
        self._noise_micro_batch = 0
        self.transform_matrix_stats: dict[str, Any] | None = None
        self.decision_maker_prior: torch.Tensor | None = None

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
        dataset = tokenize_english_prompts(dataset, processing_class, args, self.chat_template, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _set_signature_columns_if_needed(self):
        # TRL keeps the columns of the model inputs; CC-Tuning also needs the tokenized English prompt.
        super()._set_signature_columns_if_needed()
        if ENGLISH_INPUT_IDS not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ENGLISH_INPUT_IDS]

    # ------------------------------------------------------------------------------------------------ the loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """TRL's loss of one CC-Tuning step (English pass, Decision Maker, connected pass), plus the Decision Maker's.

        TRL calls the model with its fused LM head and computes the `loss_type` loss and its metrics; the trainer adds
        the `decision_maker_loss` of that forward call, scaled as TRL scales its loss (times the number of processes
        when `num_items_in_batch` counts the tokens of all of them, since DDP averages the gradients), and counts the
        layer choices of training forward calls for the logs.

        Args:
            model: the (possibly wrapped) model.
            inputs: the collated batch: `input_ids`, `attention_mask`, `labels` `[B, T]` (right-padded; the anchor of
                each row is the position before its first label), `english_input_ids`, `english_attention_mask`
                `[B, T_en]`.
            return_outputs: also return the model's output with `logits` `[B, T, V]` (TRL computes it with an extra
                forward pass).
            num_items_in_batch: supervised tokens in the whole accumulated batch (over all processes), which the loss
                is normalized by.

        Returns:
            The scalar loss, or `(loss, outputs)`.
        """
        if ENGLISH_INPUT_IDS not in inputs:
            raise ValueError(
                f"The batch has no `{ENGLISH_INPUT_IDS}` (keys: {sorted(inputs)}): CC-Tuning needs the English prompt "
                "of every row. Use the default collator, or make yours add `english_input_ids` and "
                "`english_attention_mask`."
            )
        if return_outputs:
            # TRL's extra forward pass for the logits gets no `labels`, from which the model finds the anchors.
            inputs["anchor_positions"] = anchors_from_labels(inputs["labels"])
        with self._connection_noise(), self._connection_outputs() as outputs:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not outputs or "connected_rows" not in outputs[0]:
            raise ValueError("The model did not apply the CC-Tuning connection. " + _NO_CC_ADAPTER)
        connection = outputs[0]  # the forward call of TRL's loss and metrics
        if self.model.training:
            self._layer_choice.record(connection)
        decision_maker_loss = connection.get("decision_maker_loss")
        if decision_maker_loss is None:
            return result
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            decision_maker_loss = decision_maker_loss * (self.accelerator.num_processes // self.get_tp_size())
        if return_outputs:
            return result[0] + decision_maker_loss, result[1]
        return result + decision_maker_loss

    @contextlib.contextmanager
    def _connection_outputs(self) -> Iterator[list[Mapping[str, Any]]]:
        """Collect the outputs of the CC-Tuning tuner's forward calls made in the block, in order: they hold what the
        connection did (`connected_rows`, `layer_choice`, `layer_logits`, `decision_maker_loss`)."""
        outputs: list[Mapping[str, Any]] = []
        handle = self.cc_model.register_forward_hook(lambda module, args, output: outputs.append(output))
        try:
            yield outputs
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _connection_noise(self) -> Iterator[None]:
        """Seed the Gumbel noise of a training micro-batch by its place in the run (see `deterministic_gumbel_noise`).

        The micro-batch index counts across processes and accumulation steps the way the data is split: micro-step
        `m` of process `p` of `P` is micro-batch `m * P + p` of its optimizer step (accelerate hands the per-device
        batches of the sampler out to the processes in turn).
        """
        if not self.model.training or not self.args.deterministic_gumbel_noise:
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The layer-choice statistics since the previous log join training logs (evaluation takes the arg-max),
        # before `Trainer.log` hands them to `state.log_history` and the reporters.
        if self.model.training:
            logs.update(self._layer_choice.window_logs())
        super().log(logs, start_time)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The optimizer of [`~transformers.Trainer`], with the Decision Maker's parameters
        ([`decision_maker_parameters`]) in a group of their own when `decision_maker_learning_rate` is set (no weight
        decay; the scheduler scales it like the other groups). An optimizer passed to the trainer is left as it is."""
        given = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        learning_rate = self.args.decision_maker_learning_rate
        if given or learning_rate is None:
            return optimizer
        selected = {id(p) for p in decision_maker_parameters(self.cc_model)}
        moved = [p for group in optimizer.param_groups for p in group["params"] if id(p) in selected]
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in selected]
        optimizer.add_param_group({"params": moved, "lr": learning_rate, "weight_decay": 0.0})
        return optimizer

    # ------------------------------------------------------------------------------------------------ around training

    def initialize_decision_maker(self) -> torch.Tensor:
        """Initialise the Decision Maker from the first `decision_maker_init_examples` training examples.

        [`~peft_cc.callbacks.DecisionMakerInitializationCallback`] calls it when training begins, for an adapter with
        `decision_maker="variance_reinforce_gated"`; see
        [`~peft_cc.callbacks.initialize_decision_maker_from_training_data`].

        Returns:
            `[S]` the prior over the candidate source layers (also kept as `decision_maker_prior`).
        """
        self.decision_maker_prior = initialize_decision_maker_from_training_data(self)
        return self.decision_maker_prior

    def fit_transform_matrix(self, num_pairs: int | None = None) -> dict[str, Any] | None:
        """Fit the Transform Matrix of the adapter on a seeded sample of training pairs, and store it in the adapter.

        [`~peft_cc.callbacks.TransformMatrixCallback`] calls it when training ends. It samples
        `min(num_pairs, len(train_dataset))` rows with `random.Random(seed)` (the first `num_pairs` rows of an
        iterable dataset) and runs [`peft_cc.fit_transform_matrix`] on their token ids: the prompt of each row as the
        model saw it in training (`input_ids` up to the anchor) and its `english_input_ids`. Every process fits on the
        same pairs; the matrix of the main process is then broadcast. The statistics of the fit are logged
        (`cc/transform_...`) and kept in `self.transform_matrix_stats`.

        With parameters sharded over processes (FSDP, DeepSpeed ZeRO-3) the decoder cannot run outside the wrapped
        model: the fit is skipped with a warning; fit it afterwards from the saved adapter in one process.

        Args:
            num_pairs: how many pairs (default: `args.transform_pairs`).

        Returns:
            The statistics of [`peft_cc.fit_transform_matrix`], or `None` if the fit was skipped.
        """
        num_pairs = self.args.transform_pairs if num_pairs is None else num_pairs
        stats = fit_transform_matrix_on_training_pairs(self, num_pairs)
        if stats is not None:
            self.transform_matrix_stats = stats
        return stats

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


def _check_cc_model(model: Any, peft_config: PeftConfig | None) -> None:
    if peft_config is not None:
        if not isinstance(peft_config, CCConfig):
            raise ValueError(
                f"`peft_config` must be a `peft_cc.CCConfig`, got {type(peft_config).__name__}. " + _NO_CC_ADAPTER
            )
        return
    if not isinstance(getattr(model, "base_model", None), CCModel):
        raise ValueError(f"The model ({type(model).__name__}) has no CC-Tuning adapter. " + _NO_CC_ADAPTER)


def _check_trainer_options(
    args: CCSFTConfig, formatting_func: Callable | None, compute_loss_func: Callable | None
) -> None:
    check_supported_options(args)  # again: the options may have been changed since the config was made
    if formatting_func is not None:
        raise ValueError(
            "A `formatting_func` turns the data into plain language modeling, which has no prompt to connect: "
            "CC-Tuning needs prompt-completion data. Format the `prompt`, `completion` and English prompt columns "
            "before passing the dataset instead."
        )
    if compute_loss_func is not None:
        raise ValueError(f"`compute_loss_func` is not supported: {REPLACED_LOSS}")
