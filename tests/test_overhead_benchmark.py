"""benchmarks/overhead/overhead.py: its JSON keys (stable: checks outside the suite read them), the allocator setting.

Runs the script on a tiny random Llama with one repetition; what the ratios are on the real model is measured in
benchmarks/overhead/README.md, never asserted here.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT
from transformers import LlamaConfig, LlamaForCausalLM

KEYS = {
    "model",
    "torch_threads",
    "malloc_keeps_freed_memory",
    "repeats",
    "train_step_ratio",
    "train_step_floor",
    "train_step_ratio_no_english_grad",
    "train_step_floor_no_english_grad",
    "generate_ratio",
    "generate_ratio_naive",
    "score_ratio",
    "score_ratio_naive",
    "fit_seconds_per_pair",
    "seconds",
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-overhead")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,  # the script draws token ids from [100, vocab_size - 100)
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def run_overhead(checkpoint: Path, *extra: str) -> dict:
    command = [sys.executable, "benchmarks/overhead/overhead.py", "--model", str(checkpoint), "--repeats", "1"]
    command += ["--fit-pairs", "2", "--threads", "1", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("system_malloc", [False, True])
def test_overhead_reports_every_figure_and_the_allocator_setting(tiny_checkpoint, system_malloc):
    result = run_overhead(tiny_checkpoint, *(["--system-malloc"] if system_malloc else []))
    assert set(result) == KEYS
    assert result["torch_threads"] == 1
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert result["malloc_keeps_freed_memory"] is (glibc and not system_malloc)
    for key in KEYS - {"model", "torch_threads", "malloc_keeps_freed_memory", "repeats", "seconds"}:
        assert result[key] > 0, key
    # The floors add a measured English pass to 1.
    assert result["train_step_floor"] > 1 and result["train_step_floor_no_english_grad"] > 1
