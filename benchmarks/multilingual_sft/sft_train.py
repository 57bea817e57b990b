"""Train one system of the multilingual SFT experiment with one seed, and save its adapter and training record.

Every trained system gets the same pairs (:mod:`sft_mixture`, sampled with seed 0 whatever the training seed), steps,
LoRA settings and schedule; the training seed changes the LoRA initialisation, the data order, dropout and the
Decision Maker's Gumbel noise. Vanilla LoRA is TRL's `SFTTrainer`; CC-Tuning is `CCSFTTrainer` with a `CCConfig`,
whose Transform Matrix is fitted on training pairs when training ends (`transform_pairs`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from sft_mixture import EvaluationSizes, mixture_summary, token_budget_check, training_rows
from sft_runs import System, read_finished, write_finished
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from peft_cc import CCConfig, CCSFTConfig, CCSFTTrainer

RECORD = "training.json"


@dataclass(frozen=True)
class TrainingSettings:
    """What a trained system depends on (all systems and seeds of a model share it but for the seed).

    Attributes:
        model: the base model (Hub id or folder).
        tokenizer: the tokenizer's folder, when not the model's (a chat template of its own).
        data_root: the training data root.
        benchmarks: the benchmarks to train on (equal shares).
        steps: optimizer steps.
        batch_size: pairs per step (one pass over `steps * batch_size` pairs).
        learning_rate: peak learning rate (cosine schedule, 10% warm-up), LoRA and Decision Maker alike.
        lora_r: LoRA rank (alpha `2 r`, dropout 0.05, every linear layer).
        max_length: tokens of a templated pair at most (longer pairs are left out, not truncated).
        transform_pairs: training pairs the Transform Matrix of a CC adapter is fitted on.
        logging_steps: steps per logged training loss (the curves).
    """

    model: str
    tokenizer: str | None
    data_root: str
    benchmarks: tuple[str, ...]
    steps: int
    batch_size: int
    learning_rate: float
    lora_r: int
    max_length: int
    transform_pairs: int
    logging_steps: int

    @property
    def num_pairs(self) -> int:
        return self.steps * self.batch_size


def training_dataset(settings: TrainingSettings, sizes: EvaluationSizes, tokenizer) -> tuple[Dataset, dict]:
    """The training pairs (columns `prompt`, `completion`, `prompt_en`, conversational) and their
    `{benchmark: {language: count}}`."""
    fits = token_budget_check(tokenizer, settings.max_length)
    rows = training_rows(settings.data_root, sizes, settings.num_pairs, fits, settings.benchmarks)
    columns = ("prompt", "completion", "prompt_en")
    return Dataset.from_list([{key: row[key] for key in columns} for row in rows]), mixture_summary(rows)


def train(
    system: System, seed: int, settings: TrainingSettings, sizes: EvaluationSizes, folder: Path
) -> dict[str, Any]:
    """Train `system` with `seed` into `folder` (the adapter, and the record `training.json`), unless a finished
    record with the same settings is there; returns the record.

    The record holds the settings, the held-out item counts, the mixture, the log history (loss every
    `logging_steps` steps, and for CC the layer choice `cc/...`), the wall time in seconds (`seconds`) and this
    process's CPU time (`cpu_seconds`; the training steps include the Transform Matrix fit).
    """
    run_settings = {
        **asdict(settings),
        "system": asdict(system),
        "seed": seed,
        "held_out": {benchmark: sizes.held_out(benchmark) for benchmark in sizes.benchmarks},
    }
    finished = read_finished(folder / RECORD, run_settings)
    if finished is not None:
        check_weights(folder)
        print(f"{folder.name}: trained already ({folder / RECORD})", flush=True)
        return finished
    began, began_cpu = time.perf_counter(), time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer or settings.model)
    dataset, mixture = training_dataset(settings, sizes, tokenizer)
    trainer = _trainer(system, seed, settings, dataset, tokenizer, folder)
    trained, trained_cpu = time.perf_counter(), time.process_time()
    trainer.train()
    training_seconds, training_cpu = time.perf_counter() - trained, time.process_time() - trained_cpu
    trainer.save_model()
    return write_finished(
        folder / RECORD,
        run_settings,
        {
            "mixture": mixture,
            "log_history": trainer.state.log_history,
            "seconds": {"training": training_seconds, "total": time.perf_counter() - began},
            "cpu_seconds": {"training": training_cpu, "total": time.process_time() - began_cpu},
            "cpu_threads": torch.get_num_threads(),
        },
    )


def _trainer(
    system: System, seed: int, settings: TrainingSettings, dataset: Dataset, tokenizer, folder: Path
) -> SFTTrainer:
    common = dict(
        output_dir=str(folder),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.steps // 10),
        max_length=settings.max_length,
        seed=seed,
        logging_steps=settings.logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # float32 on the CPU
    )
    lora = dict(r=settings.lora_r, lora_alpha=2 * settings.lora_r, target_modules="all-linear", lora_dropout=0.05)
    model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32)
    if system.kind == "cc":
        return CCSFTTrainer(
            model=model,
            args=CCSFTConfig(**common, transform_pairs=settings.transform_pairs),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=CCConfig(**lora, **system.cc_options),
        )
    if system.kind == "lora":
        return SFTTrainer(
            model=model,
            args=SFTConfig(**common),
            train_dataset=dataset.remove_columns("prompt_en"),
            processing_class=tokenizer,
            peft_config=LoraConfig(task_type="CAUSAL_LM", **lora),
        )
    raise ValueError(f"{system.name} is not trained (kind {system.kind!r}).")


def check_weights(folder: Path) -> None:
    """Raise `FileNotFoundError` unless the adapter folder `folder`, which holds a training record, holds the adapter's
    weights too (a folder restored from the records alone, as this experiment's results/ keeps them, does not)."""
    if not (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{folder} holds the training record {RECORD} but not the adapter's weights ({SAFETENSORS_WEIGHTS_NAME}): "
            f"move {folder / RECORD} away and train again, which writes both."
        )


def trainable_from(record: dict[str, Any]) -> dict[str, int]:
    """Per benchmark, the first item index a training record's run could train on: its `held_out` count, and 0 for a
    benchmark it trained on with none held out (e.g. MMMLU under a design that evaluates no MMMLU item)."""
    settings = record["settings"]
    return dict.fromkeys(settings["benchmarks"], 0) | settings["held_out"]


def loss_curve(record: dict[str, Any]) -> list[tuple[int, float]]:
    """`(step, training loss)` of every logging window of a training record."""
    return [(entry["step"], entry["loss"]) for entry in record["log_history"] if "loss" in entry]


def layer_choice(record: dict[str, Any]) -> dict[str, Any] | None:
    """What a CC run's Decision Maker chose in its last logging window: `most_chosen_layer`, `choice_entropy` (nats),
    the `layer_frequency` per layer, and the Transform Matrix fit's statistics (`transform_*`); `None` for a run
    without them."""
    last = [entry for entry in record["log_history"] if "cc/choice_entropy" in entry]
    if not last:
        return None
    entry = last[-1]
    choice: dict[str, Any] = {"step": entry["step"]}
    for key, value in entry.items():
        if key.startswith("cc/layer_frequency/"):
            choice.setdefault("layer_frequency", {})[int(key.rpartition("/")[2])] = value
        elif key.startswith("cc/") and "/" not in key[len("cc/") :]:
            choice[key[len("cc/") :]] = value
    for entry in record["log_history"]:
        choice.update({key[len("cc/") :]: value for key, value in entry.items() if key.startswith("cc/transform_")})
    return choice
