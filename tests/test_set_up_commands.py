"""The README's two set-up commands run with the thread settings they state: the main job one torch thread per idle
core, the suite two workers of one thread each."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from helpers import REPO_ROOT

MAIN_JOB = REPO_ROOT / "examples" / "main_job.sh"


def settings(**environment: str) -> dict[str, str]:
    """The settings `examples/main_job.sh` resolves from `environment` (its `--settings` output)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("OMP_NUM_THREADS", "STEPS", "PEFT_CC_BUSY_CORES")
    }
    printed = subprocess.run(
        ["bash", str(MAIN_JOB), "--settings"], capture_output=True, text=True, check=True, env={**env, **environment}
    ).stdout
    return dict(line.split("=", 1) for line in printed.splitlines())


def test_the_main_job_runs_a_torch_thread_per_idle_core_unless_told_otherwise():
    cores = len(os.sched_getaffinity(0))  # what `nproc` counts
    assert settings(PEFT_CC_BUSY_CORES="0.0")["OMP_NUM_THREADS"] == str(cores)  # an idle machine: every core
    assert settings(PEFT_CC_BUSY_CORES=str(cores))["OMP_NUM_THREADS"] == "1"  # every core busy: one thread, never none
    assert settings(PEFT_CC_BUSY_CORES=str(cores + 3.2))["OMP_NUM_THREADS"] == "1"
    told = settings(OMP_NUM_THREADS="3", STEPS="5", PEFT_CC_BUSY_CORES="0.0")
    assert (told["OMP_NUM_THREADS"], told["STEPS"]) == ("3", "5")


def test_the_main_job_trains_both_arms_from_the_shipped_config_and_compares_them():
    script = MAIN_JOB.read_text()
    assert 'peft-cc sft --config examples/cc_sft_mkqa.yaml --method "$method"' in script
    assert "for method in cc lora" in script and "for system in base lora cc" in script
    assert "--log_samples" in script and 'peft-cc compare "$output/eval/lora" "$output/eval/cc"' in script


@pytest.mark.skipif(os.environ.get("PEFT_CC_EXPECT_WHEEL") != "1", reason="checks the settings .ci/run runs with")
def test_the_suite_runs_in_two_workers_of_one_torch_thread_each():
    assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
    assert os.environ.get("PYTEST_XDIST_WORKER_COUNT") == "2"
