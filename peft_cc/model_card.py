"""The model card (`README.md`) of a CC-Tuning adapter: one writer for every place a card is written.

`PeftModel.save_pretrained` (hence `CCSFTTrainer.save_model`), `PeftModel.push_to_hub` and
`CCSFTTrainer.create_model_card` (hence `CCSFTTrainer.push_to_hub`) all write the card of :func:`model_card`
(:func:`install_model_card_hooks` and the trainer call :func:`write_model_card`). It holds the Hub metadata (base
model as a Hub id where there is one, languages, datasets, tags), the method with a link, the adapter's settings, and
what is known of its training: :class:`peft_cc.CCModel` keeps these facts in its `model_card_facts` dictionary,
filled by `CCSFTTrainer` (training settings, languages, the Decision Maker's layer choice), by
:func:`peft_cc.fit_transform_matrix` (pairs, R²) and by the user (:func:`add_model_card_facts`, e.g. evaluation
figures). The card carries the facts in an HTML comment as well, so that an adapter loaded from a local folder
(`PeftModel.from_pretrained`, `load_adapter`) gets them back (:func:`read_model_card_facts`) and keeps them in the
card of its next save or push.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peft import PeftModel

from .config import CCConfig

MODEL_CARD_MARKER = "<!-- peft-cc model card -->"
FACTS_COMMENT = re.compile(r"^<!-- peft-cc model card facts: (?P<facts>.*) -->$", re.MULTILINE)
PAPER_URL = "https://arxiv.org/abs/2506.00875"
FACT_KEYS = ("base_model", "languages", "datasets", "training", "layer_choice", "transform_matrix", "evaluation")


def _hub_id(name_or_path: str | None) -> str | None:
    """`name_or_path` if it is a Hub id (`org/name`, not a local folder), else `None`."""
    if not name_or_path or name_or_path.startswith(".") or name_or_path.count("/") != 1:
        return None
    path = Path(name_or_path)
    return None if path.is_absolute() or path.exists() else name_or_path


def add_model_card_facts(model: Any, **facts: Any) -> None:
    """Record facts for the adapter's model card, written on the next `save_pretrained` / `push_to_hub`.

    Args:
        model: a CC-Tuning `PeftModel` (or its `CCModel`).
        facts: any of `languages` (list of language codes), `datasets` (list of dataset names or Hub ids),
            `base_model` (the Hub id, if the base was loaded from a local copy of a Hub model), `evaluation` (a
            mapping `{metric or benchmark: value}`, or Markdown text), `training`, `layer_choice`, `transform_matrix`
            (normally recorded by `CCSFTTrainer` and `fit_transform_matrix`).
    """
    unknown = sorted(set(facts) - set(FACT_KEYS))
    if unknown:
        raise ValueError(f"Unknown model card facts {unknown}; known: {', '.join(FACT_KEYS)}.")
    tuner = model if hasattr(model, "model_card_facts") else getattr(model, "base_model", None)
    if not hasattr(tuner, "model_card_facts"):
        raise ValueError(f"add_model_card_facts needs a CC-Tuning model, got {type(model).__name__}.")
    tuner.model_card_facts.update(facts)


def _table(rows: Mapping[str, Any]) -> str:
    def shown(value: Any) -> str:
        return (
            f"{value:.4g}"
            if isinstance(value, float)
            else f"`{value}`"
            if isinstance(value, (list, str))
            else str(value)
        )

    return "| setting | value |\n| --- | --- |\n" + "\n".join(
        f"| {name} | {shown(value)} |" for name, value in rows.items()
    )


def _versions() -> str:
    names = ("peft-cc", "peft", "transformers", "trl", "torch")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _metadata(base_model: str | None, languages: Sequence[str], datasets: Sequence[str]) -> str:
    from huggingface_hub import ModelCardData

    tags = ["peft", "peft-cc", "cc-tuning", "lora", "multilingual"]
    if base_model:
        tags.append(f"base_model:adapter:{base_model}")
    data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        pipeline_tag="text-generation",
        language=list(languages) or None,
        datasets=list(datasets) or None,
        tags=tags,
    )
    return f"---\n{data.to_yaml()}\n---"


def model_card(config: CCConfig, facts: Mapping[str, Any] | None = None, repo_id: str | None = None) -> str:
    """The Markdown model card of an adapter with configuration `config` and the recorded `facts`.

    Args:
        config: the adapter's configuration (its `base_model_name_or_path` gives the base model).
        facts: see :func:`add_model_card_facts`; missing facts leave their section out.
        repo_id: the Hub repository the card is for (used in the loading snippet).
    """
    facts = dict(facts or {})
    local_base = config.base_model_name_or_path
    base_model = facts.get("base_model") or _hub_id(local_base)
    languages = list(facts.get("languages") or [])
    datasets = list(facts.get("datasets") or [])
    title = repo_id.split("/")[-1] if repo_id else "CC-Tuning adapter"
    if base_model:
        base_text = f"[{base_model}](https://huggingface.co/{base_model})"
    else:
        base_text = f"the local model `{local_base}`" if local_base else "an unrecorded base model"
    # ">" escaped (valid JSON) so that no value can end the comment.
    facts_json = json.dumps(facts, ensure_ascii=False, default=str).replace(">", "\\u003e")
    sections = [
        _metadata(base_model, languages, datasets),
        f"{MODEL_CARD_MARKER}\n<!-- peft-cc model card facts: {facts_json} -->",
        f"# {title}",
        f"A [CC-Tuning]({PAPER_URL}) adapter (Cross-lingual Connection Tuning, ACL 2025) for {base_text}, made with "
        "peft-cc: LoRA plus a Decision Maker and a Transform Matrix that "
        "connect the model's processing of a non-English prompt with its processing of the same prompt in English. "
        "In training, the Decision Maker chooses for each example which layer's FFN activation of the English prompt "
        f"is added after decoder layer {config.injection_layer} at the last prompt token; at inference, with only "
        "the non-English prompt, the Transform Matrix simulates that English activation from the model's own.",
    ]
    if base_model and local_base and base_model != local_base:
        sections.append(f"The base model was loaded from a local copy (`{local_base}`) of the model named above.")
    sections += _loading_section(repo_id, base_model or local_base)
    sections += _adapter_section(config)
    sections += _facts_sections(facts, languages, datasets)
    sections += [
        "## Method",
        f"CC-Tuning: [arXiv 2506.00875]({PAPER_URL}). Versions: {_versions()}.",
    ]
    return "\n\n".join(sections) + "\n"


def _adapter_section(config: CCConfig) -> list[str]:
    """The card's table of the adapter's settings."""
    strategy = config.variance_reinforce_config
    knobs = (
        {}
        if strategy is None
        else {
            "Decision Maker learns from (fraction of training)": strategy.start_fraction,
            "injection gate (initial value)": strategy.gate_init,
        }
    )
    return [
        "## Adapter",
        _table(
            {
                "LoRA rank / alpha / dropout": f"{config.r} / {config.lora_alpha} / {config.lora_dropout}",
                "LoRA target modules": sorted(config.target_modules)
                if isinstance(config.target_modules, (set, list))
                else config.target_modules,
                "candidate source layers": "all" if config.source_layers is None else config.source_layers,
                "injection after decoder layer": config.injection_layer,
                "Gumbel-Softmax temperature": config.gumbel_temperature,
                "gradients through the English pass": config.english_gradients,
                "Decision Maker": config.decision_maker,
                **knobs,
            }
        ),
    ]


def _facts_sections(facts: Mapping[str, Any], languages: Sequence[str], datasets: Sequence[str]) -> list[str]:
    """The card's sections on what is known of the adapter: training data and run, layer choice, Transform Matrix
    fit, evaluation."""
    sections: list[str] = []
    if languages or datasets:
        data = []
        if languages:
            data.append(f"Languages: {', '.join(languages)} (each example paired with its English prompt).")
        if datasets:
            data.append(f"Data: {', '.join(datasets)}.")
        sections += ["## Training data", " ".join(data)]
    training = facts.get("training")
    if training:
        sections += ["## Training", _table(training)]
    layer_choice = facts.get("layer_choice")
    if layer_choice:
        most = ", ".join(f"{layer} ({share:.0%})" for layer, share in layer_choice["most_chosen"].items())
        sections += [
            "## Layer choice of the Decision Maker",
            f"Over {layer_choice['connected_rows']} connected training rows, the most chosen source layers were "
            f"{most}; the entropy of the choices was {layer_choice['choice_entropy']:.3f} nats (uniform over the "
            f"{layer_choice['num_source_layers']} candidates: {layer_choice['max_entropy']:.3f}). "
            f"Rows without a valid anchor (not connected): {layer_choice['unconnected_rows']}.",
        ]
    stats = facts.get("transform_matrix")
    if stats:
        heldout = stats.get("r2_heldout")
        heldout_text = (
            f"R² {heldout:.4f} on {stats['num_heldout_pairs']} held-out pairs, " if heldout is not None else ""
        )
        sections += [
            "## Transform Matrix",
            f"Fitted by least squares on {stats['num_pairs']} (non-English, English) prompt pairs "
            f"({stats['num_rows']} rows: pairs × source layers): {heldout_text}R² {stats['r2_train']:.4f} on the "
            "fitted pairs (the share of the variance of the English FFN activations it recovers).",
        ]
    else:
        sections += [
            "## Transform Matrix",
            "Not fitted: the monolingual connection adds nothing until `peft_cc.fit_transform_matrix` is run.",
        ]
    evaluation = facts.get("evaluation")
    if evaluation:
        text = _table(evaluation) if isinstance(evaluation, Mapping) else str(evaluation)
        sections += ["## Evaluation", text]
    return sections


def _loading_section(repo_id: str | None, base_model: str | None) -> list[str]:
    """The card's "How to load it" section: the package to install, and a generation snippet."""
    loading = repo_id or "<this repository>"
    return [
        "## How to load it",
        "Loading needs the `peft-cc` package (`pip install peft-cc`), imported before PEFT reads the adapter: "
        "without it PEFT does not know the adapter type `CC` and fails with `KeyError: 'CC'`.",
        f"""```python
import peft_cc  # registers the CC method with PEFT
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{loading}")
tokenizer = AutoTokenizer.from_pretrained("{base_model or "<base model>"}")
messages = [{{"role": "user", "content": "Quelle est la capitale de la France ?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0, inputs["input_ids"].shape[1]:]))
```""",
        '`generate` uses the monolingual connection (the Transform Matrix); `connection="off"` gives LoRA alone.',
    ]


def write_model_card(
    directory: str | os.PathLike, config: CCConfig, facts: Mapping[str, Any] | None = None, repo_id: str | None = None
) -> Path:
    """Write :func:`model_card` to `directory/README.md` (replacing the card there); returns its path."""
    path = Path(directory) / "README.md"
    path.write_text(model_card(config, facts, repo_id), encoding="utf-8")
    return path


def read_model_card_facts(directory: str | os.PathLike) -> dict[str, Any]:
    """The facts a card written by :func:`write_model_card` in `directory` carries; `{}` without such a card."""
    path = Path(directory) / "README.md"
    if not path.is_file():
        return {}
    found = FACTS_COMMENT.search(path.read_text(encoding="utf-8"))
    return json.loads(found.group("facts")) if found else {}


def _cc_config(model: PeftModel) -> CCConfig | None:
    """The configuration of the model's active CC-Tuning adapter, or `None` for other adapters."""
    config = model.peft_config.get(model.active_adapter)
    return config if isinstance(config, CCConfig) else None


def install_model_card_hooks() -> None:
    """Make `PeftModel.save_pretrained` and `PeftModel.push_to_hub` write the CC-Tuning model card, and
    `PeftModel.load_adapter` (hence `from_pretrained`) read back the facts of a local adapter's card; once.

    PEFT has no per-method hook for the card: `save_pretrained` writes it with `create_or_update_model_card`, and
    `push_to_hub` (transformers) saves the adapter into a folder, writes the Hub's model card over that one, then
    uploads the folder with `_upload_modified_files`. Both are wrapped to write :func:`model_card` for a CC-Tuning
    adapter; other adapters are left to PEFT.
    """
    if getattr(PeftModel.create_or_update_model_card, "writes_cc_model_card", False):
        return
    create_card = PeftModel.create_or_update_model_card
    upload = PeftModel._upload_modified_files
    load_adapter = PeftModel.load_adapter

    @functools.wraps(load_adapter)
    def load_adapter_with_card_facts(self, model_id, adapter_name, *args, **kwargs):
        result = load_adapter(self, model_id, adapter_name, *args, **kwargs)
        if isinstance(self.peft_config.get(adapter_name), CCConfig) and os.path.isdir(model_id):
            facts = self.base_model.model_card_facts
            for key, value in read_model_card_facts(model_id).items():
                facts.setdefault(key, value)
        return result

    @functools.wraps(create_card)
    def create_cc_model_card(self, output_dir, *args, **kwargs):
        config = _cc_config(self)
        if config is None:
            return create_card(self, output_dir, *args, **kwargs)
        write_model_card(output_dir, config, self.base_model.model_card_facts)

    @functools.wraps(upload)
    def upload_with_cc_model_card(self, working_dir, repo_id, *args, **kwargs):
        config = _cc_config(self)
        if config is not None:
            write_model_card(working_dir, config, self.base_model.model_card_facts, repo_id=repo_id)
        return upload(self, working_dir, repo_id, *args, **kwargs)

    create_cc_model_card.writes_cc_model_card = True
    PeftModel.create_or_update_model_card = create_cc_model_card
    PeftModel._upload_modified_files = upload_with_cc_model_card
    PeftModel.load_adapter = load_adapter_with_card_facts
