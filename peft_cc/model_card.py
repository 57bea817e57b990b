"""The model card (`README.md`) of an adapter trained with peft-cc: a CC-Tuning adapter, or the LoRA baseline of one.

:class:`~peft_cc.CCSFTTrainer` writes it through TRL's card path (`create_model_card`, called when it saves the model,
at checkpoints and by `push_to_hub`). :func:`write_model_card` writes or updates the card of an adapter folder made
any other way. PEFT's own `save_pretrained` and `push_to_hub` are left as they are: they write PEFT's card.

The card holds Hub metadata a user can filter on (base model, licence, languages, datasets, tags), what the adapter is,
how to load it (first: the package CC-Tuning adapters need), what it was trained on and how the run went (settings,
losses, the Decision Maker's layer choice, the Transform Matrix fit), its evaluation where given, and its limits.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache
from peft import LoraConfig, PeftConfig

from .config import CCConfig

PAPER_URL = "https://arxiv.org/abs/2506.00875"
CITATION = """@inproceedings{ye2025cctuning,
    title     = {{CC-Tuning: A Cross-Lingual Connection Mechanism for Improving Joint Multilingual Supervised
                 Fine-Tuning}},
    author    = {Yangfan Ye and Xiaocheng Feng and Zekun Yuan and Xiachong Feng and Libo Qin and Lei Huang and
                 Weitao Ma and Yichong Huang and Zhirui Zhang and Yunfei Lu and Xiaohui Yan and Duyu Tang and
                 Dandan Tu and Bing Qin},
    year      = 2025,
    booktitle = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics},
    url       = {https://aclanthology.org/2025.acl-long.933/},
}"""
# Fewer training examples than this (optimizer steps × examples per step) make a card say the run is a demonstration.
DEMONSTRATION_EXAMPLES = 1000


def model_card(
    config: PeftConfig,
    *,
    base_model: str | None = None,
    license: str | None = None,
    languages: Sequence[str] = (),
    datasets: Sequence[str] = (),
    training: Mapping[str, Any] | None = None,
    losses: Mapping[str, float] | None = None,
    layer_choice: Mapping[str, Any] | None = None,
    transform_matrix: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | str | None = None,
    baseline_of: str | None = None,
    location: str | None = None,
) -> str:
    """The Markdown card of an adapter with configuration `config` (a :class:`~peft_cc.CCConfig`, or the `LoraConfig`
    of a baseline).

    Args:
        config: the adapter's configuration; `config.base_model_name_or_path` names the base model.
        base_model: the base model's Hub id, where `config` names a local folder (default: the Hub id in `config`).
        license: the licence's Hub id (default: the base model's, read from its card where one is on this machine).
        languages: language codes of the training data (non-English prompts, each paired with its English prompt).
        datasets: what it was trained on: Hub dataset ids (in the metadata) or local file names (in the text).
        training: the run's settings, `{name: value}`; `optimizer steps` and `examples per step` decide whether the
            card calls the run a demonstration (fewer than `DEMONSTRATION_EXAMPLES` examples).
        losses: `{name: nats per token}`, e.g. the training loss of the last logging window.
        layer_choice: the Decision Maker's choices over the run (see
            :meth:`~peft_cc.layer_choice.LayerChoiceStatistics.run_summary`).
        transform_matrix: the statistics :func:`~peft_cc.fit_transform_matrix` returned.
        evaluation: `{benchmark or metric: value}`, or Markdown text.
        baseline_of: for a LoRA adapter, what it is the baseline of (e.g. the config file of the CC-Tuning run).
        location: where the adapter is (a Hub repository id or a local folder), for the loading snippet.
    """
    cc = isinstance(config, CCConfig)
    local_base = config.base_model_name_or_path
    base_model = base_model or _hub_id(local_base)
    base_card = base_model_card_data(local_base or base_model)
    license = license or base_card.get("license")
    hub_datasets = [name for name in datasets if _hub_id(name)]
    tags = ["peft", "peft-cc", "lora", "trl", "sft", "multilingual"] + (
        ["cc-tuning"] if cc else ["cc-tuning-baseline"]
    )
    metadata = ModelCardData(
        base_model=base_model,
        library_name="peft",
        pipeline_tag="text-generation",
        license=license or "other",
        language=list(languages) or None,
        datasets=hub_datasets or None,
        tags=tags + ([f"base_model:adapter:{base_model}"] if base_model else []),
    )
    base_text = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{local_base}`"
    sections = [f"---\n{metadata.to_yaml()}\n---", f"# {_title(location, cc)}"]
    if cc:
        sections += [
            f"A [CC-Tuning]({PAPER_URL}) adapter (Cross-lingual Connection Tuning, ACL 2025) for {base_text}: LoRA "
            "plus a Decision Maker and a Transform Matrix that connect the model's processing of a non-English prompt "
            "with its processing of the same prompt in English, made with peft-cc.",
            "> **Loading it needs the `peft-cc` package, imported before PEFT reads the adapter** (`import peft_cc`): "
            "without it PEFT does not know the adapter type `CC` and stops with `KeyError: 'CC'`.",
        ]
    else:
        sections.append(
            f"A plain LoRA adapter for {base_text}, trained with peft-cc as the baseline of a CC-Tuning run"
            + (f" ({baseline_of})" if baseline_of else "")
            + ": the same LoRA options, data, data order, seed, schedule and length limits, without the English "
            "pass. Evaluate both on the same items and compare them with `peft-cc compare`. It loads with PEFT "
            "alone."
        )
    relation = base_card.get("base_model_relation")
    if relation and base_card.get("base_model"):
        sections.append(
            f"The base weights were a {relation} conversion of {base_card['base_model']} (as its card says), not "
            "that model's original weights: outputs differ a little from the original's."
        )
    sections += _demonstration_warning(training, transform_matrix)
    sections += _loading_section(config, location, base_model or local_base)
    sections += _training_sections(config, languages, datasets, training, losses)
    if cc:
        sections += _connection_sections(layer_choice, transform_matrix)
    if evaluation:
        sections += ["## Evaluation", _table(evaluation) if isinstance(evaluation, Mapping) else str(evaluation)]
    sections += _limitations(cc)
    sections += ["## Citation", f"```bibtex\n{CITATION}\n```", f"Versions: {_versions()}."]
    return "\n\n".join(sections) + "\n"


def write_model_card(directory: str | os.PathLike, config: PeftConfig | None = None, **facts: Any) -> Path:
    """Write the card of the adapter in `directory` to `directory/README.md`, or update the one there.

    For an adapter made without :class:`~peft_cc.CCSFTTrainer` (which writes its card itself): after
    `save_pretrained(directory)`, call it with what is known, e.g.
    `write_model_card(directory, languages=["de", "ja"], datasets=["my-org/pairs"], transform_matrix=stats)`.
    The licence, languages and datasets of a card already there are kept unless given again.

    Args:
        directory: the adapter folder.
        config: the adapter's configuration (default: `directory/adapter_config.json`).
        **facts: the keyword arguments of :func:`model_card`.

    Returns:
        The card's path.
    """
    path = Path(directory) / "README.md"
    config = config or PeftConfig.from_pretrained(str(directory))
    if not isinstance(config, (CCConfig, LoraConfig)):
        raise ValueError(
            f"{directory} holds a {type(config).__name__} adapter: peft-cc writes cards of CC-Tuning and LoRA."
        )
    if path.is_file():
        previous = ModelCard.load(path).data
        facts.setdefault("license", previous.get("license"))
        facts.setdefault("languages", previous.get("language") or ())
        facts.setdefault("datasets", previous.get("datasets") or ())
    facts.setdefault("location", str(directory))
    path.write_text(model_card(config, **facts), encoding="utf-8")
    return path


def training_run_facts(args: Any, state: Any, dataset: Any, trainer: str) -> dict[str, Any]:
    """The run's settings, losses and languages, as :func:`model_card` takes them (`training`, `losses`,
    `languages`), from a `transformers.Trainer`'s `args` (`TrainingArguments`), `state` (`TrainerState`) and training
    dataset (the languages of its `language` column, where it has one)."""
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)  # an enum, or its value
    training = {
        "trainer": trainer,
        "training examples": len(dataset) if hasattr(dataset, "__len__") else "(an iterable dataset)",
        "optimizer steps": state.global_step,
        "examples per step": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "epochs": round(state.epoch or 0.0, 2),
        "learning rate / schedule": f"{args.learning_rate:g} / {schedule}",
        "max length (tokens)": getattr(args, "max_length", None),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "seed": args.seed,
    }
    losses = {}
    logged = [entry for entry in state.log_history if "loss" in entry]
    if logged:
        losses[f"training, last logged window (step {logged[-1]['step']})"] = logged[-1]["loss"]
    summary = next((entry for entry in reversed(state.log_history) if "train_loss" in entry), None)
    if summary:
        losses["training, mean over the run"] = summary["train_loss"]
    evaluated = [entry for entry in state.log_history if "eval_loss" in entry]
    if evaluated:
        losses[f"evaluation (step {evaluated[-1]['step']})"] = evaluated[-1]["eval_loss"]
    columns = getattr(dataset, "column_names", None) or []
    languages = sorted({str(language) for language in dataset["language"]}) if "language" in columns else []
    return {"training": training, "losses": losses, "languages": languages}


def base_model_card_data(name_or_path: str | None) -> dict[str, Any]:
    """The metadata of the base model's card where it is on this machine (a local folder's `README.md`, or the Hub
    cache's copy), without asking the Hub; `{}` where there is none."""
    if not name_or_path:
        return {}
    card = Path(name_or_path) / "README.md"
    if not card.is_file():
        cached = try_to_load_from_cache(name_or_path, "README.md") if _hub_id(name_or_path) else None
        if not isinstance(cached, str):
            return {}
        card = Path(cached)
    return ModelCard.load(card).data.to_dict()


def _hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub id (`org/name`, not an existing local path), else `None`."""
    if not name or name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists():
        return None
    return name


def _title(location: str | None, cc: bool) -> str:
    name = Path(location).name if location else ""
    return name or ("CC-Tuning adapter" if cc else "LoRA baseline adapter")


def _shown(value: Any) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, set)):
        return ", ".join(str(item) for item in sorted(value, key=str)) or "—"
    return "—" if value is None else str(value)


def _table(rows: Mapping[str, Any], header: tuple[str, str] = ("setting", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    return "\n".join(lines + [f"| {name} | {_shown(value)} |" for name, value in rows.items()])


def _versions() -> str:
    found = []
    for name in ("peft-cc", "peft", "transformers", "trl", "torch"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _demonstration_warning(training: Mapping[str, Any] | None, stats: Mapping[str, Any] | None) -> list[str]:
    """A warning, first thing after the introduction, for a run too short to use and an underdetermined fit."""
    warnings = []
    steps = (training or {}).get("optimizer steps")
    per_step = (training or {}).get("examples per step")
    if isinstance(steps, int) and isinstance(per_step, int) and steps * per_step < DEMONSTRATION_EXAMPLES:
        warnings.append(
            f"trained on {steps * per_step} examples ({steps} steps of {per_step}), fewer than "
            f"{DEMONSTRATION_EXAMPLES}: a demonstration of the pipeline, not a model to use"
        )
    if stats and stats["num_rows"] < stats["hidden_size"]:
        warnings.append(
            f"its Transform Matrix was fitted on {stats['num_rows']} rows for {stats['hidden_size']}×"
            f"{stats['hidden_size']} unknowns (underdetermined: the ridge decided most of it), so its R² on the "
            "fitted pairs says nothing"
        )
    return [f"> **Warning:** this adapter was {'; '.join(warnings)}."] if warnings else []


def _loading_section(config: PeftConfig, location: str | None, base_model: str | None) -> list[str]:
    """How to load it: the package, and a generation snippet with the chat template."""
    cc = isinstance(config, CCConfig)
    version = _versions().split(",")[0].removeprefix("peft-cc ") if cc else ""
    install = (
        f"peft-cc {version} is not on PyPI: install it from a clone of its repository (`pip install .` in the "
        "clone), or from a wheel built there (`pip wheel --no-deps . -w dist`)."
        if cc
        else "PEFT alone loads it (`pip install peft transformers`)."
    )
    registration = "import peft_cc  # registers the CC method with PEFT: import it before loading\n" if cc else ""
    snippet = f"""```python
{registration}from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{location or "path/to/this/adapter"}")
tokenizer = AutoTokenizer.from_pretrained("{base_model}")
messages = [{{"role": "user", "content": "Quelle est la capitale de la France ?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0, inputs["input_ids"].shape[1]:]))
```"""
    notes = [
        "Template prompts as in training (the chat template with its generation prompt): the connection is applied "
        "at the last prompt token. `generate` uses the monolingual connection (the Transform Matrix simulates the "
        'English activation); `connection="off"` gives LoRA alone; lm-evaluation-harness: `python -m '
        "peft_cc.lm_eval --model cc --model_args pretrained=<base>,peft=<this adapter>`."
        if cc
        else "Evaluate it like any PEFT adapter, e.g. with lm-evaluation-harness (`--model hf --model_args "
        "pretrained=<base>,peft=<this adapter>`, or peft-cc's `cc` model type, which is the same without a "
        "CC-Tuning adapter)."
    ]
    return ["## How to load it", install, snippet, *notes]


def _training_sections(
    config: PeftConfig,
    languages: Sequence[str],
    datasets: Sequence[str],
    training: Mapping[str, Any] | None,
    losses: Mapping[str, float] | None,
) -> list[str]:
    """What it was trained on, with which adapter and run settings, and how the loss went."""
    sections = []
    if languages or datasets:
        text = []
        if datasets:
            text.append(f"Data: {', '.join(f'`{name}`' for name in datasets)}.")
        if languages:
            text.append(f"Languages: {', '.join(languages)}, each prompt paired with its English version.")
        sections += ["## Training data", " ".join(text)]
    adapter = {
        "LoRA rank / alpha / dropout": f"{config.r} / {config.lora_alpha} / {config.lora_dropout}",
        "LoRA target modules": config.target_modules,
    }
    if isinstance(config, CCConfig):
        adapter.update(
            {
                "candidate source layers": "all" if config.source_layers is None else config.source_layers,
                "injection after decoder layer": config.injection_layer,
                "Gumbel-Softmax temperature": config.gumbel_temperature,
                "gradients through the English pass": config.english_gradients,
            }
        )
    sections += ["## Training", _table({**adapter, **(training or {})})]
    if losses:
        sections.append(_table(losses, header=("loss", "nats per token")))
    return sections


def _connection_sections(layer_choice: Mapping[str, Any] | None, stats: Mapping[str, Any] | None) -> list[str]:
    """The Decision Maker's choices over the run, and the Transform Matrix fit."""
    sections = []
    if layer_choice:
        most = ", ".join(f"{layer} ({share:.0%})" for layer, share in layer_choice["most_chosen"].items())
        sections += [
            "## Layer choice of the Decision Maker",
            f"Over {layer_choice['connected_rows']} connected training rows, the most chosen source layers were "
            f"{most}; the entropy of the choices was {layer_choice['choice_entropy']:.3f} nats (uniform over the "
            f"{layer_choice['num_source_layers']} candidates: {layer_choice['max_entropy']:.3f}). Rows without a "
            f"valid anchor (not connected): {layer_choice['unconnected_rows']}.",
        ]
    if not stats:
        return [
            *sections,
            "## Transform Matrix",
            "Not fitted: the monolingual connection refuses to run until `peft_cc.fit_transform_matrix` is run.",
        ]
    heldout = stats.get("r2_heldout")
    heldout_text = f"R² {heldout:.4f} on {stats['num_heldout_pairs']} held-out pairs; " if heldout is not None else ""
    return [
        *sections,
        "## Transform Matrix",
        f"Fitted by least squares on {stats['num_pairs']} (non-English, English) prompt pairs of the training data "
        f"({stats['num_rows']} rows: pairs × layers, for {stats['hidden_size']}×{stats['hidden_size']} unknowns): "
        f"{heldout_text}R² {stats['r2_train']:.4f} on the fitted pairs (the share of the variance of the English FFN "
        "activations it recovers; the held-out figure is the one that tells).",
    ]


def _limitations(cc: bool) -> list[str]:
    if not cc:
        return []
    return [
        "## Limitations",
        "CC-Tuning's published gains over plain multilingual fine-tuning were measured with full fine-tuning of "
        "7-8B models; peft-cc's own experiment on 135M-270M models found it no better than a LoRA baseline. Judge "
        "this adapter against a LoRA adapter trained on the same data (`peft-cc sft --method lora` with the same "
        "config), evaluated on the same items (`peft-cc compare`). The Decision Maker's layer choice and the "
        "Transform Matrix are fitted to the training languages; other languages get an untested connection.",
    ]
