"""QLoRA CC-Tuning at a real model size: GPU memory and step time against plain QLoRA, on random weights.

    python benchmarks/qlora_gpu.py                          # Llama-3.1-8B shape, one CUDA GPU
    python benchmarks/qlora_gpu.py --tiny --device cpu      # the same code on a tiny model, to check that it runs

The settings of examples/qlora_8b_24gb.py: NF4 with double quantization and bf16 compute, LoRA r=16 (alpha 32) on
all linear layers, non-reentrant gradient checkpointing, bf16 autocast, `paged_adamw_8bit`, one micro-batch of 2 rows
of `--prompt-tokens` + `--response-tokens` tokens (the paper's cutoff, 1024, by default), English prompts as long as
the non-English ones. Random bf16 weights of the shape (seed 0) are saved as a safetensors checkpoint and loaded back
with `from_pretrained(quantization_config=...)`, the path users take; no weights are downloaded.

One process, in this order: plain QLoRA (training steps, generation), then the LoRA layers are unloaded and the same
quantized base gets a CC-Tuning adapter (training steps with and without `english_gradients`, generation with the
shared prompt cache, a Transform Matrix fit), and last a CC-Tuning adapter with the other Decision Maker,
`variance_reinforce_gated` (its English-variance initialisation, then training steps in its learning phase; the runs in
docs/benchmarks.md used peft-cc 0.1's `variance_reinforce`, the same without the gate; the result key keeps that name).
Each training variant reports the median step time (forward, backward, optimizer step) and the peak of torch's
allocator over its steps; the ratios are CC-Tuning over plain QLoRA, measured on the same card in the same run. Paged
optimizer states live in CUDA managed memory, outside torch's allocator: `device_used_gib` (the whole card's used
memory, CUDA context included) shows them. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import bitsandbytes as bnb
import peft
import torch
import transformers
from parameter_counts import LLAMA_3_1_8B
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from peft_cc import CCConfig, fit_transform_matrix

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
TINY = LlamaConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, d=64 model instead of the Llama-3.1-8B shape")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per variant (median reported)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    parser.add_argument("--generate-repeats", type=int, default=3, help="timed generate calls (median reported)")
    parser.add_argument("--fit-pairs", type=int, default=128, help="prompt pairs of the Transform Matrix fit")
    parser.add_argument(
        "--checkpoint-dir",
        help="where the random checkpoint is written, or read if one is there (default: a temp folder)",
    )
    parser.add_argument("--output", help="also write the JSON object to this file")
    return parser.parse_args()


def gib(num_bytes: int) -> float:
    return round(num_bytes / 2**30, 3)


class Memory:
    """Peak and current memory of torch's allocator, and the whole device's used memory (no-op off CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def report(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return {
            "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()),
            "allocated_gib": gib(torch.cuda.memory_allocated()),
            "device_used_gib": gib(total - free),
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_of(work: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of `work()`, with the device's queued kernels finished before and after."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def checkpointed_peft_model(base: torch.nn.Module, config: LoraConfig) -> torch.nn.Module:
    """`get_peft_model(base, config)` with non-reentrant gradient checkpointing, as the example trains."""
    model = get_peft_model(base, config)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_quantized(config: LlamaConfig, device: torch.device, checkpoint_dir: Path) -> torch.nn.Module:
    """Random bf16 weights of `config` (seed 0), saved to `checkpoint_dir` unless a checkpoint is already there,
    loaded back in 4-bit NF4 on `device`."""
    if not (checkpoint_dir / "config.json").exists():
        torch.manual_seed(0)
        with torch.device(device):  # random init on the GPU: seconds, not minutes, at 8B
            random_model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        random_model.save_pretrained(checkpoint_dir)
        del random_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint_dir, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": device}
    )
    model.config.use_cache = False
    return model


def make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if device.type == "cuda":
        return bnb.optim.PagedAdamW8bit(parameters, lr=2e-4)
    return torch.optim.AdamW(parameters, lr=2e-4)  # paged 8-bit states need CUDA


def time_training(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace, memory: Memory
) -> dict[str, float]:
    """Median seconds of a full training step over `args.steps` steps after `args.warmup_steps`, and peak memory."""
    device = batch["input_ids"].device
    model.train()
    optimizer = make_optimizer(model, device)
    memory.reset_peak()
    seconds = []
    for step in range(args.warmup_steps + args.steps):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outputs = model(**batch)
            loss = outputs.loss + (outputs.get("decision_maker_loss") or 0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= args.warmup_steps:
            seconds.append(time.perf_counter() - start)
    report = {"step_seconds": round(statistics.median(seconds), 4), "loss": round(float(loss.detach()), 4)}
    report.update(memory.report())
    del optimizer
    return report


def time_generation(model: torch.nn.Module, prompts: torch.Tensor, args: argparse.Namespace) -> float:
    """Median seconds of `args.generate_repeats` calls (after one warm-up) that each generate `args.new_tokens`
    greedy tokens per prompt."""
    model.eval()
    model.generation_config.eos_token_id = None  # always `new_tokens` tokens
    model.generation_config.pad_token_id = 0
    seconds = []
    with torch.no_grad():
        for repeat in range(1 + args.generate_repeats):
            synchronize(prompts.device)
            start = time.perf_counter()
            model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=args.new_tokens,
                do_sample=False,
            )
            synchronize(prompts.device)
            if repeat:
                seconds.append(time.perf_counter() - start)
    return round(statistics.median(seconds), 4)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    config = TINY if args.tiny else LLAMA_3_1_8B
    memory = Memory(device)
    with tempfile.TemporaryDirectory() as temporary:
        start = time.perf_counter()
        base = load_quantized(config, device, Path(args.checkpoint_dir or temporary))
        load_seconds = time.perf_counter() - start
    loaded = memory.report()

    generator = torch.Generator().manual_seed(0)
    rows, prompt, response = args.batch_size, args.prompt_tokens, args.response_tokens
    input_ids = torch.randint(100, config.vocab_size - 100, (rows, prompt + response), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    english_ids = torch.randint(100, config.vocab_size - 100, (rows, prompt), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    english = {"english_input_ids": english_ids, "english_attention_mask": torch.ones_like(english_ids)}
    english = {name: tensor.to(device) for name, tensor in english.items()}
    prompts = input_ids[:, :prompt].to(device)

    plain = checkpointed_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **LORA))
    results = {"plain_lora": time_training(plain, batch, args, memory)}
    results["plain_lora"]["generate_seconds"] = time_generation(plain, prompts, args)

    base = plain.unload()  # the same quantized weights, without LoRA layers
    del plain
    cc = checkpointed_peft_model(base, CCConfig(**LORA))
    results["cc"] = time_training(cc, {**batch, **english}, args, memory)
    cc.peft_config["default"].english_gradients = False
    results["cc_no_english_grad"] = time_training(cc, {**batch, **english}, args, memory)
    pairs = [(prompts[index % rows].tolist(), english_ids[index % rows].tolist()) for index in range(args.fit_pairs)]
    fit_seconds = seconds_of(partial(fit_transform_matrix, cc, pairs, batch_size=8, show_progress=False), device)
    results["cc"]["generate_seconds"] = time_generation(cc, prompts, args)

    # `variance_reinforce_gated` (docs/decision_maker.md): its English-variance initialisation over 64 examples,
    # then training steps in its learning phase, where the REINFORCE term adds a per-row loss.
    base = cc.unload()
    del cc
    reinforce = checkpointed_peft_model(base, CCConfig(**LORA, decision_maker="variance_reinforce_gated"))

    def initialize() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            reinforce.base_model.initialize_decision_maker([{**batch, **english}] * max(1, 64 // rows))

    init_seconds = seconds_of(initialize, device)
    reinforce.base_model.set_training_progress(0.5)
    results["cc_variance_reinforce"] = time_training(reinforce, {**batch, **english}, args, memory)
    results["cc_variance_reinforce"]["init_seconds"] = round(init_seconds, 2)

    plain_step = results["plain_lora"]["step_seconds"]
    summary = {
        "config": "tiny" if args.tiny else "Llama-3.1-8B shape, random weights",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bnb.__version__,
        },
        "batch": f"{rows} rows x ({prompt} prompt + {response} response) tokens, English prompts {prompt} tokens",
        "load_seconds": round(load_seconds, 1),
        "after_load": loaded,
        "train_step_ratio": round(results["cc"]["step_seconds"] / plain_step, 4),
        "train_step_ratio_no_english_grad": round(results["cc_no_english_grad"]["step_seconds"] / plain_step, 4),
        "train_step_ratio_variance_reinforce": round(results["cc_variance_reinforce"]["step_seconds"] / plain_step, 4),
        "generate_ratio": round(results["cc"]["generate_seconds"] / results["plain_lora"]["generate_seconds"], 4),
        "fit_seconds_per_pair": round(fit_seconds / args.fit_pairs, 4),
        **results,
    }
    if device.type == "cuda":
        summary["peak_memory_ratio"] = round(
            results["cc"]["peak_allocated_gib"] / results["plain_lora"]["peak_allocated_gib"], 4
        )
    text = json.dumps(summary, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
