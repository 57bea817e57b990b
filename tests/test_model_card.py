"""The adapter's model card: written by save_pretrained, the trainer and push_to_hub, with what is known of the run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import huggingface_hub
import peft
import pytest
import yaml
from conftest import make_tiny_model
from datasets import Dataset
from helpers import make_cc_model
from huggingface_hub.errors import EntryNotFoundError
from sft_helpers import conversational_rows, make_tiny_tokenizer

import peft_cc
from peft_cc.model_card import MODEL_CARD_MARKER, add_model_card_facts, model_card, read_model_card_facts

PEFT_TEMPLATE_TEXT = "[More Information Needed]"


def card_metadata(card: str) -> dict:
    """The YAML block at the top of a model card."""
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CC adapter trained 2 steps by CCSFTTrainer on rows with a `language` column, then saved."""
    output_dir = tmp_path_factory.mktemp("card-run")
    rows = conversational_rows()
    for index, row in enumerate(rows):
        row["language"] = ("de", "fr", "pt")[index % 3]
    args = peft_cc.CCSFTConfig(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        max_length=96,
        transform_pairs=12,
        disable_tqdm=True,
    )
    trainer = peft_cc.CCSFTTrainer(
        model=make_tiny_model("llama"),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=make_tiny_tokenizer(),
        peft_config=peft_cc.CCConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    trainer.train()
    trainer.save_model()
    return trainer


def test_card_names_a_base_model_loaded_by_hub_id_and_a_local_one_as_local(tmp_path):
    """A Hub id is the card's base model; a local folder is not, unless the user names the Hub model it copies."""
    config = peft_cc.CCConfig(r=4, target_modules=["q_proj"], base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    card = model_card(config)
    assert card_metadata(card)["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "[Qwen/Qwen2.5-0.5B-Instruct](https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct)" in card
    for local in (str(tmp_path), "/data/models/my-llama", "./my-llama", "models/llama/v2"):
        config.base_model_name_or_path = local
        card = model_card(config)
        assert card_metadata(card).get("base_model") is None and f"the local model `{local}`" in card
    card = model_card(config, {"base_model": "meta-llama/Llama-3.2-1B"})
    assert card_metadata(card)["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "loaded from a local copy (`models/llama/v2`)" in card
    config.base_model_name_or_path = None
    assert "an unrecorded base model" in model_card(config)


def test_saved_card_of_the_real_smollm2_names_its_hub_id(smollm2_model, tmp_path):
    """An adapter on SmolLM2 loaded by its Hub id (from the Hub cache) names HuggingFaceTB/SmolLM2-135M-Instruct."""
    model = peft.get_peft_model(smollm2_model, peft_cc.CCConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    metadata = card_metadata(card)
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["library_name"] == "peft"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in metadata["tags"]
    assert PEFT_TEMPLATE_TEXT not in card
    assert "Not fitted" in card  # no Transform Matrix yet


def test_trainer_card_reports_the_run(trained):
    """The card of a trained adapter: languages, training settings, layer choice, Transform Matrix fit, loading."""
    card = (Path(trained.args.output_dir) / "README.md").read_text()
    assert PEFT_TEMPLATE_TEXT not in card
    assert card.count(MODEL_CARD_MARKER) == 1
    assert card_metadata(card)["language"] == ["de", "fr", "pt"]
    assert "https://arxiv.org/abs/2506.00875" in card
    assert "| optimizer steps | 2 |" in card and "| examples per step | 4 |" in card
    layer_choice = trained.cc_model.model_card_facts["layer_choice"]
    assert layer_choice["connected_rows"] + layer_choice["unconnected_rows"] == 8  # 2 steps of 4 rows
    assert "## Layer choice of the Decision Maker" in card and f"Over {layer_choice['connected_rows']} " in card
    stats = trained.transform_matrix_stats
    assert f"Fitted by least squares on {stats['num_pairs']} " in card
    assert f"R² {stats['r2_train']:.4f} on the fitted pairs" in card
    assert card.index("import peft_cc") < card.index("AutoPeftModelForCausalLM.from_pretrained")


def test_card_is_written_once_after_saving_twice(tmp_path):
    model = make_cc_model("llama")
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.count(MODEL_CARD_MARKER) == 1 and card.count("import peft_cc") == 1


def test_unknown_fact_is_refused():
    with pytest.raises(ValueError, match=r"Unknown model card facts \['loss'\]"):
        add_model_card_facts(make_cc_model("llama"), loss=1.0)


def test_lora_adapters_keep_peft_card(tmp_path):
    """Other PEFT methods are left to PEFT's own card."""
    model = peft.get_peft_model(make_tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    assert MODEL_CARD_MARKER not in (tmp_path / "README.md").read_text()


@pytest.fixture
def hub():
    """The Hub's HTTP calls replaced at their boundary: `uploads` maps path_in_repo -> bytes of the last commit."""
    uploads: dict[str, bytes] = {}

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            source = operation.path_or_fileobj
            if isinstance(source, (str, os.PathLike)):
                source = Path(source).read_bytes()  # the temporary folder is gone after the push returns
            elif not isinstance(source, bytes):
                source = source.read()
            uploads[operation.path_in_repo] = source
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0",
            commit_message="Upload",
            commit_description="",
            oid="0" * 40,
        )

    with (
        mock.patch.object(
            huggingface_hub.HfApi,
            "create_repo",
            side_effect=lambda repo_id, **kwargs: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"),
        ),
        mock.patch.object(huggingface_hub.HfApi, "create_commit", create_commit),
        mock.patch.object(huggingface_hub.ModelCard, "load", side_effect=EntryNotFoundError("no README.md")),
    ):
        yield uploads


def test_push_to_hub_uploads_the_card_with_evaluation(trained, hub):
    """`PeftModel.push_to_hub` uploads the full card, with evaluation figures given and the repository to load."""
    model = trained.accelerator.unwrap_model(trained.model)
    add_model_card_facts(model, evaluation={"MKQA F1 (de)": 0.125}, datasets=["user/parallel-pairs"])
    model.push_to_hub("user/cc-adapter", token="x")
    card = hub["README.md"].decode()
    assert PEFT_TEMPLATE_TEXT not in card
    assert card_metadata(card)["datasets"] == ["user/parallel-pairs"]
    assert "## Evaluation" in card and "| MKQA F1 (de) | 0.125 |" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("user/cc-adapter")' in card
    assert "## Layer choice of the Decision Maker" in card and "Fitted by least squares" in card
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(hub)


def test_loaded_adapter_keeps_the_facts_of_its_card(trained, tmp_path):
    """An adapter loaded from its folder and saved again keeps the training facts in its card."""
    model = peft.PeftModel.from_pretrained(make_tiny_model("llama"), trained.args.output_dir)
    assert model.base_model.model_card_facts["layer_choice"]["connected_rows"] > 0
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "## Layer choice of the Decision Maker" in card and "| optimizer steps | 2 |" in card
    assert card_metadata(card)["language"] == ["de", "fr", "pt"]
    assert (
        read_model_card_facts(tmp_path)["transform_matrix"]["num_pairs"] == trained.transform_matrix_stats["num_pairs"]
    )


def test_pushed_adapter_of_the_real_smollm2_names_its_base_on_the_hub(smollm2_model, hub):
    """The pushed adapter_config.json and card name the Hub id that the base model was loaded by."""
    model = peft.get_peft_model(smollm2_model, peft_cc.CCConfig(r=4, target_modules=["q_proj"]))
    model.push_to_hub("user/cc-smollm2", token="x")
    pushed = json.loads(hub["adapter_config.json"])
    assert pushed["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = hub["README.md"].decode()
    assert card_metadata(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 'AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in card
