"""CC-Tuning as a TRL trainer: supervised fine-tuning on multilingual prompt-completion data with English prompts.

[`CCSFTTrainer`] adds to TRL's `SFTTrainer` the English prompts (tokenized like TRL's prompts and collated by
[`DataCollatorForCCLanguageModeling`]; see `peft_cc.sft_data`), the layer-choice statistics of its training logs, the
Transform Matrix fit when training ends, and the adapter's model card (`peft_cc.model_card`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from datasets import Dataset, IterableDataset
from peft import PeftConfig, PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments
from transformers.trainer_utils import EvalPrediction
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from .anchors import anchors_from_labels
from .config import CCConfig
from .layer_choice import LOG_PREFIX, LayerChoiceStatistics
from .model import CCModel
from .model_card import CITATION, training_run_facts, write_model_card
from .sft_config import REPLACED_LOSS, CCSFTConfig, as_cc_sft_config, check_supported_options
from .sft_data import (
    ENGLISH_INPUT_IDS,
    DataCollatorForCCLanguageModeling,
    check_datasets,
    generation_prompt_ids,
    tokenize_english_prompts,
    training_pairs,
)
from .transform_matrix import fit_transform_matrix

__all__ = ["CCSFTTrainer", "DataCollatorForCCLanguageModeling"]


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
    the whole accumulated batch). Every training log holds the layer-choice statistics (`cc/...`, see
    [`~peft_cc.layer_choice.LayerChoiceStatistics`]) next to TRL's metrics. When training ends, the trainer fits the
    Transform Matrix on `transform_pairs` training pairs; its model card (`create_model_card`, written with the model
    by `save_model`) reports the run.

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
        "citation": CITATION,
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
        config: CCConfig = tuner.peft_config[tuner.active_adapters[0]]
        if config.generation_prompt_ids is None:
            config.generation_prompt_ids = generation_prompt_ids(
                self.train_dataset, self.processing_class, self.chat_template
            )
        self.layer_choice = LayerChoiceStatistics(tuner.source_layers())
        self.layer_choice_summary: dict[str, Any] | None = None
        self.transform_matrix_stats: dict[str, Any] | None = None
        # The training data's name (a Hub dataset id or a file name) for the model card (`create_model_card`).
        self.dataset_name: str | None = None
        self._noise_step: int | None = None
        self._noise_micro_batch = 0

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
        """TRL's loss of one CC-Tuning step (English pass, Decision Maker, connected pass).

        TRL calls the model with its fused LM head and computes the `loss_type` loss and its metrics; the trainer
        counts the layer choices of training forward calls for the logs.

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
        if self.model.training:
            self.layer_choice.record(outputs[0])  # the forward call of TRL's loss and metrics
        return result

    @contextlib.contextmanager
    def _connection_outputs(self) -> Iterator[list[Mapping[str, Any]]]:
        """Collect the outputs of the CC-Tuning tuner's forward calls made in the block, in order: they hold what the
        connection did (`connected_rows`, `layer_choice`, `layer_logits`)."""
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
            logs.update(self.layer_choice.window_logs(self._sum_over_processes, self.args.log_layer_frequencies))
        super().log(logs, start_time)

    def _sum_over_processes(self, counts: torch.Tensor) -> torch.Tensor:
        reduced = self.accelerator.reduce(counts.to(self.accelerator.device), reduction="sum")
        return reduced.to("cpu", torch.float64)

    # ------------------------------------------------------------------------------------------------ around training

    def train(self, *args, **kwargs):
        """`Trainer.train`, then the layer choices of the whole run (for the model card) and, unless
        `transform_pairs` is 0, the Transform Matrix fit on training pairs ([`fit_transform_matrix`]), so that the
        saved adapter generates with the monolingual connection right away."""
        output = super().train(*args, **kwargs)
        self.layer_choice_summary = self.layer_choice.run_summary(self._sum_over_processes)
        if self.args.transform_pairs > 0:
            self.fit_transform_matrix()
        return output

    def fit_transform_matrix(self, num_pairs: int | None = None) -> dict[str, Any] | None:
        """Fit the Transform Matrix of the adapter on a seeded sample of training pairs, and store it in the adapter.

        [`train`] calls it when training ends. It samples `min(num_pairs, len(train_dataset))` rows with
        `random.Random(seed)` (the first `num_pairs` rows of an iterable dataset) and runs
        [`peft_cc.fit_transform_matrix`] on their token ids: the prompt of each row as the model saw it in training
        (`input_ids` up to the anchor) and its `english_input_ids`. Every process fits on the same pairs; the matrix of
        the main process is then broadcast. The statistics of the fit are logged (`cc/transform_...`) and kept in
        `self.transform_matrix_stats`.

        Under FSDP2 and DeepSpeed ZeRO-3 the modules of the decoder gather their sharded parameters when they run, as
        in training, so the fit works there too (every process runs it: the gathers are collectives). Under FSDP1
        (not tested) it is skipped with a warning; fit it afterwards from the saved adapter in one process.

        Args:
            num_pairs: how many pairs (default: `args.transform_pairs`; at least 1).

        Returns:
            The statistics of [`peft_cc.fit_transform_matrix`], or `None` if the fit was skipped.
        """
        num_pairs = self.args.transform_pairs if num_pairs is None else num_pairs
        if num_pairs <= 0:
            raise ValueError(f"`num_pairs` must be >= 1, got {num_pairs}.")
        if self.is_fsdp_enabled and not self.accelerator.is_fsdp2:
            warnings.warn(
                "The parameters are sharded over processes by FSDP1, so the Transform Matrix is not fitted at the end "
                "of training (FSDP2, `fsdp_version: 2`, fits it). Save the adapter, then fit it in one process: load "
                "it with `PeftModel.from_pretrained(base, path, is_trainable=False)`, call "
                "`peft_cc.fit_transform_matrix` on training pairs and `save_pretrained` again (see docs/training.md).",
                stacklevel=2,
            )
            return None
        with self._fsdp2_root_gathered():
            stats = fit_transform_matrix(
                self.accelerator.unwrap_model(self.model),
                list(training_pairs(self.train_dataset, num_pairs, seed=self.args.seed)),
                batch_size=self.args.transform_batch_size or self.args.per_device_eval_batch_size,
                seed=self.args.seed,
                show_progress=self.is_local_process_zero() and not self.args.disable_tqdm,
            )
        if self.accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
            dist.broadcast(self.cc_model.transform_matrix(), src=0)
        numbers = {key: value for key, value in stats.items() if type(value) in (int, float)}
        self.log({f"{LOG_PREFIX}transform_{key}": float(value) for key, value in numbers.items()})
        self.transform_matrix_stats = stats
        return stats

    @contextlib.contextmanager
    def _fsdp2_root_gathered(self) -> Iterator[None]:
        """Under FSDP2, gather the parameters that no inner `fully_shard` unit owns (e.g. the Decision Maker, or the
        whole decoder without an auto-wrap policy) for the block, then reshard every unit.

        The fit calls the decoder directly, not the wrapped model: each inner unit (embedding, decoder layer, final
        norm and LM head) gathers its own parameters when it runs, but the root unit only gathers in its forward.
        """
        if not self.is_fsdp_enabled:  # no FSDP (and perhaps a torch built without torch.distributed)
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.model, FSDPModule):
            yield
            return
        self.model.unshard()
        try:
            yield
        finally:
            for module in self.model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    # ------------------------------------------------------------------------------------------------ model card

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, with the adapter's model card (:mod:`peft_cc.model_card`) in place of PEFT's."""
        super().save_model(output_dir, _internal_call)
        self._write_model_card(output_dir or self.args.output_dir)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ) -> None:
        """Write the adapter's model card (:mod:`peft_cc.model_card`) into `output_dir`, as TRL does at checkpoints and
        `Trainer.push_to_hub`; `dataset_name` is recorded as the training data (and kept for later cards), and
        `model_name` (or the Hub repository when pushing) names the card."""
        if dataset_name:
            self.dataset_name = dataset_name
        self._write_model_card(self.args.output_dir, model_name)

    def _write_model_card(self, directory: str, model_name: str | None = None) -> None:
        if not self.is_world_process_zero():
            return
        tuner = self.cc_model
        config: CCConfig = tuner.peft_config[tuner.active_adapters[0]]
        hub_id = self.hub_model_id if self.args.push_to_hub else None
        Path(directory).mkdir(parents=True, exist_ok=True)
        write_model_card(
            directory,
            config,
            datasets=[self.dataset_name] if self.dataset_name else [],
            layer_choice=self.layer_choice_summary,
            transform_matrix=self.transform_matrix_stats,
            location=hub_id or model_name or directory,
            **training_run_facts(self.args, self.state, self.train_dataset, "peft_cc.CCSFTTrainer (TRL SFTTrainer)"),
        )


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
