"""What CC-Tuning costs over plain LoRA, in training, generation and the Transform Matrix fit.

Measured in one run on the same model, batch and machine, so that the ratios cancel the machine's speed and most
of its noise (variants are interleaved and each timing is the median of `--repeats` runs). Prints one JSON object.

    python benchmarks/overhead/overhead.py             # SmolLM2-135M-Instruct, float32, on the CPU
    python benchmarks/overhead/overhead.py --repeats 7 --threads 2

Ratios:
- train_step_ratio[_no_english_grad]: CC-Tuning step / plain LoRA step (forward + backward, same 8 rows of
  64 prompt + 64 response tokens; the English prompt is 64 tokens), with gradients through the English pass or not.
- train_step_floor[_no_english_grad]: 1 + (the English-prompt pass alone: its forward, plus its backward when
  gradients flow) / plain LoRA step. What CC-Tuning would cost if that pass were its only extra work.
- generate_ratio: CC generation (shared prompt cache) / plain LoRA generation (4 prompts of 64 tokens, 32 new
  tokens, greedy); generate_ratio_naive: the naive two-pass method / plain LoRA generation.
- score_ratio: CC scoring of continuations (the log-likelihood rows of an evaluation: 4 prompts of 64 tokens and
  continuations of 16, shared prompt cache, `CCModel.continuation_logits`) / the plain LoRA forward of the
  same rows; score_ratio_naive: `CCModel`'s forward with `anchor_positions` (two passes over the prompt) / plain.
- fit_seconds_per_pair: Transform Matrix fit time per (non-English, English) prompt pair.

With glibc, the C allocator is first told to keep freed memory (see `keep_freed_memory`; `--system-malloc` leaves it
as it is): the ratios then measure computation, not how often a variant page-faults memory back in.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peft_cc import CCConfig, fit_transform_matrix


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="Hub id or local folder")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--fit-pairs", type=int, default=32)
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave the C allocator as it is (glibc: freed memory goes back to the kernel and is page-faulted again)",
    )
    return parser.parse_args()


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a step frees for the next step; `False` where there is no glibc.

    By default glibc gives each allocation above a threshold (at most 32 MB, e.g. the 201 MB logits of a training
    step and their gradients) its own mmap, unmapped when freed, and hands the free top of its heap back to the
    kernel; a later step then page-faults those pages in again, zeroed by the kernel. How many pages a step faults
    depends on how much it holds at once and on what the previous step left: the CC step, which holds the English
    pass's graph during the non-English pass, faulted ~1 GB per step more than the plain step and the English pass
    alone, 0.3-0.5 s of kernel time, nearly all of its excess over `train_step_floor`. With freed memory kept (as
    PyTorch's caching allocator does on a GPU), no variant faults after warm-up.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    # Serve every allocation from the heap, and trim its free top only beyond 2 GB.
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def median_seconds(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Run every function once to warm up, then `repeats` interleaved rounds; the median seconds of each."""
    for function in functions.values():
        function()
    timings: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def random_tokens(shape: tuple[int, ...], vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(100, vocab_size - 100, shape, generator=generator)


def main() -> None:
    args = parse_args()
    keeps_freed_memory = not args.system_malloc and keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    lora = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)

    def load(config):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), config)
        with torch.no_grad():  # non-zero LoRA B, as after some training
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.01)
        return model

    plain = load(LoraConfig(task_type="CAUSAL_LM", **lora))
    cc = load(CCConfig(**lora))
    cc_no_english_grad = load(CCConfig(english_gradients=False, **lora))
    vocab = plain.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    # Training: 8 rows of 64 prompt + 64 response tokens; English prompts of 64 tokens.
    input_ids = random_tokens((8, 128), vocab, generator)
    labels = input_ids.clone()
    labels[:, :64] = -100
    english_ids = random_tokens((8, 64), vocab, generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    english = {"english_input_ids": english_ids, "english_attention_mask": torch.ones_like(english_ids)}

    def step(model, inputs) -> Callable[[], None]:
        def run() -> None:
            model.train()
            model(**inputs).loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    def english_pass(model, with_grad: bool) -> Callable[[], None]:
        tuner = model.base_model
        rows = torch.arange(8)
        anchors = torch.full((8,), 63)
        layers = tuner.source_layers()

        def run() -> None:
            model.train()
            with torch.set_grad_enabled(with_grad):
                activations = tuner.anchor_activations(
                    english_ids, torch.ones_like(english_ids), rows, anchors, layers, with_autograd=with_grad
                )
            if with_grad:
                activations.float().sum().backward()
                model.zero_grad(set_to_none=True)

        return run

    train = median_seconds(
        {
            "plain_lora_step": step(plain, batch),
            "cc_step": step(cc, {**batch, **english}),
            "cc_step_no_english_grad": step(cc_no_english_grad, {**batch, **english}),
            "english_pass_with_grad": english_pass(cc, True),
            "english_pass_no_grad": english_pass(cc_no_english_grad, False),
        },
        args.repeats,
    )

    # Generation: 4 prompts of 64 tokens, 32 new tokens, greedy; the Transform Matrix set to a fitted-like map.
    with torch.no_grad():
        cc.base_model.transform_matrix().copy_(torch.eye(cc.config.hidden_size))
    prompts = random_tokens((4, 64), vocab, generator)
    generate = dict(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32, do_sample=False)
    for model in (plain, cc):
        model.eval()
        model.generation_config.eos_token_id = None  # always 32 new tokens
        model.generation_config.pad_token_id = 0

    generation = median_seconds(
        {
            "plain_lora_generate": lambda: plain.generate(**generate),
            "cc_generate": lambda: cc.generate(**generate),
            "cc_generate_naive": lambda: cc.generate(**generate, share_prompt_cache=False),
        },
        args.repeats,
    )

    # Scoring: 4 rows of a 64-token prompt and a 16-token continuation; logits from the anchor on.
    rows = random_tokens((4, 80), vocab, generator)
    score = dict(input_ids=rows, attention_mask=torch.ones_like(rows))
    anchors = torch.full((4,), 63)

    @torch.no_grad()
    def score_with(function: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: function().log_softmax(-1)

    scoring = median_seconds(
        {
            "plain_lora_score": score_with(lambda: plain(**score, logits_to_keep=17).logits),
            "cc_score": score_with(lambda: cc.base_model.continuation_logits(prompt_length=64, **score)),
            "cc_score_naive": score_with(lambda: cc(**score, anchor_positions=anchors).logits[:, 63:]),
        },
        args.repeats,
    )

    # Transform Matrix fit on (64-token, 64-token) prompt pairs given as token ids.
    pairs = [
        (random_tokens((64,), vocab, generator).tolist(), random_tokens((64,), vocab, generator).tolist())
        for _ in range(args.fit_pairs)
    ]
    start = time.perf_counter()
    fit_transform_matrix(cc, pairs, batch_size=8, show_progress=False)
    fit_seconds = time.perf_counter() - start

    plain_step = train["plain_lora_step"]
    result = {
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "malloc_keeps_freed_memory": keeps_freed_memory,
        "repeats": args.repeats,
        "train_step_ratio": train["cc_step"] / plain_step,
        "train_step_floor": 1 + train["english_pass_with_grad"] / plain_step,
        "train_step_ratio_no_english_grad": train["cc_step_no_english_grad"] / plain_step,
        "train_step_floor_no_english_grad": 1 + train["english_pass_no_grad"] / plain_step,
        "generate_ratio": generation["cc_generate"] / generation["plain_lora_generate"],
        "generate_ratio_naive": generation["cc_generate_naive"] / generation["plain_lora_generate"],
        "score_ratio": scoring["cc_score"] / scoring["plain_lora_score"],
        "score_ratio_naive": scoring["cc_score_naive"] / scoring["plain_lora_score"],
        "fit_seconds_per_pair": fit_seconds / args.fit_pairs,
        "seconds": {**train, **generation, **scoring, "fit_total": fit_seconds},
    }
    print(json.dumps({key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()}))


if __name__ == "__main__":
    main()
