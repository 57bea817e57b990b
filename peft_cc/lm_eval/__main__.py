"""`python -m peft_cc.lm_eval ARGS`: lm-eval's command line (same arguments) with the `cc` model type registered.

Without `--include_path`, this package's tasks (`peft_cc_<benchmark>_<language>`, groups `peft_cc_<benchmark>`) are
on the task path; a given `--include_path` takes their place (lm-eval reads one such folder).
"""

from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

from peft_cc.lm_eval import TASKS_DIR

from . import model as _model  # noqa: F401  (registers the `cc` model type)


def with_task_path(argv: list[str]) -> list[str]:
    """`argv` (without the program name) plus `--include_path TASKS_DIR`, unless it is empty (lm-eval's help) or
    names an include path."""
    if not argv or any(arg == "--include_path" or arg.startswith("--include_path=") for arg in argv):
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


def main() -> None:
    sys.argv = [sys.argv[0], *with_task_path(sys.argv[1:])]
    cli_evaluate()


if __name__ == "__main__":
    main()
