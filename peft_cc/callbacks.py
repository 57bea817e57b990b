"""The parts of a CC-Tuning run that happen around the training steps, as [`~transformers.TrainerCallback`]s.

[`CCSFTTrainer`] adds these callbacks to itself; each holds the trainer, as TRL's own callbacks do:

- [`TrainingProgressCallback`]: before every optimizer step, tells the adapter how far training is
  (`global_step / max_steps`), which the `variance_reinforce_gated` strategy's `start_fraction` reads;
- [`DecisionMakerInitializationCallback`]: when training begins (not when it resumes), initialises a Decision Maker
  that starts from training examples ([`initialize_decision_maker_from_training_data`]);
- [`LayerChoiceCallback`]: counts the Decision Maker's choices, for the training logs (`cc/...` keys) and, over the
  whole run, for the model card;
- [`TrainingFactsCallback`]: records the run's settings and languages for the model card when training ends;
- [`TransformMatrixCallback`]: fits the Transform Matrix on training pairs when training ends
  ([`fit_transform_matrix_on_training_pairs`]).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .sft_data import training_pairs
from .transform_matrix import fit_transform_matrix

if TYPE_CHECKING:
    from .sft_trainer import CCSFTTrainer

logger = logging.get_logger(__name__)

LOG_PREFIX = "cc/"


class TrainingProgressCallback(TrainerCallback):
    """Tell the adapter, before every optimizer step, how far training is: `global_step / max_steps` in `[0, 1)`."""

    def __init__(self, trainer: CCSFTTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._report(state)  # also right after resuming from a checkpoint, before the first step runs

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._report(state)

    def _report(self, state: TrainerState) -> None:
        max_steps = state.max_steps or 0
        self.trainer.cc_model.set_training_progress(state.global_step / max_steps if max_steps > 0 else 0.0)


class DecisionMakerInitializationCallback(TrainerCallback):
    """Initialise the Decision Maker from training examples when training begins (with
    [`CCSFTTrainer.initialize_decision_maker`]).

    Only for an adapter whose Decision Maker waits for it (`CCConfig(decision_maker="variance_reinforce_gated")`),
    and not when training resumes from a checkpoint, which holds the trained Decision Maker.
    """

    def __init__(self, trainer: CCSFTTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step == 0 and self.trainer.cc_model.needs_decision_maker_initialization():
            self.trainer.initialize_decision_maker()


def initialize_decision_maker_from_training_data(trainer: CCSFTTrainer) -> torch.Tensor:
    """Initialise the trainer's Decision Maker from the first `decision_maker_init_examples` training examples.

    Runs [`CCModel.initialize_decision_maker`] on the first batches of a fresh training data loader, inside a forked
    random state, so that training then sees the same batches in the same order as without it and the global random
    state is as it was. With several processes, process 0's Decision Maker is broadcast to the others.

    Returns:
        `[S]` float32, the prior over the candidate source layers (each layer's share; see
        `VarianceReinforceConfig.prior`).
    """
    with torch.random.fork_rng(devices=[]):
        batches = list(_first_training_batches(trainer, trainer.args.decision_maker_init_examples))
    tuner = trainer.cc_model
    prior = tuner.initialize_decision_maker(batches)
    for parameter in tuner.decision_maker().parameters():
        _broadcast_from_main_process(trainer, parameter.data)
    favoured = prior.topk(min(3, len(prior)))
    layers = tuner.source_layers()
    logger.info(
        "Decision Maker initialised from %d training batches; most favoured source layers: %s",
        len(batches),
        ", ".join(f"{layers[i]} ({p:.0%})" for p, i in zip(favoured.values.tolist(), favoured.indices.tolist())),
    )
    return prior


def _first_training_batches(trainer: CCSFTTrainer, num_examples: int) -> Iterator[dict[str, Any]]:
    """The first batches of a training data loader, on the device, until they hold `num_examples` rows."""
    rows = 0
    for batch in trainer.get_train_dataloader():
        yield trainer._prepare_inputs(batch)
        rows += len(batch["input_ids"])
        if rows >= num_examples:
            return


class LayerChoiceCallback(TrainerCallback):
    """Counts of the Decision Maker's choices in the training forward calls, summed over processes.

    The trainer passes every training forward output to [`record`] and merges [`window_logs`] into each training log
    (so that the `cc/...` keys reach `state.log_history` and every reporter, like TRL's own metrics); when training
    ends, the counts of the whole run go into the adapter's model card facts (`layer_choice`).

    The counts are one float64 vector: `[S]` choices per candidate source layer, then the number of unconnected rows,
    of connected rows, and the sum over the connected rows of the entropy (nats) of the Decision Maker's softmax.
    """

    def __init__(self, trainer: CCSFTTrainer) -> None:
        self.trainer = trainer
        self.source_layers = trainer.cc_model.source_layers()
        self._window = self._zeros()  # since the previous log
        self._run = self._zeros()  # since training began
        self._recorded = False  # whether the window saw a forward call (the same on every process)

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(len(self.source_layers) + 3, dtype=torch.float64)

    @torch.no_grad()
    def record(self, outputs: Mapping[str, Any]) -> None:
        """Add the choices of one training forward output (`connected_rows` `[B]`, `layer_choice` and `layer_logits`
        `[B, S]`) to the counts of this process."""
        connected = outputs["connected_rows"]
        choice = outputs["layer_choice"][connected].float()  # [B', S] one-hot
        log_probs = torch.log_softmax(outputs["layer_logits"][connected].float(), dim=-1)  # [B', S]
        entropy = -(log_probs.exp() * log_probs).sum()
        extra = torch.stack([(~connected).sum().float(), connected.sum().float(), entropy])
        counts = torch.cat([choice.sum(dim=0), extra]).to("cpu", torch.float64)
        self._window += counts
        self._run += counts
        self._recorded = True

    def window_logs(self) -> dict[str, float]:
        """The `cc/...` entries of the choices since the previous call (see docs/training.md), summed over processes.

        Every process must call it at the same point (as `Trainer.log` is): the counts are all-reduced.
        """
        if not self._recorded:
            return {}
        counts, self._window, self._recorded = self._reduce(self._window), self._zeros(), False
        per_layer = self.trainer.args.log_layer_frequencies
        logs = self._summary(counts, per_layer)
        gate = getattr(self.trainer.cc_model.decision_maker(), "gate", None)
        if gate is not None:
            gates = dict(zip(self.source_layers, gate.detach().float().tolist()))
            most_chosen = logs.get(f"{LOG_PREFIX}most_chosen_layer")
            if most_chosen is not None:
                logs[f"{LOG_PREFIX}most_chosen_gate"] = gates[most_chosen]
            if per_layer:
                logs.update(_per_layer_logs("injection_gate", gates))
        return logs

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        counts = self._reduce(self._run)
        self._run = self._zeros()
        unconnected, connected = int(counts[-3]), int(counts[-2])
        if unconnected + connected == 0:
            return
        summary = self._summary(counts, per_layer=True)
        prefix = f"{LOG_PREFIX}layer_frequency/"
        frequency = {int(key[len(prefix) :]): value for key, value in summary.items() if key.startswith(prefix)}
        self.trainer.cc_model.model_card_facts["layer_choice"] = {
            "most_chosen": dict(sorted(frequency.items(), key=lambda item: -item[1])[:5]),
            "choice_entropy": summary[f"{LOG_PREFIX}choice_entropy"],
            "max_entropy": math.log(len(self.source_layers)),
            "num_source_layers": len(self.source_layers),
            "connected_rows": connected,
            "unconnected_rows": unconnected,
        }

    def _reduce(self, counts: torch.Tensor) -> torch.Tensor:
        accelerator = self.trainer.accelerator
        return accelerator.reduce(counts.to(accelerator.device), reduction="sum").to("cpu", torch.float64)

    def _summary(self, counts: torch.Tensor, per_layer: bool) -> dict[str, float]:
        per_source = counts[: len(self.source_layers)]
        unconnected, connected, entropy_sum = (float(value) for value in counts[-3:])
        logs = {f"{LOG_PREFIX}unconnected_rows": unconnected}
        if connected == 0:
            return logs
        frequency = per_source / connected
        nonzero = frequency[frequency > 0]
        most = int(per_source.argmax())
        # sum of p·log(1/p): non-negative term by term, so a single chosen layer logs 0.0, not -0.0
        logs[f"{LOG_PREFIX}choice_entropy"] = float((nonzero * nonzero.reciprocal().log()).sum())
        logs[f"{LOG_PREFIX}decision_entropy"] = entropy_sum / connected
        logs[f"{LOG_PREFIX}most_chosen_layer"] = self.source_layers[most]
        logs[f"{LOG_PREFIX}most_chosen_frequency"] = float(frequency[most])
        if per_layer:
            logs.update(_per_layer_logs("layer_frequency", dict(zip(self.source_layers, frequency.tolist()))))
        return logs


def _per_layer_logs(name: str, values: dict[int, float]) -> dict[str, float]:
    """`cc/<name>/<layer>` for each layer's value, the layer zero-padded to the widest (`07`) so that the keys sort."""
    width = len(str(max(values)))
    return {f"{LOG_PREFIX}{name}/{layer:0{width}d}": value for layer, value in values.items()}


class TrainingFactsCallback(TrainerCallback):
    """Put the run's settings, and the languages of a `language` column of the data, into the adapter's model card
    facts when training ends (see `peft_cc.model_card`)."""

    def __init__(self, trainer: CCSFTTrainer) -> None:
        self.trainer = trainer

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        facts = self.trainer.cc_model.model_card_facts
        facts["training"] = {
            "trainer": "peft_cc.CCSFTTrainer (TRL SFTTrainer)",
            "optimizer steps": state.global_step,
            "examples per step": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            "learning rate / schedule": f"{args.learning_rate:g} / {args.lr_scheduler_type}",
            "max length (tokens)": args.max_length,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "seed": args.seed,
        }
        dataset = self.trainer.train_dataset
        if "language" in (getattr(dataset, "column_names", None) or []) and not facts.get("languages"):
            facts["languages"] = sorted({str(language) for language in dataset["language"]})


class TransformMatrixCallback(TrainerCallback):
    """Fit the Transform Matrix on `transform_pairs` training pairs when training ends (none with `0`), so that the
    saved adapter generates with the monolingual connection right away."""

    def __init__(self, trainer: CCSFTTrainer) -> None:
        self.trainer = trainer

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.transform_pairs > 0:
            self.trainer.fit_transform_matrix()


def fit_transform_matrix_on_training_pairs(trainer: CCSFTTrainer, num_pairs: int) -> dict[str, Any] | None:
    """Fit the trainer's Transform Matrix on a seeded sample of `num_pairs` training pairs; see
    [`CCSFTTrainer.fit_transform_matrix`].

    Returns:
        The statistics of [`peft_cc.fit_transform_matrix`] (also logged as `cc/transform_...`), or `None` when the
        parameters are sharded over processes and the fit is skipped.
    """
    if num_pairs <= 0:
        raise ValueError(f"`num_pairs` must be >= 1, got {num_pairs}.")
    if _parameters_are_sharded(trainer):
        warnings.warn(
            "The parameters are sharded over processes (FSDP or DeepSpeed ZeRO-3), so the Transform Matrix is not "
            "fitted at the end of training. Save the adapter, then fit it in one process: load it with "
            "`PeftModel.from_pretrained(base, path, is_trainable=False)`, call `peft_cc.fit_transform_matrix` on "
            "training pairs and `save_pretrained` again (see docs/training.md).",
            stacklevel=3,
        )
        return None
    args = trainer.args
    stats = fit_transform_matrix(
        trainer.accelerator.unwrap_model(trainer.model),
        list(training_pairs(trainer.train_dataset, num_pairs, seed=args.seed)),
        batch_size=args.transform_batch_size or args.per_device_eval_batch_size,
        seed=args.seed,
        show_progress=trainer.is_local_process_zero() and not args.disable_tqdm,
    )
    _broadcast_from_main_process(trainer, trainer.cc_model.transform_matrix())
    trainer.log(
        {
            f"{LOG_PREFIX}transform_{key}": float(value)
            for key, value in stats.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    )
    return stats


def _broadcast_from_main_process(trainer: CCSFTTrainer, tensor: torch.Tensor) -> None:
    """Give every process process 0's `tensor` (in place); nothing to do in a single process."""
    if trainer.accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src=0)


def _parameters_are_sharded(trainer: CCSFTTrainer) -> bool:
    if trainer.is_fsdp_enabled:
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)
