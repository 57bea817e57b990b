"""The data root's six benchmarks as lm-eval tasks (benchmarks/tasks/): documents, item scores, task configurations,
loading from any working directory, and a run with the packaged SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT

pytest.importorskip("lm_eval")

from data_root_tasks import (  # noqa: E402
    DATA_ROOT_VARIABLE,
    answer_token_count,
    load_benchmark,
    metadata_tokenizer,
    resolve_data_root,
    score_extractive_qa,
    score_open_qa,
    score_summary,
)
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from peft_cc.lm_eval.model import CCLM  # noqa: E402

TASKS_DIR = REPO_ROOT / "benchmarks" / "tasks"
SHARED_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
BENCHMARKS = ("XNLI", "XStoryCloze", "MMMLU", "XQuAD", "MKQA", "XLSum")


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture
def data_root(tmp_path) -> Path:
    """A hand-made data root: XNLI and MKQA in English and German."""
    for benchmark, answers in (("XNLI", ["2", "3"]), ("MKQA", [["Paris"], ["1999", "neunzehnhundert"]])):
        for language in ("en", "de"):
            prompts = [{"prompt": f"{benchmark} {language} question {index}"} for index in range(2)]
            write_jsonl(tmp_path / benchmark / "prompts" / f"{language}.jsonl", prompts)
            write_jsonl(tmp_path / benchmark / "answers" / f"{language}.jsonl", answers)
    return tmp_path


def test_documents_hold_the_prompt_its_english_version_and_the_gold_answers(data_root):
    xnli = load_benchmark("XNLI", "de", data_root=str(data_root), version=1.0)["test"]
    assert xnli[1] == {
        "index": 1,
        "prompt": "XNLI de question 1",
        "english_prompt": "XNLI en question 1",
        "language": "de",
        "answers": ["3"],
        "label": 2,
    }
    mkqa = load_benchmark("MKQA", "de", data_root=str(data_root))["test"]
    assert mkqa[1]["answers"] == ["1999", "neunzehnhundert"] and mkqa[1]["label"] == -1


def test_a_multiple_choice_gold_answer_outside_the_labels_is_refused(data_root):
    write_jsonl(data_root / "XNLI" / "answers" / "de.jsonl", ["2", "entailment"])
    with pytest.raises(ValueError, match="line 2: 'entailment' is not one of"):
        load_benchmark("XNLI", "de", data_root=str(data_root))


def test_the_data_root_comes_from_the_metadata_else_the_environment(monkeypatch):
    monkeypatch.setenv(DATA_ROOT_VARIABLE, "/from/environment")
    assert resolve_data_root("/from/metadata") == "/from/metadata"
    assert resolve_data_root(None) == "/from/environment"
    monkeypatch.delenv(DATA_ROOT_VARIABLE)
    with pytest.raises(ValueError, match="--metadata"):
        resolve_data_root(None)


def test_extractive_qa_scores_count_characters_in_chinese():
    doc = {"answers": ["北京大学"], "language": "zh"}
    scores = score_extractive_qa(doc, ["在北京大学。", (-2.5, False)])
    assert scores["exact_match"] == 0.0
    assert scores["contains"] == 1.0
    assert scores["f1"] == pytest.approx(2 * (4 / 5) * 1 / (4 / 5 + 1))  # 4 of 5 characters, all 4 of the gold


def test_open_qa_accuracy_is_containment_of_any_gold_answer_on_token_boundaries():
    doc = {"answers": ["1999", "neunzehnhundert"], "language": "de"}
    assert score_open_qa(doc, ["Im Jahr 1999.", (-1.0, True)])["accuracy"] == 1.0
    assert score_open_qa(doc, ["Im Jahr 19990", (-1.0, True)])["accuracy"] == 0.0
    english = score_open_qa({"answers": ["the Beatles"], "language": "en"}, ["Beatles", (-1.0, True)])
    assert english["exact_match"] == 1.0  # English articles do not count


def test_summary_rouge_l_counts_thai_characters():
    # Tokens: แ ม ว กิ น (a vowel sign stays with its consonant) against แ ม ว: precision 1, recall 3/5.
    doc = {"answers": ["แมวกิน"], "language": "th"}
    assert score_summary(doc, ["แมว", (-3.0, False)]) == {"rouge_l": pytest.approx(0.75)}


def test_answer_tokens_are_the_answers_own(smollm2_tokenizer):
    # lm-eval also scores the chat template's final newline (it moves trailing white space into the continuation);
    # it is not an answer token.
    context = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Wer gewann 1999?"}], add_generation_prompt=True, tokenize=False
    )
    assert context.endswith("assistant\n")
    answer = smollm2_tokenizer("1999 Manchester United", add_special_tokens=False)["input_ids"]
    assert len(answer) > 3
    assert answer_token_count(smollm2_tokenizer, context, "1999 Manchester United") == len(answer)
    assert answer_token_count(smollm2_tokenizer, "Antwort:", " Paris") == 1  # " Paris" is one token
    assert answer_token_count(smollm2_tokenizer, "Antwort: ", "Paris") == 1  # the space merges into the answer


def test_the_tokenizer_comes_from_the_metadata(smollm2_id):
    assert metadata_tokenizer({"pretrained": smollm2_id}).name_or_path == smollm2_id
    with pytest.raises(ValueError, match="TaskManager's metadata"):
        metadata_tokenizer({"data_root": "somewhere"})


@torch.no_grad()
def answer_nll_by_hand(model, tokenizer, prompt: str, answer: str) -> tuple[float, int]:
    """`(summed NLL in nats, answer tokens)` of the chat template's final newline and the answer's tokens after the
    templated prompt (lm-eval scores both): one forward over `template(prompt) + tokens(answer)`, both tokenised on
    their own."""
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert tokenizer.decode(prompt_ids[-1:]) == "\n"
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    scored = [prompt_ids[-1], *answer_ids]  # position p predicts token p + 1
    log_probs = torch.log_softmax(model(torch.tensor([prompt_ids + answer_ids])).logits[0].float(), dim=-1)
    first = len(prompt_ids) - 2
    return -sum(float(log_probs[first + offset, token]) for offset, token in enumerate(scored)), len(answer_ids)


def test_answer_nll_is_nats_per_answer_token(smollm2_id, data_root):
    """With `max_gen_toks` 0 the documents ask for the gold answer's log-likelihood alone."""
    write_jsonl(data_root / "MKQA" / "answers" / "de.jsonl", [["Paris"], ["neunzehnhundertneunundneunzig"]])
    lm = CCLM(pretrained=smollm2_id, device="cpu", dtype="float32", batch_size=2)
    metadata = {"data_root": str(data_root), "pretrained": smollm2_id}
    samples = simple_evaluate(
        model=lm,
        tasks=["peft_cc_mkqa_de"],
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata),
        apply_chat_template=True,
        log_samples=True,
        bootstrap_iters=0,
        gen_kwargs={"max_gen_toks": 0},
    )["samples"]["peft_cc_mkqa_de"]
    tokens = []
    for sample in sorted(samples, key=lambda sample: sample["doc_id"]):
        doc = sample["doc"]
        nll, count = answer_nll_by_hand(lm.model, lm.tokenizer, doc["prompt"], doc["answers"][0])
        assert len(sample["filtered_resps"]) == 1 and "accuracy" not in sample  # nothing generated
        assert -float(sample["filtered_resps"][0][0]) == pytest.approx(nll, abs=1e-3)
        assert sample["answer_nll"] == pytest.approx(nll / count, abs=1e-4)
        tokens.append(count)
    assert tokens[1] > 3  # a multi-token answer


def test_answer_nll_refuses_tasks_without_the_model_tokenizer(smollm2_id, data_root):
    lm = CCLM(pretrained=smollm2_id, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="tokenizer"):
        simple_evaluate(
            model=lm,
            tasks=["peft_cc_mkqa_de"],
            task_manager=TaskManager(
                include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_root": str(data_root)}
            ),
            limit=1,
        )


def test_the_tasks_load_from_any_working_directory_without_pythonpath(data_root, tmp_path):
    """lm-eval loads the tasks' functions by file path: their module finds its siblings without the caller's help."""
    code = textwrap.dedent(
        f"""
        from lm_eval.tasks import TaskManager
        manager = TaskManager(include_path={str(TASKS_DIR)!r}, include_defaults=False,
                              metadata={{"data_root": {str(data_root)!r}}})
        tasks = manager.load(["peft_cc_xnli_en", "peft_cc_mkqa_de"])["tasks"]
        print(sorted((name, type(task).__name__, len(task.eval_docs)) for name, task in tasks.items()))
        """
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    expected = [("peft_cc_mkqa_de", "GenerationWithGoldLikelihood", 2), ("peft_cc_xnli_en", "ConfigurableTask", 2)]
    assert result.stdout.splitlines()[-1] == str(expected)


def test_every_benchmark_and_language_of_the_shared_data_root_has_a_task():
    if not SHARED_DATA_ROOT.is_dir():
        pytest.skip(f"no shared data root at {SHARED_DATA_ROOT}")
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    for benchmark in BENCHMARKS:
        languages = sorted(path.stem for path in (SHARED_DATA_ROOT / benchmark / "prompts").glob("*.jsonl"))
        expected = {f"peft_cc_{benchmark.lower()}_{language}" for language in languages}
        assert expected <= set(manager.all_subtasks)
        assert f"peft_cc_{benchmark.lower()}" in manager.all_groups
        assert {f"peft_cc_{language}" for language in languages} <= set(manager.all_tags)


@pytest.mark.slow
def test_the_six_benchmarks_run_with_smollm2_on_the_shared_data_root(smollm2_id, monkeypatch):
    if not SHARED_DATA_ROOT.is_dir():
        pytest.skip(f"no shared data root at {SHARED_DATA_ROOT}")
    monkeypatch.setenv(DATA_ROOT_VARIABLE, str(SHARED_DATA_ROOT))  # the environment, as the metadata lacks it
    tasks = [f"peft_cc_{benchmark.lower()}_{'zh' if benchmark != 'MMMLU' else 'es'}" for benchmark in BENCHMARKS]
    tasks[-1] = "peft_cc_xlsum_fr"
    lm = CCLM(pretrained=smollm2_id, device="cpu", dtype="float32", batch_size=4, max_length=1024)
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(
            include_path=str(TASKS_DIR), include_defaults=False, metadata={"pretrained": smollm2_id}
        ),
        limit=2,
        apply_chat_template=True,
        bootstrap_iters=0,
        gen_kwargs={"max_gen_toks": 8},
    )["results"]
    for benchmark, task in zip(BENCHMARKS, tasks):
        metric = {"XQuAD": "f1", "MKQA": "accuracy", "XLSum": "rouge_l"}.get(benchmark, "acc")
        assert 0.0 <= results[task][f"{metric},none"] <= 1.0
        if benchmark in ("XQuAD", "MKQA", "XLSum"):
            assert results[task]["answer_nll,none"] > 0.0
