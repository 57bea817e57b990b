"""benchmarks/qlora_gpu/qlora_gpu.py: QLoRA CC-Tuning against plain QLoRA, run as a subprocess (a tiny model on the
CPU, where the run sees only the packages the benchmark's machine needs; the Llama-3.1-8B shape on a CUDA GPU)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "qlora_gpu" / "qlora_gpu.py"
ARMS = ("plain_qlora", "cc_tuning", "cc_tuning_no_english_gradients")
# What the benchmark's machine needs (the script's docstring says so); the rest of this environment is hidden.
NEEDED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")
NOT_NEEDED = ("trl", "datasets", "lm_eval")
# The child: runs the script as `python SCRIPT OPTIONS...` would, then records the top-level modules it imported
# (beyond the standard library) with their files.
CHILD = """
import json, os, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    names = sorted({name.partition(".")[0] for name in list(sys.modules)} - set(sys.stdlib_module_names))
    with open(os.environ["MODULES_RECORD"], "w") as record:
        json.dump({name: getattr(sys.modules.get(name), "__file__", None) for name in names}, record)
"""
GPU_RUN_SECONDS = 600  # the script's budget is 8 minutes on one H100


def requirement_closure(roots: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
    """The installed distributions of `roots` and of their requirements, recursively (no extras)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = list(roots)
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement for another platform, not installed here
        found[name] = distribution
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return list(found.values())


def restricted_site(folder: Path) -> Path:
    """`folder` filled with links to the installed files of `NEEDED` and their requirements, and nothing else."""
    folder.mkdir()
    for distribution in requirement_closure(NEEDED):
        location = Path(distribution.locate_file(""))
        tops = {Path(file).parts[0] for file in distribution.files or () if not str(file).startswith("..")}
        for top in tops:
            if not (folder / top).exists() and (location / top).exists():
                (folder / top).symlink_to(location / top)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, dict[str, str | None], Path]:
    """The script in tiny CPU mode under `python -S` (no site-packages), with only the restricted site and the working
    tree on the path: its JSON output, the top-level modules it imported with their files, and the restricted site."""
    folder = tmp_path_factory.mktemp("qlora_tiny")
    site = restricted_site(folder / "site")
    output, modules = folder / "qlora.json", folder / "modules.json"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "MODULES_RECORD": str(modules)}
    command = [sys.executable, "-S", "-c", CHILD, str(SCRIPT), "--tiny", "--device", "cpu", "--output", str(output)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(output.read_text())
    assert json.loads(completed.stdout) == result  # stdout holds the JSON object and nothing else
    return result, json.loads(modules.read_text()), site


def check_result(result: dict, shapes: tuple[str, ...], repetitions: int) -> None:
    """Every shape and arm with `repetitions` positive step times, their median, tokens per second from it, and the
    CC arms' ratios computed from the medians (memory ratios only where memory was measured)."""
    assert tuple(result["shapes"]) == shapes and result["settings"]["repetitions"] == repetitions
    for shape in result["shapes"].values():
        arms = shape["arms"]
        assert tuple(arms) == ARMS
        for arm in arms.values():
            assert len(arm["step_seconds"]) == repetitions and min(arm["step_seconds"]) > 0
            assert arm["step_seconds_median"] == sorted(arm["step_seconds"])[repetitions // 2]
            expected = shape["tokens_per_step"] / arm["step_seconds_median"]
            assert arm["tokens_per_second"] == pytest.approx(expected, abs=0.05)
            assert all(math.isfinite(loss) for loss in arm["first_step_loss"])
        plain = arms["plain_qlora"]
        for name in ARMS[1:]:
            ratios = arms[name]["vs_plain_qlora"]
            expected = arms[name]["step_seconds_median"] / plain["step_seconds_median"]
            assert ratios["step_seconds"] > 0 and ratios["step_seconds"] == pytest.approx(expected, abs=5e-5)
            for memory in ("peak_allocated", "peak_reserved"):
                median, reference = arms[name][f"{memory}_gib_median"], plain[f"{memory}_gib_median"]
                assert ratios[memory] == (None if reference is None else pytest.approx(median / reference, abs=5e-5))


@pytest.mark.slow
def test_tiny_cpu_run_reports_every_arm_and_shape(tiny_run):
    result, _, _ = tiny_run
    assert result["device"] == "cpu" and result["versions"]["bitsandbytes"]
    check_result(result, ("4x32", "8x16"), repetitions=1)
    for shape in result["shapes"].values():
        for arm in shape["arms"].values():
            assert arm["peak_allocated_gib_median"] is None  # no CUDA allocator to read


@pytest.mark.slow
def test_the_run_imports_only_the_needed_packages_and_the_working_tree(tiny_run):
    _, modules, site = tiny_run
    assert not set(NOT_NEEDED) & set(modules)
    assert Path(modules["peft_cc"]).resolve().is_relative_to(ROOT / "peft_cc")
    for name in NEEDED:
        assert Path(modules[name]).is_relative_to(site), modules[name]
    # Every other module came from the restricted site (a requirement of NEEDED), the interpreter's own library, or
    # the working tree: peft_cc, and the script (as multiprocessing's alias of the main module).
    homes = (site, Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["platstdlib"]))
    outside = {
        Path(file).resolve()
        for file in modules.values()
        if file and not any(Path(file).is_relative_to(home) for home in homes)
    }
    assert all(file == SCRIPT or file.is_relative_to(ROOT / "peft_cc") for file in outside), outside


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(GPU_RUN_SECONDS + 60)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: QLoRA at the Llama-3.1-8B shape")
def test_llama_8b_shape_on_the_gpu(tmp_path):
    output = tmp_path / "qlora.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(SCRIPT), "--output", str(output)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=GPU_RUN_SECONDS)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(output.read_text())
    check_result(result, ("4x1024", "8x512"), repetitions=3)
    for shape in result["shapes"].values():
        for arm in shape["arms"].values():
            # A 24 GB card (22.35 GiB) holds the peak (optimizer states included) and ~1 GiB of CUDA context.
            assert arm["peak_allocated_gib_median"] + 1 < 24e9 / 2**30
            # Each repetition started from the base alone (up to workspaces that CUDA libraries keep after a step).
            assert max(arm["base_allocated_gib"]) - min(arm["base_allocated_gib"]) < 0.1
