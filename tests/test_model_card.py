"""The adapter's model card: written by the trainer (TRL's card path) and by `write_model_card`; PEFT's own
`save_pretrained` and `push_to_hub` keep PEFT's card."""

from __future__ import annotations

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
from peft_cc.model_card import model_card, write_model_card

PEFT_TEMPLATE_TEXT = "[More Information Needed]"
LOADING_NOTE = "Loading it needs the `peft-cc` package"


def card_metadata(card: str) -> dict:
    """The YAML block at the top of a model card."""
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def section(card: str, title: str) -> str:
    """The text of the card's `## title` section."""
    return card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


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
        lr_scheduler_type="cosine",
        logging_steps=1,
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


def test_the_trainer_writes_a_card_with_metadata_a_user_can_filter_on(trained):
    card = (Path(trained.args.output_dir) / "README.md").read_text()
    metadata = card_metadata(card)
    assert metadata["library_name"] == "peft" and metadata["pipeline_tag"] == "text-generation"
    assert metadata["language"] == ["de", "fr", "pt"]
    assert metadata["license"] == "other"  # a random base model has no card to take a licence from
    assert {"peft", "peft-cc", "cc-tuning", "lora"} <= set(metadata["tags"])
    assert PEFT_TEMPLATE_TEXT not in card and "<this repository>" not in card


def test_the_trainer_card_reports_the_run(trained):
    card = (Path(trained.args.output_dir) / "README.md").read_text()
    training = section(card, "Training")
    assert "| optimizer steps | 2 |" in training and "| examples per step | 4 |" in training
    assert "| learning rate / schedule | 0.001 / cosine |" in training  # the value, not `SchedulerType.COSINE`
    last = [entry for entry in trained.state.log_history if "loss" in entry][-1]
    assert f"| training, last logged window (step 2) | {last['loss']:.4g} |" in training
    layer_choice = trained.layer_choice_summary
    assert layer_choice["connected_rows"] + layer_choice["unconnected_rows"] == 8  # 2 steps of 4 rows
    assert f"Over {layer_choice['connected_rows']} connected training rows" in card
    assert layer_choice["most_chosen"] and all(share > 0 for share in layer_choice["most_chosen"].values())
    stats = trained.transform_matrix_stats
    assert f"Fitted by least squares on {stats['num_pairs']} " in card
    assert f"R² {stats['r2_train']:.4f} on the fitted pairs" in card
    assert "https://arxiv.org/abs/2506.00875" in card


def test_the_first_lines_say_that_loading_needs_peft_cc_and_a_short_run_is_a_demonstration(trained):
    card = (Path(trained.args.output_dir) / "README.md").read_text()
    body = card.split("---\n", 2)[2]
    assert body.index(LOADING_NOTE) < body.index("## ")
    assert "KeyError: 'CC'" in body
    assert "trained on 8 examples (2 steps of 4)" in body and "a demonstration" in body
    assert body.index("a demonstration") < body.index("## ")
    loading = section(card, "How to load it")
    assert "not on PyPI" in loading and "pip install peft-cc" not in loading
    assert loading.index("import peft_cc") < loading.index("AutoPeftModelForCausalLM.from_pretrained")
    assert f'AutoPeftModelForCausalLM.from_pretrained("{trained.args.output_dir}")' in loading


def test_an_underdetermined_transform_matrix_fit_is_called_so():
    config = peft_cc.CCConfig(r=4, target_modules=["q_proj"], base_model_name_or_path="org/model")
    stats = dict(num_pairs=4, num_heldout_pairs=1, num_rows=120, hidden_size=576, r2_train=0.9999, r2_heldout=0.92)
    card = model_card(config, transform_matrix=stats)
    warning = card.split("> **Warning:**", 1)[1].split("\n", 1)[0]
    assert "120 rows for 576×576 unknowns (underdetermined" in warning
    assert "R² 0.9200 on 1 held-out pairs" in section(card, "Transform Matrix")
    assert "> **Warning:**" not in model_card(config, transform_matrix={**stats, "num_rows": 6000})


def test_the_base_models_card_gives_the_licence_and_says_when_its_weights_are_a_conversion(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text(
        "---\nlicense: apache-2.0\nbase_model: org/original\nbase_model_relation: quantized\n---\n# a conversion\n"
    )
    card = model_card(peft_cc.CCConfig(r=4, target_modules=["q_proj"], base_model_name_or_path=str(base)))
    assert card_metadata(card)["license"] == "apache-2.0"
    assert "a quantized conversion of org/original" in card and "not that model's original weights" in card
    config = peft_cc.CCConfig(r=4, target_modules=["q_proj"], base_model_name_or_path="org/model")
    assert card_metadata(model_card(config))["base_model"] == "org/model"
    assert card_metadata(model_card(config, license="mit"))["license"] == "mit"


def test_the_packaged_smollm2_card_names_its_hub_id_licence_and_conversion(smollm2_model, tmp_path):
    model = peft.get_peft_model(smollm2_model, peft_cc.CCConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    card = write_model_card(tmp_path).read_text()
    metadata = card_metadata(card)
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["license"] == "apache-2.0"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in metadata["tags"]
    assert "conversion of HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "Not fitted" in section(card, "Transform Matrix")


def test_write_model_card_writes_a_hand_made_adapters_card_and_updates_it(tmp_path):
    model = make_cc_model("llama")
    model.save_pretrained(tmp_path)
    assert PEFT_TEMPLATE_TEXT in (tmp_path / "README.md").read_text()  # save_pretrained alone: PEFT's card
    card = write_model_card(
        tmp_path, languages=["de", "ja"], datasets=["user/pairs", "local_pairs.jsonl"], license="mit"
    ).read_text()
    assert "`local_pairs.jsonl`" in section(card, "Training data")  # a local file is named in the text only
    card = write_model_card(tmp_path, evaluation={"MKQA F1 (de)": 0.125}).read_text()
    metadata = card_metadata(card)
    assert metadata["language"] == ["de", "ja"] and metadata["license"] == "mit"
    assert metadata["datasets"] == ["user/pairs"]  # kept: the metadata's Hub ids
    assert "| MKQA F1 (de) | 0.125 |" in section(card, "Evaluation")
    assert PEFT_TEMPLATE_TEXT not in card


def test_the_card_of_a_lora_baseline_says_what_it_is_the_baseline_of_and_loads_without_peft_cc(tmp_path):
    model = peft.get_peft_model(make_tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    card = write_model_card(tmp_path, baseline_of="the CC-Tuning run of cc.yaml").read_text()
    assert "baseline of a CC-Tuning run (the CC-Tuning run of cc.yaml)" in card
    assert "import peft_cc" not in card and LOADING_NOTE not in card
    assert "cc-tuning-baseline" in card_metadata(card)["tags"]
    with pytest.raises(ValueError, match="CC-Tuning and LoRA"):
        write_model_card(tmp_path, config=peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))


@pytest.fixture
def hub():
    """The Hub's HTTP calls replaced at their boundary: `uploads` maps path_in_repo -> bytes of the last commit."""
    uploads: dict[str, bytes] = {}

    def commit(repo_id: str) -> huggingface_hub.CommitInfo:
        url = f"https://huggingface.co/{repo_id}/commit/0"
        return huggingface_hub.CommitInfo(commit_url=url, commit_message="Upload", commit_description="", oid="0" * 40)

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            source = operation.path_or_fileobj
            if isinstance(source, (str, os.PathLike)):
                source = Path(source).read_bytes()  # the temporary folder is gone after the push returns
            elif not isinstance(source, bytes):
                source = source.read()
            uploads[operation.path_in_repo] = source
        return commit(repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                uploads[path.relative_to(folder_path).as_posix()] = path.read_bytes()
        return commit(repo_id)

    with (
        mock.patch.object(
            huggingface_hub.HfApi,
            "create_repo",
            side_effect=lambda repo_id, **kwargs: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"),
        ),
        mock.patch.object(huggingface_hub.HfApi, "create_commit", create_commit),
        mock.patch.object(huggingface_hub.HfApi, "list_repo_refs", side_effect=EntryNotFoundError("no refs")),
        mock.patch.object(huggingface_hub.HfApi, "upload_folder", upload_folder),
    ):
        yield uploads


def test_the_trainers_push_to_hub_uploads_its_card_with_the_dataset(trained, hub):
    trained.args.push_to_hub, trained.args.hub_model_id, trained.args.hub_token = True, "user/cc-adapter", "x"
    trained.init_hf_repo()
    trained.push_to_hub(dataset_name="user/parallel-pairs")
    card = hub["README.md"].decode()
    assert card_metadata(card)["datasets"] == ["user/parallel-pairs"]
    assert 'AutoPeftModelForCausalLM.from_pretrained("user/cc-adapter")' in card
    assert "## Layer choice of the Decision Maker" in card
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(hub)


def test_peft_save_pretrained_and_push_to_hub_write_pefts_own_card(hub, tmp_path):
    """`import peft_cc` changes nothing of PEFT: a CC adapter saved or pushed by PEFT alone gets PEFT's card."""
    model = make_cc_model("llama")
    model.save_pretrained(tmp_path)
    assert "CC-Tuning" not in (tmp_path / "README.md").read_text()
    model.push_to_hub("user/cc-by-peft", token="x")
    assert "CC-Tuning" not in hub["README.md"].decode()
