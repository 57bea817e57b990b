"""Small helpers shared by the CC-Tuning unit tests (tiny models, paired batches, gradients, subprocesses)."""

import os
import subprocess
import sys
from pathlib import Path

import peft
import torch
from conftest import VOCAB_SIZE, make_tiny_model
from torch import nn

import peft_cc
from peft_cc.anchors import position_ids_from_attention_mask
from peft_cc.tokenization import right_pad

REPO_ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "default"


def cc_config(**kwargs):
    """A small CCConfig (r=4, all linear layers, no dropout) with `kwargs` overriding the defaults."""
    options = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    options.update(kwargs)
    return peft_cc.CCConfig(**options)


def make_cc_model(architecture, seed=0, dtype=torch.float32, train=True, base=None, **config_kwargs):
    """A tiny model of `architecture` wrapped with a CC-Tuning adapter (seeded, so two calls give the same weights)."""
    if base is None:
        base = make_tiny_model(architecture, seed=seed, dtype=dtype)
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(base, cc_config(**config_kwargs))
    return model.train() if train else model.eval()


def cc_tuner(model):
    """The `CCModel` inside a `PeftModel`."""
    return model.base_model


def decision_maker_weight(model):
    return cc_tuner(model).cc_decision_maker[ADAPTER].weight


def randomize_lora_b(model, seed=0, std=0.1):
    """Give every (zero-initialised) lora_B a random value so that LoRA changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_batch(prompt_lens=(4, 6), response_lens=(3, 2), english_lens=(5, 3), seed=0):
    """A right-padded paired batch.

    Row i has a prompt of `prompt_lens[i]` tokens followed by a response of `response_lens[i]` tokens (labels are
    the response tokens, -100 on the prompt and on padding), and an English prompt of `english_lens[i]` tokens
    (0 tokens: an all-padding row). Token ids lie in 1..VOCAB_SIZE-1; 0 is padding.

    Returns:
        dict with input_ids, attention_mask, labels, english_input_ids, english_attention_mask, and `anchors`
        (the position of the last prompt token of each row; not a model input).
    """
    generator = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(1, VOCAB_SIZE, (n,), generator=generator).tolist()

    sequences = [tokens(p + r) for p, r in zip(prompt_lens, response_lens)]
    input_ids, attention_mask = right_pad(sequences, 0)
    labels = torch.full_like(input_ids, -100)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        labels[i, p : p + r] = input_ids[i, p : p + r]
    english_ids, english_mask = right_pad([tokens(n) for n in english_lens], 0)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        english_input_ids=english_ids,
        english_attention_mask=english_mask,
        anchors=torch.tensor([p - 1 for p in prompt_lens]),
    )


def model_inputs(batch, english=True):
    """The forward kwargs of `batch` (without `anchors`; without the English prompt if `english` is False)."""
    skip = {"anchors"} if english else {"anchors", "english_input_ids", "english_attention_mask"}
    return {key: value for key, value in batch.items() if key not in skip}


def select_row(batch, i):
    """Row `i` of `batch` alone, with its padding removed (as if it had been batched alone)."""
    length = int(batch["attention_mask"][i].sum())
    english_length = max(int(batch["english_attention_mask"][i].sum()), 1)
    row = {}
    for key in ("input_ids", "attention_mask", "labels"):
        row[key] = batch[key][i : i + 1, :length]
    for key in ("english_input_ids", "english_attention_mask"):
        row[key] = batch[key][i : i + 1, :english_length]
    row["anchors"] = batch["anchors"][i : i + 1]
    return row


def trainable_parameters(model):
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def gradients(model):
    """`name -> grad` (cloned) of every trainable parameter; zeros where no gradient arrived."""
    return {
        name: (param.grad.detach().clone() if param.grad is not None else torch.zeros_like(param))
        for name, param in trainable_parameters(model).items()
    }


def train_step(model, batch, seed=0):
    """One seeded training forward + backward; returns the output."""
    torch.manual_seed(seed)
    output = model(**model_inputs(batch))
    output.loss.backward()
    return output


def expected_trainable_count(base, r, num_sources):
    """LoRA's r*(in+out) for every Linear of `base` except the LM head ("all-linear"), plus the Decision Maker S*d."""
    lora = sum(
        r * (module.in_features + module.out_features)
        for name, module in base.named_modules()
        if isinstance(module, nn.Linear) and name != "lm_head"
    )
    return lora + num_sources * base.config.hidden_size


def run_python(code, *args, timeout=300):
    """Run `code` (with `args` as sys.argv[1:]) in a fresh offline Python process, which imports the installed
    peft_cc (it runs in the tests' folder, so that the checkout's `peft_cc/` does not shadow the install).

    Returns its stdout; fails the test with the process's output if it exits with an error.
    """
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=Path(__file__).parent,
    )
    assert result.returncode == 0, f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


MAX_NEW_TOKENS = 6


def fit_random_transform(model, seed: int = 0, scale: float = 0.3) -> None:
    """Stand-in for a fitted Transform Matrix: identity plus a random d×d map (plumbing tests need no real fit)."""
    matrix = cc_tuner(model).transform_matrix()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        matrix.copy_(torch.eye(matrix.shape[0]) + scale * torch.randn(matrix.shape, generator=generator))


@torch.no_grad()
def naive_greedy(model, input_ids, attention_mask, steps: int = MAX_NEW_TOKENS, **connection_inputs) -> torch.Tensor:
    """The reference: at every step, full forward passes over the prompt (the connected one with the anchor at the
    last prompt token) and all generated tokens, without any cache; the arg-max is appended."""
    anchor = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1)
    sequence, mask = input_ids, attention_mask
    for _ in range(steps):
        logits = model(
            input_ids=sequence,
            attention_mask=mask,
            position_ids=position_ids_from_attention_mask(mask),
            anchor_positions=anchor,
            **connection_inputs,
        ).logits
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return sequence
