"""CCSFTTrainer under distributed data parallel: two CPU processes (gloo) against one process, same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
WORKER = TESTS / "ddp_worker.py"


def _run(command: list[str], timeout: int = 300) -> str:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for name in [name for name in env if name.startswith(("ACCELERATE_", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))]:
        env.pop(name)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}"
    return result.stdout


def test_two_processes_end_with_identical_adapters_equal_to_one_process_with_the_same_global_batch(tmp_path):
    """2 processes × batch 2 (DDP) against 1 process × batch 2 × 2 accumulation steps: global batch 4, 3 steps, with
    LoRA dropout and the sampled layer choice; then the Transform Matrix fit on 8 pairs."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    single.mkdir()
    out = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(WORKER),
            "--output",
            str(ddp),
            "--gradient-accumulation-steps",
            "1",
        ]
    )
    assert "world size 2, 3 steps" in out
    out = _run(
        [
            sys.executable,
            str(WORKER),
            "--output",
            str(single),
            "--gradient-accumulation-steps",
            "2",
        ]
    )
    assert "world size 1, 3 steps" in out

    rank0 = torch.load(ddp / "adapter-rank0.pt")
    rank1 = torch.load(ddp / "adapter-rank1.pt")
    reference = torch.load(single / "adapter-rank0.pt")
    assert set(rank0) == set(rank1) == set(reference)
    assert any("cc_decision_maker" in name for name in reference)
    assert any("cc_transform_matrix" in name for name in reference)
    for name in reference:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
        torch.testing.assert_close(rank0[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
    largest = max((rank0[name] - reference[name]).abs().max().item() for name in reference)
    print(f"largest difference between 2 processes and 1 process: {largest:.3g}")
    for name, tensor in reference.items():
        if "lora_B" in name or "cc_transform_matrix" in name:
            assert torch.any(tensor != 0), f"{name} was not trained / fitted"

    ddp_logs = [entry for entry in json.loads((ddp / "log_history.json").read_text()) if "loss" in entry]
    single_logs = [entry for entry in json.loads((single / "log_history.json").read_text()) if "loss" in entry]
    assert [entry["step"] for entry in ddp_logs] == [entry["step"] for entry in single_logs] == [1, 2, 3]
    for ours, theirs in zip(ddp_logs, single_logs):
        assert abs(ours["loss"] - theirs["loss"]) < 1e-4
        # The layer-choice counts are summed over the processes: the same as one process sees.
        assert ours["cc/most_chosen_layer"] == theirs["cc/most_chosen_layer"]
        assert abs(ours["cc/choice_entropy"] - theirs["cc/choice_entropy"]) < 1e-6
