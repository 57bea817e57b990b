"""The CC-Tuning vs LoRA experiment script: its data split and its seed summary (no training here)."""

from __future__ import annotations

import os

import multilingual_sft as experiment
import pytest
from helpers import REPO_ROOT

from peft_cc.parallel_data import available_languages, load_parallel_items

DATA_ROOT = os.environ.get("PEFT_CC_BENCHMARKS", str(REPO_ROOT.parent / "shared" / "data" / "benchmarks"))


def test_no_evaluated_item_is_trained_on_in_any_language(smollm2_tokenizer, monkeypatch):
    if not os.path.isdir(DATA_ROOT):
        pytest.skip(f"no benchmark data at {DATA_ROOT}")
    monkeypatch.setattr("sys.argv", ["multilingual_sft.py", "--data-root", DATA_ROOT, "--steps", "50"])
    args = experiment.parse_args()
    pairs = experiment.training_pairs(args, smollm2_tokenizer)
    assert len(pairs) == 50 * args.batch_size

    held_out = set()
    for benchmark in experiment._names(args.train_benchmarks):
        for language in available_languages(DATA_ROOT, benchmark):
            for item in load_parallel_items(DATA_ROOT, benchmark, language)[: args.split]:
                held_out |= {item.prompt, item.english_prompt}
    prompts = {row["prompt"][0]["content"] for row in pairs} | {row["prompt_en"][0]["content"] for row in pairs}
    assert not prompts & held_out
    for row in pairs:
        text = row["prompt"][0]["content"] + " " + row["completion"][0]["content"]
        assert len(smollm2_tokenizer(text)["input_ids"]) + 16 <= args.max_length


def test_seed_summary_pools_the_seeds_of_each_system():
    def result(mkqa_nll: float, xnli: float) -> dict:
        return {
            "benchmarks": {
                "MKQA": {"average_non_english": {"accuracy": 0.0, "answer_nll": mkqa_nll}},
                "XNLI": {"average_non_english": {"accuracy": xnli, "accuracy_loglik": xnli}},
            }
        }

    table = experiment.seed_summary(
        {"base": result(4.0, 0.25), "lora-seed0": result(3.0, 0.5), "lora-seed1": result(3.5, 0.25)}
    )
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {"base", "lora"}
    assert "| lora | 2 | 0.0 ± 0.0 | 3.25 ± 0.25 | – | – | 37.5 ± 12.5 | 37.5 ± 12.5 |" == rows["lora"]
    assert "| base | 1 | 0.0 | 4.00 |" in rows["base"]


def test_cc_options_and_systems_are_parsed_and_checked(monkeypatch):
    options = '{"decision_maker": "variance_reinforce_gated", "variance_reinforce_config": {"start_fraction": 0.5}}'
    argv = ["multilingual_sft.py", "--systems", "cc", "--cc-name", "cc-ev", "--cc-options", options]
    argv += ["--cc-trainer-options", '{"decision_maker_learning_rate": 0.005}']
    monkeypatch.setattr("sys.argv", argv)
    args = experiment.parse_args()
    assert args.cc_options == {
        "decision_maker": "variance_reinforce_gated",
        "variance_reinforce_config": {"start_fraction": 0.5},
    }
    assert args.cc_trainer_options == {"decision_maker_learning_rate": 0.005}
    assert experiment._names(args.systems) == ["cc"] and args.cc_name == "cc-ev"
    for wrong in (
        ["--systems", "base,gpt"],
        ["--cc-options", "[1]"],
        ["--cc-options", "{not json"],
        ["--cc-trainer-options", "3"],
    ):
        monkeypatch.setattr("sys.argv", ["multilingual_sft.py", *wrong])
        with pytest.raises(SystemExit):
            experiment.parse_args()
