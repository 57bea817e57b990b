"""benchmarks/qlora_gpu.py: QLoRA CC-Tuning against plain QLoRA (a tiny model on the CPU; the 8B shape on a GPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "qlora_gpu.py"
VARIANTS = ("plain_lora", "cc", "cc_no_english_grad", "cc_variance_reinforce")


def run_benchmark(tmp_path: Path, *options: str) -> dict:
    output = tmp_path / "qlora.json"
    command = [sys.executable, str(SCRIPT), "--checkpoint-dir", str(tmp_path / "base"), "--output", str(output)]
    subprocess.run([*command, *options], check=True, capture_output=True, timeout=1800)
    return json.loads(output.read_text())


def test_benchmark_trains_all_variants_on_4bit_layers_on_the_cpu(tmp_path):
    tiny = ["--tiny", "--device", "cpu", "--prompt-tokens", "16", "--response-tokens", "8", "--steps", "2"]
    result = run_benchmark(tmp_path, *tiny, "--warmup-steps", "1", "--new-tokens", "2", "--fit-pairs", "8")
    assert result["device"] == "cpu" and result["versions"]["bitsandbytes"]
    for variant in VARIANTS:
        assert result[variant]["step_seconds"] > 0 and math.isfinite(result[variant]["loss"])
    ratios = ("train_step_ratio", "train_step_ratio_no_english_grad", "train_step_ratio_variance_reinforce")
    for ratio in (*ratios, "generate_ratio"):
        assert math.isfinite(result[ratio]) and result[ratio] > 0
    assert (tmp_path / "base" / "model.safetensors").exists()  # the random checkpoint, which a next run reuses


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: QLoRA at the Llama-3.1-8B shape")
def test_cc_tuning_of_an_8b_shape_fits_a_24gb_card(tmp_path):
    result = run_benchmark(tmp_path)  # 2 rows x 1024 tokens, the settings of examples/qlora_8b_24gb.py
    for variant in VARIANTS:
        assert result[variant]["device_used_gib"] < 24
