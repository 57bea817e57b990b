"""Worker of `tests/test_ddp.py`: a short CC-Tuning run of a tiny model with `CCSFTTrainer`.

Run it as a script (Python then puts its folder, tests/, first on the module path, where it finds the tests' helpers),
alone (one process) or under `torch.distributed.run` (several CPU processes, gloo). Every process writes its
adapter tensors (LoRA, Decision Maker, Transform Matrix) to `<output>/adapter-rank<r>.pt`, and the main process the
log history to `<output>/log_history.json`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import peft
import torch
from conftest import make_tiny_model
from datasets import Dataset
from helpers import cc_config
from sft_helpers import conversational_rows, make_tiny_tokenizer

from peft_cc import CCSFTConfig, CCSFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True)
    parser.add_argument("--per-device-batch-size", type=int, default=2)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--global-noise", action="store_true", help="deterministic_gumbel_noise=False")
    options = parser.parse_args()
    output = Path(options.output)

    args = CCSFTConfig(
        output_dir=str(output / "run"),
        per_device_train_batch_size=options.per_device_batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        max_steps=options.max_steps,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        max_length=96,
        transform_pairs=8,
        disable_tqdm=True,
        seed=0,
        deterministic_gumbel_noise=not options.global_noise,
    )
    trainer = CCSFTTrainer(
        model=make_tiny_model("llama"),
        args=args,
        train_dataset=Dataset.from_list(conversational_rows()),
        processing_class=make_tiny_tokenizer(),
        peft_config=cc_config(lora_dropout=0.1),
    )
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    tensors = {name: tensor.detach().cpu() for name, tensor in peft.get_peft_model_state_dict(model).items()}
    rank = trainer.accelerator.process_index
    torch.save(tensors, output / f"adapter-rank{rank}.pt")
    if trainer.is_world_process_zero():
        (output / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        print(f"world size {trainer.accelerator.num_processes}, {trainer.state.global_step} steps")


if __name__ == "__main__":
    main()
