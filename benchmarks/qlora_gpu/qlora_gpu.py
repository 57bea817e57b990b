"""QLoRA CC-Tuning at the Llama-3.1-8B shape on one GPU: peak memory and step time against plain QLoRA, in one run.

    PYTHONPATH=. python benchmarks/qlora_gpu/qlora_gpu.py --output qlora_gpu.json  # one CUDA GPU, ~3 min on an H100
    PYTHONPATH=. python benchmarks/qlora_gpu/qlora_gpu.py --tiny --device cpu      # the same code on a tiny model (CI)

Run from the repository root: `PYTHONPATH=.` imports `peft_cc` from the working tree, so nothing needs installing but
torch (a CUDA build), transformers, peft, accelerate and bitsandbytes; no trl, datasets or lm_eval (the script and
`import peft_cc` import nothing else, which tests/test_qlora_benchmark.py checks). For a machine without bitsandbytes,
fetch its wheel where there is a network, `pip download bitsandbytes==0.50.2 --no-deps -d wheels/`, carry `wheels/`
with the working tree and install it there, `pip install wheels/*.whl` (its requirements, numpy and packaging, come
with torch and transformers). Progress goes to stderr, each line with the seconds since the imports and the projected
total; the budget is 8 minutes on one H100, the estimate 2.5-4 (README.md of this folder). Loading holds ~21 GiB of GPU
memory for a few seconds (below), so the full run is for a 40 GB-class card or larger.

What runs: random weights of the Llama-3.1-8B shape (hidden 4096, 32 layers, FFN 14336, 32 heads, 8 KV heads,
vocabulary 128256) in 4-bit NF4 with double quantization and bf16 compute; LoRA r=16, alpha 32, dropout 0.05 on all
linear layers (not the LM head); non-reentrant gradient checkpointing; bf16 autocast; 8-bit AdamW (lr 2e-4, no weight
decay): the settings of the examples/ab_8b_qlora/ recipe, which trains through `CCSFTTrainer`. As that trainer does
(TRL, for a quantized model), the LoRA weights are cast to bf16 and the Decision Maker stays float32. Three arms:

    plain_qlora                     peft.LoraConfig; the forward call without the English inputs
    cc_tuning                       peft_cc.CCConfig with the paper's defaults (English pass with gradients)
    cc_tuning_no_english_gradients  the same with `english_gradients=False` (the English pass is a forward only)

Two shapes of the same 4096 trained tokens per step: 4 rows x 1024 tokens and 8 rows x 512 tokens, each row a prompt
half and a response half (labels -100 on the prompt, so the connection's anchor is the last prompt token), the CC arms'
English prompt as long as the non-English one. A step is forward + backward + optimizer step, timed between two
`torch.cuda.synchronize()`. Per shape the arms alternate, A B C A B C A B C: each repetition wraps the base in a fresh
adapter (`get_peft_model`), runs `--warmup-steps` untimed then `--steps` timed steps and takes the median of the timed
ones; an arm's figure is the median of its `--repetitions` repetitions, and the CC arms' ratios divide their medians by
plain QLoRA's. Tokens per second count the trained sequence (rows x tokens), not the English prompts the CC arms also
run.

Memory: one quantized base model is loaded once and shared by the arms, as one training run holds one. After each
repetition `unload()` removes its adapter (the LoRA layers; for CC also its Decision Maker, Transform Matrix and
hooks), the optimizer is dropped and the allocator's cache emptied, so every repetition starts from the base alone
(`base_allocated_gib`). Peak statistics are reset after wrapping, before the first warm-up step, so an arm's
`peak_allocated_gib` (`torch.cuda.max_memory_allocated`) covers all its steps, the first included, and holds the base
(4-bit decoder weights, bf16 embeddings and LM head), the arm's own adapter (bf16 LoRA; for CC also the float32
Decision Maker and the 64 MiB Transform Matrix), gradients, optimizer states, activations and library workspaces.
`peak_reserved_gib` (`max_memory_reserved`) adds the allocator's cached free blocks, among them what remains of the
block transformers' loader reserves for the base. The optimizer is bitsandbytes' `AdamW8bit`, the non-paged form of
the trainer's `paged_adamw_8bit`: the same 8-bit states and kernels, but allocated by torch, so the peaks include them
(`optimizer_state_gib` is their size) and repetitions do not pile up paged buffers, which bitsandbytes never frees.
`device_used_gib` is the whole card's use after the steps (CUDA context included).

Random weights: the script draws a bf16 state dict of the shape on the GPU, tensor by tensor (normal, std 0.02; norm
weights 1), and hands it to `from_pretrained(None, config=..., state_dict=..., quantization_config=...)`, so that
transformers' bitsandbytes quantizer builds the 4-bit model as it does from a checkpoint; the state dict is then
dropped. Nothing touches the disk, no CPU memory holds weights (15 GiB of bf16 and the 5.3 GiB 4-bit model share the
GPU during the seconds of loading, before any measurement) and nothing is downloaded. Measured at a small scale on 2
busy CPU cores (4 layers, hidden 1024, 0.22 GiB of bf16): 1.5 s to load and quantize from the state dict, against 4.7 s
for the alternative of writing a safetensors shard per layer and loading the folder with `from_pretrained(...,
quantization_config=...)`, which at 8B would also write and read 16 GB of files; the old benchmark's random model,
`save_pretrained` and load took 22-27 s on an H200, and its load of an existing checkpoint 3.5-3.8 s.

Output: one JSON object on stdout (settings, device, versions, per shape and arm the repetitions in run order, their
medians, tokens per second, memory in GiB, the first step's loss of each repetition, and the ratios to plain QLoRA),
also written to `--output` if given. Times are in seconds, counted from the end of the imports (`load_seconds`,
`wall_seconds`). On the CPU (`--tiny`) the memory fields are null and the figures only show that the code runs.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, PreTrainedModel

import peft_cc

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
TINY = LlamaConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
# (rows, tokens per row): the same 4096 trained tokens per step in both shapes; tiny: the same rows, short rows.
SHAPES = ((4, 1024), (8, 512))
TINY_SHAPES = ((4, 32), (8, 16))
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
QUANTIZATION = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
)
LEARNING_RATE = 2e-4
PLAIN = "plain_qlora"
ARMS = (PLAIN, "cc_tuning", "cc_tuning_no_english_gradients")
MODEL_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
# The ratios to plain QLoRA: name -> the medians they divide.
RATIOS = {
    "step_seconds": "step_seconds_median",
    "peak_allocated": "peak_allocated_gib_median",
    "peak_reserved": "peak_reserved_gib_median",
}
START = time.perf_counter()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, d=64 Llama, shapes 4 x 32 and 8 x 16 tokens")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps per repetition (default 2; tiny 1)")
    parser.add_argument("--steps", type=int, help="timed steps per repetition, median taken (default 3; tiny 1)")
    parser.add_argument("--repetitions", type=int, help="repetitions per arm and shape (default 3; tiny 1)")
    parser.add_argument("--output", help="also write the JSON object to this file")
    args = parser.parse_args()
    for name, full, tiny in (("warmup_steps", 2, 1), ("steps", 3, 1), ("repetitions", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def log(message: str) -> None:
    """One progress line on stderr, prefixed with the seconds since the script started."""
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


def gib(num_bytes: int) -> float:
    """Bytes in GiB, to the MiB."""
    return round(num_bytes / 2**30, 3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_random_base(config: LlamaConfig, device: torch.device) -> PreTrainedModel:
    """A causal LM of `config` with random weights (seed 0), quantized to 4-bit NF4 by transformers on `device`.

    A bf16 state dict (normal with the config's `initializer_range` for matrices, 1 for the norm weights) is drawn on
    `device`, tensor by tensor, and loaded with `from_pretrained(None, state_dict=...)`: the checkpoint path of
    transformers' bitsandbytes quantizer without a file. Returns the model in training mode with non-reentrant gradient
    checkpointing (which also makes the input embeddings' output require grad, as the trainer does) and no KV cache.
    """
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator(device).manual_seed(0)
    state_dict = {}
    for name, tensor in skeleton.state_dict().items():
        value = torch.empty(tensor.shape, dtype=torch.bfloat16, device=device)
        if tensor.dim() > 1:
            state_dict[name] = value.normal_(0.0, config.initializer_range, generator=generator)
        else:
            state_dict[name] = value.fill_(1.0)
    model = type(skeleton).from_pretrained(
        None,
        config=config,
        state_dict=state_dict,
        quantization_config=QUANTIZATION,
        dtype=torch.bfloat16,
        device_map={"": device},
        attn_implementation="sdpa",
    )
    del state_dict, skeleton
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def make_batch(config: LlamaConfig, rows: int, tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids: `input_ids` `[rows, tokens]` (prompt half, response half), `labels` the same with -100 on the
    prompt half, `english_input_ids` `[rows, tokens // 2]` (an English prompt as long as the non-English one), and
    all-ones attention masks."""
    generator = torch.Generator().manual_seed(rows * tokens)
    prompt = tokens // 2
    input_ids = torch.randint(0, config.vocab_size, (rows, tokens), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    english_input_ids = torch.randint(0, config.vocab_size, (rows, prompt), generator=generator)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "english_input_ids": english_input_ids,
        "english_attention_mask": torch.ones_like(english_input_ids),
    }
    return {name: tensor.to(device) for name, tensor in batch.items()}


def adapter_config(arm: str) -> LoraConfig:
    if arm == PLAIN:
        return LoraConfig(task_type="CAUSAL_LM", **LORA)
    return peft_cc.CCConfig(**LORA, english_gradients=arm == "cc_tuning")


def wrap(base: PreTrainedModel, arm: str) -> PeftModel:
    """A fresh adapter of `arm` on `base`, its LoRA weights in bf16 (the Decision Maker's stay float32)."""
    model = get_peft_model(base, adapter_config(arm))
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "lora_" in name:
            parameter.data = parameter.data.to(torch.bfloat16)
    return model.train()


def training_step(
    model: PeftModel, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[float, float]:
    """Seconds of one forward (bf16 autocast) + backward + optimizer step, synchronised; and its loss."""
    synchronize(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start, float(loss.detach())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (8-bit moments, their block scales and quantization maps)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def repetition(
    base: PreTrainedModel, arm: str, batch: dict[str, torch.Tensor], args: argparse.Namespace, device: torch.device
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """One repetition of `arm`: wrap `base`, `args.warmup_steps` + `args.steps` steps on `batch`, unload.

    Returns the unloaded base and the repetition's record: the median of the timed steps' seconds, the first step's
    loss, the trainable parameters, the optimizer states' GiB, and on CUDA the memory in GiB (the base alone before
    wrapping, the peaks over all the steps, the card's use after them; see the module docstring).
    """
    cuda = device.type == "cuda"
    if arm == PLAIN:
        batch = {name: tensor for name, tensor in batch.items() if not name.startswith("english_")}
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        base_allocated = torch.cuda.memory_allocated(device)
    model = wrap(base, arm)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = bnb.optim.AdamW8bit(parameters, lr=LEARNING_RATE, weight_decay=0.0)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timings = [training_step(model, batch, optimizer, device) for _ in range(args.warmup_steps + args.steps)]
    record: dict[str, Any] = {
        "step_seconds": round(statistics.median(seconds for seconds, _ in timings[args.warmup_steps :]), 6),
        "first_step_loss": round(timings[0][1], 4),
        "trainable_parameters": sum(parameter.numel() for parameter in parameters),
        "optimizer_state_gib": gib(optimizer_state_bytes(optimizer)),
        "base_allocated_gib": None,
        "peak_allocated_gib": None,
        "peak_reserved_gib": None,
        "device_used_gib": None,
    }
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        record.update(
            base_allocated_gib=gib(base_allocated),
            peak_allocated_gib=gib(torch.cuda.max_memory_allocated(device)),
            peak_reserved_gib=gib(torch.cuda.max_memory_reserved(device)),
            device_used_gib=gib(total - free),
        )
    return model.unload(), record


def summarize(records: list[dict[str, Any]], tokens_per_step: int) -> dict[str, Any]:
    """An arm's repetitions (lists in run order) and their medians; tokens per second from the median step."""
    seconds = [record["step_seconds"] for record in records]
    summary: dict[str, Any] = {
        "step_seconds": seconds,
        "step_seconds_median": statistics.median(seconds),
        "tokens_per_second": round(tokens_per_step / statistics.median(seconds), 1),
    }
    for key in ("peak_allocated_gib", "peak_reserved_gib", "base_allocated_gib", "device_used_gib"):
        values = [record[key] for record in records]
        summary[key] = values
        summary[f"{key}_median"] = None if None in values else statistics.median(values)
    for key in ("trainable_parameters", "optimizer_state_gib"):
        summary[key] = records[0][key]  # the same in every repetition
    summary["first_step_loss"] = [record["first_step_loss"] for record in records]
    return summary


def ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else round(value / reference, 4)


class Progress:
    """Counts the repetitions done and logs each with the projected total seconds of the run."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def tick(self, message: str) -> None:
        self.done += 1
        per_repetition = (time.perf_counter() - self.start) / self.done
        projected = time.perf_counter() - START + per_repetition * (self.total - self.done)
        log(f"{message}; {self.done}/{self.total} done, projected total {projected:.0f} s")


def measure_shape(
    base: PreTrainedModel,
    config: LlamaConfig,
    rows: int,
    tokens: int,
    args: argparse.Namespace,
    device: torch.device,
    progress: Progress,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The arms on `rows` x `tokens` tokens, alternating A B C per repetition: the shape's section of the output."""
    batch = make_batch(config, rows, tokens, device)
    parameter_names = [name for name, _ in base.named_parameters()]
    records: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for index in range(args.repetitions):
        for arm in ARMS:
            base, record = repetition(base, arm, batch, args, device)
            if [name for name, _ in base.named_parameters()] != parameter_names:
                raise RuntimeError(f"unloading the {arm} adapter did not restore the base model")
            records[arm].append(record)
            progress.tick(
                f"{rows}x{tokens} repetition {index + 1}/{args.repetitions} {arm}: "
                f"{record['step_seconds']:.3f} s/step (median of {args.steps}), "
                f"peak {record['peak_allocated_gib']} GiB allocated, {record['peak_reserved_gib']} GiB reserved"
            )
    arms = {arm: summarize(records[arm], rows * tokens) for arm in ARMS}
    for arm in ARMS[1:]:
        arms[arm]["vs_plain_qlora"] = {name: ratio(arms[arm][key], arms[PLAIN][key]) for name, key in RATIOS.items()}
    section = {
        "rows": rows,
        "prompt_tokens": tokens // 2,
        "response_tokens": tokens - tokens // 2,
        "english_prompt_tokens": tokens // 2,
        "tokens_per_step": rows * tokens,
        "arms": arms,
    }
    return base, section


def settings(args: argparse.Namespace, config: LlamaConfig) -> dict[str, Any]:
    """The model and training settings of the run, for the output."""
    model = {key: getattr(config, key) for key in MODEL_FIELDS}
    return {
        "model": {
            "shape": "tiny Llama" if args.tiny else "Llama-3.1-8B",
            "weights": "random (seed 0), 4-bit NF4, double quantization, bf16 compute",
            **model,
        },
        "settings": {
            "lora": LORA,
            "cc_tuning": "peft_cc.CCConfig defaults (paper's), english_gradients True / False",
            "gradient_checkpointing": "non-reentrant",
            "autocast": "bfloat16",
            "adapter_dtype": "LoRA bfloat16, Decision Maker float32",
            "optimizer": f"bitsandbytes AdamW8bit (not paged), lr {LEARNING_RATE}, no weight decay",
            "warmup_steps": args.warmup_steps,
            "timed_steps": args.steps,
            "repetitions": args.repetitions,
            "order": "per shape, the arms alternate (" + ", ".join(ARMS) + ") once per repetition",
        },
    }


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    config, shapes = (TINY, TINY_SHAPES) if args.tiny else (LLAMA_3_1_8B, SHAPES)
    if args.tiny:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads, and loses much on a busy CPU
    transformers.utils.logging.disable_progress_bar()
    # Said at every `unload()`: that it drops the connection (Decision Maker, Transform Matrix), as intended here.
    warnings.filterwarnings("ignore", message="Unloading a CC-Tuning adapter")
    torch.manual_seed(0)
    log(f"loading random 4-bit weights ({'tiny' if args.tiny else 'Llama-3.1-8B shape'}) on {device}")
    base = load_random_base(config, device)
    load_seconds = time.perf_counter() - START
    progress = Progress(len(shapes) * args.repetitions * len(ARMS))
    log(
        f"loaded; {len(shapes)} shapes x {args.repetitions} repetitions x {len(ARMS)} arms x "
        f"({args.warmup_steps} warm-up + {args.steps} timed) steps"
    )
    results = {}
    for rows, tokens in shapes:
        base, results[f"{rows}x{tokens}"] = measure_shape(base, config, rows, tokens, args, device, progress)

    output = {
        "benchmark": "benchmarks/qlora_gpu/qlora_gpu.py",
        **settings(args, config),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": importlib.metadata.version("accelerate"),
            "bitsandbytes": bnb.__version__,
            "peft_cc": peft_cc.__version__,
        },
        "load_seconds": round(load_seconds, 1),
        "shapes": results,
        "wall_seconds": round(time.perf_counter() - START, 1),
    }
    text = json.dumps(output, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    log(f"done in {output['wall_seconds']} s")


if __name__ == "__main__":
    main()
