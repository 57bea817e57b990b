"""`peft-cc sft`: TRL's parser over the CC options, a YAML config with flag overrides, the LoRA baseline, the help."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from conftest import make_tiny_model
from peft import LoraConfig
from sft_helpers import conversational_rows, make_tiny_tokenizer
from trl import SFTTrainer

from peft_cc import CCConfig
from peft_cc.cli import main
from peft_cc.scripts.sft import CCArguments, make_parser, parse_args
from peft_cc.scripts.sft import main as sft

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO_ROOT / "examples" / "cc_sft_mkqa.yaml"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama and the tiny chat tokenizer, saved as a normal checkpoint folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """The three columns `CCSFTTrainer` trains on, as chat messages, in a JSON Lines file."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in conversational_rows()))
    return path


@pytest.fixture
def config_file(tmp_path, tiny_checkpoint, pairs_file) -> Path:
    config = tmp_path / "cc.yaml"
    options = {
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
        "disable_tqdm": True,
    }
    config.write_text(yaml.safe_dump(options))
    return config


def run_sft(*argv: str):
    return sft(*parse_args(argv))


def test_config_file_then_flags_train_a_cc_adapter_with_its_card(tmp_path, config_file):
    """A YAML config sets the options, flags override it; the run trains, fits the matrix and saves the adapter."""
    trainer = run_sft("--config", str(config_file), "--max_steps", "1", "--source_layers", "0", "2")
    assert trainer.state.global_step == 1  # the flag, not the file's 5
    assert trainer.transform_matrix_stats["num_pairs"] + trainer.transform_matrix_stats["num_heldout_pairs"] == 8
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CC" and saved["source_layers"] == [0, 2]
    assert saved["r"] == 4 and saved["lora_alpha"] == 32  # TRL ModelConfig's default
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "Loading it needs the `peft-cc` package" in card and "pairs.jsonl" in card


def test_the_lora_baseline_is_a_plain_lora_adapter_that_loads_without_peft_cc(tmp_path, config_file, tiny_checkpoint):
    run_sft("--config", str(config_file), "--method", "lora", "--max_steps", "1")
    adapter = tmp_path / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 32
    assert saved["target_modules"] and "english_gradients" not in saved
    card = (adapter / "README.md").read_text()
    assert "baseline of a CC-Tuning run" in card and "import peft_cc" not in card
    # A process that never imports peft_cc loads it.
    script = (
        "import sys; from peft import PeftModel; from transformers import AutoModelForCausalLM\n"
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tiny_checkpoint)!r}), "
        f"{str(adapter)!r})\n"
        "assert 'peft_cc' not in sys.modules, 'peft_cc was imported'\n"
        "print(type(model.peft_config['default']).__name__)"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "LoraConfig"


def test_both_methods_see_the_same_batches_in_the_same_order(config_file):
    """The baseline differs from the CC run only by the English pass: same rows, same order, same seed."""

    def batches(method: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        seen, compute_loss = [], SFTTrainer.compute_loss

        def recording(self, model, inputs, *args, **kwargs):
            seen.append((inputs["input_ids"].clone(), inputs["labels"].clone()))
            return compute_loss(self, model, inputs, *args, **kwargs)

        with mock.patch.object(SFTTrainer, "compute_loss", recording):
            run_sft("--config", str(config_file), "--method", method, "--max_steps", "3", "--transform_pairs", "0")
        return seen

    cc, lora = batches("cc"), batches("lora")
    assert len(cc) == len(lora) == 3
    for (cc_ids, cc_labels), (lora_ids, lora_labels) in zip(cc, lora):
        assert torch.equal(cc_ids, lora_ids) and torch.equal(cc_labels, lora_labels)
    assert not torch.equal(cc[0][0], cc[1][0])  # not one batch repeated


def test_the_lora_baseline_needs_no_english_column(tmp_path, config_file):
    rows = [{key: row[key] for key in ("prompt", "completion")} for row in conversational_rows()]
    monolingual = tmp_path / "monolingual.jsonl"
    monolingual.write_text("".join(json.dumps(row) + "\n" for row in rows))
    trainer = run_sft(
        "--config", str(config_file), "--method", "lora", "--max_steps", "1", "--dataset_name", str(monolingual)
    )
    assert trainer.state.global_step == 1


def test_data_without_the_english_column_fails_before_the_model_is_loaded_saying_how_to_fix_it(tmp_path, config_file):
    rows = [{key: row[key] for key in ("prompt", "completion")} for row in conversational_rows()]
    monolingual = tmp_path / "monolingual.jsonl"
    monolingual.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError) as error:  # a model that does not exist: the data is checked first
        run_sft("--config", str(config_file), "--dataset_name", str(monolingual), "--model_name_or_path", "/no/model")
    message = str(error.value)
    assert "no `prompt_en` column" in message and "--english_prompt_field" in message
    assert "examples/load_parallel_dataset.py" in message and "--method lora" in message


def test_every_connection_option_of_cc_config_is_a_flag():
    connection = {field.name for field in dataclasses.fields(CCConfig)} - {
        field.name for field in dataclasses.fields(LoraConfig)
    }
    recorded = {"generation_prompt_ids"}  # recorded by the trainer from the tokenizer, not chosen
    assert connection - recorded <= {field.name for field in dataclasses.fields(CCArguments)}


def test_the_help_starts_with_the_config_file_and_the_cc_options():
    help_text = make_parser().format_help()
    first_screen = "\n".join(help_text.splitlines()[:100])
    assert help_text.startswith("usage: peft-cc sft [--config CONFIG.yaml]")
    for option in ("--config", "--method", "--injection_layer", "--source_layers", "--english_gradients"):
        assert option in first_screen, option
    for option in ("--english_prompt_field", "--transform_pairs", "--gumbel_temperature", "--ffn_output_module"):
        assert option in first_screen, option
    assert ":class:" not in help_text
    assert "\n  peft-cc sft --config examples/cc_sft_mkqa.yaml\n" in help_text  # examples on lines of their own


def test_missing_dataset_says_what_to_give(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"No dataset: set `dataset_name`.*`prompt`, `completion`"):
        run_sft("--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(tmp_path), "--bf16", "false")


def test_missing_dataset_file_is_named(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl does not exist"):
        run_sft(
            *("--model_name_or_path", str(tiny_checkpoint), "--dataset_name", "nowhere.jsonl"),
            *("--output_dir", str(tmp_path), "--bf16", "false"),
        )


def test_evaluation_on_a_single_file_is_refused(tiny_checkpoint, pairs_file, tmp_path):
    """A file has no test split: evaluating on it would evaluate on the training rows."""
    with pytest.raises(ValueError, match=r"single file\s+with no test split"):
        run_sft(
            *("--model_name_or_path", str(tiny_checkpoint), "--dataset_name", str(pairs_file), "--bf16", "false"),
            *("--output_dir", str(tmp_path), "--eval_strategy", "steps", "--eval_steps", "1"),
        )


def test_without_a_command_prints_the_commands(capsys):
    assert main([]) == 2
    usage = capsys.readouterr().err
    assert "peft-cc {sft,compare}" in usage and "compare two lm-evaluation-harness runs" in usage


def test_the_shipped_config_parses_for_both_methods():
    for method in ("cc", "lora"):
        script_args, training_args, model_args, cc_args = parse_args(
            ["--config", str(SHIPPED_CONFIG), "--method", method]
        )
        assert cc_args.method == method and model_args.model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert script_args.dataset_name.endswith(".jsonl")
