"""The `cc` model type of lm-eval: a tiny random Llama with a tiny CC-Tuning adapter, run end to end through
`lm_eval.simple_evaluate` on local JSONL tasks, against what `CCModel` computes by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import peft
import pytest
import torch
from helpers import cc_config, fit_random_transform, randomize_lora_b
from transformers import LlamaConfig, LlamaForCausalLM

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from peft_cc.lm_eval import __main__ as lm_eval_main  # noqa: E402
from peft_cc.lm_eval.__main__ import unknown_tasks_message  # noqa: E402
from peft_cc.lm_eval.model import CCLM, context_end_in_continuation, english_context  # noqa: E402

DOCS = [
    {"prompt": "Ist der Himmel blau?", "english_prompt": "Is the sky blue?", "answer": "ja"},
    {"prompt": "Schwimmen Fische im Wasser, wenn es regnet?", "english_prompt": "Do fish swim?", "answer": "ja"},
    {"prompt": "Fliegt ein Stein?", "english_prompt": "Does a stone fly when thrown far?", "answer": "nein"},
]
CHOICES = [" yes", " no", " maybe so"]  # the last one has two tokens
STOP = "\n\n\n"
MAX_NEW_TOKENS = 5

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{prompt}}}}"
"""
CHOICE_TASK = """\
output_type: multiple_choice
doc_to_choice: {choices}
doc_to_target: 0
metric_list:
  - metric: acc
"""
GENERATION_TASK = """\
output_type: generate_until
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n\\n"]
  max_gen_toks: {max_new_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two tasks over DOCS: `tiny_choice` (multiple choice: log-likelihoods) and `tiny_generation`."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS), encoding="utf-8")
    (folder / "tiny_choice.yaml").write_text(
        TASK_YAML.format(name="tiny_choice", data=data) + CHOICE_TASK.format(choices=json.dumps(CHOICES))
    )
    (folder / "tiny_generation.yaml").write_text(
        TASK_YAML.format(name="tiny_generation", data=data) + GENERATION_TASK.format(max_new_tokens=MAX_NEW_TOKENS)
    )
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smollm2_tokenizer):
    """`(base folder, adapter folder)`: a tiny random Llama with SmolLM2's tokenizer, and a CC-Tuning adapter on it
    with random LoRA weights and a (random) fitted Transform Matrix."""
    tokenizer = smollm2_tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    base_dir, adapter_dir = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("adapter")
    base = LlamaForCausalLM(config)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, cc_config(injection_layer=1))
    randomize_lora_b(model)
    fit_random_transform(model, scale=3.0)
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def load(checkpoints, **model_args) -> CCLM:
    base_dir, adapter_dir = checkpoints
    return CCLM(
        pretrained=str(base_dir), peft=str(adapter_dir), device="cpu", batch_size=4, dtype="float32", **model_args
    )


def evaluate(lm: CCLM, task_dir, task: str) -> list[dict]:
    """The logged samples of `task` (in document order) after an evaluation of `lm` with the chat template."""
    results = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        apply_chat_template=True,
        log_samples=True,
        bootstrap_iters=0,
    )
    return sorted(results["samples"][task], key=lambda sample: sample["doc_id"])


@torch.no_grad()
def log_likelihood_by_hand(lm: CCLM, context: str, continuation: str, connected: bool = True, **english) -> float:
    """The continuation's log-likelihood from one unpadded forward of `lm.model`: connected, anchored at the last
    token of the whole context (`anchor_positions`; bilingual with `english_input_ids`), or LoRA alone. lm-eval
    scores the chat template's final newline as part of the continuation; the anchor is that newline, as in
    `CCModel.generate` and in training."""
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    whole_context = lm.tok_encode(context)
    assert context.endswith("\n") and len(whole_context) == len(context_ids) + 1
    assert (context_ids + continuation_ids)[: len(whole_context)] == whole_context
    input_ids = torch.tensor([context_ids + continuation_ids[:-1]])
    connection = {"anchor_positions": torch.tensor([len(whole_context) - 1]), **english} if connected else {}
    log_probs = torch.log_softmax(lm.model(input_ids=input_ids, **connection).logits[0].float(), dim=-1)
    predicting = log_probs[len(context_ids) - 1 :]
    return float(predicting.gather(-1, torch.tensor(continuation_ids)[:, None]).sum())


def english_ids(lm: CCLM, sample: dict) -> torch.Tensor:
    context = sample["arguments"][0][0]
    english = context.replace(sample["doc"]["prompt"], sample["doc"]["english_prompt"])
    assert english != context
    return torch.tensor([lm.tok_encode(english)])


def log_likelihoods(samples: list[dict]) -> list[list[float]]:
    return [[float(response[0]) for response in sample["filtered_resps"]] for sample in samples]


@pytest.fixture(scope="module")
def models(checkpoints):
    """The `cc` model with each connection, loaded once: `models[connection]`."""
    return {connection: load(checkpoints, connection=connection) for connection in ("monolingual", "bilingual", "off")}


@pytest.fixture(scope="module")
def samples(models, task_dir):
    """`samples(connection, task)`: the logged samples of one evaluation (run once per module)."""
    runs: dict[tuple[str, str], list[dict]] = {}

    def run(connection: str, task: str) -> list[dict]:
        if (connection, task) not in runs:
            runs[connection, task] = evaluate(models[connection], task_dir, task)
        return runs[connection, task]

    return run


def test_log_likelihoods_with_the_connection_are_those_of_ccmodel_anchored_at_the_context_end(models, samples):
    lm = models["monolingual"]
    connected, off = samples("monolingual", "tiny_choice"), log_likelihoods(samples("off", "tiny_choice"))
    assert len(connected) == len(DOCS)
    for sample, lora in zip(connected, off):
        context = sample["arguments"][0][0]
        assert "<|im_start|>user" in context  # the chat template applied
        expected = [log_likelihood_by_hand(lm, context, choice) for choice in CHOICES]
        assert log_likelihoods([sample])[0] == pytest.approx(expected, abs=1e-4)
        assert all(abs(with_connection - alone) > 1e-3 for with_connection, alone in zip(expected, lora))


def test_connection_off_is_lora_alone(models, samples):
    for sample in samples("off", "tiny_choice"):
        context = sample["arguments"][0][0]
        expected = [log_likelihood_by_hand(models["off"], context, choice, connected=False) for choice in CHOICES]
        assert log_likelihoods([sample])[0] == pytest.approx(expected, abs=1e-4)


def test_bilingual_log_likelihoods_use_each_document_english_prompt(models, samples):
    lm = models["bilingual"]
    off = log_likelihoods(samples("off", "tiny_choice"))
    for sample, lora in zip(samples("bilingual", "tiny_choice"), off):
        context = sample["arguments"][0][0]
        english = english_ids(lm, sample)
        expected = [log_likelihood_by_hand(lm, context, choice, english_input_ids=english) for choice in CHOICES]
        assert log_likelihoods([sample])[0] == pytest.approx(expected, abs=1e-4)
        assert all(abs(with_connection - alone) > 1e-3 for with_connection, alone in zip(expected, lora))


@torch.no_grad()
def generated_by_hand(lm: CCLM, context: str, **connection) -> str:
    input_ids = torch.tensor([lm.tok_encode(context)])
    output = lm.model.generate(input_ids=input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **connection)
    text = lm.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    for stop in (STOP, lm.tokenizer.eos_token):
        text = text.split(stop)[0]
    return text


@pytest.mark.parametrize("connection", ["monolingual", "bilingual", "off"])
def test_generation_is_that_of_ccmodel_generate(models, samples, connection):
    lm = models[connection]
    for sample in samples(connection, "tiny_generation"):
        inputs = {"connection": connection}
        if connection == "bilingual":
            inputs["english_input_ids"] = english_ids(lm, sample)
        assert sample["resps"][0][0] == generated_by_hand(lm, sample["arguments"][0][0], **inputs)


def test_the_connection_changes_the_generated_text(samples):
    outputs = {c: [s["resps"][0][0] for s in samples(c, "tiny_generation")] for c in ("monolingual", "off")}
    assert outputs["monolingual"] != outputs["off"]


def test_bilingual_without_the_english_field_is_refused(checkpoints, task_dir):
    lm = load(checkpoints, connection="bilingual", english_field="english")
    with pytest.raises(ValueError, match="no text field 'english'.*english_field="):
        evaluate(lm, task_dir, "tiny_choice")


def test_the_anchor_is_the_last_token_of_the_whole_context():
    # lm-eval moved the context's final newline (token 9) into the continuation: the anchor is that token.
    assert context_end_in_continuation([1, 2, 9], [1, 2], [9, 5, 6]) == 1
    assert context_end_in_continuation([1, 2], [1, 2], [5, 6]) == 0  # no trailing white space
    assert context_end_in_continuation([1, 2, 9], [1, 2], [7, 6]) == 0  # merged into the first answer token
    assert context_end_in_continuation([1, 2, 9], [1, 2], [9]) == 0  # the last continuation token is never an anchor


def test_english_context_replaces_the_document_prompt():
    doc = {"prompt": "Hallo?", "english_prompt": "Hello?"}
    assert english_context("<u>Hallo?</u><a>", doc, "prompt", "english_prompt") == "<u>Hello?</u><a>"
    with pytest.raises(ValueError, match="does not occur"):
        english_context("<u>Bonjour?</u>", doc, "prompt", "english_prompt")


def test_connections_a_model_cannot_apply_are_refused(checkpoints):
    base_dir, _ = checkpoints
    with pytest.raises(ValueError, match="needs a CC-Tuning adapter"):
        CCLM(pretrained=str(base_dir), device="cpu", connection="monolingual")
    with pytest.raises(ValueError, match="must be one of"):
        load(checkpoints, connection="both")


def test_rolling_log_likelihoods_refuse_the_connection(models):
    with pytest.raises(ValueError, match="connection=off"):
        models["monolingual"].loglikelihood_rolling([])


def test_import_peft_cc_does_not_import_lm_eval():
    code = "import sys, peft_cc; assert 'lm_eval' not in sys.modules, 'lm_eval imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rows_are_scored_alike_alone_and_batched_with_a_continuation_that_starts_before_its_anchor(models):
    # `short`: a one-token context, its anchor the row's first token; `moved`: lm-eval moved the context's final
    # newline into the continuation, so the continuation starts one token before the anchor. Batched together,
    # `short` has no position before its anchor: its score must not depend on the other row.
    lm = models["monolingual"]
    newline, answer = lm.tok_encode("\n"), lm.tok_encode(" yes")
    question = lm.tok_encode("Is the sky blue?")
    assert lm.tok_encode("Is the sky blue?\n") == question + newline
    short = (("Hi", " yes"), lm.tok_encode("Hi"), answer)
    moved = (("Is the sky blue?\n", "\n yes"), question, newline + answer)
    assert len(short[1]) == 1 and lm._row(moved).anchor == len(question)
    alone = [lm._loglikelihood_tokens([request], disable_tqdm=True)[0] for request in (short, moved)]
    together = lm._loglikelihood_tokens([short, moved], disable_tqdm=True)
    for (score_alone, _), (score_together, _) in zip(alone, together):
        assert score_together == pytest.approx(score_alone, abs=1e-4)


def test_a_continuation_longer_than_the_model_is_refused(models):
    lm = models["monolingual"]
    too_long = lm.tok_encode(" yes" * (lm.max_length + 1))
    with pytest.raises(ValueError, match="does not fit in the model's"):
        lm._loglikelihood_tokens([(("Hi", "..."), lm.tok_encode("Hi"), too_long)], disable_tqdm=True)


def test_an_unknown_task_name_is_answered_with_the_closest_names_and_how_to_list_them():
    known = ["peft_cc_xnli", "peft_cc_xnli_en", "peft_cc_xnli_ru", "peft_cc_mkqa_de", "xnli_de", "xnli_eu"]
    message = unknown_tasks_message(["peft_cc_xnli_de", "zzz"], known, "benchmarks/tasks")
    assert "peft_cc_xnli_de: not a task or group lm-eval knows; close: peft_cc_xnli_en, peft_cc_xnli, " in message
    assert "zzz: not a task or group lm-eval knows\n" in message  # nothing close
    assert "python -m peft_cc.lm_eval ls tasks --include_path benchmarks/tasks" in message
    assert "need `--include_path benchmarks/tasks`" in unknown_tasks_message(["peft_cc_xnli_ru"], known, None)
    assert "need `--include_path" not in unknown_tasks_message(["xnli_deu"], known, None)


def test_the_command_line_ends_on_an_unknown_task_with_that_message(monkeypatch, capsys):
    """lm-eval's own refusal of an unknown task (the message `main` recognises), then `main`'s answer to it."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    with pytest.raises(ValueError) as refusal:
        EvaluatorConfig(tasks=["xnli_deu"]).process_tasks()
    assert lm_eval_main.NOT_FOUND.match(str(refusal.value))

    def cli_evaluate():
        raise refusal.value

    class TaskManager:
        def __init__(self, include_path=None):
            self.all_tasks = ["xnli_de", "xnli_eu", "xnli_ru"]

    monkeypatch.setattr(lm_eval_main, "cli_evaluate", cli_evaluate)
    monkeypatch.setattr("lm_eval.tasks.TaskManager", TaskManager)
    assert lm_eval_main.main(["--model", "hf", "--tasks", "xnli_deu"]) == 2
    assert "xnli_deu: not a task or group lm-eval knows; close: xnli_eu, xnli_de" in capsys.readouterr().err


def test_the_printed_result_table_names_its_columns():
    """lm-eval's result table, as `python -m peft_cc.lm_eval` prints it, with the pinned pytablewriter."""
    from lm_eval.utils import make_table

    results = {
        "results": {"xnli_de": {"alias": "xnli_de", "acc,none": 0.5, "acc_stderr,none": 0.1}},
        "versions": {"xnli_de": 1.0},
        "n-shot": {"xnli_de": 0},
        "higher_is_better": {"xnli_de": {"acc": True}},
    }
    header = [cell.strip() for cell in make_table(results).splitlines()[0].strip("|").split("|")]
    assert header[:6] == ["Tasks", "Version", "Filter", "n-shot", "Metric", ""]
    assert "Value" in header and "Stderr" in header
