"""`peft-cc sft`: train a CC-Tuning adapter from the command line, in the style of `trl sft`.

The options are those of TRL's own parser (`trl.TrlParser`): every `CCSFTConfig` field (TRL's `SFTConfig` and
`transformers.TrainingArguments` included), TRL's `ModelConfig` (model, dtype, LoRA rank, 4-bit loading), TRL's
`ScriptArguments` (dataset) and the CC-Tuning options of :class:`CCArguments`. They come from a YAML file
(`--config cc.yaml`, one key per option), from flags, or both (flags win):

    peft-cc sft --config examples/cc_sft_mkqa.yaml
    peft-cc sft --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name my_pairs.jsonl \\
        --output_dir my-cc-adapter --decision_maker variance_reinforce_gated --max_steps 200

The dataset (`dataset_name`: a `.jsonl`/`.json`/`.csv`/`.parquet` file, a folder saved with `save_to_disk`, or a Hub
dataset id) must hold the three columns of `CCSFTTrainer`: `prompt`, `completion` and the English prompt
(`english_prompt_field`, default `prompt_en`), as strings or as chat messages.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import DECISION_MAKER_STRATEGIES, CCConfig

DATASET_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass
class CCArguments:
    """The options of the cross-lingual connection that `trl.ModelConfig`'s LoRA options do not cover."""

    decision_maker: str = field(
        default="paper",
        metadata={
            "help": "Decision Maker strategy (`CCConfig.decision_maker`): `paper` is the published method, "
            "`variance_reinforce_gated` one built to find a single informative layer (docs/decision_maker.md).",
            "choices": list(DECISION_MAKER_STRATEGIES),
        },
    )
    injection_layer: int = field(
        default=0, metadata={"help": "Decoder layer after which the English activation is added (0: the first)."}
    )
    english_gradients: bool = field(
        default=True, metadata={"help": "Backpropagate through the English pass (the paper); false saves memory."}
    )


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


def cc_config_from(model_args, cc_args: CCArguments) -> CCConfig:
    """The adapter configuration: LoRA from TRL's `ModelConfig` (all linear layers unless `lora_target_modules`),
    the connection from :class:`CCArguments`."""
    return CCConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear",
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        injection_layer=cc_args.injection_layer,
        english_gradients=cc_args.english_gradients,
        decision_maker=cc_args.decision_maker,
    )


def make_parser(prog: str = "peft-cc sft"):
    """TRL's parser over `ScriptArguments`, `CCSFTConfig`, `ModelConfig` and :class:`CCArguments`."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    from .sft_config import CCSFTConfig

    return TrlParser((ScriptArguments, CCSFTConfig, ModelConfig, CCArguments), prog=prog, description=__doc__)


def sft(script_args, training_args, model_args, cc_args: CCArguments):
    """Train, fit the Transform Matrix, save the adapter (and push it with `push_to_hub`); returns the trainer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    from .sft_trainer import CCSFTTrainer

    if not model_args.model_name_or_path:
        raise ValueError("No model: set `model_name_or_path` (a Hub id or a local folder).")
    if not script_args.dataset_name:
        raise ValueError(
            "No dataset: set `dataset_name` to a .jsonl/.json/.csv/.parquet file, a saved dataset folder or a Hub "
            "dataset id with the columns `prompt`, `completion` and the English prompt (`english_prompt_field`)."
        )
    path = model_args.model_name_or_path
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=training_args.trust_remote_code,
        quantization_config=get_quantization_config(model_args),
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=training_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
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
    trainer = CCSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=cc_config_from(model_args, cc_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Adapter saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def main(argv: Sequence[str] | None = None) -> int:
    """`peft-cc sft [options]`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "sft":
        print(
            "usage: peft-cc sft --config cc.yaml [options]   (peft-cc sft --help lists the options)", file=sys.stderr
        )
        return 2
    parser = make_parser()
    script_args, training_args, model_args, cc_args = parser.parse_args_and_config(argv[1:])
    sft(script_args, training_args, model_args, cc_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
