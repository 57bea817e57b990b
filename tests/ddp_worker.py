"""Worker of `tests/test_ddp.py`: a short CC-Tuning run of a tiny model with `CCSFTTrainer`.

Run it as a script (Python then puts its folder, tests/, first on the module path, where it finds the tests' helpers),
alone (one process), under `torch.distributed.run` (several CPU processes, gloo: DDP) or under `accelerate launch`
with an FSDP or DeepSpeed config (several CPU processes, gloo; DeepSpeed with `DS_ACCELERATOR=cpu`). Every process
writes its view of the whole adapter (LoRA, Decision Maker, Transform Matrix; gathered from the shards under FSDP2 and
ZeRO-3) to `<output>/adapter-rank<r>.pt` and facts about its run (how many parameters it held sharded, how many
micro-batches had no connected row) to `<output>/run-rank<r>.json`; the trainer saves the adapter with `save_model` to
`<output>/adapter/`, and the main process writes the log history to `<output>/log_history.json` and the distinct
warnings of the run to `<output>/warnings.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import peft
import torch
from conftest import make_tiny_model
from datasets import Dataset
from helpers import cc_config
from sft_helpers import conversational_rows, make_tiny_tokenizer

from peft_cc import CCSFTConfig, CCSFTTrainer


def let_accelerate_shard_on_cpu() -> None:
    """Let accelerate run FSDP on CPU processes, as `accelerate launch` of an FSDP config asks.

    accelerate 1.15 builds its FSDP plugin from the launcher's environment (`ACCELERATE_USE_FSDP`, `FSDP_VERSION`,
    ...) on any device, but `AcceleratorState` switches the run to FSDP (and gives the plugin the mixed precision)
    only on an accelerator: a CPU run stays `MULTI_CPU` (DDP). Here it does what it does on an accelerator; that is
    the only change to accelerate. The sharding itself (`fully_shard` of every decoder layer, of the embedding and of
    the final norm and LM head; the full state dict at save time) is accelerate's and torch's own code, which runs on
    CPU with gloo.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs) -> None:
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # A later `AcceleratorState()` reads its distributed type back from the `PartialState`.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


def is_sharded(parameter: torch.nn.Parameter) -> bool:
    """Whether this process holds only a part of `parameter` (a DTensor shard of FSDP2, or a ZeRO-3 partition)."""
    if hasattr(parameter, "full_tensor"):
        return True
    return hasattr(parameter, "ds_id") and not getattr(parameter, "ds_persist", False) and parameter.numel() == 0


def whole_adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors on this process, each whole (FSDP2 parameters are gathered from their shards)."""
    tensors = {}
    for name, tensor in peft.get_peft_model_state_dict(model).items():
        if hasattr(tensor, "full_tensor"):  # a DTensor: one shard per process (a collective: every process calls it)
            tensor = tensor.full_tensor()
        tensors[name] = tensor.detach().cpu().clone()
    return tensors


def saved(model: torch.nn.Module, folder: Path, args: CCSFTConfig) -> Path:
    """`folder`, where the main process saved `model` (the other processes wait for it)."""
    with args.main_process_first(desc="saving the base model"):
        if args.process_index == 0:
            model.save_pretrained(folder)
    return folder


def quantized(folder: Path) -> torch.nn.Module:
    """The model saved in `folder`, loaded in 4 bits (NF4) as QLoRA loads it, with its 4-bit weights stored as
    bfloat16 (`bnb_4bit_quant_storage`), which FSDP needs to shard them."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": "cpu"}
    )


def rows_with_unconnected(count: int) -> list[dict]:
    """The test rows, the English prompts of the first `count` of them longer than `max_length` (96 characters): the
    trainer empties those, and their rows are trained without the connection."""
    rows = conversational_rows()
    for row in rows[:count]:
        row["prompt_en"] = [{"role": "user", "content": "x" * 100}]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True)
    parser.add_argument("--per-device-batch-size", type=int, default=2)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--global-noise", action="store_true", help="deterministic_gumbel_noise=False")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant, as the recipes use")
    parser.add_argument("--qlora", action="store_true", help="the model in 4 bits (bitsandbytes), stored in bfloat16")
    parser.add_argument(
        "--from-folder",
        action="store_true",
        help="hand the trainer the model's folder (loaded by TRL; under DeepSpeed ZeRO-3 with `zero3_init_flag`, "
        "partitioned as it loads) instead of the model",
    )
    parser.add_argument(
        "--unconnected-rows", type=int, default=0, help="give the first N rows an English prompt over max_length"
    )
    options = parser.parse_args()
    output = Path(options.output)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp:
        let_accelerate_shard_on_cpu()

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
        gradient_checkpointing=options.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if options.gradient_checkpointing else None,
        # accelerate turns DeepSpeed off in a `use_cpu` run; DeepSpeed's CPU accelerator keeps it on the CPU.
        use_cpu=os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        max_length=96,
        transform_pairs=8,
        disable_tqdm=True,
        seed=0,
        deterministic_gumbel_noise=not options.global_noise,
    )
    model = make_tiny_model("llama")
    if options.qlora:
        model = quantized(saved(model, output / "base", args))
    elif options.from_folder:
        model = str(saved(model, output / "base", args))
    trainer = CCSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows_with_unconnected(options.unconnected_rows)),
        processing_class=make_tiny_tokenizer(),
        peft_config=cc_config(lora_dropout=0.1),
    )
    if fsdp and not trainer.accelerator.is_fsdp2:
        raise RuntimeError(f"FSDP2 was asked for, but the run is {trainer.accelerator.distributed_type}.")
    # Parameters that DeepSpeed's `zero.Init` partitioned as the model loaded (before training wraps the model).
    partitioned_at_load = sum(hasattr(parameter, "ds_id") for parameter in trainer.model.parameters())
    empty_micro_batches = []  # training forward calls of this process in which no row was connected
    handle = trainer.cc_model.register_forward_hook(
        lambda module, inputs, output: empty_micro_batches.extend(
            [1] if module.training and torch.is_grad_enabled() and not output["connected_rows"].any() else []
        )
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
        trainer.save_model(str(output / "adapter"))
    handle.remove()

    model = trainer.accelerator.unwrap_model(trainer.model)
    sharded = sum(is_sharded(parameter) for parameter in model.parameters())
    if trainer.is_deepspeed_enabled:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            tensors = whole_adapter(model)
    else:
        tensors = whole_adapter(model)
    rank = trainer.accelerator.process_index
    torch.save(tensors, output / f"adapter-rank{rank}.pt")
    kind = "FSDP2" if trainer.accelerator.is_fsdp2 else trainer.accelerator.distributed_type.value
    facts = {
        "kind": kind,
        "parameters": len(list(model.parameters())),
        "sharded_parameters": sharded,
        "partitioned_at_load": partitioned_at_load,
        "empty_micro_batches": len(empty_micro_batches),
    }
    (output / f"run-rank{rank}.json").write_text(json.dumps(facts))
    if trainer.is_world_process_zero():
        (output / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        messages = sorted({str(warning.message) for warning in caught})
        (output / "warnings.json").write_text(json.dumps(messages, indent=1))
        print(f"world size {trainer.accelerator.num_processes} ({kind}), {trainer.state.global_step} steps")


if __name__ == "__main__":
    main()
