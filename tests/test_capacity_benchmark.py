"""benchmarks/connection_capacity/connection_capacity.py: forced-layer arms, the informativeness profile and restricted
candidates.

The mechanics run on a tiny random Llama with SmolLM2's tokenizer and chat template (the capacity task's prompts need a
chat template); what the arms learn on the real model is measured in benchmarks/connection_capacity/README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import connection_capacity
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

NUM_LAYERS = 7


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 7-layer random Llama (d=32) saved with SmolLM2's tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-capacity")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=smollm2_tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    return directory


def _run(monkeypatch, checkpoint: Path, output_dir: Path, *options: str) -> None:
    common = ["--steps", "2", "--batch-size", "2", "--window", "1", "--eval-every", "2"]
    arguments = ["connection_capacity.py", "--model", str(checkpoint), "--output-dir", str(output_dir)]
    monkeypatch.setattr(sys, "argv", [*arguments, *common, *options])
    connection_capacity.main()


def test_profile_arms_are_every_third_layer_and_the_last_four():
    assert connection_capacity.profile_arms(30) == [
        f"forced_{layer}" for layer in (0, 3, 6, 9, 12, 15, 18, 21, 24, 26, 27, 28, 29)
    ]
    assert connection_capacity.profile_arms(3) == ["forced_0", "forced_1", "forced_2"]


def test_source_layer_lists_parse_ranges_and_negative_layers_and_refuse_others():
    parse = connection_capacity.parse_layers
    assert parse("0-3", 30) == [0, 1, 2, 3]
    assert parse("0-2, 10, -1", 30) == [0, 1, 2, 10, 29]
    assert parse("-4--1", 30) == [26, 27, 28, 29]
    for bad in ("0-30", "5-2", "-31", "-40-3", "a", "1-", ""):
        with pytest.raises(ValueError, match="--source-layers"):
            parse(bad, 30)


def test_forced_arms_use_their_layer_and_candidates_restrict_the_other_arms(monkeypatch, tiny_checkpoint, tmp_path):
    arms = "profile,forced_-1,decision_maker_lr_5e-2,paper_default"
    _run(monkeypatch, tiny_checkpoint, tmp_path, "--arms", arms, "--source-layers", "0-2,5")
    results = json.loads((tmp_path / "results.json").read_text())
    forced = ["forced_0", "forced_3", "forced_4", "forced_5", "forced_6", "forced_-1"]
    assert list(results) == [*forced, "decision_maker_lr_5e-2", "paper_default"]
    for name in forced:
        layer = int(name.removeprefix("forced_")) % NUM_LAYERS
        assert results[name]["source_layers"] == [layer]
        assert {window["most_chosen_layer"] for window in results[name]["windows"]} == {layer}
    assert (tmp_path / "profile.png").stat().st_size > 0
    assert (
        results["decision_maker_lr_5e-2"]["source_layers"] == results["paper_default"]["source_layers"] == [0, 1, 2, 5]
    )
    for window in results["decision_maker_lr_5e-2"]["windows"] + results["paper_default"]["windows"]:
        assert window["most_chosen_layer"] in (0, 1, 2, 5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--arms", "forced_7"], "outside the model's 7 decoder layers"),
        (["--arms", "no_such_arm"], "Unknown arms"),
        (["--arms", "paper_default", "--source-layers", "0-9"], "outside the model's 7 layers"),
    ],
)
def test_bad_arms_and_candidates_are_refused_before_training(monkeypatch, tiny_checkpoint, tmp_path, options, message):
    with pytest.raises(SystemExit, match=message):
        _run(monkeypatch, tiny_checkpoint, tmp_path, *options)
    assert not (tmp_path / "results.json").exists()
