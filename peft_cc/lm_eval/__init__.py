"""lm-evaluation-harness integration: the `cc` model type (:mod:`peft_cc.lm_eval.model`).

Importing :mod:`peft_cc.lm_eval.model` registers the model type `cc` with lm-eval (which `import peft_cc` does not
import). `python -m peft_cc.lm_eval` is lm-eval's own command line with that model type registered; the tasks are
lm-eval's, or a folder of your own given as `--include_path`, such as the repository's tasks over the benchmark data
layout (`benchmarks/tasks/`)::

    python -m peft_cc.lm_eval --model cc \\
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,peft=<adapter>,connection=monolingual \\
        --tasks peft_cc_xnli --include_path benchmarks/tasks \\
        --metadata '{"data_root": "../shared/data/benchmarks"}' --apply_chat_template

Needs the `eval` extra (`pip install peft-cc[eval]`).
"""
