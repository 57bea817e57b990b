"""CC-Tuning vs vanilla multilingual LoRA SFT on a real model, evaluated on the paper's benchmarks.

Systems, all trained on the same pairs, steps, LoRA settings and seeds:

- `base`: the model zero-shot;
- `lora-seed<s>`: vanilla multilingual LoRA SFT (TRL's `SFTTrainer`, no connection);
- `cc-mono-seed<s>`: CC-Tuning (`CCSFTTrainer`), evaluated with the monolingual connection (Transform Matrix);
- `cc-bi-seed<s>`: the same adapter with the bilingual connection (the real English prompt; an upper bound), for
  the seeds of `--bilingual-seeds`.

`--systems` picks which of `base`, `lora` and `cc` to run; `--cc-options` passes CCConfig options to the CC system
and `--cc-name` renames it (e.g. `--cc-name cc-rec --cc-options '{"decision_maker": "variance_reinforce_gated"}'`).

Training pairs come from the benchmark files, item indices `>= --split` in every language; evaluation uses item
indices `< --split` (the first `--eval-items` of them), so no evaluated item, in any language, is trained on. Every
adapter and every result is saved under `--output-dir`; the adapters can be evaluated on another data root later
with `python -m peft_cc.evaluation --adapter ...`.

    python benchmarks/multilingual_sft.py                                   # SmolLM2-135M-Instruct, about an hour
    python benchmarks/multilingual_sft.py --steps 2 --eval-items 1 --seeds 0 --output-dir /tmp/smoke   # smoke test
    python benchmarks/multilingual_sft.py --systems cc --cc-name cc-rec --cc-options \
        '{"decision_maker": "variance_reinforce_gated", "variance_reinforce_config": {"start_fraction": 0.5}}'
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from peft_cc import CCConfig, CCSFTConfig, CCSFTTrainer
from peft_cc.evaluation import evaluate, load_system, write_report
from peft_cc.parallel_data import available_languages, load_parallel_items

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_BENCHMARKS = "MKQA,XQuAD,XNLI,XStoryCloze,MMMLU"
EVAL_BENCHMARKS = "MKQA,XQuAD,XNLI"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="Hub id or local folder")
    parser.add_argument("--data-root", default=str(REPO_ROOT.parent / "shared" / "data" / "benchmarks"))
    parser.add_argument("--train-benchmarks", default=TRAIN_BENCHMARKS)
    parser.add_argument("--eval-benchmarks", default=EVAL_BENCHMARKS)
    parser.add_argument("--eval-languages", default="en,de,zh", help="languages to evaluate (where present)")
    parser.add_argument("--split", type=int, default=100, help="items below this index are never trained on")
    parser.add_argument("--eval-items", type=int, default=16, help="held-out items per language to evaluate")
    parser.add_argument(
        "--train-pairs", type=int, default=None, help="pairs sampled from all languages (default: steps × batch size)"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=160, help="longer training pairs are left out")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument(
        "--bilingual-seeds", default="0", help="seeds whose CC adapter is also evaluated with the bilingual connection"
    )
    parser.add_argument("--transform-pairs", type=int, default=200)
    parser.add_argument("--systems", default="base,lora,cc", help="which of base, lora, cc to run")
    parser.add_argument("--cc-options", type=json.loads, default={}, help="CCConfig options of the CC system (JSON)")
    parser.add_argument(
        "--cc-trainer-options", type=json.loads, default={}, help="CCSFTConfig options of the CC system (JSON)"
    )
    parser.add_argument("--cc-name", default="cc", help="name of the CC system in the results")
    parser.add_argument("--output-dir", default=str(REPO_ROOT / "outputs" / "multilingual_sft"))
    args = parser.parse_args()
    unknown = set(_names(args.systems)) - {"base", "lora", "cc"}
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}: choose from base, lora, cc")
    for name in ("cc_options", "cc_trainer_options"):
        if not isinstance(getattr(args, name), dict):
            parser.error(f"--{name.replace('_', '-')} must be a JSON object, got {getattr(args, name)!r}")
    return args


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def training_pairs(args: argparse.Namespace, tokenizer) -> Dataset:
    """Conversational prompt-completion rows with the English prompt, from item indices >= split, seeded sample.

    Pairs whose prompt and answer, or whose English prompt, exceed `--max-length` tokens are left out rather than
    truncated (a truncated pair loses its answer and its anchor).
    """

    def fits(*texts: str) -> bool:
        return len(tokenizer(" ".join(texts))["input_ids"]) + 16 <= args.max_length  # 16: the chat template

    rows = []
    for benchmark in _names(args.train_benchmarks):
        for language in available_languages(args.data_root, benchmark):
            for item in load_parallel_items(args.data_root, benchmark, language)[args.split :]:
                if not (fits(item.prompt, item.first_answer) and fits(item.english_prompt)):
                    continue
                rows.append(
                    {
                        "prompt": [{"role": "user", "content": item.prompt}],
                        "completion": [{"role": "assistant", "content": item.first_answer}],
                        "prompt_en": [{"role": "user", "content": item.english_prompt}],
                    }
                )
    random.Random(0).shuffle(rows)
    return Dataset.from_list(rows[: args.train_pairs or args.steps * args.batch_size])


def train(kind: str, seed: int, dataset: Dataset, args: argparse.Namespace) -> Path:
    """Train one adapter (`kind` is "lora" or "cc") and save it; returns its folder."""
    output = Path(args.output_dir) / "adapters" / f"{args.cc_name if kind == 'cc' else kind}-seed{seed}"
    common = dict(
        output_dir=str(output),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        max_length=args.max_length,
        seed=seed,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # float32 on the CPU
    )
    lora = dict(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", lora_dropout=0.05)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if kind == "cc":
        trainer = CCSFTTrainer(
            model=model,
            args=CCSFTConfig(**common, transform_pairs=args.transform_pairs, **args.cc_trainer_options),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=CCConfig(**lora, **args.cc_options),
        )
    else:
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**common),
            train_dataset=dataset.remove_columns("prompt_en"),
            processing_class=tokenizer,
            peft_config=LoraConfig(task_type="CAUSAL_LM", **lora),
        )
    trainer.train()
    trainer.save_model()
    (output / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    if getattr(trainer, "decision_maker_prior", None) is not None:  # decision_maker="variance_reinforce_gated"
        (output / "decision_maker_prior.json").write_text(json.dumps(trainer.decision_maker_prior.tolist()))
    gate = trainer.cc_model.decision_maker().gate if kind == "cc" else None
    if gate is not None:  # the gated strategy: how much of each candidate layer training chose to inject
        (output / "injection_gate.json").write_text(json.dumps(gate.tolist()))
    return output


SUMMARY_SCORES = (
    ("MKQA", "accuracy", "MKQA acc %"),
    ("MKQA", "answer_nll", "MKQA gold NLL"),
    ("XQuAD", "contains", "XQuAD contains %"),
    ("XQuAD", "answer_nll", "XQuAD gold NLL"),
    ("XNLI", "accuracy", "XNLI acc %"),
    ("XNLI", "accuracy_loglik", "XNLI acc log-lik. %"),
)


def seed_summary(results: dict[str, dict]) -> str:
    """A Markdown table per system (seeds pooled): the non-English average of each score, mean ± half range."""
    systems: dict[str, list[dict]] = {}
    for name, result in results.items():
        systems.setdefault(name.split("-seed")[0], []).append(result)
    header = ["system", "seeds"] + [label for _, _, label in SUMMARY_SCORES]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for system, runs in systems.items():
        cells = [system, str(len(runs))]
        for benchmark, metric, _ in SUMMARY_SCORES:
            values = [
                run["benchmarks"][benchmark]["average_non_english"][metric]
                for run in runs
                if benchmark in run["benchmarks"]
                and metric in (run["benchmarks"][benchmark]["average_non_english"] or {})
            ]
            scale, digits = (1, 2) if metric == "answer_nll" else (100, 1)
            if not values:
                cells.append("–")
            elif len(values) == 1:
                cells.append(f"{scale * values[0]:.{digits}f}")
            else:
                middle, half = (max(values) + min(values)) / 2, (max(values) - min(values)) / 2
                cells.append(f"{scale * middle:.{digits}f} ± {scale * half:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset = training_pairs(args, AutoTokenizer.from_pretrained(args.model))
    print(f"{len(dataset)} training pairs (item indices >= {args.split}, at most {args.max_length} tokens)")
    evaluation = dict(
        data_root=args.data_root,
        benchmarks=_names(args.eval_benchmarks),
        languages=_names(args.eval_languages),
        offset=0,
        limit=min(args.eval_items, args.split),
    )

    results: dict[str, dict] = {}
    timings: dict[str, float] = {}

    def run(name: str, adapter: Path | None, connection: str | None) -> None:
        began = time.perf_counter()
        model, tokenizer, loading = load_system(args.model, str(adapter) if adapter else None)
        results[name] = evaluate(model, tokenizer, settings=loading, connection=connection, **evaluation)
        timings[f"evaluate {name}"] = time.perf_counter() - began
        write_report(results, output_dir / "results.json")

    bilingual_seeds = {int(seed) for seed in _names(args.bilingual_seeds)}
    systems = _names(args.systems)
    if "base" in systems:
        run("base", None, None)
    for seed in (int(seed) for seed in _names(args.seeds)):
        for kind in [kind for kind in ("lora", "cc") if kind in systems]:
            began = time.perf_counter()
            adapter = train(kind, seed, dataset, args)
            timings[f"train {adapter.name}"] = time.perf_counter() - began
            if kind == "lora":
                run(f"lora-seed{seed}", adapter, None)
            else:
                run(f"{args.cc_name}-mono-seed{seed}", adapter, "monolingual")
                if seed in bilingual_seeds:
                    run(f"{args.cc_name}-bi-seed{seed}", adapter, "bilingual")
    timings["total"] = time.perf_counter() - start
    settings = {key: value for key, value in vars(args).items()}
    (output_dir / "experiment.json").write_text(json.dumps({"settings": settings, "seconds": timings}, indent=2))
    print(json.dumps({"seconds": {key: round(value, 1) for key, value in timings.items()}}, indent=2))
    summary = seed_summary(results)
    (output_dir / "summary.md").write_text(summary)
    print((output_dir / "results.md").read_text())
    print(summary)


if __name__ == "__main__":
    main()
