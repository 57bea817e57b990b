"""Command line: evaluate a model (optionally with an adapter) on the benchmarks, or compare saved results.

    python -m peft_cc.evaluation --model HuggingFaceTB/SmolLM2-135M-Instruct --benchmarks XQuAD,MKQA \\
        --languages en,de,zh --limit 16 --output results/base/results.json
    python -m peft_cc.evaluation --model HuggingFaceTB/SmolLM2-135M-Instruct --adapter outputs/cc \\
        --connection monolingual --limit 16 --output results/cc/results.json
    python -m peft_cc.evaluation --compare results/base/results.json results/cc/results.json \\
        --output results/comparison/results.json

Each run writes the JSON results, a Markdown table (`.md`) and a plot (`.png`) next to each other; see
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..parallel_data import check_data_root
from .connection import CONNECTIONS
from .loading import DTYPES, adapter_base_model, load_system
from .report import load_results, write_report
from .runner import EvaluationConfig, evaluate

DATA_ROOT_VARIABLE = "PEFT_CC_BENCHMARKS"
DEFAULT_DATA_ROOT = os.path.join("..", "shared", "data", "benchmarks")


def _help(name: str) -> str:
    return next(field.metadata["help"] for field in dataclasses.fields(EvaluationConfig) if field.name == name)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m peft_cc.evaluation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    system = parser.add_argument_group("the system to evaluate")
    system.add_argument(
        "--model",
        help="A local checkpoint folder or a Hub id. Default with --adapter: the base model the adapter records.",
    )
    system.add_argument("--adapter", help="A saved PEFT adapter folder (LoRA, CC-Tuning, ...) to load onto the model.")
    system.add_argument("--connection", choices=CONNECTIONS, help=_help("connection"))
    system.add_argument("--name", help="The system's name in reports (default: from the model, adapter, connection).")
    system.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="The weights' dtype (auto: the checkpoint's)."
    )
    system.add_argument("--device", help="Where to run (default: cuda if available, else cpu).")
    what = parser.add_argument_group("what to evaluate")
    what.add_argument(
        "--data-root",
        default=os.environ.get(DATA_ROOT_VARIABLE, DEFAULT_DATA_ROOT),
        help=f"{_help('data_root')} Default: ${DATA_ROOT_VARIABLE}, else {DEFAULT_DATA_ROOT}.",
    )
    what.add_argument("--benchmarks", type=_names, help=_help("benchmarks") + " Comma-separated.")
    what.add_argument("--languages", type=_names, help=_help("languages") + " Comma-separated.")
    what.add_argument("--limit", type=int, help=_help("limit"))
    what.add_argument("--offset", type=int, default=0, help=_help("offset"))
    what.add_argument("--batch-size", type=int, default=8, help=_help("batch_size"))
    what.add_argument("--max-new-tokens", type=int, default=40, help=_help("max_new_tokens"))
    what.add_argument("--no-chat-template", action="store_true", help="Prompt with plain text, even with a template.")
    what.add_argument(
        "--no-option-log-likelihood", action="store_true", help="Skip the log-likelihood scoring of options."
    )
    what.add_argument(
        "--no-answer-log-likelihood",
        action="store_true",
        help="Skip the log-likelihood scoring of gold answers (answer_nll) of generative benchmarks.",
    )
    what.add_argument("--quiet", action="store_true", help="No progress bars or per-language log lines.")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="RESULTS_JSON",
        help="Instead of evaluating: tabulate and plot the systems of these results files side by side.",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="The results JSON file (or a folder for results.json); the .md table and .png plot go next to it.",
    )
    return parser


def system_name(arguments: argparse.Namespace, connection: str | None) -> str:
    """The name of the evaluated system in reports: `--name`, else the adapter's (or model's) name and connection."""
    if arguments.name:
        return arguments.name
    if arguments.adapter:
        name = Path(arguments.adapter).resolve().name
        return f"{name} ({connection})" if connection else name
    return Path(arguments.model).name if os.path.exists(arguments.model) else arguments.model


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: `sys.argv[1:]`); returns the exit status."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if arguments.quiet else logging.INFO, format="%(message)s")
    if arguments.compare:
        paths = write_report(load_results(arguments.compare), arguments.output)
    else:
        if not arguments.model:
            if not arguments.adapter:
                parser.error("--model or --adapter is required (or --compare).")
            try:
                arguments.model = adapter_base_model(arguments.adapter)
            except ValueError as error:
                parser.error(str(error))
        try:
            check_data_root(arguments.data_root)
        except FileNotFoundError as error:
            parser.error(str(error))

        config = EvaluationConfig(
            data_root=arguments.data_root,
            benchmarks=arguments.benchmarks,
            languages=arguments.languages,
            limit=arguments.limit,
            offset=arguments.offset,
            batch_size=arguments.batch_size,
            max_new_tokens=arguments.max_new_tokens,
            connection=arguments.connection,
            chat_template=not arguments.no_chat_template,
            option_log_likelihood=not arguments.no_option_log_likelihood,
            answer_log_likelihood=not arguments.no_answer_log_likelihood,
            show_progress=not arguments.quiet,
        )
        model, tokenizer, settings = load_system(arguments.model, arguments.adapter, arguments.dtype, arguments.device)
        settings["command"] = [sys.executable, "-m", "peft_cc.evaluation", *(sys.argv[1:] if argv is None else argv)]
        results = evaluate(model, tokenizer, config, settings=settings)
        paths = write_report({system_name(arguments, results["settings"]["connection"]): results}, arguments.output)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    print(paths["markdown"].read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
