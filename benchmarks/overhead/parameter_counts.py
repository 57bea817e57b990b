"""Parameter counts of a CC-Tuning adapter at a real model size, without allocating the model (meta device).

    python benchmarks/overhead/parameter_counts.py        # Llama-3.1-8B shape, LoRA r=16 on all linear layers
    python benchmarks/overhead/parameter_counts.py --rank 64

Prints one JSON object: LoRA parameters, Decision Maker parameters, Transform Matrix entries, base parameters.
"""

from __future__ import annotations

import argparse
import json

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_cc import CCConfig

LLAMA_3_1_8B = LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(LLAMA_3_1_8B)
    base_parameters = sum(parameter.numel() for parameter in base.parameters())
    model = get_peft_model(base, CCConfig(r=args.rank, target_modules="all-linear"))
    trainable = {name: parameter.numel() for name, parameter in model.named_parameters() if parameter.requires_grad}
    tuner = model.base_model
    result = {
        "config": "Llama-3.1-8B shape (32 layers, d=4096, FFN 14336, 8 KV heads)",
        "lora_rank": args.rank,
        "base_parameters": base_parameters,
        "lora_parameters": sum(count for name, count in trainable.items() if "lora_" in name),
        "decision_maker_parameters": tuner.decision_maker().weight.numel(),
        "transform_matrix_entries": tuner.transform_matrix().numel(),
        "trainable_parameters": sum(trainable.values()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
