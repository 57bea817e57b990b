"""`peft-cc sft`: train a CC-Tuning adapter, or its plain LoRA baseline, from the command line (as `trl sft`).

examples:
  # CC-Tuning with the options of a YAML file (one key per option; flags given after it win)
  peft-cc sft --config examples/cc_sft_mkqa.yaml
  # the plain LoRA baseline of the same run: same LoRA options, data, order, seed, schedule and lengths
  peft-cc sft --config examples/cc_sft_mkqa.yaml --method lora --output_dir outputs/lora-smollm2
  # everything from flags
  peft-cc sft --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name pairs.jsonl \\
      --output_dir cc-qwen --lora_r 16 --max_steps 200 --source_layers 0 8 16 23

data: a .jsonl/.json/.csv/.parquet file, a folder saved with `save_to_disk`, or a Hub dataset id (`--dataset_name`),
with the columns `prompt`, `completion` and the English prompt (`--english_prompt_field`, default `prompt_en`), as
chat messages or strings; examples/load_parallel_dataset.py builds them from common parallel layouts. The LoRA
baseline ignores the English column.

The CC-Tuning options come first below; then the data (trl.ScriptArguments), the model, LoRA and quantization
(trl.ModelConfig) and the training (peft_cc.CCSFTConfig: trl.SFTConfig and transformers.TrainingArguments).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import CCConfig

DATASET_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
# The CCSFTConfig options of CC-Tuning, shown in the help's first group with those of `CCArguments`.
CC_TRAINING_OPTIONS = (
    "english_prompt_field",
    "transform_pairs",
    "transform_batch_size",
    "deterministic_gumbel_noise",
    "log_layer_frequencies",
)
CC_GROUP = "CC-Tuning (peft_cc.CCConfig and the CC options of peft_cc.CCSFTConfig)"


def _help_of(name: str) -> dict[str, Any]:
    """The metadata (the help text) of the `CCConfig` field `name`."""
    return dict(CCConfig.__dataclass_fields__[name].metadata)


@dataclass
class CCArguments:
    """The method to train, and the `CCConfig` options that `trl.ModelConfig`'s LoRA options do not cover."""

    method: Literal["cc", "lora"] = field(
        default="cc",
        metadata={
            "help": "`cc` trains CC-Tuning; `lora` trains its baseline: a plain PEFT LoRA adapter with the same LoRA "
            "options, data, data order, seed, schedule and length limits, without the English pass (the English "
            "column is ignored)."
        },
    )
    injection_layer: int = field(default=0, metadata=_help_of("injection_layer"))
    source_layers: list[int] | None = field(default=None, metadata=_help_of("source_layers"))
    gumbel_temperature: float = field(default=1.0, metadata=_help_of("gumbel_temperature"))
    english_gradients: bool = field(default=True, metadata=_help_of("english_gradients"))
    ffn_output_module: str | None = field(default=None, metadata=_help_of("ffn_output_module"))


def make_parser(prog: str = "peft-cc sft"):
    """TRL's parser over :class:`CCArguments`, `ScriptArguments`, `ModelConfig` and `CCSFTConfig`, their options in
    help groups (the CC-Tuning options first), with `--config` listed."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    from ..sft_config import CCSFTConfig

    parser = TrlParser(
        (CCArguments, ScriptArguments, ModelConfig, CCSFTConfig),
        prog=prog,
        usage=f"{prog} [--config CONFIG.yaml] [--OPTION VALUE ...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="CONFIG.yaml",
        default=argparse.SUPPRESS,
        help="a YAML file of options (one key per option, as the flags below are named); flags given too win",
    )
    cc_options = {field.name for field in dataclasses.fields(CCArguments)} | set(CC_TRAINING_OPTIONS)
    groups = {
        CC_GROUP: cc_options,
        "data (trl.ScriptArguments)": {field.name for field in dataclasses.fields(ScriptArguments)},
        "model, LoRA and quantization (trl.ModelConfig)": {field.name for field in dataclasses.fields(ModelConfig)},
        "training (peft_cc.CCSFTConfig: trl.SFTConfig and transformers.TrainingArguments)": {
            field.name for field in dataclasses.fields(CCSFTConfig)
        }
        - cc_options,
    }
    for title, destinations in groups.items():
        _move_to_group(parser, parser.add_argument_group(title), destinations)
    return parser


def _move_to_group(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup, destinations: set[str]) -> None:
    """Show the options of `destinations` in the help group `group` (argparse keeps groups for the help only)."""
    for other in parser._action_groups:
        if other is group:
            continue
        moved = [action for action in other._group_actions if action.dest in destinations]
        other._group_actions[:] = [action for action in other._group_actions if action not in moved]
        group._group_actions.extend(moved)


def load_any(source: str, split: str = "train", name: str | None = None):
    """A `datasets.Dataset` from a local file (`.json`, `.jsonl`, `.csv`, `.parquet`, `.arrow`), a folder saved with
    `save_to_disk`, or a Hub dataset id (`load_dataset(source, name=name, split=split)`)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(source)
    if path.is_file() and path.suffix in DATASET_FILE_BUILDERS:
        return load_dataset(DATASET_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    if path.is_dir() and any((path / marker).is_file() for marker in ("dataset_info.json", "dataset_dict.json")):
        loaded = load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, DatasetDict) else loaded
    if path.suffix in DATASET_FILE_BUILDERS or source.startswith((".", "/")):
        raise FileNotFoundError(
            f"The dataset file {source} does not exist (a relative path starts from the working directory, "
            f"{Path.cwd()})."
        )
    return load_dataset(source, name=name, split=split)


def lora_options(model_args) -> dict[str, Any]:
    """The LoRA options of TRL's `ModelConfig`, the same for both methods (all linear layers unless
    `lora_target_modules` names others)."""
    options = {
        "r": model_args.lora_r,
        "lora_alpha": model_args.lora_alpha,
        "lora_dropout": model_args.lora_dropout,
        "target_modules": model_args.lora_target_modules or "all-linear",
        "modules_to_save": model_args.lora_modules_to_save,
        "use_rslora": model_args.use_rslora,
        "use_dora": model_args.use_dora,
    }
    if model_args.lora_target_parameters is not None:
        options["target_parameters"] = model_args.lora_target_parameters
    return options


def adapter_config(model_args, cc_args: CCArguments):
    """The adapter to train: a `CCConfig` (`method="cc"`) or the baseline's `peft.LoraConfig` (`method="lora"`)."""
    from peft import LoraConfig

    if cc_args.method == "lora":
        return LoraConfig(task_type="CAUSAL_LM", **lora_options(model_args))
    connection = {name: getattr(cc_args, name) for name in ("injection_layer", "source_layers", "gumbel_temperature")}
    return CCConfig(
        **lora_options(model_args),
        **connection,
        english_gradients=cc_args.english_gradients,
        ffn_output_module=cc_args.ffn_output_module,
    )


def main(script_args, training_args, model_args, cc_args: CCArguments):
    """Train, fit the Transform Matrix (CC-Tuning), save the adapter with its model card (and push it with
    `push_to_hub`); returns the trainer."""
    from trl import SFTTrainer, get_quantization_config

    from ..model_card import training_run_facts, write_model_card
    from ..sft_trainer import CCSFTTrainer

    if not model_args.model_name_or_path:
        raise ValueError("No model: set `model_name_or_path` (a Hub id or a local folder).")
    if not script_args.dataset_name:
        raise ValueError(
            "No dataset: set `dataset_name` to a .jsonl/.json/.csv/.parquet file, a saved dataset folder or a Hub "
            "dataset id with the columns `prompt`, `completion` and the English prompt (`english_prompt_field`)."
        )
    if cc_args.method not in ("cc", "lora"):
        raise ValueError(f"`method` must be 'cc' or 'lora', got {cc_args.method!r}.")
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    train = load_any(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    evaluation = None
    if training_args.eval_strategy != "no":
        if Path(script_args.dataset_name).is_file():
            raise ValueError(
                f"eval_strategy is {training_args.eval_strategy!r}, but {script_args.dataset_name} is a single file "
                "with no test split: set `eval_strategy: no`, or use a saved dataset or Hub dataset with a "
                "`dataset_test_split`."
            )
        evaluation = load_any(script_args.dataset_name, script_args.dataset_test_split, script_args.dataset_config)
    trainer_class = CCSFTTrainer
    if cc_args.method == "lora":
        trainer_class = SFTTrainer
        english = training_args.english_prompt_field
        train, evaluation = (
            data.remove_columns(english) if data is not None and english in data.column_names else data
            for data in (train, evaluation)
        )
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        quantization_config=get_quantization_config(model_args),
        peft_config=adapter_config(model_args, cc_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if cc_args.method == "cc":
        trainer.create_model_card(dataset_name=script_args.dataset_name)
    elif trainer.is_world_process_zero():
        write_model_card(
            training_args.output_dir,
            datasets=[script_args.dataset_name],
            baseline_of="CC-Tuning with the options of this run, `--method cc`",
            **training_run_facts(training_args, trainer.state, train, "trl.SFTTrainer"),
        )
    trainer.accelerator.print(f"Adapter saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def parse_args(argv: Sequence[str] | None = None) -> tuple:
    """`(script_args, training_args, model_args, cc_args)` of the command line `argv` (default: `sys.argv[1:]`), in
    the order :func:`main` takes them."""
    cc_args, script_args, model_args, training_args = make_parser().parse_args_and_config(argv)
    return script_args, training_args, model_args, cc_args


def run(argv: Sequence[str] | None = None) -> int:
    """`peft-cc sft ARGV` (the arguments without the command's name); returns the exit status."""
    main(*parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run())
