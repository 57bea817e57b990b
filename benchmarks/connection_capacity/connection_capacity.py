"""Does the Decision Maker find the layer that carries what the task needs? The connection-capacity task.

The English prompt names one of twelve words, the French prompt only asks which word was named (see
:mod:`capacity_task`). Each arm trains SmolLM2-135M-Instruct with LoRA (r=16, all linear layers) on the same
seeded batches and reports the held-out loss (every `--eval-every` steps, with the arg-max choice); CC arms also
record how the layer choice evolves (in each window of steps: the entropy of the choices, the most chosen layer and
its share). Prints one JSON object and writes a plot.

    python benchmarks/connection_capacity/connection_capacity.py              # every named arm, 120 steps
    python benchmarks/connection_capacity/connection_capacity.py --arms lora_alone,forced_last,paper_default --steps 60

Informativeness profile: `forced_<L>` forces the source to layer L (any L; negative counts from the end), and
`--arms profile` runs every third layer and the last four:

    python benchmarks/connection_capacity/connection_capacity.py --arms profile --steps 60 \\
        --output-dir outputs/capacity_profile

Candidates: `--source-layers 0-25` (ranges and single layers, comma-separated; negative counts from the end) restricts
the source layers of every arm that does not force one, e.g. to leave out the last layers, the informative ones:

    python benchmarks/connection_capacity/connection_capacity.py --arms paper_default --source-layers 0-25 --seed 1

The arms of the Decision Maker settings that were measured here and left the package (`recommended*`, the gated
strategy, and the options before it) run at the commits named in this folder's README.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import torch
from capacity_task import heldout_batch, training_batches, without_english
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from peft_cc import CCConfig

LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)

# name -> (CCConfig options or None for LoRA alone, Decision Maker learning rate or None for the common one). The arms
# of settings that were measured and removed from CCConfig are in this folder's README, with the commit that ran them.
ARMS: dict[str, tuple[dict | None, float | None]] = {
    "lora_alone": (None, None),
    "forced_first": ({"source_layers": [0]}, None),
    "forced_middle": ({"source_layers": [15]}, None),
    "forced_last": ({"source_layers": [-1]}, None),
    "paper_default": ({}, None),
    "decision_maker_lr_5e-2": ({}, 5e-2),
}
FORCED = re.compile(r"forced_(-?\d+)")


def arm_settings(name: str) -> tuple[dict | None, float | None]:
    """The (CCConfig options, Decision Maker learning rate) of a named arm or of `forced_<L>` (source layer L)."""
    if name in ARMS:
        return ARMS[name]
    forced = FORCED.fullmatch(name)
    if forced is None:
        raise KeyError(name)
    return {"source_layers": [int(forced.group(1))]}, None


def profile_arms(num_layers: int) -> list[str]:
    """`forced_<L>` for every third layer and the last four, in layer order."""
    layers = sorted({*range(0, num_layers, 3), *range(max(0, num_layers - 4), num_layers)})
    return [f"forced_{layer}" for layer in layers]


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'0-25' or '0-9,20,-1' -> sorted layer indices (negative ones count from the end); refuses out-of-range ones."""
    layers = set()
    for part in text.split(","):
        bounds = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", part)
        if bounds is None:
            raise ValueError(f"--source-layers: {part!r} is not a layer or a range such as 0-25")
        first, last = (int(bound) + num_layers if int(bound) < 0 else int(bound) for bound in bounds.groups(bounds[1]))
        if not 0 <= first <= last < num_layers:
            raise ValueError(
                f"--source-layers: {part.strip()!r} is outside the model's {num_layers} layers 0-{num_layers - 1}"
            )
        layers.update(range(first, last + 1))
    return sorted(layers)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="Hub id or local folder")
    parser.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"comma-separated, from: {', '.join(ARMS)}; forced_<L> for any layer L; profile",
    )
    parser.add_argument(
        "--source-layers",
        default=None,
        help="candidate layers of every arm that does not force one, e.g. 0-25 (default: all layers)",
    )
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--window", type=int, default=10, help="steps per layer-choice statistics window")
    parser.add_argument("--eval-every", type=int, default=20, help="steps between held-out evaluations")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapter's initialisation and the sampling")
    parser.add_argument("--output-dir", default=None, help="default: outputs/connection_capacity/seed<seed>")
    return parser.parse_args()


def entropy(counts: Counter) -> float:
    """Entropy in nats of the empirical distribution `counts`."""
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values() if n) if total else 0.0


def run_arm(name: str, path: str, tokenizer, args: argparse.Namespace, candidates: list[int] | None) -> dict:
    options, decision_maker_lr = arm_settings(name)
    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if options is None:
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **LORA))
    else:
        if candidates is not None and "source_layers" not in options:
            options = {**options, "source_layers": candidates}
        model = get_peft_model(base, CCConfig(**LORA, **options))
    select = without_english if options is None else (lambda batch: batch)
    decision_maker = list(model.base_model.decision_maker().parameters()) if options is not None else []
    connection = {id(p) for p in decision_maker}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in connection]}]
    if decision_maker:
        groups.append({"params": decision_maker, "lr": decision_maker_lr or args.learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)

    sources = model.base_model.source_layers() if options is not None else []
    windows, window, heldout_curve = [], Counter(), []
    start = time.perf_counter()
    model.train()
    for step, batch in zip(range(args.steps), training_batches(tokenizer, args.batch_size)):
        output = model(**select(batch))
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if options is not None:
            weights = output.layer_choice[output.connected_rows].sum(0).tolist()
            window.update({layer: weight for layer, weight in zip(sources, weights)})
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            heldout_curve.append({"step": step + 1, "heldout_loss": heldout_loss(model, select, tokenizer)})
            print(f"{name} step {step + 1}: held-out loss {heldout_curve[-1]['heldout_loss']:.4f}", flush=True)
        if (step + 1) % args.window == 0:
            most_chosen = window.most_common(1)[0] if window else (None, 0)
            windows.append(
                {
                    "step": step + 1,
                    "train_loss": output.loss.item(),
                    "choice_entropy": entropy(window),
                    "most_chosen_layer": most_chosen[0],
                    "most_chosen_share": most_chosen[1] / max(1, sum(window.values())),
                }
            )
            print(f"{name} step {step + 1}: {windows[-1]}", flush=True)
            window = Counter()
    return {
        "heldout_loss": heldout_curve[-1]["heldout_loss"],
        "heldout_curve": heldout_curve,
        "seconds": time.perf_counter() - start,
        "windows": windows,
        "source_layers": sources,
    }


def heldout_loss(model, select, tokenizer) -> float:
    """The loss on the held-out batch, in eval mode (the arg-max choice), leaving the model in training mode."""
    model.eval()
    with torch.no_grad():
        loss = model(**select(heldout_batch(tokenizer))).loss.item()
    model.train()
    return loss


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    return plt


def plot(results: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, (curve, left, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    for index, (name, result) in enumerate(results.items()):
        style = dict(marker="o", label=name, color=f"C{index % 10}")  # one colour per arm in every panel
        points = result["heldout_curve"]
        curve.plot([p["step"] for p in points], [p["heldout_loss"] for p in points], **style)
        steps = [w["step"] for w in result["windows"]]
        if result["windows"] and result["windows"][0]["most_chosen_layer"] is not None:
            left.plot(steps, [w["choice_entropy"] for w in result["windows"]], **style)
            right.plot(steps, [w["most_chosen_layer"] for w in result["windows"]], **style)
    curve.axhline(0.1, color="grey", linestyle=":", label="goal: 0.1")
    curve.set(xlabel="training step", ylabel="held-out loss (nats)", title="Held-out loss", yscale="log")
    curve.legend(fontsize=7)
    left.axhline(math.log(30), color="grey", linestyle=":", label="uniform over 30 layers")
    left.set(xlabel="training step", ylabel="entropy of the layer choice (nats)", title="Layer-choice entropy")
    right.set(xlabel="training step", ylabel="most chosen source layer", title="Most chosen layer per window")
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_profile(forced: dict[int, dict], args: argparse.Namespace, path: Path) -> None:
    """Held-out loss after training with the source forced to each layer (the informativeness profile)."""
    plt = pyplot()
    if plt is None:
        return
    layers = sorted(forced)
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(layers, [forced[layer]["heldout_loss"] for layer in layers], marker="o")
    axis.axhline(0.1, color="grey", linestyle=":", label="goal: 0.1")
    axis.set(
        xlabel="forced source layer",
        ylabel=f"held-out loss at step {args.steps} (nats)",
        title=f"Informativeness profile (seed {args.seed})",
        yscale="log",
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    num_layers = AutoConfig.from_pretrained(args.model).num_hidden_layers
    names = []
    for name in (name.strip() for name in args.arms.split(",")):
        names.extend(profile_arms(num_layers) if name == "profile" else [name] if name else [])
    unknown = []
    for name in names:
        try:
            options = arm_settings(name)[0] or {}
            CCConfig(**LORA, **options).resolve_source_layers(num_layers)
        except (KeyError, ValueError) as error:
            unknown.append(f"{name} ({error})" if isinstance(error, ValueError) else name)
    if unknown:
        raise SystemExit(
            f"Unknown arms {unknown}; choose from {list(ARMS)}, forced_<L> with 0 <= L < {num_layers}, profile."
        )
    try:
        candidates = None if args.source_layers is None else parse_layers(args.source_layers, num_layers)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    results = {name: run_arm(name, args.model, tokenizer, args, candidates) for name in names}
    output_dir = Path(args.output_dir or f"outputs/connection_capacity/seed{args.seed}")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, output_dir / "layer_choice.png")
    forced = {result["source_layers"][0]: result for name, result in results.items() if FORCED.fullmatch(name)}
    if len(forced) > 1:
        plot_profile(forced, args, output_dir / "profile.png")
    summary = {name: round(result["heldout_loss"], 4) for name, result in results.items()}
    print(json.dumps({"steps": args.steps, "learning_rate": args.learning_rate, "seed": args.seed, **summary}))


if __name__ == "__main__":
    main()
