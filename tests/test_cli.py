"""`peft-cc sft`: TRL's parser over the CC options, a YAML config with flag overrides, and the shipped config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import train_cc
import yaml
from conftest import make_tiny_model
from sft_helpers import conversational_rows, make_tiny_tokenizer

from peft_cc.cli import main, make_parser, sft

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO_ROOT / "examples" / "cc_sft_mkqa.yaml"


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """A tiny random Llama and the tiny chat tokenizer, saved as a normal checkpoint folder."""
    folder = tmp_path / "tiny-llama"
    make_tiny_model("llama").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    """The three columns `CCSFTTrainer` trains on, as chat messages, in a JSON Lines file."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in conversational_rows()))
    return path


def test_config_file_then_flags(tmp_path, tiny_checkpoint, pairs_file):
    """A YAML config sets the options, flags override it; the run trains, fits the matrix and saves the adapter."""
    config = tmp_path / "cc.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_checkpoint),
                "dataset_name": str(pairs_file),
                "output_dir": str(tmp_path / "adapter"),
                "max_steps": 5,
                "per_device_train_batch_size": 4,
                "lora_r": 4,
                "transform_pairs": 8,
                "bf16": False,
                "report_to": "none",
                "save_strategy": "no",
            }
        )
    )
    arguments = make_parser().parse_args_and_config(
        ["--config", str(config), "--max_steps", "1", "--decision_maker", "variance_reinforce_gated"]
    )
    trainer = sft(*arguments)
    assert trainer.state.global_step == 1  # the flag, not the file's 5
    assert trainer.transform_matrix_stats["num_pairs"] + trainer.transform_matrix_stats["num_heldout_pairs"] == 8
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CC"
    assert saved["r"] == 4 and saved["lora_alpha"] == 32  # TRL ModelConfig's default
    assert saved["decision_maker"] == "variance_reinforce_gated"  # the strategy named on the command line
    assert saved["variance_reinforce_config"]["gate_init"] == 0.3
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_missing_dataset_says_what_to_give(tiny_checkpoint, tmp_path):
    arguments = make_parser().parse_args_and_config(
        ["--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(tmp_path), "--bf16", "false"]
    )
    with pytest.raises(ValueError, match=r"No dataset: set `dataset_name`.*`prompt`, `completion`"):
        sft(*arguments)


def test_missing_dataset_file_is_named(tiny_checkpoint, tmp_path):
    arguments = make_parser().parse_args_and_config(
        ["--model_name_or_path", str(tiny_checkpoint), "--dataset_name", "nowhere.jsonl"]
        + ["--output_dir", str(tmp_path), "--bf16", "false"]
    )
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl does not exist"):
        sft(*arguments)


def test_without_subcommand_prints_usage(capsys):
    assert main([]) == 2
    assert "peft-cc sft --config" in capsys.readouterr().err


def test_shipped_config_is_the_main_jobs_training(monkeypatch):
    """examples/cc_sft_mkqa.yaml parses and trains with the main job's (examples/train_cc.py's) settings."""
    script_args, training_args, model_args, cc_args = make_parser().parse_args_and_config(
        ["--config", str(SHIPPED_CONFIG)]
    )
    monkeypatch.setattr(sys, "argv", ["train_cc.py"])
    main_job = train_cc.parse_args()
    assert model_args.model_name_or_path == main_job.model
    assert (training_args.max_steps, training_args.per_device_train_batch_size) == (
        main_job.steps,
        main_job.batch_size,
    )
    assert training_args.learning_rate == main_job.learning_rate
    assert training_args.max_length == main_job.max_length
    assert training_args.transform_pairs == main_job.transform_pairs
    assert training_args.logging_steps == main_job.logging_steps and training_args.seed == main_job.seed
    assert training_args.warmup_steps == max(1, main_job.steps // 10)
    assert (model_args.lora_r, model_args.lora_alpha) == (main_job.lora_r, 2 * main_job.lora_r)
    assert cc_args.decision_maker == main_job.decision_maker
    assert script_args.dataset_name == "outputs/mkqa_train.jsonl"


def test_evaluation_on_a_single_file_is_refused(tiny_checkpoint, pairs_file, tmp_path):
    """A file has no test split: evaluating on it would evaluate on the training rows."""
    arguments = make_parser().parse_args_and_config(
        ["--model_name_or_path", str(tiny_checkpoint), "--dataset_name", str(pairs_file), "--bf16", "false"]
        + ["--output_dir", str(tmp_path), "--eval_strategy", "steps", "--eval_steps", "1"]
    )
    with pytest.raises(ValueError, match=r"single file\s+with no test split"):
        sft(*arguments)
