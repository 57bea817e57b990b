"""CCSFTTrainer: data preparation, collation, loss, logging, Transform Matrix fit, saving and resuming."""

from __future__ import annotations

import dataclasses
import math
import os

import peft
import pytest
import torch
from conftest import _COMMON, VOCAB_SIZE, make_tiny_model
from datasets import Dataset
from helpers import cc_config
from peft import LoraConfig, PeftModel
from sft_helpers import PAIRS, conversational_rows, make_tiny_tokenizer, plain_rows
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)
from trl import SFTConfig

import peft_cc
from peft_cc import CCSFTConfig, CCSFTTrainer, DataCollatorForCCLanguageModeling
from peft_cc.anchors import anchors_from_labels
from peft_cc.sft_data import training_pairs

# Tiny models fitted on a few pairs are underdetermined on purpose (the fit's own tests check that warning).
pytestmark = pytest.mark.filterwarnings("ignore:Fitting the .* Transform Matrix on only:UserWarning")

CC_FIELDS = (
    "english_prompt_field",
    "transform_pairs",
    "transform_batch_size",
    "deterministic_gumbel_noise",
    "log_layer_frequencies",
)
BATCH_KEYS = {"input_ids", "attention_mask", "labels", "english_input_ids", "english_attention_mask"}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def make_args(output_dir, **overrides) -> CCSFTConfig:
    """A small CPU configuration: float32, no checkpointing, no saving, no reporting, 8 transform pairs."""
    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        max_steps=4,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        max_length=96,
        transform_pairs=8,
        disable_tqdm=True,
        seed=0,
    )
    options.update(overrides)
    return CCSFTConfig(**options)


def make_trainer(output_dir, tokenizer, dataset=None, model=None, peft_config="default", **overrides):
    if dataset is None:
        dataset = Dataset.from_list(conversational_rows())
    if model is None:
        model = make_tiny_model("llama")
    if peft_config == "default":
        peft_config = cc_config()
    callbacks = overrides.pop("callbacks", None)
    eval_dataset = overrides.pop("eval_dataset", None)
    return CCSFTTrainer(
        model=model,
        args=make_args(output_dir, **overrides),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def adapter_tensors(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: tensor.detach().clone() for name, tensor in peft.get_peft_model_state_dict(model).items()}


def first_label(labels) -> int:
    return next(index for index, label in enumerate(labels) if label != -100)


# ------------------------------------------------------------------------------------------------ configuration


def test_config_has_the_cc_fields_with_help_and_paper_defaults(tmp_path):
    fields = {field.name: field for field in dataclasses.fields(CCSFTConfig)}
    for name in CC_FIELDS:
        assert fields[name].metadata.get("help"), name
    args = CCSFTConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True)
    assert isinstance(args, SFTConfig)
    assert args.english_prompt_field == "prompt_en"
    assert args.transform_pairs == 1000


@pytest.mark.parametrize(
    "options, message",
    [
        ({"transform_pairs": -1}, "transform_pairs"),
        ({"transform_batch_size": 0}, "transform_batch_size"),
        ({"english_prompt_field": ""}, "english_prompt_field"),
        ({"packing": True}, "packing"),
        ({"padding_free": True}, "padding_free"),
    ],
)
def test_config_refuses_invalid_values(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        CCSFTConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, **options)


# ------------------------------------------------------------------------------------------------ early failures


def test_dataset_without_the_english_field_fails_before_the_model_is_loaded(tmp_path, tokenizer):
    rows = [{key: value for key, value in row.items() if key != "prompt_en"} for row in conversational_rows()]
    with pytest.raises(ValueError, match="no `prompt_en` column"):
        # A model id that does not exist: the dataset is checked first, so loading is never tried.
        CCSFTTrainer(
            model="no-such-org/no-such-model",
            args=make_args(tmp_path),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=cc_config(),
        )


def test_eval_dataset_without_the_english_field_fails(tmp_path, tokenizer):
    rows = [{key: value for key, value in row.items() if key != "prompt_en"} for row in conversational_rows()]
    with pytest.raises(ValueError, match="eval dataset has no `prompt_en`"):
        make_trainer(tmp_path, tokenizer, eval_dataset=Dataset.from_list(rows))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "Hallo Welt.", "prompt_en": "Hello world."}], "prompt-completion"),
        ([{"messages": [{"role": "user", "content": "Hallo"}], "prompt_en": "Hello"}], "prompt-completion"),
        (
            [
                {
                    "prompt": [{"role": "user", "content": "Hallo?"}],
                    "completion": [{"role": "assistant", "content": "Ja"}],
                    "prompt_en": "Hello?",
                }
            ],
            "same form",
        ),
        ([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}], "english_input_ids"),
    ],
    ids=["text", "messages", "form-mismatch", "pre-tokenized-without-english"],
)
def test_datasets_that_cannot_be_connected_are_refused(tmp_path, tokenizer, rows, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, tokenizer, dataset=Dataset.from_list(rows))


def test_packing_and_padding_free_are_refused_even_from_a_plain_sft_config(tmp_path, tokenizer):
    for options in ({"packing": True}, {"padding_free": True}):
        args = SFTConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", **options)
        with pytest.raises(ValueError, match="does not support"):
            CCSFTTrainer(
                model=make_tiny_model("llama"),
                args=args,
                train_dataset=Dataset.from_list(conversational_rows()),
                processing_class=tokenizer,
                peft_config=cc_config(),
            )


def test_a_plain_sft_config_becomes_a_cc_config(tmp_path, tokenizer):
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", max_steps=1)
    trainer = CCSFTTrainer(
        model=make_tiny_model("llama"),
        args=args,
        train_dataset=Dataset.from_list(conversational_rows()),
        processing_class=tokenizer,
        peft_config=cc_config(),
    )
    assert isinstance(trainer.args, CCSFTConfig)
    assert trainer.args.max_steps == 1 and trainer.args.transform_pairs == 1000


@pytest.mark.parametrize("case", ["lora-config", "lora-model", "plain-model"])
def test_a_model_without_a_cc_adapter_is_refused(tmp_path, tokenizer, case):
    model, peft_config = make_tiny_model("llama"), None
    if case == "lora-config":
        peft_config = LoraConfig(r=4, target_modules="all-linear")
    elif case == "lora-model":
        model = peft.get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match="CC-Tuning adapter|CCConfig"):
        make_trainer(tmp_path, tokenizer, model=model, peft_config=peft_config)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"completion_only_loss": False}, "completion_only_loss"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
    ],
)
def test_options_that_break_the_anchor_or_the_loss_are_refused(tmp_path, tokenizer, options, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, tokenizer, **options)


def test_a_loss_function_is_refused(tmp_path, tokenizer):
    """TRL computes a `compute_loss_func` loss from a forward call without labels: no anchors, no reward."""
    with pytest.raises(ValueError, match="compute_loss_func"):
        CCSFTTrainer(
            model=make_tiny_model("llama"),
            args=make_args(tmp_path),
            train_dataset=Dataset.from_list(conversational_rows()),
            processing_class=tokenizer,
            peft_config=cc_config(),
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss,
        )


def test_a_formatting_function_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="formatting_func"):
        CCSFTTrainer(
            model=make_tiny_model("llama"),
            args=make_args(tmp_path),
            train_dataset=Dataset.from_list(conversational_rows()),
            processing_class=tokenizer,
            peft_config=cc_config(),
            formatting_func=lambda example: example["prompt"],
        )


def test_a_peft_model_with_a_cc_adapter_is_accepted(tmp_path, tokenizer):
    model = peft.get_peft_model(make_tiny_model("llama"), cc_config())
    trainer = make_trainer(tmp_path, tokenizer, model=model, peft_config=None)
    assert trainer.cc_model is model.base_model


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("kind", ["conversational", "plain"])
def test_english_prompt_is_tokenized_exactly_like_the_prompt(tmp_path, tokenizer, kind):
    """With the English prompt equal to the prompt, its ids are the prompt of the training sequence, up to the anchor
    (same template and generation prompt for messages, same BOS for plain text)."""
    rows = conversational_rows() if kind == "conversational" else plain_rows()
    for row in rows:
        row["prompt_en"] = row["prompt"]
    trainer = make_trainer(tmp_path, tokenizer, dataset=Dataset.from_list(rows))
    for row in trainer.train_dataset:
        assert row["english_input_ids"] == row["input_ids"][: first_label(row["labels"])]
    # The Transform Matrix is fitted on the same prompts: the training prompt up to its anchor, and the English one.
    for prompt, english in training_pairs(trainer.train_dataset, 4, seed=0):
        assert prompt == english
    first = trainer.train_dataset[0]["english_input_ids"]
    if kind == "plain":
        assert first[0] == tokenizer.bos_token_id  # TRL tokenizes plain prompts with the special tokens
    else:
        assert first[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")  # ends with the generation prompt


@pytest.mark.parametrize("kind", ["conversational", "plain"])
def test_english_prompt_is_tokenized_as_the_model_sees_it_at_inference(tmp_path, tokenizer, kind):
    rows = conversational_rows(english_field="english") if kind == "conversational" else plain_rows()
    field = "english" if kind == "conversational" else "prompt_en"
    trainer = make_trainer(tmp_path, tokenizer, dataset=Dataset.from_list(rows), english_prompt_field=field)
    for row, prepared in zip(rows, trainer.train_dataset):
        if kind == "conversational":
            expected = tokenizer.apply_chat_template(row[field], add_generation_prompt=True, tokenize=True)
            expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        else:
            expected = tokenizer(row[field])["input_ids"]
        assert prepared["english_input_ids"] == list(expected)


def test_from_value_messages_are_converted_like_the_prompt(tmp_path, tokenizer):
    rows = conversational_rows()
    for row in rows:
        row["prompt_en"] = [{"from": m["role"], "value": m["content"]} for m in row["prompt_en"]]
    trainer = make_trainer(tmp_path, tokenizer, dataset=Dataset.from_list(rows))
    expected = tokenizer.apply_chat_template(conversational_rows()[0]["prompt_en"], add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert trainer.train_dataset[0]["english_input_ids"] == list(expected)


def test_batches_keep_the_english_prompts_through_column_pruning_and_are_right_padded(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, per_device_train_batch_size=4)
    assert trainer.args.remove_unused_columns
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == BATCH_KEYS
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    for ids, mask in (
        (batch["input_ids"], batch["attention_mask"]),
        (batch["english_input_ids"], batch["english_attention_mask"]),
    ):
        assert torch.all(mask[:, :-1] >= mask[:, 1:]), "right padding: no token after padding"
        assert torch.all(ids[mask == 0] == tokenizer.pad_token_id)
        assert len(set(mask.sum(-1).tolist())) > 1, "rows of different lengths"
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == -100)
    # The anchor of each row (before its first label) is the last token of its generation prompt, as in English.
    anchors = anchors_from_labels(batch["labels"])
    rows = torch.arange(len(anchors))
    assert torch.all(batch["input_ids"][rows, anchors] == assistant)
    english_last = batch["english_attention_mask"].sum(-1) - 1
    assert torch.all(batch["english_input_ids"][rows, english_last] == assistant)


def test_collator_pads_english_prompts_right_and_keeps_empty_ones_unconnectable():
    collator = DataCollatorForCCLanguageModeling(pad_token_id=0, pad_to_multiple_of=4)
    batch = collator(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, -100, 7], "english_input_ids": [8, 9]},
            {"input_ids": [5, 7], "labels": [-100, 7], "english_input_ids": []},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 7, 0, 0]]
    assert batch["english_input_ids"].tolist() == [[8, 9, 0, 0], [0, 0, 0, 0]]
    assert batch["english_attention_mask"].tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    only_empty = DataCollatorForCCLanguageModeling(pad_token_id=0)(
        [{"input_ids": [5, 7], "labels": [-100, 7], "english_input_ids": []}]
    )
    assert only_empty["english_input_ids"].shape == (1, 1)  # one padding column: the model needs a width >= 1
    with pytest.raises(KeyError, match="english_input_ids"):
        collator([{"input_ids": [5, 7], "labels": [-100, 7]}])
    with pytest.raises(ValueError, match="padding-free"):
        DataCollatorForCCLanguageModeling(pad_token_id=0, padding_free=True)(
            [{"input_ids": [1], "english_input_ids": [1]}]
        )


# ------------------------------------------------------------------------------------------------ loss


def first_batch(trainer) -> dict[str, torch.Tensor]:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def recorded_forward_outputs(trainer, run) -> list:
    """The outputs of the CC-Tuning tuner's forward calls while `run()` runs."""
    outputs = []
    handle = trainer.cc_model.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        run()
    finally:
        handle.remove()
    return outputs


def test_loss_is_trls_fused_loss_of_the_connected_forward(tmp_path, tokenizer):
    """`loss_type="nll"` (TRL's default): the model's own causal-LM loss on the same batch, computed by TRL's fused LM
    head, whose output has no `[B, T, V]` logits."""
    trainer = make_trainer(tmp_path, tokenizer, per_device_train_batch_size=4, deterministic_gumbel_noise=False)
    batch = first_batch(trainer)
    model = trainer.model
    model.eval()  # bilingual connection with the arg-max choice
    losses = []
    with torch.no_grad():
        expected = model(**batch)
        outputs = recorded_forward_outputs(trainer, lambda: losses.append(trainer.compute_loss(model, dict(batch))))
    assert torch.allclose(losses[0], expected.loss, atol=1e-6)
    assert len(outputs) == 1 and outputs[0].get("logits") is None and outputs[0]["log_probs"].shape[0] == 4

    model.train()  # sampled choice: the same seed draws the same Gumbel noise
    torch.manual_seed(7)
    losses = []
    outputs = recorded_forward_outputs(trainer, lambda: losses.append(trainer.compute_loss(model, dict(batch))))
    assert outputs[0].get("logits") is None and outputs[0]["connected_rows"].all()
    torch.manual_seed(7)
    expected = model(**batch)
    assert torch.equal(outputs[0]["layer_choice"], expected.layer_choice)
    assert torch.allclose(losses[0], expected.loss, atol=1e-6)
    # With the token count of an accumulated batch, the loss is the sum over tokens divided by that count.
    num_tokens = int((batch["labels"][:, 1:] != -100).sum())
    torch.manual_seed(7)
    scaled = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(2 * num_tokens))
    assert torch.allclose(scaled, expected.loss / 2, atol=1e-6)


def test_dft_loss_weighs_each_token_by_its_probability_and_trains(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, per_device_train_batch_size=4)
    batch = first_batch(trainer)
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        supervised = labels != -100
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][supervised]
        nll = trainer.compute_loss(model, dict(batch))
        trainer.args.loss_type = "dft"
        dft = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(nll, -log_probs.mean())
    torch.testing.assert_close(dft, -(log_probs * log_probs.exp()).mean())
    assert dft < nll

    trainer = make_trainer(tmp_path, tokenizer, max_steps=2, loss_type="dft", transform_pairs=0, logging_steps=1)
    outputs = recorded_forward_outputs(trainer, trainer.train)
    assert len(outputs) == 2 and all(output.get("logits") is None for output in outputs)  # the fused LM head
    assert all(math.isfinite(entry["loss"]) and "cc/choice_entropy" in entry for entry in train_logs(trainer))


def test_gumbel_noise_is_seeded_by_the_place_of_the_micro_batch(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, per_device_train_batch_size=4)
    batch = first_batch(trainer)
    trainer.model.train()

    def logits_with_noise():
        with trainer._connection_noise():
            return torch.empty(64).exponential_()

    first, second = logits_with_noise(), logits_with_noise()  # micro-batches 0 and 1 of step 0
    trainer._noise_step = None
    assert torch.equal(logits_with_noise(), first)  # micro-batch 0 of step 0 again
    assert not torch.equal(first, second)
    state = torch.get_rng_state()
    trainer.compute_loss(trainer.model, dict(batch))
    assert torch.equal(torch.get_rng_state(), state), "the global generator is left as it was"


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """One epoch over 8 rows (4 steps of 2), logged every 2 steps; one English prompt is longer than max_length."""
    rows = conversational_rows(PAIRS[:8])
    rows[5]["prompt_en"] = [{"role": "user", "content": "How many legs does a spider have? " * 4}]
    output_dir = tmp_path_factory.mktemp("trained")
    with pytest.warns(UserWarning, match="longer than `max_length`"):
        trainer = make_trainer(
            output_dir,
            tokenizer,
            dataset=Dataset.from_list(rows),
            max_steps=-1,
            num_train_epochs=1,
            transform_pairs=6,
            eval_dataset=Dataset.from_list(conversational_rows(PAIRS[8:12])),
        )
    trainer.train()
    return trainer


def train_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_training_logs_the_layer_choice(trained):
    logs = train_logs(trained)
    assert len(logs) == 2
    sources = trained.cc_model.source_layers()
    for entry in logs:
        frequencies = [entry[f"cc/layer_frequency/{layer}"] for layer in sources]
        assert math.isclose(sum(frequencies), 1.0, rel_tol=1e-6)
        assert 0.0 <= entry["cc/choice_entropy"] <= math.log(len(sources)) + 1e-9
        assert 0.0 <= entry["cc/decision_entropy"] <= math.log(len(sources)) + 1e-9
        assert entry["cc/most_chosen_layer"] in sources
        assert entry["cc/most_chosen_frequency"] == max(frequencies)
        assert {"entropy", "mean_token_accuracy", "num_tokens"} <= set(entry)
    # Every row is seen once; the one whose English prompt was too long is the only unconnected one.
    assert sum(entry["cc/unconnected_rows"] for entry in logs) == 1


def test_a_single_candidate_layer_logs_a_choice_entropy_of_plus_zero(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tokenizer, peft_config=cc_config(source_layers=[1]), max_steps=2, transform_pairs=0, logging_steps=1
    )
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert entry["cc/most_chosen_layer"] == 1 and entry["cc/most_chosen_frequency"] == 1.0
        assert entry["cc/choice_entropy"] == 0.0
        assert math.copysign(1.0, entry["cc/choice_entropy"]) == 1.0  # +0.0, not -0.0: a log shows "0.0"


def test_evaluation_logs_no_layer_choice(trained):
    metrics = trained.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert not any(key.startswith("cc/") or key.startswith("eval_cc/") for key in metrics)


def test_transform_matrix_is_fitted_when_training_ends_and_saved(trained):
    matrix = trained.cc_model.transform_matrix()
    assert torch.any(matrix != 0)
    stats = trained.transform_matrix_stats
    assert stats["num_pairs"] + stats["num_heldout_pairs"] + stats["num_skipped_pairs"] == 6
    logged = [entry for entry in trained.state.log_history if "cc/transform_num_pairs" in entry]
    assert logged and logged[-1]["cc/transform_num_pairs"] == stats["num_pairs"]

    trained.save_model()
    output_dir = trained.args.output_dir
    with open(os.path.join(output_dir, "README.md"), encoding="utf-8") as card:
        assert "import peft_cc" in card.read()
    reloaded = PeftModel.from_pretrained(make_tiny_model("llama"), output_dir)
    assert torch.equal(reloaded.base_model.transform_matrix(), matrix)
    trained_dm = trained.cc_model.decision_maker().weight
    assert torch.equal(reloaded.base_model.decision_maker().weight, trained_dm)


def test_transform_pairs_zero_turns_the_fit_off(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, transform_pairs=0)
    trainer.train()
    assert not torch.any(trainer.cc_model.transform_matrix())
    assert trainer.transform_matrix_stats is None


def test_evaluation_with_compute_metrics_gets_the_logits(tmp_path, tokenizer):
    """`compute_metrics` needs the logits, which TRL computes in a second forward call without labels."""
    shapes = []

    def compute_metrics(prediction):
        shapes.append(prediction.predictions.shape)
        return {"rows": float(prediction.predictions.shape[0])}

    trainer = CCSFTTrainer(
        model=make_tiny_model("llama"),
        args=make_args(tmp_path),
        train_dataset=Dataset.from_list(conversational_rows(PAIRS[:8])),
        eval_dataset=Dataset.from_list(conversational_rows(PAIRS[8:12])),
        processing_class=tokenizer,
        peft_config=cc_config(),
        compute_metrics=compute_metrics,
    )
    with pytest.warns(FutureWarning, match="return_outputs"):
        metrics = trainer.evaluate()
    assert metrics["eval_rows"] == 4 and shapes[0][-1] == VOCAB_SIZE and math.isfinite(metrics["eval_loss"])


def test_the_trainer_records_the_generation_prompt_that_ends_every_prompt(tmp_path, tokenizer):
    """Conversational data: the chat template's generation prompt, where the anchor is; plain text: none."""
    chat = make_trainer(tmp_path / "chat", tokenizer)
    assert chat.cc_model.peft_config["default"].generation_prompt_ids == tokenizer.convert_tokens_to_ids(
        ["<|assistant|>"]
    )
    plain = make_trainer(tmp_path / "plain", tokenizer, dataset=Dataset.from_list(plain_rows()))
    assert plain.cc_model.peft_config["default"].generation_prompt_ids is None


def test_an_iterable_dataset_trains(tmp_path, tokenizer):
    dataset = Dataset.from_list(conversational_rows()).to_iterable_dataset()
    trainer = make_trainer(tmp_path, tokenizer, dataset=dataset, max_steps=2, transform_pairs=6)
    trainer.train()
    assert train_logs(trainer)[-1]["cc/unconnected_rows"] == 0
    stats = trainer.transform_matrix_stats
    assert stats["num_pairs"] + stats["num_heldout_pairs"] == 6  # the first 6 rows of the stream


def test_plain_text_data_trains(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, dataset=Dataset.from_list(plain_rows()), max_steps=2)
    trainer.train()
    assert train_logs(trainer)[-1]["cc/unconnected_rows"] == 0
    assert torch.any(trainer.cc_model.transform_matrix() != 0)


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resuming_from_a_checkpoint_gives_the_same_adapter(tmp_path, tokenizer):
    """10 rows, batches of 2: 6 steps cross an epoch boundary; the run is stopped at step 3 and resumed there."""
    dataset = Dataset.from_list(conversational_rows(PAIRS[:10]))
    options = dict(max_steps=6, save_strategy="steps", save_steps=3, transform_pairs=4, logging_steps=1)
    config = dict(lora_dropout=0.1)  # dropout draws from the generator too

    full = make_trainer(tmp_path / "full", tokenizer, dataset=dataset, peft_config=cc_config(**config), **options)
    full.train()
    expected = adapter_tensors(full)

    stopped = make_trainer(
        tmp_path / "resumed",
        tokenizer,
        dataset=dataset,
        peft_config=cc_config(**config),
        callbacks=[_StopAt(3)],
        **options,
    )
    stopped.train()
    assert stopped.state.global_step == 3
    resumed = make_trainer(
        tmp_path / "resumed", tokenizer, dataset=dataset, peft_config=cc_config(**config), **options
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    with open(tmp_path / "resumed" / "README.md", encoding="utf-8") as card:  # TRL's card, written with checkpoints
        assert "import peft_cc" in card.read()

    actual = adapter_tensors(resumed)
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert any(name.endswith("cc_transform_matrix") for name in expected)
    # The losses logged after the resumption are those of the uninterrupted run.
    losses = {entry["step"]: entry["loss"] for entry in full.state.log_history if "loss" in entry}
    for entry in resumed.state.log_history:
        if "loss" in entry and entry["step"] > 3:
            assert math.isclose(entry["loss"], losses[entry["step"]], rel_tol=1e-5)


def test_qlora_on_a_4bit_model_keeps_the_decision_maker_in_float32(tmp_path, tokenizer):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    # bitsandbytes' CPU inference kernels (used by the fit, in eval mode) need layers at least 64 wide.
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**_COMMON, "hidden_size": 64, "intermediate_size": 128})).save_pretrained(
        tmp_path / "base"
    )
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    trainer = make_trainer(tmp_path / "out", tokenizer, model=model, max_steps=2, transform_pairs=4)
    trainer.train()
    assert trainer.cc_model.decision_maker().weight.dtype == torch.float32
    assert all(math.isfinite(entry["loss"]) for entry in train_logs(trainer))
    assert torch.any(trainer.cc_model.transform_matrix() != 0)


def test_bf16_mixed_precision_trains_fits_and_infers(tmp_path, tokenizer):
    """`bf16=True` (autocast, TRL's default) trains, fits and infers; choice logits and matrix stay float32."""
    trainer = make_trainer(tmp_path, tokenizer, max_steps=2, bf16=True)
    assert trainer.args.bf16
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in train_logs(trainer))
    assert torch.any(trainer.cc_model.transform_matrix() != 0)
    model = trainer.accelerator.unwrap_model(trainer.model)
    batch = tokenizer(["ab cd ef"], return_tensors="pt")
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**batch, anchor_positions=torch.tensor([batch["input_ids"].shape[1] - 1]))
    assert output.layer_logits.dtype == torch.float32
    assert output.connected_rows.all()


# ------------------------------------------------------------------------------------------------ real model


def test_smollm2_anchors_both_prompts_at_the_end_of_its_generation_prompt(tmp_path, smollm2_dir, smollm2_tokenizer):
    """With SmolLM2-135M-Instruct's chat template, the prepared rows' non-English and English prompts both end with
    the generation prompt (their anchors are its last token), which the trainer records in the adapter's config.
    Training, saving and generating with this model run in the README quick start (tests/test_docs_code_blocks.py)."""
    trainer = CCSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
        args=make_args(tmp_path, max_length=128),
        train_dataset=Dataset.from_list(conversational_rows()),
        processing_class=smollm2_tokenizer,
        peft_config=peft_cc.CCConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    generation_prompt = smollm2_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row in trainer.train_dataset:
        anchor = first_label(row["labels"]) - 1
        assert row["english_input_ids"][-len(generation_prompt) :] == generation_prompt
        assert row["input_ids"][anchor + 1 - len(generation_prompt) : anchor + 1] == generation_prompt
    assert trainer.cc_model.peft_config["default"].generation_prompt_ids == generation_prompt
