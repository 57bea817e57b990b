"""`peft-cc COMMAND`: the package's command line; each command is a module of `peft_cc.scripts`.

peft-cc sft ...       train a CC-Tuning adapter or its LoRA baseline (peft_cc.scripts.sft)
peft-cc compare A B   pair two lm-eval runs item by item (peft_cc.scripts.compare)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "sft": "train a CC-Tuning adapter, or its plain LoRA baseline (--method lora), with TRL",
    "compare": "compare two lm-evaluation-harness runs item by item: paired differences and standard errors",
}
USAGE = "usage: peft-cc {sft,compare} ...\n\n" + "\n".join(f"  {name:<9}{text}" for name, text in COMMANDS.items())


def main(argv: Sequence[str] | None = None) -> int:
    """`peft-cc COMMAND [options]`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE + "\n\n`peft-cc COMMAND --help` lists a command's options.", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command = importlib.import_module(f"peft_cc.scripts.{argv[0]}")
    return command.run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
