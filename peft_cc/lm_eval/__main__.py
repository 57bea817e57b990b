"""`python -m peft_cc.lm_eval ARGS`: lm-eval's command line (the same arguments) with the `cc` model type added.

A task name lm-eval does not know ends the run with the names closest to it, instead of lm-eval's bare
`ValueError: Tasks not found`.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence

from lm_eval.__main__ import cli_evaluate

from . import model as _model  # noqa: F401  (registers the `cc` model type)

NOT_FOUND = re.compile(r"^Tasks not found: (?P<names>.+)$")


def unknown_tasks_message(missing: Sequence[str], known: Sequence[str], include_path: str | None) -> str:
    """What to say about task names lm-eval does not know: the known names closest to each, and how to list them.

    Args:
        missing: the unknown task or group names.
        known: every task, group and tag name lm-eval knows in this run (`TaskManager(include_path=...).all_tasks`).
        include_path: the run's `--include_path`, if any.
    """
    lines = []
    for name in missing:
        close = difflib.get_close_matches(name, known, n=6, cutoff=0.6)
        lines.append(f"{name}: not a task or group lm-eval knows" + (f"; close: {', '.join(close)}" if close else ""))
    listing = "python -m peft_cc.lm_eval ls tasks" + (f" --include_path {include_path}" if include_path else "")
    hints = [f"List every name with `{listing}`."]
    if include_path is None and any(name.startswith("peft_cc_") for name in missing):
        hints.append("The peft_cc_* tasks over the benchmark samples need `--include_path benchmarks/tasks`.")
    return "\n".join(["Tasks not found:", *(f"  {line}" for line in lines), *hints])


def _include_path(argv: Sequence[str]) -> str | None:
    for index, argument in enumerate(argv):
        if argument == "--include_path" and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith("--include_path="):
            return argument.partition("=")[2]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's command line on `argv` (default: `sys.argv[1:]`); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except ValueError as error:
        found = NOT_FOUND.match(str(error))
        if found is None:
            raise
        from lm_eval.tasks import TaskManager

        missing = [name.strip() for name in found.group("names").split(",")]
        include_path = _include_path(argv)
        known = TaskManager(include_path=include_path).all_tasks
        print(unknown_tasks_message(missing, known, include_path), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
