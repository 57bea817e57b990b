"""The CC-Tuning vs LoRA A/B at 7-8B with QLoRA on one 24 GB GPU: data, both trainings, evaluation, comparison.

    python examples/ab_8b_qlora/ab_recipe.py --model llama --output-dir outputs/ab-llama
    python examples/ab_8b_qlora/ab_recipe.py --model qwen --output-dir outputs/ab-qwen --dry-run   # the plan only

Stages, in order (`--stages` picks some; each writes a record to <out>/stages/ and is skipped when run again with the
same settings, and refused, saying what changed, with other ones; an interrupted training resumes from its last
checkpoint):

  prepare     MBZUAI/Bactrian-X -> <out>/data/train.jsonl: every non-English row joined to its English original by
              `id`, instruction and input in one user turn, chat messages (`prompt`, `completion`, `prompt_en`)
  train-lora  peft-cc sft --config <model>.yaml --method lora   -> <out>/adapters/lora
  train-cc    peft-cc sft --config <model>.yaml --method cc     -> <out>/adapters/cc (Transform Matrix fitted)
  quantize    the base model in 4-bit NF4 as trained, saved once -> <out>/base-nf4 (lm-eval loads it as it is)
  eval-base   python -m peft_cc.lm_eval run --model cc ... (base model)                 -> <out>/eval/base
  eval-lora   the same with peft=<out>/adapters/lora                                   -> <out>/eval/lora
  eval-cc     the same with peft=<out>/adapters/cc,connection=monolingual              -> <out>/eval/cc
  compare     peft-cc compare: LoRA - base and CC - LoRA, tables, JSON and plots       -> <out>/compare

The same script runs the real recipe on a GPU and its CPU test (tests/test_ab_recipe.py), which changes only the
model, the sources and the scale, through --base-model, --source, --task-dir, --rows-per-language, --items,
--mmlu-subjects, --eval-batch-size, --sft-args and --lm-eval-args (README.md, "What the toy test changes"). README.md
beside this file has the settings, the sizes, the costs and how to read the comparison.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig
    from trl import ModelConfig

RECIPE_DIR = Path(__file__).resolve().parent
CONFIGS = {"llama": RECIPE_DIR / "llama-3.1-8b-instruct.yaml", "qwen": RECIPE_DIR / "qwen2.5-7b-instruct.yaml"}
TASKS_DIR = RECIPE_DIR / "tasks"

BACTRIAN_X = "hf://datasets/MBZUAI/Bactrian-X"
#: The 52 languages of Bactrian-X (the configurations of its loading script), each a file `data/<code>.json.gz`.
BACTRIAN_X_LANGUAGES = frozenset(
    "af ar az bn cs de es et fa fi fr gl gu he hi hr id it ja ka kk km ko lt lv mk ml mn mr my ne nl pl ps pt ro "
    "ru si sl sv sw ta te th tl tr uk ur vi xh zh en".split()
)
BACTRIAN_X_COLUMNS = ("instruction", "input", "id", "output")
DEFAULT_LANGUAGES = ("ar", "es", "hi", "ru", "zh")
DEFAULT_ROWS_PER_LANGUAGE = 2000
DEFAULT_SEED = 42
MAX_NEW_TOKENS = 40  # the paper's limit for generated answers
STAGES = ("prepare", "train-lora", "train-cc", "quantize", "eval-base", "eval-lora", "eval-cc", "compare")
STAGE_ALIASES = {"all": STAGES, "train": ("train-lora", "train-cc"), "eval": ("eval-base", "eval-lora", "eval-cc")}
COMPARISONS = (("lora_vs_base", "base", "lora"), ("cc_vs_lora", "lora", "cc"))
BENCHMARK_NAMES = ("xnli", "xstorycloze", "global_mmlu", "xquad_gold_nll", "xquad")


class RecipeError(Exception):
    """A setting or an input the recipe cannot work with; the message says how to fix it."""


# ------------------------------------------------------------------------------------------------------ the data


def user_turn(instruction: str | None, input_text: str | None) -> str:
    """The user turn of a Bactrian-X row: its instruction, then its input after a blank line when it has one (the
    order and separation of an Alpaca prompt, without the English section headers, which would put English words into
    every non-English prompt)."""
    instruction, input_text = (instruction or "").strip(), (input_text or "").strip()
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def load_bactrian_x(source: str, language: str) -> list[dict[str, str]]:
    """The rows of one language of Bactrian-X under `source` (the Hub, `hf://datasets/MBZUAI/Bactrian-X[@rev]`, or a
    folder with the same layout, `data/<lang>.json.gz`). The packaged `json` builder reads the file directly: the Hub
    repository still holds a loading script, which `datasets` >= 4 refuses to run."""
    from datasets import Features, Value, load_dataset

    data_file = f"{source.rstrip('/')}/data/{language}.json.gz"
    try:
        table = load_dataset(
            "json",
            data_files=data_file,
            split="train",
            features=Features({column: Value("string") for column in BACTRIAN_X_COLUMNS}),
        )
    except FileNotFoundError as error:
        raise RecipeError(
            f"No Bactrian-X file for the language {language!r}: {data_file} does not exist. Bactrian-X has "
            f"data/<code>.json.gz for {' '.join(sorted(BACTRIAN_X_LANGUAGES))}; check --source (a local copy needs "
            "the Hub's layout) and --languages."
        ) from error
    return table.to_list()


def rows_by_id(rows: list[dict[str, str]], language: str) -> dict[str, dict[str, str]]:
    """`{id: row}`; raises RecipeError if an `id` occurs twice (the join would be ambiguous)."""
    counts = Counter(row["id"] for row in rows)
    repeated = sorted(row_id for row_id, count in counts.items() if count > 1)
    if repeated:
        raise RecipeError(
            f"Bactrian-X {language}: {len(repeated)} ids occur more than once (e.g. {repeated[:3]}); rows are joined "
            "to their English originals by id, which must be unique in each language."
        )
    return {row["id"]: row for row in rows}


def chat_pairs(
    rows: list[dict[str, str]], english: dict[str, dict[str, str]], language: str
) -> tuple[list[dict[str, Any]], Counter]:
    """The training rows of one language, each joined to its English original by `id`: `prompt`, `completion`,
    `prompt_en` as chat messages, plus `id` and `language`. Rows without an English original and rows with an empty
    output are dropped and counted (`Counter` keys `no_english`, `empty_output`)."""
    dropped: Counter = Counter()
    pairs = []
    for row in rows:
        original = english.get(row["id"])
        if original is None:
            dropped["no_english"] += 1
        elif not (row["output"] or "").strip():
            dropped["empty_output"] += 1
        else:
            pairs.append(
                {
                    "prompt": [{"role": "user", "content": user_turn(row["instruction"], row["input"])}],
                    "completion": [{"role": "assistant", "content": row["output"].strip()}],
                    "prompt_en": [{"role": "user", "content": user_turn(original["instruction"], original["input"])}],
                    "id": row["id"],
                    "language": language,
                }
            )
    return pairs, dropped


def prepare_training_data(
    source: str, languages: Sequence[str], rows_per_language: int, seed: int, folder: Path
) -> dict[str, Any]:
    """Write `folder/train.jsonl` (the training pairs, shuffled) and `folder/summary.json` (the counts per language);
    returns the summary. Per language: join to English by id, drop empty outputs, a seeded shuffle, the first
    `rows_per_language`; then one seeded shuffle of all languages together."""
    print(f"[ab] prepare: reading Bactrian-X English from {source}", flush=True)
    english = rows_by_id(load_bactrian_x(source, "en"), "en")
    summary: dict[str, Any] = {"source": source, "seed": seed, "rows_per_language": rows_per_language, "languages": {}}
    selected: list[dict[str, Any]] = []
    for language in languages:
        rows = load_bactrian_x(source, language) if language != "en" else list(english.values())
        rows_by_id(rows, language)  # refuses repeated ids
        pairs, dropped = chat_pairs(rows, english, language)
        random.Random(f"{seed}/{language}").shuffle(pairs)
        used = pairs[:rows_per_language]
        summary["languages"][language] = {
            "rows": len(rows),
            "dropped_no_english_original": dropped["no_english"],
            "dropped_empty_output": dropped["empty_output"],
            "used": len(used),
        }
        print(
            f"[ab] prepare: {language}: {len(rows)} rows, {dropped['no_english']} without an English original, "
            f"{dropped['empty_output']} with an empty output dropped, {len(used)} used",
            flush=True,
        )
        if len(used) < rows_per_language:
            print(f"[ab] prepare: warning: {language} has {len(used)} usable rows, fewer than {rows_per_language}")
        selected.extend(used)
    random.Random(seed).shuffle(selected)
    summary["rows"] = len(selected)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in selected)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"[ab] prepare: {len(selected)} training pairs -> {folder / 'train.jsonl'}", flush=True)
    return summary


# ------------------------------------------------------------------------------------------------ the evaluation


@dataclass(frozen=True)
class Benchmark:
    """One evaluated benchmark: its lm-eval task per language, the languages that have it, the metrics that its
    groups average and its default number of items per language (README.md, "Sizes")."""

    name: str
    task: str
    languages: frozenset[str]
    metrics: tuple[str, ...]
    default_items: int


def global_mmlu_layout() -> tuple[frozenset[str], list[str]]:
    """The languages and the 57 subjects of lm-eval's installed `global_mmlu_full_<lang>_<subject>` tasks."""
    (package,) = importlib.util.find_spec("lm_eval").submodule_search_locations
    folder = Path(package) / "tasks" / "global_mmlu" / "full"
    languages = frozenset(path.name for path in folder.iterdir() if (path / f"_{path.name}_template_yaml").is_file())
    prefix = "global_mmlu_full_en_"
    subjects = sorted(path.stem[len(prefix) :] for path in (folder / "en").glob(f"{prefix}*.yaml"))
    return languages, subjects


def benchmarks(mmlu_languages: frozenset[str]) -> dict[str, Benchmark]:
    """The recipe's benchmarks (lm-eval 0.4.13's task names and languages; XQuAD's are this folder's tasks), with their
    default items per language: `n = (2 sd / target)^2` for the largest paired sd measured in this project (README.md,
    "Sizes")."""
    xquad = frozenset("ar de el en es hi ro ru th tr vi zh".split())
    return {
        "xnli": Benchmark(
            "xnli", "xnli_{}", frozenset("ar bg de el en es fr hi ru sw th tr ur vi zh".split()), ("acc",), 938
        ),
        "xstorycloze": Benchmark(
            "xstorycloze", "xstorycloze_{}", frozenset("ar en es eu hi id my ru sw te zh".split()), ("acc",), 862
        ),
        "global_mmlu": Benchmark("global_mmlu", "global_mmlu_full_{}", mmlu_languages, ("acc",), 570),
        "xquad_gold_nll": Benchmark("xquad_gold_nll", "xquad_gold_nll_{}", xquad, ("answer_nll",), 122),
        "xquad": Benchmark("xquad", "xquad_{}", xquad, ("exact_match", "f1"), 122),
    }


@dataclass
class EvaluationPlan:
    """What each evaluation runs: the names for `--tasks`, the item indices per task (`--samples`), the groups the
    recipe defines (`ab_<benchmark>`: the non-English languages pooled; `ab_global_mmlu_<lang>`: the chosen subjects
    of one language), the items per language of each benchmark, and notes on languages a benchmark lacks."""

    tasks: list[str] = field(default_factory=list)
    samples: dict[str, list[int]] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    items_per_language: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _group(name: str, members: list[str], metrics: Sequence[str]) -> dict[str, Any]:
    """An lm-eval group configuration over `members`, averaging `metrics` weighted by the members' sizes."""
    return {
        "group": name,
        "task": members,
        "aggregate_metric_list": [
            {"metric": metric, "aggregation": "mean", "weight_by_size": True} for metric in metrics
        ],
        "metadata": {"version": 1.0},
    }


def evaluation_plan(
    languages: Sequence[str], items: dict[str, int], subjects: Sequence[str], mmlu_languages: frozenset[str]
) -> EvaluationPlan:
    """The evaluation of English and `languages` on every benchmark with items (see :class:`EvaluationPlan`). A
    Global-MMLU language gets `ceil(items / len(subjects))` items of each subject."""
    plan = EvaluationPlan()
    for name, benchmark in benchmarks(mmlu_languages).items():
        count = items[name]
        if count <= 0:
            continue
        evaluated = [language for language in dict.fromkeys(["en", *languages]) if language in benchmark.languages]
        lacking = [language for language in languages if language not in benchmark.languages]
        if lacking:
            plan.notes.append(f"{name} has no {', '.join(lacking)}: not evaluated there")
        members = {}
        for language in evaluated:
            task = benchmark.task.format(language)
            if name == "global_mmlu":
                per_subject = math.ceil(count / len(subjects))
                leaves = [f"{task}_{subject}" for subject in subjects]
                plan.samples.update({leaf: list(range(per_subject)) for leaf in leaves})
                members[language] = f"ab_global_mmlu_{language}"
                plan.groups[members[language]] = _group(members[language], leaves, benchmark.metrics)
                plan.items_per_language[name] = per_subject * len(subjects)
            else:
                plan.samples[task] = list(range(count))
                members[language] = task
                plan.items_per_language[name] = count
        non_english = [members[language] for language in evaluated if language != "en"]
        if non_english:
            plan.groups[f"ab_{name}"] = _group(f"ab_{name}", non_english, benchmark.metrics)
            plan.tasks.append(f"ab_{name}")
        if "en" in members:
            plan.tasks.append(members["en"])
    return plan


def write_task_folder(task_dir: Path, plan: EvaluationPlan, folder: Path) -> Path:
    """The run's `--include_path` folder: a copy of `task_dir` plus the plan's group YAMLs (in `ab_groups/`), and the
    plan's `samples.json` beside it; returns the samples file."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(task_dir, folder / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "tasks" / "ab_groups").mkdir()
    for name, group in plan.groups.items():
        text = yaml.safe_dump(group, sort_keys=False, allow_unicode=True)
        (folder / "tasks" / "ab_groups" / f"{name}.yaml").write_text(text, encoding="utf-8")
    samples = folder / "samples.json"
    samples.write_text(json.dumps(plan.samples), encoding="utf-8")
    return samples


# ----------------------------------------------------------------------------------------------- stages and runs


@dataclass
class Stage:
    """One step of the recipe: its inputs (what its record must match to be skipped), what it runs and, for the
    plan, the command it runs."""

    name: str
    inputs: dict[str, Any]
    run: Callable[[], None]
    command: list[str] | None = None
    resumes_from: Path | None = None


def run_command(command: list[str], stage: str) -> None:
    """Run `command`, its output on this terminal; raises RecipeError if it fails."""
    print(f"[ab] {stage}: $ {shlex.join(command)}", flush=True)
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise RecipeError(
            f"Stage {stage} failed (exit status {completed.returncode}); its output is above. Fix the cause and run "
            "the same command again: finished stages are skipped and a training resumes from its last checkpoint."
        )


def require(path: Path, what: str, stage: str) -> None:
    """Raise RecipeError unless `path`, written by `stage`, exists."""
    if not path.exists():
        raise RecipeError(f"{what} ({path}) is missing: run the stage {stage} first (--stages {stage}).")


def latest_checkpoint(folder: Path) -> Path | None:
    """The `checkpoint-<step>` folder of the highest step in `folder`, if any."""
    checkpoints = [path for path in folder.glob("checkpoint-*") if path.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda path: int(path.name.split("-")[-1]), default=None)


class Recipe:
    """The recipe's settings, paths and stages (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.output_dir).resolve()
        self.config = CONFIGS[args.model]
        self.languages = [language.strip() for language in args.languages.split(",") if language.strip()]
        unknown = [language for language in self.languages if language not in BACTRIAN_X_LANGUAGES]
        if unknown or not self.languages:
            raise RecipeError(
                f"--languages {args.languages!r}: {', '.join(unknown) or 'none given'} not in Bactrian-X. Its "
                f"languages: {' '.join(sorted(BACTRIAN_X_LANGUAGES))}."
            )
        if args.rows_per_language < 1 or args.eval_batch_size < 1:
            raise RecipeError("--rows-per-language and --eval-batch-size must be at least 1.")
        self.sft_args = shlex.split(args.sft_args)
        self.lm_eval_args = shlex.split(args.lm_eval_args)
        self.model_override = ["--model_name_or_path", args.base_model] if args.base_model else []
        self.model_args = self._model_config()
        self.base_model = self.model_args.model_name_or_path
        mmlu_languages, all_subjects = global_mmlu_layout()
        self.subjects = self._subjects(all_subjects)
        self.items = self._items(mmlu_languages)
        self.plan = evaluation_plan(self.languages, self.items, self.subjects, mmlu_languages)
        self.task_dir = Path(args.task_dir).resolve()
        if not self.task_dir.is_dir():
            raise RecipeError(f"--task-dir {args.task_dir}: no such folder (the default is {TASKS_DIR}).")
        self.train_file = self.out / "data" / "train.jsonl"

    # -------------------------------------------------------------------------------------------- settings

    def _model_config(self) -> ModelConfig:
        """TRL's `ModelConfig` of the config file with the overrides (`--base-model`, `--sft-args`), as `peft-cc
        sft` will read it: the model, its dtype and its quantization."""
        from trl import ModelConfig, TrlParser

        argv = ["--config", str(self.config), *self.model_override, *self.sft_args]
        model_args, _ = TrlParser((ModelConfig,)).parse_args_and_config(argv, return_remaining_strings=True)
        return model_args

    def _subjects(self, all_subjects: list[str]) -> list[str]:
        """The Global-MMLU subjects of `--mmlu-subjects` (`all`: every one), checked against `all_subjects`."""
        if self.args.mmlu_subjects == "all":
            return all_subjects
        subjects = [subject.strip() for subject in self.args.mmlu_subjects.split(",") if subject.strip()]
        unknown = [subject for subject in subjects if subject not in all_subjects]
        if unknown or not subjects:
            raise RecipeError(
                f"--mmlu-subjects: {', '.join(unknown) or 'none given'} not among Global-MMLU's subjects: "
                f"{', '.join(all_subjects)} (or `all`)."
            )
        return subjects

    def _items(self, mmlu_languages: frozenset[str]) -> dict[str, int]:
        """Items per language of every benchmark: the defaults, with those of `--items` instead."""
        items = {name: benchmark.default_items for name, benchmark in benchmarks(mmlu_languages).items()}
        for entry in filter(None, (part.strip() for part in self.args.items.split(","))):
            name, _, value = entry.partition("=")
            if name not in items or not value.isdigit():
                raise RecipeError(
                    f"--items {entry!r}: expected BENCHMARK=COUNT with BENCHMARK one of {', '.join(items)} and COUNT "
                    "a whole number (0 leaves the benchmark out)."
                )
            items[name] = int(value)
        return items

    def check_chat_template(self) -> None:
        """Raise RecipeError unless the base model's tokenizer has a chat template (training data and evaluation are
        chat-formatted)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.base_model, revision=self.model_args.model_revision)
        if not tokenizer.chat_template:
            raise RecipeError(
                f"The tokenizer of {self.base_model} has no chat template, but the recipe trains on chat messages and "
                "evaluates with --apply_chat_template. Use an instruct model, or save the model with a tokenizer "
                "that has one (tokenizer.chat_template = ...; tokenizer.save_pretrained(folder)) and pass that "
                "folder as --base-model."
            )

    # ---------------------------------------------------------------------------------------------- stages

    def stages(self) -> list[Stage]:
        """Every stage, in order."""
        data_inputs = {
            "source": self.args.source,
            "languages": self.languages,
            "rows_per_language": self.args.rows_per_language,
            "seed": self.args.seed,
        }
        quantization = self.quantization
        base_inputs = {"base_model": self.base_model, "quantization": quantization and quantization.to_dict()}
        stages = [
            Stage(
                "prepare",
                data_inputs,
                lambda: prepare_training_data(
                    self.args.source, self.languages, self.args.rows_per_language, self.args.seed, self.out / "data"
                ),
            )
        ]
        train_inputs = {}
        for arm in ("lora", "cc"):
            command = self._sft_command(arm)
            adapter = self.out / "adapters" / arm
            train_inputs[arm] = {
                **data_inputs,
                "config": yaml.safe_load(self.config.read_text(encoding="utf-8")),
                "model_override": self.model_override,
                "sft_args": self.sft_args,
                "method": arm,
            }
            checkpoint = latest_checkpoint(adapter)
            if checkpoint is not None:
                command = [*command, "--resume_from_checkpoint", str(checkpoint)]
            stages.append(Stage(f"train-{arm}", train_inputs[arm], self._train(command, arm), command, checkpoint))
        stages.append(Stage("quantize", base_inputs, self._quantize))
        evaluation_inputs = {
            "base": base_inputs,
            "languages": self.languages,
            "items_per_language": self.plan.items_per_language,
            "mmlu_subjects": self.subjects,
            "task_dir": str(self.task_dir),
            "lm_eval_args": self.lm_eval_args,
        }
        for system, adapter in (("base", None), ("lora", "lora"), ("cc", "cc")):
            command = self._eval_command(system, adapter)
            inputs = {**evaluation_inputs, "adapter": adapter and train_inputs[adapter]}
            stages.append(Stage(f"eval-{system}", inputs, self._evaluate(command, system), command))
        stages.append(Stage("compare", {}, self._compare))
        return stages

    def _train(self, command: list[str], arm: str) -> Callable[[], None]:
        """The stage train-<arm>: `command` (`peft-cc sft`), once the training pairs exist."""

        def train() -> None:
            require(self.train_file, "the training pairs", "prepare")
            run_command(command, f"train-{arm}")

        return train

    @functools.cached_property
    def quantization(self) -> BitsAndBytesConfig | None:
        """The `BitsAndBytesConfig` that `peft-cc sft` trains with (None for an unquantized base)."""
        from trl import get_quantization_config

        return get_quantization_config(self.model_args)

    @property
    def eval_model(self) -> str:
        """What lm-eval loads as `pretrained`: the saved 4-bit base when the config trains on one, else the base."""
        return str(self.out / "base-nf4") if self.quantization is not None else self.base_model

    def _sft_command(self, arm: str) -> list[str]:
        """`peft-cc sft` for one arm: the config, the method, the prepared pairs, the output folder, the overrides."""
        return [
            sys.executable, "-m", "peft_cc.cli", "sft", "--config", str(self.config), "--method", arm,
            "--dataset_name", str(self.train_file), "--output_dir", str(self.out / "adapters" / arm),
            *self.model_override, *self.sft_args,
        ]  # fmt: skip

    def _eval_command(self, system: str, adapter: str | None) -> list[str]:
        """lm-eval's command line for one system: the base, or the base with the adapter of arm `adapter` (CC-Tuning
        with its monolingual connection)."""
        model_args = f"pretrained={self.eval_model},dtype={self.model_args.dtype or 'auto'}"
        if adapter is not None:
            model_args += f",peft={self.out / 'adapters' / adapter}"
        if adapter == "cc":
            model_args += ",connection=monolingual"
        return [
            sys.executable, "-m", "peft_cc.lm_eval", "run", "--model", "cc", "--model_args", model_args,
            "--tasks", ",".join(self.plan.tasks), "--include_path", str(self.out / "lm_eval_tasks" / "tasks"),
            "--samples", str(self.out / "lm_eval_tasks" / "samples.json"), "--num_fewshot", "0",
            "--apply_chat_template", "--gen_kwargs", f"max_gen_toks={MAX_NEW_TOKENS}",
            "--batch_size", str(self.args.eval_batch_size), "--log_samples",
            "--output_path", str(self.out / "eval" / system), *self.lm_eval_args,
        ]  # fmt: skip

    def _quantize(self) -> None:
        """Save the base model quantized as `peft-cc sft` quantizes it for training (same `BitsAndBytesConfig`), so
        that lm-eval, which cannot be given a quantization config, loads the model the adapters were trained on."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quantization = self.quantization
        if quantization is None:
            print(f"[ab] quantize: the config trains on the unquantized {self.base_model}; nothing to do", flush=True)
            return
        device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
        print(
            f"[ab] quantize: {self.base_model} -> {self.eval_model} ({quantization.bnb_4bit_quant_type})", flush=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            self.base_model,
            revision=self.model_args.model_revision,
            dtype=self.model_args.dtype,
            quantization_config=quantization,
            device_map=device_map,
        )
        model.save_pretrained(self.eval_model)
        AutoTokenizer.from_pretrained(self.base_model, revision=self.model_args.model_revision).save_pretrained(
            self.eval_model
        )

    def _evaluate(self, command: list[str], system: str) -> Callable[[], None]:
        """The stage eval-<system>: the run's task folder written, then `command` (lm-eval), into a fresh folder."""

        def evaluate() -> None:
            from peft_cc.lm_eval.comparison import ComparisonError, find_results_file

            output = self.out / "eval" / system
            if self.quantization is not None:
                require(Path(self.eval_model) / "config.json", "the quantized base model", "quantize")
            if system != "base":
                require(self.out / "adapters" / system / "adapter_config.json", "the adapter", f"train-{system}")
            if output.exists():  # an interrupted run's partial results would be read as the finished ones
                shutil.rmtree(output)
            write_task_folder(self.task_dir, self.plan, self.out / "lm_eval_tasks")
            run_command(command, f"eval-{system}")
            try:
                find_results_file(output)
            except ComparisonError:
                raise RecipeError(f"eval-{system}: lm-eval wrote no results_*.json under {output}.") from None

        return evaluate

    def _compare(self) -> None:
        """What `peft-cc compare RUN_A RUN_B` prints, and `--json` and `--plot` write, for LoRA - base and CC - LoRA:
        the same functions, called here (one process instead of six)."""
        from peft_cc.lm_eval.comparison import ComparisonError, compare_runs, read_run
        from peft_cc.scripts.compare import format_table, plot_differences

        folder = self.out / "compare"
        folder.mkdir(parents=True, exist_ok=True)
        for name, baseline, system in COMPARISONS:
            runs = [self.out / "eval" / baseline, self.out / "eval" / system]
            print(f"[ab] compare: peft-cc compare {shlex.join(map(str, runs))} --plot {folder / name}.png", flush=True)
            try:
                comparison = compare_runs(*(read_run(str(run)) for run in runs))
                plot_differences(comparison, folder / f"{name}.png")
            except ComparisonError as error:
                raise RecipeError(f"compare {name}: {error}") from error
            table = format_table(comparison)
            (folder / f"{name}.txt").write_text(table + "\n", encoding="utf-8")
            (folder / f"{name}.json").write_text(
                json.dumps(comparison.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8"
            )
            print(f"\n[ab] {name} ({system} - {baseline}):\n{table}\n", flush=True)
        print(headline(folder), flush=True)

    # ------------------------------------------------------------------------------------------------- runs

    def run(self, selected: Sequence[str], dry_run: bool) -> None:
        """Run the `selected` stages in order (see the module docstring); with `dry_run`, print the plan only."""
        print(self.describe(), flush=True)
        stages = [stage for stage in self.stages() if stage.name in selected]
        needs_model = any(stage.name.startswith(("train", "quantize", "eval")) for stage in stages)
        if needs_model and not dry_run:
            self.check_chat_template()
        timings = []
        for number, stage in enumerate(stages, 1):
            record = self.out / "stages" / f"{stage.name}.json"
            inputs = json.loads(json.dumps(stage.inputs))
            done = self._is_done(stage.name, record, inputs)
            header = f"[ab] stage {number}/{len(stages)} {stage.name}"
            if dry_run:
                state = "done" if done else f"resumes from {stage.resumes_from}" if stage.resumes_from else "to run"
                command = f": $ {shlex.join(stage.command)}" if stage.command else ""
                print(f"{header} ({state}){command}")
                continue
            if done:
                print(f"{header}: done before ({record}); skipped", flush=True)
                continue
            print(f"{header}: started {time.strftime('%H:%M:%S')}", flush=True)
            start = time.monotonic()
            stage.run()
            seconds = time.monotonic() - start
            timings.append((stage.name, seconds))
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"inputs": inputs, "seconds": round(seconds, 1)}, indent=2), encoding="utf-8")
            print(f"{header}: finished in {seconds:.0f} s", flush=True)
        if timings:
            print("[ab] wall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings))

    def _is_done(self, name: str, record: Path, inputs: dict[str, Any]) -> bool:
        """Whether the stage's record exists with these inputs; raises RecipeError if it exists with others."""
        if name == "compare" or not record.is_file():
            return False
        previous = json.loads(record.read_text(encoding="utf-8"))["inputs"]
        if previous == inputs:
            return True
        changed = sorted(key for key in {*previous, *inputs} if previous.get(key) != inputs.get(key))
        raise RecipeError(
            f"Stage {name} was run in {self.out} with other settings ({', '.join(changed)} differ; record: "
            f"{record}). Use another --output-dir, or delete the record and that stage's outputs to run it again."
        )

    def describe(self) -> str:
        """The run's settings, as printed at the start."""
        items = ", ".join(f"{name} {count}" for name, count in self.plan.items_per_language.items())
        lines = [
            f"[ab] CC-Tuning vs LoRA A/B: {self.base_model} (config {self.config.name}) -> {self.out}",
            f"[ab] data: Bactrian-X from {self.args.source}, {', '.join(self.languages)}, "
            f"{self.args.rows_per_language} rows per language, seed {self.args.seed}",
            f"[ab] evaluation: English and {', '.join(self.languages)}; items per language: {items} "
            f"(Global-MMLU over {len(self.subjects)} subjects); tasks from {self.task_dir}",
            *(f"[ab] note: {note}" for note in self.plan.notes),
        ]
        return "\n".join(lines)


def headline(folder: Path) -> str:
    """The pooled non-English rows (the `ab_<benchmark>` groups) of both comparisons: B - A, its standard error and
    whether it is beyond two of them."""
    pooled = {f"ab_{name}" for name in BENCHMARK_NAMES}
    lines = ["[ab] pooled non-English languages (the recipe's groups), B - A +- SE, * beyond 2 SE:"]
    for name, baseline, system in COMPARISONS:
        for row in json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))["rows"]:
            if row["kind"] != "group" or row["name"] not in pooled:
                continue
            error = "n/a" if row["standard_error"] is None else f"{row['standard_error']:.4f}"
            lines.append(
                f"  {system + ' - ' + baseline:<11} {row['name']:<17} {row['metric_name']:<11} "
                f"{row['difference']:+.4f} +- {error:<6} {'*' if row['beyond_2se'] else ' '} ({row['units']} items)"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring and `--help`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True, help="which config: llama or qwen")
    parser.add_argument("--output-dir", required=True, help="where every stage writes (rerun to resume)")
    parser.add_argument("--source", default=BACTRIAN_X, help=f"Bactrian-X root (default {BACTRIAN_X}; pin @<rev>)")
    parser.add_argument("--languages", default=",".join(DEFAULT_LANGUAGES), help="non-English languages (codes)")
    parser.add_argument("--rows-per-language", type=int, default=DEFAULT_ROWS_PER_LANGUAGE)
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="the seed of the data's selection and order (the training's: the config's `seed`, --sft-args '--seed N')",
    )
    parser.add_argument(
        "--items",
        default="",
        help="items per language, e.g. xnli=300,xquad=0 (0 leaves a benchmark out); defaults (README.md, "
        '"Sizes"): xnli 938, xstorycloze 862, global_mmlu 570 (10 of each of 57 subjects), xquad_gold_nll 122, '
        "xquad 122",
    )
    parser.add_argument("--mmlu-subjects", default="all", help="Global-MMLU subjects (comma-separated) or all")
    parser.add_argument("--base-model", help="another base model (Hub id or folder) than the config's")
    parser.add_argument("--task-dir", default=str(TASKS_DIR), help="lm-eval task folder (default: tasks/ here)")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="lm-eval's --batch_size (4 if memory runs out)")
    parser.add_argument("--sft-args", default="", help="extra `peft-cc sft` flags for both arms, one string")
    parser.add_argument("--lm-eval-args", default="", help="extra lm-eval flags for the three evaluations")
    parser.add_argument(
        "--stages",
        default="all",
        help=f"comma-separated, in any order: {', '.join(STAGES)}, or train, eval, all (default all)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the settings and every stage's command only")
    args = parser.parse_args(argv)
    selected = set()
    for name in filter(None, (part.strip() for part in args.stages.split(","))):
        if name not in STAGES and name not in STAGE_ALIASES:
            parser.error(f"--stages: unknown stage {name!r}; choose from {', '.join([*STAGES, *STAGE_ALIASES])}")
        selected.update(STAGE_ALIASES.get(name, (name,)))
    args.stages = [stage for stage in STAGES if stage in selected]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recipe; returns the exit status (2 with a message for settings or inputs it cannot work with)."""
    args = parse_args(argv)
    try:
        Recipe(args).run(args.stages, args.dry_run)
    except RecipeError as error:
        print(f"ab_recipe: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
