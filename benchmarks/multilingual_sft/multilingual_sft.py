"""Does CC-Tuning help? CC-Tuning against vanilla multilingual LoRA SFT on a real model, with the power to tell.

Systems (:data:`sft_runs.SYSTEMS`), all trained on the same pairs, steps, LoRA settings and seeds: `base` (the model
zero-shot), `lora` (vanilla LoRA SFT), `cc-paper` (CC-Tuning, the paper's settings) and `cc-paper-noen` (the same with
`english_gradients=False`). Every CC adapter is evaluated with the monolingual connection and with the connection off,
and for the seeds of `--bilingual-seeds` with the bilingual one (the real English prompt: an upper bound). (The
records of `cc-gated` and `cc-gated-noen`, whose Decision Maker left the package, were made at commit 735790f.)

Each invocation does one thing and writes its result, and is skipped when that result is there already (with the same
settings), so an interrupted experiment resumes where it stopped:

    python benchmarks/multilingual_sft/multilingual_sft.py train    --model smollm2 --system cc-paper --seed 0
    python benchmarks/multilingual_sft/multilingual_sft.py evaluate --model smollm2 --system cc-paper --seed 0 \
        --connection off
    python benchmarks/multilingual_sft/multilingual_sft.py report   --model smollm2
    python benchmarks/multilingual_sft/multilingual_sft.py all      --model smollm2  # every run above, then the report
    python benchmarks/multilingual_sft/multilingual_sft.py plan     --model smollm2  # the invocations and their times

What `all` and `plan` run, and the items and steps of every invocation, default to the model's design: with
`--design reported` (the default) the runs this folder's README reports for a packaged model, with `--design full`
(and for any other model) the issue's systems on every benchmark, as sized from the pilot; the flags override it.

`--model` is `smollm2` (HuggingFaceTB/SmolLM2-135M-Instruct), `gemma3` (google/gemma-3-270m, a base model whose
packaged tokenizer has no chat template: it gets Gemma's turn format, :data:`GEMMA_CHAT_TEMPLATE`, in training and
evaluation alike) or another Hub id or folder (with its tokenizer's chat template). Results go to
`--output-dir/<model>/`: `adapters/<system>-seed<s>/` (the adapter and `training.json`), `evaluation/<run>.json`
(every item's metrics) and `evaluation/report.md` (tables, paired differences with standard errors, curves, the
Decision Maker's choices, wall times). Evaluation reads `--eval-data-root` (default: `--data-root`), by item index,
through the lm-eval tasks of `benchmarks/tasks/`; the same adapters evaluated on another data root go to another
`--evaluation-dir`.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

EXPERIMENT_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXPERIMENT_DIR.parents[1]
# The reader of the benchmark data layout (`parallel_data`) lives with the lm-eval tasks, in benchmarks/tasks/.
sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "tasks"))

from sft_mixture import TRAIN_BENCHMARKS, EvaluationSizes  # noqa: E402
from sft_runs import SYSTEMS, System, run_name  # noqa: E402

DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data" / "benchmarks"
PILOT_RATES = EXPERIMENT_DIR / "results" / "multilingual_sft_rates.json"
SCRIPT = "benchmarks/multilingual_sft/multilingual_sft.py"


# Gemma's turn format (`<start_of_turn>user ... <end_of_turn>`, the assistant's role named `model`), which Gemma 3's
# vocabulary has tokens for; the base model's packaged tokenizer has no chat template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class Design:
    """What the experiment runs where the flags do not say otherwise.

    Attributes:
        steps: training steps (of `--batch-size` pairs).
        loglik_items: per benchmark, the evaluated items per language (the first ones, in every language); the
            training draws only from items after them.
        generation_items: per benchmark, how many of those items are also generated.
        secondary_loglik_items: per benchmark, the log-likelihood items of the evaluations that compare a CC adapter
            with itself (:data:`SECONDARY_CONNECTIONS`): their paired differences vary less (README.md,
            "Sizing"), so they run the first of the items above.
        systems: the systems of `all` and `plan` (names of :data:`sft_runs.SYSTEMS`).
        seeds: the training seeds of `all` and `plan`.
        bilingual_seeds: the seeds whose CC adapters are also evaluated with the bilingual connection.
    """

    steps: int
    loglik_items: dict[str, int]
    generation_items: dict[str, int]
    secondary_loglik_items: dict[str, int]
    systems: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1)
    bilingual_seeds: tuple[int, ...] = (0,)


# The design sized from the pilot (README.md, "Sizing"): every benchmark, and the systems the issue asks for; about 6.5
# hours for SmolLM2-135M on the 2-core machine (`plan --design full`), and some 1.4 times that for Gemma-3-270M.
FULL_DESIGN = Design(
    steps=60,
    loglik_items={"MKQA": 150, "XQuAD": 20, "XLSum": 6, "XNLI": 120, "XStoryCloze": 120, "MMMLU": 40},
    generation_items={"MKQA": 40, "XQuAD": 8, "XLSum": 2},
    secondary_loglik_items={"MKQA": 50, "XQuAD": 8, "XLSum": 2, "XNLI": 40, "XStoryCloze": 40, "MMMLU": 16},
    systems=("base", "lora", "cc-paper", "cc-paper-noen"),
)


@dataclass(frozen=True)
class ModelPreset:
    """A packaged model (examples/install_packaged_models.py), its evaluation batch size, the chat template to give
    its tokenizer (`None`: its own), and the design of its runs in README.md (`--design reported`)."""

    hub_id: str
    eval_batch_size: int
    reported: Design
    chat_template: str | None = None


MODELS: dict[str, ModelPreset] = {
    "smollm2": ModelPreset(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        eval_batch_size=8,
        reported=Design(
            steps=60,
            loglik_items={"MKQA": 150, "XNLI": 120, "XStoryCloze": 120},
            generation_items={"MKQA": 40},
            secondary_loglik_items={"MKQA": 50, "XNLI": 40, "XStoryCloze": 40},
            systems=("base", "lora", "cc-paper"),
        ),
    ),
    # 262k vocabulary: large logits, smaller batches; its steps and prompt tokens are dearer than SmolLM2's
    # (README.md, "Sizing"), hence fewer steps and items.
    "gemma3": ModelPreset(
        "google/gemma-3-270m",
        eval_batch_size=4,
        chat_template=GEMMA_CHAT_TEMPLATE,
        reported=Design(
            steps=40,
            loglik_items={"MKQA": 100, "XNLI": 80, "XStoryCloze": 80},
            generation_items={"MKQA": 20},
            secondary_loglik_items={"MKQA": 40, "XNLI": 40, "XStoryCloze": 40},
            systems=("base", "lora", "cc-paper"),
            bilingual_seeds=(),
        ),
    ),
}
# The connections evaluated on `Design.secondary_loglik_items`.
SECONDARY_CONNECTIONS = ("off", "bilingual")
# The options that choose which invocations `all` and `plan` run: not the settings of any one of them.
SCHEDULE_OPTIONS = ("systems", "seeds", "bilingual_seeds")


def parse_names(text: str) -> list[str]:
    """`"base, lora"` -> `["base", "lora"]`; `""` -> `[]`."""
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_counts(text: str) -> dict[str, int]:
    """`"MKQA=150,XNLI=100"` -> `{"MKQA": 150, "XNLI": 100}`."""
    counts = {}
    for part in parse_names(text):
        name, separator, value = part.partition("=")
        if not separator or not re.fullmatch(r"\d+", value.strip()):
            raise argparse.ArgumentTypeError(f"Expected BENCHMARK=COUNT[,...], got {part!r}.")
        counts[name.strip()] = int(value)
    return counts


def parse_ints(text: str) -> list[int]:
    """`"0,1"` -> `[0, 1]`; `""` -> `[]`."""
    try:
        return [int(part) for part in parse_names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"Expected comma-separated integers, got {text!r}.") from None


def common_options() -> argparse.ArgumentParser:
    """The options every command takes: the model, the folders, and the settings of the runs."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="smollm2", help=f"{' or '.join(MODELS)}, or a Hub id or folder")
    common.add_argument("--output-dir", default=str(REPO_ROOT / "outputs" / "multilingual_sft"))
    common.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="training data root")
    common.add_argument("--eval-data-root", help="evaluation data root (default: --data-root)")
    common.add_argument(
        "--evaluation-dir",
        default="evaluation",
        help="the folder (in the model's) of the evaluation records and the report: another one for another "
        "--eval-data-root",
    )
    common.add_argument(
        "--train-benchmarks", type=parse_names, default=list(TRAIN_BENCHMARKS), help="NAME,...: benchmarks to train on"
    )
    common.add_argument(
        "--design",
        choices=["reported", "full"],
        default="reported",
        help="the defaults of the flags below: `reported`, the runs of this folder's README for a packaged model (for "
        "another model: `full`); `full`, every system on every benchmark, as sized from the pilot",
    )
    common.add_argument("--steps", type=int, help="training steps (default: the design's)")
    common.add_argument("--batch-size", type=int, default=8, help="pairs per training step")
    common.add_argument("--learning-rate", type=float, default=5e-4)
    common.add_argument("--lora-r", type=int, default=16)
    common.add_argument("--max-length", type=int, default=256, help="longer training pairs are left out")
    common.add_argument(
        "--transform-pairs",
        type=int,
        default=200,
        help="English/non-English prompt pairs the Transform Matrix is fit on",
    )
    common.add_argument("--logging-steps", type=int, default=5, help="steps between two points of the loss curve")
    common.add_argument("--languages-per-benchmark", type=int, default=4, help="non-English languages, besides en")
    common.add_argument(
        "--loglik-items",
        type=parse_counts,
        help="BENCHMARK=N,...: evaluated items per language (default: the design's)",
    )
    common.add_argument(
        "--generation-items", type=parse_counts, help="BENCHMARK=N,...: of those, generated (default: the design's)"
    )
    common.add_argument(
        "--secondary-loglik-items",
        type=parse_counts,
        help="BENCHMARK=N,...: log-likelihood items of the connection=off and bilingual evaluations (default: the "
        "design's)",
    )
    common.add_argument("--eval-batch-size", type=int, help="lm-eval's batch size (default: the model's preset)")
    common.add_argument("--seeds", type=parse_ints, help="training seeds of `all` and `plan` (default: the design's)")
    common.add_argument(
        "--bilingual-seeds", type=parse_ints, help="seeds also evaluated bilingually (default: the design's)"
    )
    common.add_argument(
        "--systems", type=parse_names, help="NAME,...: the systems of `all` and `plan` (default: the design's)"
    )
    return common


def parser() -> argparse.ArgumentParser:
    common = common_options()
    main = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", parents=[common], help="train one system with one seed")
    train.add_argument("--system", required=True, choices=[name for name, s in SYSTEMS.items() if s.trained])
    train.add_argument("--seed", type=int, required=True)
    evaluate = commands.add_parser("evaluate", parents=[common], help="evaluate one system, seed and connection")
    evaluate.add_argument("--system", required=True, choices=list(SYSTEMS))
    evaluate.add_argument("--seed", type=int, help="required for a trained system")
    evaluate.add_argument("--connection", choices=["monolingual", "bilingual", "off"], help="CC systems only")
    commands.add_parser("report", parents=[common], help="assemble the report from the finished runs")
    commands.add_parser("all", parents=[common], help="every run of the experiment in turn, then the report")
    plan = commands.add_parser("plan", parents=[common], help="print the invocations with their expected wall times")
    plan.add_argument(
        "--rates", default=str(PILOT_RATES), help="the rates per model (JSON; see sft_plan.evaluation_seconds)"
    )
    plan.add_argument("--pilot-dir", help="a pilot's model folder: print its sizing and rates instead")
    plan.add_argument("--earlier-run", action="store_true", help="print the sizing from the earlier run instead")
    plan.add_argument("--clock", choices=["seconds", "cpu_seconds"], default="seconds", help="the pilot's rates")
    plan.add_argument("--scale", type=float, default=1.0, help="multiply the pilot's rates by this (e.g. CPU to wall)")
    return main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    main = parser()
    args = main.parse_args(argv)
    # The options given that differ from their defaults, parsed: what `command_line` repeats.
    defaults = vars(common_options().parse_args([]))
    args.given = {name: getattr(args, name) for name, default in defaults.items() if getattr(args, name) != default}
    args.model_key, args.model_id, preset_batch = _model(args.model)
    preset = MODELS.get(args.model)
    design = preset.reported if preset is not None and args.design == "reported" else FULL_DESIGN
    for field in fields(Design):
        if getattr(args, field.name) is None:
            setattr(args, field.name, getattr(design, field.name))
    args.eval_batch_size = args.eval_batch_size or preset_batch
    args.eval_data_root = args.eval_data_root or args.data_root
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        main.error(f"unknown systems {sorted(unknown)}: choose from {', '.join(SYSTEMS)}")
    try:
        args.sizes = EvaluationSizes(args.loglik_items, args.generation_items)
        secondary = {
            name: min(count, args.secondary_loglik_items.get(name, count)) for name, count in args.loglik_items.items()
        }
        args.secondary_sizes = EvaluationSizes(secondary, args.generation_items)
    except ValueError as error:
        main.error(str(error))
    if args.command == "evaluate":
        system = SYSTEMS[args.system]
        if system.trained != (args.seed is not None):
            main.error(f"--seed is {'required' if system.trained else 'not used'} for the system {system.name}")
        if (args.connection is not None) != (system.kind == "cc"):
            main.error(f"--connection is {'required' if system.kind == 'cc' else 'not used'} for {system.name}")
    return args


def _model(name: str) -> tuple[str, str, int]:
    """`(folder name, Hub id or folder, evaluation batch size)` of `--model`."""
    if name in MODELS:
        return name, MODELS[name].hub_id, MODELS[name].eval_batch_size
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip("/")).strip("_"), name, 8


def tokenizer_path(args: argparse.Namespace) -> str | None:
    """The tokenizer folder with the preset's chat template (written once under the model's folder), or `None` for
    the model's own tokenizer."""
    preset = MODELS.get(args.model)
    if preset is None or preset.chat_template is None:
        return None
    folder = model_dir(args) / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_id)
        tokenizer.chat_template = preset.chat_template
        tokenizer.eos_token = "<end_of_turn>"  # where a turn, and so a generated answer, ends
        tokenizer.save_pretrained(folder)
    return str(folder)


def sizes_for(args: argparse.Namespace, connection: str | None) -> EvaluationSizes:
    """The evaluated items of an evaluation with `connection`: fewer for those of :data:`SECONDARY_CONNECTIONS`."""
    return args.secondary_sizes if connection in SECONDARY_CONNECTIONS else args.sizes


def model_dir(args: argparse.Namespace) -> Path:
    return Path(args.output_dir) / args.model_key


def adapter_dir(args: argparse.Namespace, system: str, seed: int) -> Path:
    return model_dir(args) / "adapters" / run_name(system, seed)


def evaluation_path(args: argparse.Namespace, system: str, seed: int | None, connection: str | None) -> Path:
    return model_dir(args) / args.evaluation_dir / f"{run_name(system, seed, connection)}.json"


def invocations(args: argparse.Namespace) -> Iterator[tuple[str, System, int | None, str | None]]:
    """`(command, system, seed, connection)` of every run of the experiment, in the order `all` runs them: the base
    model, then each seed's systems, each trained and then evaluated with its connections."""
    systems = [SYSTEMS[name] for name in args.systems]
    if SYSTEMS["base"] in systems:
        yield "evaluate", SYSTEMS["base"], None, None
    for seed in args.seeds:
        for system in (system for system in systems if system.trained):
            yield "train", system, seed, None
            connections = list(system.connections)
            if system.kind == "cc" and seed in args.bilingual_seeds:
                connections.append("bilingual")
            for connection in connections:
                yield "evaluate", system, seed, connection


def option_text(value: object) -> str:
    """An option's parsed value as it is typed: the inverse of :func:`parse_counts`, :func:`parse_names` and
    :func:`parse_ints`."""
    if isinstance(value, dict):
        return ",".join(f"{name}={count}" for name, count in value.items())
    if isinstance(value, list):
        return ",".join(str(part) for part in value)
    return str(value)


def command_line(args: argparse.Namespace, command: str, system: System, seed: int | None, connection: str | None):
    """The command that runs one invocation with the settings of `args`: the invocation's own options, then every
    option given on `args`' command line but those that choose which invocations `all` and `plan` run."""
    parts = ["python", SCRIPT, command, "--model", args.model, "--system", system.name]
    if seed is not None:
        parts += ["--seed", str(seed)]
    if connection is not None:
        parts += ["--connection", connection]
    for name, value in args.given.items():
        if name not in ("model", *SCHEDULE_OPTIONS):
            parts += [f"--{name.replace('_', '-')}", option_text(value)]
    return shlex.join(parts)


def training_settings(args: argparse.Namespace):
    from sft_train import TrainingSettings

    return TrainingSettings(
        model=args.model_id,
        tokenizer=tokenizer_path(args),
        data_root=str(args.data_root),
        benchmarks=tuple(args.train_benchmarks),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lora_r=args.lora_r,
        max_length=args.max_length,
        transform_pairs=args.transform_pairs,
        logging_steps=args.logging_steps,
    )


def evaluation_settings(args: argparse.Namespace):
    from sft_evaluate import EvaluationSettings

    return EvaluationSettings(
        model=args.model_id,
        tokenizer=tokenizer_path(args),
        data_root=str(args.eval_data_root),
        languages_per_benchmark=args.languages_per_benchmark,
        batch_size=args.eval_batch_size,
    )


def run(args: argparse.Namespace, command: str, system: System, seed: int | None, connection: str | None) -> None:
    """Run one invocation (skipped when its result is there with the same settings)."""
    import sft_evaluate
    import sft_train

    if command == "train":
        sft_train.train(system, seed, training_settings(args), args.sizes, adapter_dir(args, system.name, seed))
        return
    held_out, adapter = None, None
    if system.trained:
        adapter = adapter_dir(args, system.name, seed)
        record = adapter / sft_train.RECORD
        if not record.is_file():
            raise SystemExit(
                f"{run_name(system.name, seed)} is not trained yet ({record} is missing): run "
                f"`{command_line(args, 'train', system, seed, None)}` first."
            )
        sft_train.check_weights(adapter)
        held_out = sft_train.trainable_from(json.loads(record.read_text()))
    sft_evaluate.evaluate(
        adapter,
        connection,
        evaluation_settings(args),
        sizes_for(args, connection),
        evaluation_path(args, system.name, seed, connection),
        held_out=held_out,
    )


def plan(args: argparse.Namespace, model_rates: dict) -> str:
    """The invocations of the experiment (:func:`invocations`) with their expected seconds at `model_rates`
    (:func:`sft_plan.evaluation_seconds`, :func:`sft_plan.training_seconds`), and the total."""
    import sft_plan
    from transformers import AutoTokenizer

    settings = evaluation_settings(args)
    tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer or settings.model)
    tokens = functools.cache(lambda part: sft_plan.prompt_tokens(tokenizer, settings.data_root, part))
    lines = ["| invocation | expected s |", "| --- | --- |"]
    total = 0.0
    for command, system, seed, connection in invocations(args):
        if command == "train":
            seconds = sft_plan.training_seconds(system.name, args.steps, model_rates)
        else:
            sizes = sizes_for(args, connection)
            seconds = sft_plan.evaluation_seconds(settings, sizes, connection, model_rates, tokens)
        total += seconds
        lines.append(f"| `{command_line(args, command, system, seed, connection)}` | {seconds:.0f} |")
    lines.append(f"| total | {total:.0f} ({total / 3600:.2f} h) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "plan":
        import sft_plan
        import sft_report
        import sft_train

        languages = args.languages_per_benchmark
        if args.earlier_run:
            print(sft_plan.format_sizing(sft_plan.earlier_sizing(languages)))
        elif args.pilot_dir:
            pilot = Path(args.pilot_dir)
            if not sft_report.load_trainings(pilot) and not sft_report.load_evaluations(pilot):
                raise SystemExit(
                    f"{pilot} holds no finished training (adapters/*/{sft_train.RECORD}) or evaluation "
                    "(evaluation/*.json): give a pilot's model folder, `--output-dir`/<model> of its `train` and "
                    "`evaluate` runs (e.g. /tmp/pilot16/smollm2), not a folder of stored records."
                )
            print(sft_plan.format_sizing(sft_plan.pilot_sizing(pilot, languages)))
            print(json.dumps(sft_plan.rates(pilot, args.clock, args.scale), indent=1))
        else:
            rates = json.loads(Path(args.rates).read_text())
            if args.model_key not in rates:
                raise SystemExit(
                    f"{args.rates} has no rates for {args.model_key} (it has {sorted(rates)}): give --rates."
                )
            print(plan(args, rates[args.model_key]))
        return
    if args.command in ("train", "evaluate"):
        run(args, args.command, SYSTEMS[args.system], args.seed, getattr(args, "connection", None))
        return
    if args.command == "all":
        for invocation in invocations(args):
            print(f"== {command_line(args, *invocation)}", flush=True)
            run(args, *invocation)
    import sft_report

    print(sft_report.write_report(model_dir(args), args.evaluation_dir), flush=True)


if __name__ == "__main__":
    sys.exit(main())
