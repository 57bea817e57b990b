"""`peft-cc compare` (peft_cc/scripts/compare.py, peft_cc/lm_eval/comparison.py): two lm-eval runs paired item by item,
against differences and standard errors computed by hand, on runs written in lm-eval's layout and schema (by a helper
here, and by lm-eval's own evaluator and writer), and every input it refuses, with its message."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import sys
from pathlib import Path

import pytest

from peft_cc.lm_eval import comparison
from peft_cc.lm_eval.comparison import (
    compare_runs,
    find_results_file,
    paired_statistics,
    read_run,
    task_languages,
)
from peft_cc.scripts.compare import run

TIMESTAMP = "2025-06-01T12-00-00.000000"
LOWER_IS_BETTER = {"answer_nll"}

# Run A and run B: per task, per metric key ("metric,filter"), the scores of doc_id 0, 1, 2, ...
SCORES_A = {
    "peft_cc_xnli_de": {"acc,none": [1, 0, 0, 1]},
    "peft_cc_xnli_ru": {"acc,none": [0, 0, 1, 0]},
    "peft_cc_mkqa_de": {"answer_nll,none": [2.0, 3.0, 2.5, 4.0]},
    "tiny_gsm": {"exact_match,strict-match": [0, 0, 0, 1], "exact_match,flexible-extract": [1, 0, 1, 1]},
}
SCORES_B = {
    "peft_cc_xnli_de": {"acc,none": [1, 1, 0, 1]},
    "peft_cc_xnli_ru": {"acc,none": [1, 1, 1, 0]},
    "peft_cc_mkqa_de": {"answer_nll,none": [1.5, 2.6, 2.2, 3.4]},
    "tiny_gsm": {"exact_match,strict-match": [1, 1, 1, 1], "exact_match,flexible-extract": [1, 1, 1, 1]},
}
GROUPS = {"peft_cc_xnli": ["peft_cc_xnli_de", "peft_cc_xnli_ru"], "peft_cc_mkqa": ["peft_cc_mkqa_de"]}


def document(task: str, doc_id: int) -> dict:
    return {"premise": f"{task} item {doc_id}", "label": doc_id % 3}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_run(
    folder: Path,
    scores: dict[str, dict[str, list]],
    groups: dict[str, list[str]] | None = None,
    model: str = "org/model",
    limit: int | None = None,
    documents: dict[str, list[dict]] | None = None,
    timestamp: str = TIMESTAMP,
    log_samples: bool = True,
) -> Path:
    """Write a run as `lm_eval --output_path folder --log_samples` does: `folder/<model, sanitized>/` with
    `results_<timestamp>.json` and a `samples_<task>_<timestamp>.jsonl` per task (one line per document and filter,
    lm-eval's fields); returns the results file. `documents` replaces a task's documents (doc_id = position)."""
    groups = groups or {}
    documents = documents or {}
    run_folder = folder / model.replace("/", "__")
    run_folder.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "results": {},
        "group_subtasks": groups,
        "configs": {},
        "versions": {},
        "n-shot": {},
        "higher_is_better": {},
        "n-samples": {},
        "config": {"model": "hf", "model_args": f"pretrained={model}", "limit": limit},
        "model_name": model,
        "model_name_sanitized": model.replace("/", "__"),
    }
    for task, metrics in scores.items():
        count = len(next(iter(metrics.values())))
        docs = documents.get(task, [document(task, doc_id) for doc_id in range(count)])
        aggregates = {}
        for key, values in metrics.items():
            metric, _, filter_name = key.partition(",")
            numbers = [value for value in values if isinstance(value, int | float)]
            aggregates[key] = sum(numbers) / len(numbers) if numbers else 0.0
            aggregates[f"{metric}_stderr,{filter_name}"] = "N/A"
            results["higher_is_better"].setdefault(task, {})[metric] = metric not in LOWER_IS_BETTER
        results["results"][task] = {"name": task, "alias": task, "sample_len": count, **aggregates}
        results["configs"][task] = {"task": task, "output_type": "multiple_choice"}
        results["versions"][task] = 1.0
        results["n-shot"][task] = 0
        results["n-samples"][task] = {"original": 100, "effective": count}
        lines = []
        filters = dict.fromkeys(key.partition(",")[2] for key in metrics)
        for filter_name in filters:
            for doc_id, doc in enumerate(docs):
                keys = [key for key in metrics if key.partition(",")[2] == filter_name]
                sample = {
                    "doc_id": doc_id,
                    "doc": doc,
                    "target": str(doc["label"]),
                    "arguments": {"gen_args_0": {"arg_0": doc["premise"], "arg_1": " yes"}},
                    "resps": [[["-1.5", "False"]]],
                    "filtered_resps": [["-1.5", "False"]],
                    "filter": filter_name,
                    "metrics": [key.partition(",")[0] for key in keys],
                    "doc_hash": sha256(json.dumps(doc, indent=2, ensure_ascii=False)),
                    "prompt_hash": sha256(doc["premise"]),
                    "target_hash": sha256(str(doc["label"])),
                }
                sample.update({key.partition(",")[0]: metrics[key][doc_id] for key in keys})
                lines.append(json.dumps(sample, ensure_ascii=False) + "\n")
        if log_samples:
            (run_folder / f"samples_{task}_{timestamp}.jsonl").write_text("".join(lines), encoding="utf-8")
    results_file = run_folder / f"results_{timestamp}.json"
    results_file.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results_file


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    """The `--output_path` folders of run A (a LoRA adapter) and run B (a CC-Tuning adapter)."""
    write_run(tmp_path / "lora", SCORES_A, GROUPS, model="org/lora")
    write_run(tmp_path / "cc", SCORES_B, GROUPS, model="org/cc")
    return tmp_path / "lora", tmp_path / "cc"


def rows_by_key(runs: tuple[Path, Path]) -> dict[tuple[str, str], dict]:
    comparison = compare_runs(read_run(runs[0]), read_run(runs[1]))
    return {(row["name"], row["metric"]): row for row in comparison.to_dict()["rows"]}


def test_task_rows_match_the_paired_differences_computed_by_hand(runs):
    rows = rows_by_key(runs)
    # peft_cc_xnli_de: differences 0, 1, 0, 0: mean 0.25, sd 0.5, SE 0.5 / √4.
    de = rows["peft_cc_xnli_de", "acc,none"]
    assert (de["mean_a"], de["mean_b"], de["difference"]) == pytest.approx((0.5, 0.75, 0.25))
    assert de["standard_error"] == pytest.approx(0.25)
    assert (de["items"], de["units"], de["beyond_2se"], de["language"]) == (4, 4, False, "de")
    assert de["higher_is_better"] is True and de["kind"] == "task"
    # peft_cc_xnli_ru: differences 1, 1, 0, 0: sd √(1/3), SE √(1/3) / 2.
    ru = rows["peft_cc_xnli_ru", "acc,none"]
    assert (ru["mean_a"], ru["mean_b"], ru["difference"]) == pytest.approx((0.25, 0.75, 0.5))
    assert ru["standard_error"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert ru["beyond_2se"] is False and ru["language"] == "ru"


def test_a_lower_is_better_metric_keeps_its_direction(runs):
    # answer_nll differences −0.5, −0.4, −0.3, −0.6: mean −0.45, sd √(0.05 / 3), SE sd / 2, beyond 2 SE.
    row = rows_by_key(runs)["peft_cc_mkqa_de", "answer_nll,none"]
    assert (row["mean_a"], row["mean_b"], row["difference"]) == pytest.approx((2.875, 2.425, -0.45))
    assert row["standard_error"] == pytest.approx(math.sqrt(0.05 / 3) / 2)
    assert row["beyond_2se"] is True and row["higher_is_better"] is False
    assert row["language"] == "de"  # the only task of the group peft_cc_mkqa, named peft_cc_mkqa_<language>


def test_the_group_row_pools_items_and_clusters_the_standard_error_by_doc_id(runs):
    row = rows_by_key(runs)["peft_cc_xnli", "acc,none"]
    # 8 items: A 3/8, B 6/8. Per doc_id, the differences of de and ru averaged: 0.5, 1, 0, 0 (mean 0.375).
    unit_differences = [0.5, 1.0, 0.0, 0.0]
    deviations = sum((value - 0.375) ** 2 for value in unit_differences)
    clustered = math.sqrt(deviations / 3) / math.sqrt(4)
    assert (row["mean_a"], row["mean_b"], row["difference"]) == pytest.approx((0.375, 0.75, 0.375))
    assert row["standard_error"] == pytest.approx(clustered) == pytest.approx(0.239357, abs=1e-6)
    assert (row["items"], row["units"], row["beyond_2se"], row["kind"]) == (8, 4, False, "group")
    assert row["language"] is None and row["subtasks"] == ["peft_cc_xnli_de", "peft_cc_xnli_ru"]
    assert row["higher_is_better"] is True
    # Not the ordinary standard error over the 8 items as if independent.
    differences = [0, 1, 0, 0, 1, 1, 0, 0]
    independent = math.sqrt(sum((d - 0.375) ** 2 for d in differences) / 7) / math.sqrt(8)
    assert row["standard_error"] != pytest.approx(independent)


def test_filters_are_separate_metrics_and_a_task_of_no_group_has_no_language(runs):
    rows = rows_by_key(runs)
    strict = rows["tiny_gsm", "exact_match,strict-match"]
    # Differences 1, 1, 1, 0: mean 0.75, sd 0.5, SE 0.25: beyond 2 SE.
    assert (strict["difference"], strict["standard_error"]) == pytest.approx((0.75, 0.25))
    assert strict["beyond_2se"] is True and strict["filter"] == "strict-match" and strict["language"] is None
    flexible = rows["tiny_gsm", "exact_match,flexible-extract"]
    assert (flexible["difference"], flexible["standard_error"], flexible["beyond_2se"]) == (
        pytest.approx(0.25),
        pytest.approx(0.25),
        False,
    )


def test_the_table_shows_every_row_marks_those_beyond_two_standard_errors_and_shows_the_filter(runs, capsys):
    assert run([str(runs[0]), str(runs[1])]) == 0
    output = capsys.readouterr().out
    lines = output.splitlines()
    assert "(model org/lora)" in lines[0] and "(model org/cc)" in lines[1]
    table = {line.split()[0]: line for line in lines if line.startswith(("peft_cc", "  peft_cc", "tiny"))}
    assert table["peft_cc_xnli"].split()[1:5] == ["acc", "higher", "8", "(4"]
    assert "+0.3750" in table["peft_cc_xnli"] and "0.2394" in table["peft_cc_xnli"]
    assert table["peft_cc_xnli"].endswith("  no")
    ru = next(line for line in lines if line.startswith("  peft_cc_xnli_ru"))
    assert ru.split()[1:5] == ["ru", "acc", "higher", "4"]
    nll = next(line for line in lines if line.startswith("  peft_cc_mkqa_de"))
    assert nll.split()[1:4] == ["de", "answer_nll", "lower"] and nll.endswith("yes, B better")
    strict = next(line for line in lines if "exact_match,strict-match" in line)
    assert strict.split()[1] == "exact_match,strict-match" and strict.endswith("yes, B better")
    # A group's rows come before its subtasks', indented under it.
    order = [line.split()[0] for line in lines if line.strip().startswith(("peft_cc", "tiny"))]
    assert (
        order
        == ["peft_cc_mkqa", "peft_cc_mkqa_de", "peft_cc_xnli", "peft_cc_xnli_de", "peft_cc_xnli_ru"] + ["tiny_gsm"] * 2
    )


def test_json_output_is_one_document_with_every_row(runs, capsys):
    assert run([str(runs[0]), str(runs[1]), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["run_a"]["model_name"] == "org/lora" and document["run_b"]["model_name"] == "org/cc"
    keys = {(row["kind"], row["name"], row["metric"]) for row in document["rows"]}
    assert ("group", "peft_cc_xnli", "acc,none") in keys and ("task", "tiny_gsm", "exact_match,strict-match") in keys
    assert len(document["rows"]) == 7
    assert document["groups"]["peft_cc_xnli"] == ["peft_cc_xnli_de", "peft_cc_xnli_ru"]
    assert document["notes"] == []


def test_run_may_be_the_output_folder_its_model_subfolder_or_the_results_file(runs, capsys):
    results_file = find_results_file(runs[0])
    assert results_file == runs[0] / "org__lora" / f"results_{TIMESTAMP}.json"
    for run_a in (runs[0], results_file.parent, results_file):
        assert run([str(run_a), str(runs[1]), "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)["rows"]) == 7


def test_plot_writes_a_png(runs, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    plot = tmp_path / "plots" / "cc_vs_lora.png"
    assert run([str(runs[0]), str(runs[1]), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Plot written to {plot}." in capsys.readouterr().out


def test_plot_without_matplotlib_says_to_install_it(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert run([str(runs[0]), str(runs[1]), "--plot", str(tmp_path / "plot.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_a_corpus_level_metric_is_skipped_with_a_note(tmp_path, capsys):
    pairs = [["ein Haus", "a house"], ["der Hund", "the dog"]]
    write_run(tmp_path / "a", {"wmt_de": {"bleu,none": pairs, "acc,none": [0, 1]}})
    write_run(tmp_path / "b", {"wmt_de": {"bleu,none": pairs, "acc,none": [1, 1]}})
    assert run([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    output = capsys.readouterr().out
    assert "Note: wmt_de bleu: skipped, its per-item values are not numbers" in output
    assert [line.split()[:2] for line in output.splitlines() if line.startswith("wmt_de")] == [["wmt_de", "acc"]]


def test_languages_of_per_language_tasks_only():
    groups = {
        "xnli": ["xnli_de", "xnli_en", "xnli_es"],
        "belebele": ["belebele_deu_Latn", "belebele_fra_Latn"],
        "mmlu_stem": ["mmlu_abstract_algebra", "mmlu_anatomy"],
        "arc": ["arc_easy", "arc_challenge"],
    }
    tasks = [task for children in groups.values() for task in children] + ["xstorycloze_ru", "xstorycloze_zh"]
    assert task_languages([*tasks, "hellaswag", "gsm8k", "gsm8k_cot"], groups) == {
        "xnli_de": "de",
        "xnli_en": "en",
        "xnli_es": "es",
        "belebele_deu_Latn": "deu_Latn",
        "belebele_fra_Latn": "fra_Latn",
        "xstorycloze_ru": "ru",
        "xstorycloze_zh": "zh",
    }


def test_the_reading_and_statistics_need_the_standard_library_only():
    """They read JSON files, so they work in any environment: no lm-eval, torch, transformers or trl."""
    tree = ast.parse(Path(comparison.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert {name.partition(".")[0] for name in imported} <= sys.stdlib_module_names | {"__future__"}


def test_paired_statistics_of_one_item_has_no_standard_error():
    numbers = paired_statistics([1.0], [0.0])
    assert (numbers.difference, numbers.standard_error, numbers.beyond_two_standard_errors) == (-1.0, None, False)


def error_of(capsys, *argv: str) -> str:
    """The message of `peft-cc compare argv`, which must fail with exit status 2, one paragraph and no traceback."""
    assert run(list(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    message = captured.err.strip()
    assert message.startswith("peft-cc compare: error: ") and "\n" not in message and "Traceback" not in message
    return message


def test_error_without_sample_logs(tmp_path, capsys):
    write_run(tmp_path / "a", SCORES_A, GROUPS, log_samples=False)
    write_run(tmp_path / "b", SCORES_B, GROUPS)
    message = error_of(capsys, str(tmp_path / "a"), str(tmp_path / "b"))
    assert "has no sample log for any of its tasks" in message and "Rerun lm-eval with --log_samples" in message


def test_error_without_a_shared_task(tmp_path, capsys):
    write_run(tmp_path / "a", {"xnli_de": {"acc,none": [1, 0]}})
    write_run(tmp_path / "b", {"xstorycloze_ru": {"acc,none": [1, 0]}, "xcopa_et": {"acc,none": [0, 1]}})
    message = error_of(capsys, str(tmp_path / "a"), str(tmp_path / "b"))
    assert "The runs share no task" in message
    assert "has xnli_de;" in message and "has xcopa_et, xstorycloze_ru." in message
    assert "Evaluate both on the same --tasks" in message


def test_error_for_a_different_limit(tmp_path, capsys):
    write_run(tmp_path / "a", {"xnli_de": {"acc,none": [1, 0, 1, 1, 0, 1, 1]}}, limit=7)
    write_run(tmp_path / "b", {"xnli_de": {"acc,none": [1, 0, 1]}}, limit=3)
    message = error_of(capsys, str(tmp_path / "a"), str(tmp_path / "b"))
    assert "Task xnli_de was evaluated on different documents: run A has 7 items, run B has 3" in message
    assert (
        "doc_ids only in A: 3, 4, 5, 6" in message and "run A was made with --limit 7, run B with --limit 3" in message
    )
    assert "Evaluate both with the same --limit" in message


def test_error_for_a_different_document(tmp_path, capsys):
    changed = [document("xnli_de", 0), {"premise": "another premise", "label": 1}, document("xnli_de", 2)]
    write_run(tmp_path / "a", {"xnli_de": {"acc,none": [1, 0, 1]}})
    write_run(tmp_path / "b", {"xnli_de": {"acc,none": [1, 1, 1]}}, documents={"xnli_de": changed})
    message = error_of(capsys, str(tmp_path / "a"), str(tmp_path / "b"))
    assert "Task xnli_de: doc_id 1 is a different document in the two runs" in message
    assert "1 of 3 documents differ" in message and "evaluate both with the same ones" in message


def test_error_for_a_metric_of_one_run_only(tmp_path, capsys):
    write_run(tmp_path / "a", {"xnli_de": {"acc,none": [1, 0], "acc_norm,none": [1, 1]}})
    write_run(tmp_path / "b", {"xnli_de": {"acc,none": [1, 1]}})
    message = error_of(capsys, str(tmp_path / "a"), str(tmp_path / "b"))
    assert "Task xnli_de: metric acc_norm,none (metric,filter) is in run A's sample log but not in run B's" in message
    assert "A has acc,none, acc_norm,none; B has acc,none" in message


def test_error_for_a_folder_of_several_runs(tmp_path, capsys):
    write_run(tmp_path / "a", SCORES_A, GROUPS)
    write_run(tmp_path / "a", SCORES_A, GROUPS, timestamp="2025-06-02T08-30-00.000000")
    write_run(tmp_path / "b", SCORES_B, GROUPS)
    message = error_of(capsys, str(tmp_path / "a"), str(tmp_path / "b"))
    assert (
        f"{tmp_path / 'a'} holds 2 lm-eval runs: " in message and "results_2025-06-02T08-30-00.000000.json" in message
    )
    assert "Pass the results file of the run to compare as RUN" in message


def test_error_for_a_folder_without_results(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    message = error_of(capsys, str(tmp_path / "empty"), str(tmp_path / "missing"))
    assert "holds no lm-eval results file" in message and "--log_samples" in message


def test_runs_written_by_lm_eval_itself(tmp_path, capsys):
    """lm-eval's evaluator (`evaluate`: `simple_evaluate` without its environment report) scores a local group of
    two per-language multiple-choice tasks with a fixed log-likelihood model (run A always picks the first option,
    run B the gold one where it knows it), and lm-eval's EvaluationTracker writes both runs: the comparison reads
    lm-eval's own layout and schema."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.model import LM
    from lm_eval.evaluator import evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    docs = [{"prompt": f"Q{index}", "gold": index % 2, "easy": index < 3} for index in range(5)]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    for language in ("de", "fr"):
        (tasks / f"tiny_{language}.yaml").write_text(
            f"task: tiny_{language}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {tasks / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
            'doc_to_text: "{{prompt}}"\ndoc_to_choice: ["no", "yes"]\ndoc_to_target: gold\n'
            "metric_list:\n  - metric: acc\n"
        )
    (tasks / "tiny.yaml").write_text(
        "group: tiny\ntask: [tiny_de, tiny_fr]\naggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
    )

    class FixedChoice(LM):
        """Picks the first option, or where `knows` the gold one: of the documents marked easy, and of Q3 in fr."""

        def __init__(self, knows: bool) -> None:
            super().__init__()
            self.knows = knows

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            scores = []
            for request in requests:
                doc, continuation = request.doc, request.arguments[1]
                known = doc["easy"] or (request.task_name == "tiny_fr" and doc["prompt"] == "Q3")
                chosen = doc["gold"] if self.knows and known else 0
                scores.append((0.0 if continuation.strip() == ["no", "yes"][chosen] else -1.0, False))
            return scores

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    task_manager = TaskManager(include_path=str(tasks), include_defaults=False)
    for name, knows in (("a", False), ("b", True)):
        results = evaluate(lm=FixedChoice(knows), task_dict=task_manager.load(["tiny"]), bootstrap_iters=0)
        samples = results.pop("samples")
        tracker = EvaluationTracker(output_path=str(tmp_path / name))
        tracker.general_config_tracker.log_experiment_args(
            model_source="fixed",
            model_args=f"pretrained=org/{name}",
            system_instruction=None,
            chat_template=None,
            fewshot_as_multiturn=False,
        )
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    assert find_results_file(tmp_path / "a").parent == tmp_path / "a" / "org__a"  # lm-eval's model subfolder
    assert run([str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    rows = {(row["name"], row["metric"]): row for row in json.loads(capsys.readouterr().out)["rows"]}
    # Golds 0, 1, 0, 1, 0. A answers 0: right on 1, 0, 1, 0, 1. B is right on 1, 1, 1, 0, 1 in de and on all in fr.
    de, fr, group = rows["tiny_de", "acc,none"], rows["tiny_fr", "acc,none"], rows["tiny", "acc,none"]
    assert (de["language"], fr["language"], group["kind"]) == ("de", "fr", "group")
    # de: differences 0, 1, 0, 0, 0: mean 0.2, sd √0.2, SE √0.2 / √5 = 0.2.
    assert (de["mean_a"], de["mean_b"], de["difference"], de["standard_error"]) == pytest.approx((0.6, 0.8, 0.2, 0.2))
    # fr: differences 0, 1, 0, 1, 0: mean 0.4, sd √0.3, SE √0.3 / √5.
    assert (fr["mean_b"], fr["difference"], fr["standard_error"]) == pytest.approx((1.0, 0.4, math.sqrt(0.3 / 5)))
    # The group: 10 items, mean difference 0.3; per doc_id, de and fr averaged: 0, 1, 0, 0.5, 0 (mean 0.3, sd √0.2),
    # SE √0.2 / √5 = 0.2.
    assert (group["items"], group["units"]) == (10, 5)
    assert (group["mean_a"], group["mean_b"], group["difference"], group["standard_error"]) == pytest.approx(
        (0.6, 0.9, 0.3, 0.2)
    )
    assert group["higher_is_better"] is True and group["subtasks"] == ["tiny_de", "tiny_fr"]


def test_per_language_tasks_run_without_their_group_get_a_pooled_row(tmp_path):
    """`--tasks xnli_de,xnli_ru` (no group): the benchmark's row `xnli_*` pools them as its group's row would."""
    write_run(tmp_path / "lora", SCORES_A, model="org/lora")
    write_run(tmp_path / "cc", SCORES_B, model="org/cc")
    ungrouped = rows_by_key((tmp_path / "lora", tmp_path / "cc"))
    write_run(tmp_path / "lora-grouped", SCORES_A, GROUPS, model="org/lora")
    write_run(tmp_path / "cc-grouped", SCORES_B, GROUPS, model="org/cc")
    grouped = rows_by_key((tmp_path / "lora-grouped", tmp_path / "cc-grouped"))
    pooled, group = ungrouped["peft_cc_xnli_*", "acc,none"], grouped["peft_cc_xnli", "acc,none"]
    for key in ("mean_a", "mean_b", "difference", "standard_error", "items", "units", "kind", "subtasks"):
        assert pooled[key] == group[key], key
    assert ("peft_cc_mkqa_*", "answer_nll,none") not in ungrouped  # one language: no pooled row
