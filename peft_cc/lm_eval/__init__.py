"""lm-evaluation-harness integration: the `cc` model type and the data root's benchmarks as lm-eval tasks.

Importing :mod:`peft_cc.lm_eval.model` registers the model type `cc` with lm-eval (which `import peft_cc` does not
import). `python -m peft_cc.lm_eval` runs lm-eval's own command line with that model type registered and this
package's tasks (`peft_cc_<benchmark>_<language>`, groups `peft_cc_<benchmark>`) on the task path::

    python -m peft_cc.lm_eval --model cc \\
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,peft=<adapter>,connection=monolingual \\
        --tasks peft_cc_xnli --metadata '{"data_root": "../shared/data/benchmarks"}' --apply_chat_template

Needs the `eval` extra (`pip install peft-cc[eval]`).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""The folder of this package's lm-eval task configurations (pass it as lm-eval's `include_path`)."""
