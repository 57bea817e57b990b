"""QLoRA CC-Tuning of an 8B model on one 24 GB GPU (Llama-3.1-8B-Instruct or Qwen2.5-7B-Instruct).

    python examples/qlora_8b_24gb.py --model meta-llama/Llama-3.1-8B-Instruct --dataset aya_parallel.jsonl \
        --prompt-column instruction --english-column instruction_en --completion-column output
    python examples/qlora_8b_24gb.py --model Qwen/Qwen2.5-7B-Instruct            # the benchmark samples as data
    accelerate launch --num_processes 2 examples/qlora_8b_24gb.py ...              # one copy per GPU (DDP)

The settings, and why:

| setting | value | why |
| --- | --- | --- |
| quantization | 4-bit NF4, double quant., bf16 compute | the frozen base weights take ~0.52 byte per parameter |
| LoRA | r=16, alpha=32, dropout 0.05, all linear layers | the QLoRA recipe (not the LM head); ~42M parameters |
| Decision Maker | float32, trained (32 × 4096 for Llama) | kept float32 by the trainer, whatever the compute dtype |
| batch | 2 per device × 8 accumulation steps = 16 | the paper's batch size, at a sequence length that fits |
| `max_length` | 1024 | the paper's cutoff length |
| learning rate | 2e-4, cosine, 10% warm-up | the usual QLoRA rate (the paper's 1e-5 is for full fine-tuning) |
| epochs | 3 | the paper's |
| gradient checkpointing | on, non-reentrant | one layer's activations at a time; non-reentrant also suits DDP |
| optimizer | `paged_adamw_8bit` | 8-bit Adam states (2 bytes per trainable parameter), paged to CPU on spikes |
| `transform_pairs` | 1000 | the paper's: the Transform Matrix is fitted on 1000 training pairs at the end |

Expected GPU memory (estimated from the parameter counts, per device; check with the peak the script prints):

| part | Llama-3.1-8B | Qwen2.5-7B |
| --- | --- | --- |
| decoder linear weights, NF4 + double-quant constants (6.98B / 6.53B parameters) | 3.6 GB | 3.4 GB |
| embeddings + LM head, bf16, not quantized (2 × 525M / 2 × 545M) | 2.1 GB | 2.2 GB |
| LoRA (bf16), its gradients and paged 8-bit Adam states, Decision Maker, Transform Matrix | 0.3 GB | 0.3 GB |
| activations with checkpointing, batch 2 × 1024 tokens (layer inputs, one layer recomputed) | 1.1 GB | 0.9 GB |
| English pass of the prompts (at most 2 × 1024 tokens, no LM head) | ≤ 0.5 GB | ≤ 0.4 GB |
| logits and loss, 2 × 1024 × vocabulary (bf16 logits, float32 log-softmax, its gradient) | ~3.2 GB | ~3.7 GB |
| CUDA context, allocator and bitsandbytes workspaces | ~1.5 GB | ~1.5 GB |
| **total (peak)** | **~12 GB** | **~12.5 GB** |

Measured (`benchmarks/qlora_gpu/qlora_gpu.py`, random weights of the Llama-3.1-8B shape, one H200, these settings
without the trainer): 5.3 GiB after loading, a peak of 9.4 GiB allocated by torch at 2 × 1024 tokens (13.1 GiB at 2 ×
2048), and 10.9 GiB (15.3 GiB) in use on the card with the CUDA context and the paged optimizer states; plain QLoRA
peaks 0.3-0.6 GiB lower. So a 24 GB card takes `--max-length 2048` at batch 2; the logits grow with batch × length ×
vocabulary, so they are what to watch. Figures and reading: benchmarks/qlora_gpu/README.md.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import PartialState
from load_parallel_dataset import DEFAULT_DATA_ROOT, from_benchmark_layout, from_columns, load_any
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from peft_cc import CCConfig, CCSFTConfig, CCSFTTrainer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="meta-llama/Llama-3.1-8B-Instruct", help="Hub id or local path")
    parser.add_argument("--dataset", help="a .jsonl/.csv/.parquet file, a saved dataset or a Hub id (parallel data)")
    parser.add_argument("--prompt-column", default="instruction")
    parser.add_argument("--english-column", default="instruction_en")
    parser.add_argument("--completion-column", default="output")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="benchmark layout, without --dataset")
    parser.add_argument("--languages", default="ar,de,ja,ko,pt,ru,tr,vi,zh")
    parser.add_argument("--output-dir", default="outputs/cc-qlora-8b")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--per-device-batch-size", type=int, default=2)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.dataset:
        train = from_columns(load_any(args.dataset), args.prompt_column, args.english_column, args.completion_column)
    else:
        train = from_benchmark_layout(args.data_root, "MKQA", args.languages.split(","), skip_items=100)

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        quantization_config=quantization,
        dtype=torch.bfloat16,
        # One whole copy per process: under `accelerate launch` every process holds the model on its own GPU.
        device_map={"": PartialState().local_process_index},
        attn_implementation="sdpa",
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    config = CCSFTConfig(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_ratio=0.1,
        max_length=args.max_length,
        bf16=True,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="paged_adamw_8bit",
        logging_steps=10,
        save_steps=200,
        save_total_limit=2,
        transform_pairs=1000,
        transform_batch_size=8,
        report_to="none",
    )
    peft_config = CCConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    trainer = CCSFTTrainer(
        model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.model.print_trainable_parameters()
    trainer.train()  # ends with the Transform Matrix fit on 1000 training pairs
    trainer.save_model()  # LoRA + Decision Maker + Transform Matrix
    if torch.cuda.is_available() and trainer.is_world_process_zero():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated")


if __name__ == "__main__":
    main()
