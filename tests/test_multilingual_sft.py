"""The multilingual SFT experiment (benchmarks/multilingual_sft/: multilingual_sft.py and its sft_* modules): the data
split, the mixture's format, resumable runs, the invocations, and the report's arithmetic on hand-made results."""

from __future__ import annotations

import json
import math
import os
import re
import shlex

import multilingual_sft as experiment
import pytest
import sft_evaluate
import sft_figure
import sft_mixture
import sft_plan
import sft_report
import sft_train
from helpers import REPO_ROOT
from parallel_data import CHOICES, available_languages, load_parallel_items
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from sft_mixture import EvaluationSizes
from sft_runs import SYSTEMS, read_finished, write_finished

DATA_ROOT = os.environ.get("PEFT_CC_BENCHMARKS", str(REPO_ROOT.parent / "shared" / "data" / "benchmarks"))
needs_data = pytest.mark.skipif(not os.path.isdir(DATA_ROOT), reason=f"no benchmark data at {DATA_ROOT}")


def write_benchmark(root, benchmark: str, languages: dict[str, list[tuple[str, object]]]) -> None:
    """A benchmark of `(prompt, answer)` items per language in the data root layout."""
    for language, items in languages.items():
        for folder, rows in (("prompts", [{"prompt": p} for p, _ in items]), ("answers", [a for _, a in items])):
            path = root / benchmark / folder / f"{language}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def tiny_root(tmp_path):
    """MKQA (open answers) and XNLI (options) in en and de, 6 items each; item i's prompts end with `#i`."""
    options = "\n(1) Entail\n(2) Neutral\n(3) Contradict\n\nAnswer:"
    for benchmark, answer in (("MKQA", lambda i: [f"answer {i}", "other"]), ("XNLI", lambda i: str(1 + i % 3))):
        suffix = options if benchmark == "XNLI" else ""
        write_benchmark(
            tmp_path,
            benchmark,
            {
                language: [(f"{language} {benchmark} #{i}{suffix}", answer(i)) for i in range(6)]
                for language in "en de".split()
            },
        )
    return str(tmp_path)


# ------------------------------------------------------------------------------------------------- data split


def test_training_rows_come_from_items_no_language_evaluates(tmp_path):
    root = tiny_root(tmp_path)
    sizes = EvaluationSizes({"MKQA": 2, "XNLI": 3}, {"MKQA": 1})
    rows = sft_mixture.training_rows(root, sizes, 10, fits=lambda row: True, benchmarks=("MKQA", "XNLI"))
    assert len(rows) == 10
    assert {row["benchmark"] for row in rows} == {"MKQA", "XNLI"}
    assert sum(row["benchmark"] == "MKQA" for row in rows) == 5  # equal shares
    for row in rows:
        assert row["index"] >= sizes.held_out(row["benchmark"])
        assert row["prompt"][0]["content"].startswith(f"{row['language']} {row['benchmark']} #{row['index']}")
        assert row["prompt_en"][0]["content"].startswith(f"en {row['benchmark']} #{row['index']}")
    again = sft_mixture.training_rows(root, sizes, 10, fits=lambda row: True, benchmarks=("MKQA", "XNLI"))
    assert again == rows  # the same pairs for every system and seed


def test_too_few_rows_that_fit_is_an_error(tmp_path):
    root = tiny_root(tmp_path)
    sizes = EvaluationSizes({"MKQA": 2, "XNLI": 2}, {})
    with pytest.raises(ValueError, match=r"MKQA: only 4 training rows fit \(of 8 items at indices >= 2\), 5 needed"):
        sft_mixture.training_rows(root, sizes, 10, fits=lambda row: row["index"] >= 4, benchmarks=("MKQA", "XNLI"))


@needs_data
def test_no_evaluated_item_is_trained_on_in_any_language(smollm2_tokenizer):
    design = experiment.FULL_DESIGN
    sizes = EvaluationSizes(design.loglik_items, design.generation_items)
    max_length = 256
    fits = sft_mixture.token_budget_check(smollm2_tokenizer, max_length)
    rows = sft_mixture.training_rows(DATA_ROOT, sizes, 400, fits)
    assert len(rows) == 400

    evaluated = set()
    for benchmark in sizes.benchmarks:
        for language in available_languages(DATA_ROOT, benchmark):
            for item in load_parallel_items(DATA_ROOT, benchmark, language)[: sizes.held_out(benchmark)]:
                evaluated |= {item.prompt, item.english_prompt}
    for row in rows:
        assert row["prompt"][0]["content"] not in evaluated and row["prompt_en"][0]["content"] not in evaluated
        assert row["index"] >= sizes.held_out(row["benchmark"])
        templated = smollm2_tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
        assert len(templated["input_ids"] if isinstance(templated, dict) else templated) <= max_length
    assert {row["benchmark"] for row in rows} == set(sft_mixture.TRAIN_BENCHMARKS)


# ------------------------------------------------------------------------------------------------- mixture format


@needs_data
@pytest.mark.parametrize("benchmark", sorted(CHOICES))
def test_every_multiple_choice_item_gets_its_label_and_option_text(benchmark):
    for language in available_languages(DATA_ROOT, benchmark):
        for item in load_parallel_items(DATA_ROOT, benchmark, language):
            completion = sft_mixture.completion(item)
            label, separator, text = completion.partition(". ")
            assert label == item.answer and separator and text.strip()
            assert f"({label})" in item.prompt and text in item.prompt


def test_completions_carry_answer_text(tmp_path):
    root = tiny_root(tmp_path)
    sizes = EvaluationSizes({"MKQA": 1, "XNLI": 1}, {})
    rows = sft_mixture.training_rows(root, sizes, 10, fits=lambda row: True, benchmarks=("MKQA", "XNLI"))
    for row in rows:
        completion = row["completion"][0]["content"]
        if row["benchmark"] == "MKQA":
            assert completion == f"answer {row['index']}"
        else:
            label = str(1 + row["index"] % 3)
            assert completion == f"{label}. " + {"1": "Entail", "2": "Neutral", "3": "Contradict"}[label]
    summary = sft_mixture.mixture_summary(rows)
    assert list(summary) == ["MKQA", "XNLI"] and all(sum(counts.values()) == 5 for counts in summary.values())


def test_an_option_missing_from_the_prompt_is_an_error():
    with pytest.raises(ValueError, match=r"No option \(4\)"):
        sft_mixture.option_text("Q?\n(1) yes\n(2) no\n", "4")
    assert sft_mixture.option_text("Q?\n(A) 0\n(B) 4 \n", "B") == "4"


@needs_data
def test_evaluation_languages_are_english_and_four_others_with_a_non_latin_script():
    for benchmark in ("MKQA", "XQuAD", "XLSum", "XNLI", "XStoryCloze", "MMMLU"):
        languages = sft_mixture.evaluation_languages(DATA_ROOT, benchmark, 4)
        assert languages[0] == "en" and len(set(languages)) == 5
        assert set(languages) & {"zh", "ar", "ru", "hi"}
    with pytest.raises(ValueError, match="need English and 9"):
        sft_mixture.evaluation_languages(DATA_ROOT, "XNLI", 9)


def test_evaluation_sizes_are_checked():
    with pytest.raises(ValueError, match="MKQA: 5 generated items but 4"):
        EvaluationSizes({"MKQA": 4}, {"MKQA": 5})
    with pytest.raises(ValueError, match="int >= 0"):
        EvaluationSizes({"MKQA": -1}, {})
    sizes = EvaluationSizes({"MKQA": 4, "XNLI": 0}, {"MKQA": 2})
    assert sizes.benchmarks == ["MKQA"] and sizes.held_out("MKQA") == 4 and sizes.held_out("XQuAD") == 0


def test_evaluating_items_the_adapter_may_have_trained_on_is_refused():
    sizes = EvaluationSizes({"MKQA": 150, "XLSum": 40}, {})
    sft_evaluate.check_held_out(sizes, {"MKQA": 150})  # XLSum was not trained on
    sft_evaluate.check_held_out(sizes, None)  # the base model
    with pytest.raises(
        ValueError, match="MKQA: 150 items to evaluate, but the adapter was trained on items from index 100"
    ):
        sft_evaluate.check_held_out(sizes, {"MKQA": 100})


def test_a_benchmark_trained_on_with_no_item_held_out_is_not_evaluated(tmp_path):
    # Gemma's reported adapters trained on MMMLU from index 0: its design evaluates no MMMLU item, so holds none out.
    args = experiment.parse_args(
        ["evaluate", "--system", "lora", "--seed", "0", "--output-dir", str(tmp_path), "--generation-items", ""]
        + ["--loglik-items", "MMMLU=40"]
    )
    settings = {"benchmarks": ["MKQA", "XNLI", "XStoryCloze", "MMMLU"], "held_out": {"MKQA": 100, "XNLI": 80}}
    write_finished(experiment.adapter_dir(args, "lora", 0) / sft_train.RECORD, settings, {})
    (experiment.adapter_dir(args, "lora", 0) / SAFETENSORS_WEIGHTS_NAME).touch()
    with pytest.raises(
        ValueError, match="MMMLU: 40 items to evaluate, but the adapter was trained on items from index 0"
    ):
        experiment.run(args, "evaluate", SYSTEMS["lora"], 0, None)
    trainable = sft_train.trainable_from({"settings": settings})
    assert trainable == {"MKQA": 100, "XNLI": 80, "XStoryCloze": 0, "MMMLU": 0}
    sft_evaluate.check_held_out(EvaluationSizes({"XQuAD": 20, "MKQA": 100}, {}), trainable)  # XQuAD: not trained on


def test_evaluation_parts_split_generated_from_loglik_items(tmp_path):
    root = tiny_root(tmp_path)
    settings = sft_evaluate.EvaluationSettings("m", None, root, languages_per_benchmark=1, batch_size=1)
    parts = sft_evaluate.evaluation_parts(settings, EvaluationSizes({"MKQA": 5, "XNLI": 4}, {"MKQA": 2}))
    assert [(p.benchmark, p.start, p.stop, p.generate) for p in parts] == [
        ("MKQA", 0, 2, True),
        ("MKQA", 2, 5, False),
        ("XNLI", 0, 4, False),
    ]
    assert parts[0].languages == ("en", "de") and parts[0].task("de") == "peft_cc_mkqa_de"
    assert parts[0].metrics == ("answer_nll", "accuracy", "exact_match", "f1") and parts[1].metrics == ("answer_nll",)
    assert parts[2].metrics == ("acc",)


# ------------------------------------------------------------------------------------------------- resumable runs


def test_a_finished_run_is_read_back_and_other_settings_are_refused(tmp_path):
    path = tmp_path / "run.json"
    assert read_finished(path, {"steps": 10}) is None
    written = write_finished(path, {"steps": 10, "sizes": (1, 2)}, {"items": {"MKQA": {"de": {3: {"acc": 1.0}}}}})
    assert read_finished(path, {"steps": 10, "sizes": (1, 2)}) == written
    assert written["items"]["MKQA"]["de"] == {"3": {"acc": 1.0}}  # as JSON reads it back
    with pytest.raises(ValueError, match=r"other settings \(steps differ\)"):
        read_finished(path, {"steps": 20, "sizes": (1, 2)})
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no staging file left


def test_a_finished_training_is_skipped(tmp_path, monkeypatch):
    settings = sft_train.TrainingSettings("m", None, "root", ("MKQA",), 2, 1, 1e-3, 4, 64, 0, 1)
    sizes = EvaluationSizes({"MKQA": 3}, {})
    folder = tmp_path / "lora-seed0"
    run_settings = {
        **sft_train.asdict(settings),
        "system": sft_train.asdict(SYSTEMS["lora"]),
        "seed": 0,
        "held_out": {"MKQA": 3},
    }
    write_finished(folder / sft_train.RECORD, run_settings, {"log_history": [], "seconds": {}})

    def no_loading(*args, **kwargs):
        raise AssertionError("a finished run must not load a model")

    monkeypatch.setattr(sft_train.AutoTokenizer, "from_pretrained", no_loading)
    # the record without the adapter's weights (as the experiment's results/ keeps it): not finished, nor retrained
    with pytest.raises(FileNotFoundError, match="not the adapter's weights .adapter_model.safetensors.: move"):
        sft_train.train(SYSTEMS["lora"], 0, settings, sizes, folder)
    (folder / SAFETENSORS_WEIGHTS_NAME).touch()
    record = sft_train.train(SYSTEMS["lora"], 0, settings, sizes, folder)
    assert record["settings"]["seed"] == 0
    with pytest.raises(ValueError, match="seed differ"):
        sft_train.train(SYSTEMS["lora"], 1, settings, sizes, folder)


def test_an_adapter_kept_as_its_record_alone_is_not_evaluated(tmp_path):
    args = experiment.parse_args(["evaluate", "--system", "lora", "--seed", "0", "--output-dir", str(tmp_path)])
    folder = experiment.adapter_dir(args, "lora", 0)
    write_finished(folder / sft_train.RECORD, {"benchmarks": ["MKQA"], "held_out": {"MKQA": 150}}, {})
    message = f"{folder} holds the training record training.json but not the adapter's weights"
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        experiment.run(args, "evaluate", SYSTEMS["lora"], 0, None)


# ------------------------------------------------------------------------------------------------- invocations


def test_the_experiment_runs_every_system_seed_and_connection():
    args = experiment.parse_args(["all", "--design", "full", "--seeds", "0,1", "--bilingual-seeds", "0"])
    runs = [
        (command, system.name, seed, connection) for command, system, seed, connection in experiment.invocations(args)
    ]
    assert runs[0] == ("evaluate", "base", None, None)
    trainings = [run for run in runs if run[0] == "train"]
    assert len(trainings) == 3 * 2  # lora and two CC systems, two seeds
    evaluations = [run for run in runs if run[0] == "evaluate"]
    assert len(evaluations) == 1 + 2 + 2 * 2 * 2 + 2  # base, lora, CC mono and off, bilingual for seed 0
    assert ("evaluate", "cc-paper-noen", 0, "bilingual") in runs and (
        "evaluate",
        "cc-paper",
        1,
        "bilingual",
    ) not in runs
    for command, system, seed, connection in runs:  # each evaluation after its training
        if command == "evaluate" and seed is not None:
            assert runs.index(("train", system, seed, None)) < runs.index((command, system, seed, connection))
    assert SYSTEMS["cc-paper-noen"].cc_options == {"english_gradients": False}
    assert SYSTEMS["cc-paper"].cc_options == {}  # the paper's settings: CCConfig's defaults


def test_arguments_are_checked():
    args = experiment.parse_args(["evaluate", "--system", "cc-paper", "--seed", "1", "--connection", "off"])
    assert args.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and args.eval_data_root == args.data_root
    args = experiment.parse_args(
        [
            "train",
            "--model",
            "gemma3",
            "--system",
            "lora",
            "--seed",
            "0",
            "--loglik-items",
            "MKQA=5",
            "--generation-items",
            "MKQA=2",
        ]
    )
    assert args.model_id == "google/gemma-3-270m" and args.sizes.loglik_items == {"MKQA": 5}
    args = experiment.parse_args(["all", "--loglik-items", "MKQA=50,XNLI=40", "--generation-items", "MKQA=10"])
    args_secondary = experiment.parse_args(
        [
            "all",
            "--loglik-items",
            "MKQA=50,XNLI=40",
            "--generation-items",
            "MKQA=10",
            "--secondary-loglik-items",
            "MKQA=20",
        ]
    )
    assert experiment.sizes_for(args_secondary, "off").loglik_items == {"MKQA": 20, "XNLI": 40}
    assert experiment.sizes_for(args_secondary, "bilingual").generation_items == {"MKQA": 10}
    assert experiment.sizes_for(args_secondary, "monolingual") == experiment.sizes_for(args, None) == args.sizes
    for wrong in (
        ["all", "--loglik-items", "MKQA=50", "--generation-items", "MKQA=10", "--secondary-loglik-items", "MKQA=5"],
        ["evaluate", "--system", "cc-paper", "--seed", "0"],  # no connection
        ["evaluate", "--system", "lora", "--connection", "off", "--seed", "0"],
        ["evaluate", "--system", "lora"],  # no seed
        ["evaluate", "--system", "base", "--seed", "0"],
        ["train", "--system", "base", "--seed", "0"],
        ["all", "--systems", "base,gpt"],
        ["all", "--loglik-items", "MKQA"],
        ["all", "--loglik-items", "MKQA=2", "--generation-items", "MKQA=3"],
        ["all", "--seeds", "a"],
    ):
        with pytest.raises(SystemExit):
            experiment.parse_args(wrong)


def test_a_packaged_model_defaults_to_the_design_of_its_reported_runs():
    gemma = experiment.parse_args(["all", "--model", "gemma3"])
    assert gemma.steps == 40 and gemma.seeds == (0, 1) and gemma.bilingual_seeds == ()
    assert gemma.systems == ("base", "lora", "cc-paper")
    assert gemma.sizes == EvaluationSizes({"MKQA": 100, "XNLI": 80, "XStoryCloze": 80}, {"MKQA": 20})
    assert experiment.sizes_for(gemma, "off").loglik_items == {"MKQA": 40, "XNLI": 40, "XStoryCloze": 40}
    smollm2 = experiment.parse_args(["plan", "--model", "smollm2"])
    assert smollm2.steps == 60 and smollm2.bilingual_seeds == (0,)
    assert smollm2.sizes.loglik_items == {"MKQA": 150, "XNLI": 120, "XStoryCloze": 120}
    assert experiment.sizes_for(smollm2, "bilingual").loglik_items == {"MKQA": 50, "XNLI": 40, "XStoryCloze": 40}
    # The full design, chosen or for a model without a preset; flags override either.
    full = experiment.FULL_DESIGN
    for argv in (["all", "--model", "gemma3", "--design", "full"], ["all", "--model", "someone/some-model"]):
        args = experiment.parse_args(argv)
        assert args.steps == full.steps and args.systems == full.systems and set(full.systems) <= set(SYSTEMS)
        assert args.sizes == EvaluationSizes(full.loglik_items, full.generation_items)
    args = experiment.parse_args(["all", "--model", "gemma3", "--steps", "7", "--systems", "lora", "--seeds", ""])
    assert (args.steps, args.systems, args.seeds, args.bilingual_seeds) == (7, ["lora"], [], ())
    args = experiment.parse_args(["all", "--model", "gemma3", "--secondary-loglik-items", ""])  # no fewer items
    assert experiment.sizes_for(args, "off") == args.sizes == gemma.sizes


def test_evaluating_an_untrained_system_says_what_to_run(tmp_path):
    args = experiment.parse_args(["evaluate", "--system", "lora", "--seed", "0", "--output-dir", str(tmp_path)])
    command = f"train --model smollm2 --system lora --seed 0 --output-dir {tmp_path}"
    with pytest.raises(SystemExit, match=re.escape(command)):
        experiment.run(args, "evaluate", SYSTEMS["lora"], 0, None)


def test_a_listed_invocation_runs_with_the_settings_it_was_listed_with(tmp_path):
    # What `plan` and `all` list must run as they would: with every setting given to them, and not their schedule.
    output_dir = str(tmp_path / "a folder")
    args = experiment.parse_args(
        ["plan", "--output-dir", output_dir, "--design", "full", "--steps", "7", "--learning-rate", "1e-4"]
        + ["--loglik-items", "XQuAD=20,MMMLU=40", "--generation-items", "XQuAD=8", "--secondary-loglik-items", ""]
        + ["--train-benchmarks", "MMMLU", "--systems", "lora,cc-paper", "--seeds", "3", "--bilingual-seeds", "3"]
    )
    listed = list(experiment.invocations(args))
    assert {connection for *_, connection in listed} == {None, "monolingual", "off", "bilingual"}
    for command, system, seed, connection in listed:
        line = experiment.command_line(args, command, system, seed, connection)
        python, script, *argv = shlex.split(line)
        assert (python, script) == ("python", "benchmarks/multilingual_sft/multilingual_sft.py")
        assert not {"--systems", "--seeds", "--bilingual-seeds"} & set(argv)
        again = experiment.parse_args(argv)
        assert (again.command, again.system, again.seed) == (command, system.name, seed)
        assert getattr(again, "connection", None) == connection
        assert experiment.training_settings(again) == experiment.training_settings(args)
        assert experiment.evaluation_settings(again) == experiment.evaluation_settings(args)
        assert experiment.sizes_for(again, connection) == experiment.sizes_for(args, connection)
        assert experiment.adapter_dir(again, system.name, seed) == experiment.adapter_dir(args, system.name, seed)
        path = experiment.evaluation_path(again, system.name, seed, connection)
        assert path == experiment.evaluation_path(args, system.name, seed, connection)
    assert experiment.training_settings(args).steps == 7 and args.sizes.loglik_items == {"XQuAD": 20, "MMMLU": 40}


# ------------------------------------------------------------------------------------------------- the report


def evaluation(nll: dict[str, list[float]], acc: dict[str, list[float]], seconds: float = 10.0) -> dict:
    """An evaluation record: MKQA gold NLL and XNLI accuracy per language and item."""

    def per_item(values: list[float], metric: str) -> dict:
        return {str(index): {metric: value} for index, value in enumerate(values)}

    return {
        "settings": {},
        "items": {
            "MKQA": {language: per_item(values, "answer_nll") for language, values in nll.items()},
            "XNLI": {language: per_item(values, "acc") for language, values in acc.items()},
        },
        "outputs": {},
        "seconds": {"total": seconds, "MKQA loglik": seconds},
        "item_counts": {"MKQA loglik": 4},
    }


def test_the_curves_give_a_system_one_colour_and_each_seed_its_own_line_style(tmp_path, monkeypatch):
    from matplotlib.axes import Axes  # the [dev] extra's

    plotted = {}
    plot = Axes.plot

    def recording_plot(axis, *args, **kwargs):
        lines = plot(axis, *args, **kwargs)
        plotted[kwargs["label"]] = (lines[0].get_color(), lines[0].get_linestyle())
        return lines

    monkeypatch.setattr(Axes, "plot", recording_plot)
    record = {"log_history": [{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.5}]}
    names = ["lora-seed0", "lora-seed1", "lora-seed2", "cc-paper-seed0", "cc-paper-seed2"]
    assert sft_report.plot_curves(dict.fromkeys(names, record), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert len({plotted[name][0] for name in names[:3]}) == 1  # one colour for LoRA's three seeds
    assert plotted["cc-paper-seed0"][0] != plotted["lora-seed0"][0]
    assert [plotted[name][1] for name in names[:3]] == ["-", "--", ":"]
    assert plotted["cc-paper-seed2"][1] == plotted["lora-seed2"][1]


def test_the_report_pairs_items_averages_seeds_and_marks_differences_beyond_two_standard_errors(tmp_path):
    folder = tmp_path / "smollm2"
    records = {
        "base": evaluation({"en": [1, 1], "de": [3.0, 4.0], "zh": [5.0, 6.0]}, {"de": [0, 0], "zh": [0, 1]}),
        # LoRA: every non-English item 1.3 nats better in seed 0, 0.7 in seed 1 (1.0 averaged); XNLI +50 / -50
        # points per item: noise.
        "lora-seed0": evaluation({"en": [0, 0], "de": [1.7, 2.7], "zh": [3.7, 4.7]}, {"de": [1, 0], "zh": [1, 0]}),
        "lora-seed1": evaluation({"en": [0, 0], "de": [2.3, 3.3], "zh": [4.3, 5.3]}, {"de": [1, 0], "zh": [1, 0]}),
        # CC: better than LoRA by 0.5 on item 0, worse by 0.1 on item 1 (seeds averaged: 0.2 and 0.0 apart).
        "cc-paper-seed0-monolingual": evaluation({"de": [1.4, 3.2], "zh": [3.4, 5.2]}, {"de": [1, 1], "zh": [1, 1]}),
        "cc-paper-seed1-monolingual": evaluation({"de": [1.6, 3.0], "zh": [3.6, 5.0]}, {"de": [1, 1], "zh": [1, 1]}),
        # connection off: one more item than the others; seed 0 only: 0.3 (de) and 0.8 (zh) nats above LoRA's seed 0
        "cc-paper-seed0-off": evaluation(
            {"de": [2.0, 3.0, 9.0], "zh": [4.5, 5.5, 9.0]}, {"de": [1, 0, 1], "zh": [0, 0, 1]}
        ),
        # bilingual, seed 0: 0.2 and 0.3 nats below the monolingual connection per item; -0.5 and +0.2 against LoRA
        "cc-paper-seed0-bilingual": evaluation({"de": [1.2, 2.9], "zh": [3.2, 4.9]}, {"de": [1, 1], "zh": [1, 1]}),
    }
    for name, record in records.items():
        (folder / "evaluation").mkdir(parents=True, exist_ok=True)
        (folder / "evaluation" / f"{name}.json").write_text(json.dumps(record))
    log = [{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.5, "cc/choice_entropy": 1.2, "cc/most_chosen_layer": 3}]
    log[1] |= {"cc/layer_frequency/3": 0.6, "cc/layer_frequency/1": 0.4, "cc/transform_r2_heldout": 0.9}
    for name in ("lora-seed0", "cc-paper-seed0", "cc-paper-noen-seed0"):  # cc-paper-noen: trained, not evaluated
        (folder / "adapters" / name).mkdir(parents=True)
        training = {"settings": {"steps": 10}, "log_history": log, "seconds": {"training": 100.0, "total": 120.0}}
        (folder / "adapters" / name / sft_train.RECORD).write_text(json.dumps(training))

    text = sft_report.write_report(folder)
    tables = json.loads((folder / "evaluation" / "report.json").read_text())
    differences = {(r["system"], r["baseline"], r["benchmark"]): r for r in tables["differences"]}
    lora = differences["lora", "base", "MKQA"]
    assert lora["difference"] == pytest.approx(-1.0) and lora["standard_error"] == pytest.approx(0.0)
    assert lora["beyond_2se"] and lora["units"] == 2 and lora["items"] == 4
    xnli = differences["lora", "base", "XNLI"]  # item 0: +100 in de and zh; item 1: 0 in de, -100 in zh
    assert xnli["difference"] == pytest.approx(25.0) and xnli["standard_error"] == pytest.approx(75.0)
    assert not xnli["beyond_2se"]
    cc = differences["cc-paper", "lora", "MKQA"]  # per unit: -0.5 and +0.1 -> mean -0.2, sd 0.4243, s.e. 0.3
    assert cc["difference"] == pytest.approx(-0.2) and cc["standard_error"] == pytest.approx(0.3)
    assert cc["seeds"] == 2 and not cc["beyond_2se"]
    off = differences["cc-paper (off)", "lora", "MKQA"]  # paired on seed 0, the one both have: +0.55 per unit
    assert off["difference"] == pytest.approx(0.55) and off["standard_error"] == pytest.approx(0.0)
    assert off["seeds"] == 1 and off["units"] == 2
    connection = differences["cc-paper", "cc-paper (off)", "MKQA"]  # seed 0 only: -0.85 and -0.05 per unit
    assert connection["difference"] == pytest.approx(-0.45) and connection["standard_error"] == pytest.approx(0.4)
    upper_bound = differences["cc-paper (bilingual)", "cc-paper", "MKQA"]  # paired on seed 0
    assert upper_bound["difference"] == pytest.approx(-0.25) and upper_bound["standard_error"] == pytest.approx(0.05)
    against_lora = differences["cc-paper (bilingual)", "lora", "MKQA"]
    assert against_lora["difference"] == pytest.approx(-0.15) and against_lora["standard_error"] == pytest.approx(0.35)
    assert "Items per language: MKQA 2, XNLI 2 (cc-paper (off): MKQA 3, XNLI 3)." in text
    assert "| train cc-paper-seed0 |" in text and "cc-paper-noen" not in text  # the evaluated adapters' trainings
    per_seed = {(r["system"], r["baseline"], r["seed"], r["benchmark"]): r for r in tables["differences_per_seed"]}
    # seed 0 against LoRA's seed 0: -0.3 and +0.5 per unit; seed 1 against LoRA's seed 1: -0.7 and -0.3
    assert per_seed["cc-paper", "lora", 0, "MKQA"]["difference"] == pytest.approx(0.1)
    assert per_seed["cc-paper", "lora", 0, "MKQA"]["standard_error"] == pytest.approx(0.4)
    assert per_seed["cc-paper", "lora", 1, "MKQA"]["standard_error"] == pytest.approx(0.2)
    assert per_seed["lora", "base", 1, "MKQA"]["difference"] == pytest.approx(-0.7)  # the base model's one record
    assert not any(system == "cc-paper (off)" for system, *_ in per_seed)  # one seed: nothing to tell apart
    assert "| cc-paper | lora | 1 | **−0.500 ± 0.200** |" in text
    across = {(r["system"], r["baseline"], r["benchmark"]): r for r in tables["differences_across_seeds"]}
    # LoRA against base: -1.3 and -0.7 per seed, so ± 0.3 across seeds where the items alone said ± 0.000
    assert across["lora", "base", "MKQA"]["difference"] == pytest.approx(-1.0)
    assert across["lora", "base", "MKQA"]["standard_error"] == pytest.approx(0.3)
    assert across["lora", "base", "MKQA"]["beyond_2se"] and across["lora", "base", "MKQA"]["seeds"] == 2
    # CC against LoRA: +0.1 and -0.5, seeds of opposite sign are never beyond 2 standard errors
    assert across["cc-paper", "lora", "MKQA"]["difference"] == pytest.approx(-0.2)
    assert across["cc-paper", "lora", "MKQA"]["standard_error"] == pytest.approx(0.3)
    assert not across["cc-paper", "lora", "MKQA"]["beyond_2se"]
    assert not any(system == "cc-paper (off)" for system, *_ in across)
    assert "| lora | base | 2 | **−1.000 ± 0.300** |" in text
    levels = {(r["variant"], r["benchmark"]): r for r in tables["levels"]}
    assert levels["base", "MKQA"]["mean"] == pytest.approx(4.5) and levels["base", "MKQA"][
        "standard_error"
    ] == pytest.approx(0.5)
    english = {(r["variant"], r["benchmark"]): r for r in tables["levels_english"]}
    assert english["lora", "MKQA"]["mean"] == 0.0
    assert "| lora | base | 2 | **−1.000 ± 0.000** | +25.000 ± 75.000 |" in text
    assert "layer 3 (60% of rows), entropy 1.20 nats; Transform Matrix held-out R² 0.900" in text
    assert "| **total** | **" in text and (folder / "evaluation" / "report.md").read_text() == text


def test_the_figure_shows_each_seed_and_the_mean_over_seeds_of_the_stored_reports(tmp_path):
    report = json.loads((sft_figure.RESULTS / "multilingual_sft_smollm2_run1" / "report.json").read_text())
    per_seed, across = sft_figure.comparison_points(report, "MKQA", ("cc-paper", "lora"))
    assert [row["seed"] for row in per_seed] == [0, 1, 2]
    assert [round(row["difference"], 3) for row in per_seed] == [0.068, 0.072, 0.202]  # the README's figures
    assert across["seeds"] == 3 and across["difference"] == pytest.approx(0.114, abs=5e-4)
    assert sft_figure.comparison_points(report, "MKQA", ("cc-paper", "nothing")) == ([], None)
    sft_figure.main(["--output", str(tmp_path / "figure.png")])  # the two models' stored reports
    assert (tmp_path / "figure.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no per-seed MMMLU rows"):
        sft_figure.main(["--output", str(tmp_path / "none.png"), "--benchmark", "MMMLU"])


def test_a_single_chosen_layer_reads_as_zero_entropy():
    choice = {"most_chosen_layer": 14, "layer_frequency": {"14": 1.0}, "choice_entropy": -0.0}
    assert sft_report.describe_choice(choice) == "layer 14 (100% of rows), entropy 0.00 nats"


# ------------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@needs_data
def test_the_experiment_runs_end_to_end_and_resumes(smollm2_id, tmp_path, capsys):
    argv = ["all", "--output-dir", str(tmp_path), "--systems", "cc-paper", "--seeds", "0", "--bilingual-seeds", ""]
    argv += ["--steps", "2", "--batch-size", "2", "--max-length", "160", "--transform-pairs", "4"]
    argv += ["--logging-steps", "1", "--train-benchmarks", "MKQA,XNLI", "--languages-per-benchmark", "1"]
    argv += ["--loglik-items", "MKQA=2,XNLI=2", "--generation-items", "MKQA=1", "--secondary-loglik-items", ""]
    experiment.main(argv)

    folder = tmp_path / "smollm2"
    names = sorted(path.stem for path in (folder / "evaluation").glob("*.json"))
    assert names == ["cc-paper-seed0-monolingual", "cc-paper-seed0-off", "report"]
    record = json.loads((folder / "evaluation" / "cc-paper-seed0-monolingual.json").read_text())
    assert record["settings"]["connection"] == "monolingual"
    assert {benchmark: sorted(languages) for benchmark, languages in record["items"].items()} == {
        "MKQA": ["en", "zh"],
        "XNLI": ["en", "zh"],
    }
    mkqa = record["items"]["MKQA"]["zh"]
    assert sorted(mkqa) == ["0", "1"] and sorted(mkqa["0"]) == ["accuracy", "answer_nll", "exact_match", "f1"]
    assert list(mkqa["1"]) == ["answer_nll"] and mkqa["1"]["answer_nll"] > 0  # not generated: its NLL only
    assert record["items"]["XNLI"]["zh"]["0"]["acc"] in (0.0, 1.0)
    assert isinstance(record["outputs"]["MKQA"]["zh"]["0"], str) and "1" not in record["outputs"]["MKQA"]["zh"]
    training = json.loads((folder / "adapters" / "cc-paper-seed0" / sft_train.RECORD).read_text())
    assert [entry["step"] for entry in training["log_history"] if "loss" in entry] == [1, 2]
    assert training["mixture"] == {"MKQA": training["mixture"]["MKQA"], "XNLI": training["mixture"]["XNLI"]}
    report = (folder / "evaluation" / "report.md").read_text()
    assert "| cc-paper | cc-paper (off) | 1 |" in report

    finished = {path: path.stat().st_mtime_ns for path in folder.rglob("*.json") if not path.name.startswith("report")}
    capsys.readouterr()
    experiment.main(argv)  # everything has finished: nothing runs again
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    output = capsys.readouterr().out
    assert output.count("trained already") == 1 and output.count("evaluated already") == 2


# ------------------------------------------------------------------------------------------------- sizing


def test_sizing_extrapolates_the_pooled_sd_from_the_correlation_between_languages():
    baseline = {(language, index): 0.0 for language in ("de", "zh", "en") for index in range(4)}
    uncorrelated = {("de", i): d for i, d in enumerate([1, -1, 1, -1])} | {
        ("zh", i): d for i, d in enumerate([1, -1, -1, 1])
    }
    row = sft_plan.pooled_sd(uncorrelated | {("en", i): 5.0 for i in range(4)}, baseline, 4, assumed_correlation=0.9)
    assert row["measured"] and row["measured_languages"] == 2 and row["items"] == 4
    assert row["sd_one_language"] == pytest.approx(math.sqrt(4 / 3)) and row["correlation"] == pytest.approx(0.0)
    assert row["sd"] == pytest.approx(math.sqrt(4 / 3) / 2)  # four independent languages halve it
    same = {("de", i): d for i, d in enumerate([1, -1, 1, -1])} | {("zh", i): d for i, d in enumerate([1, -1, 1, -1])}
    assert sft_plan.pooled_sd(same, baseline, 4, 0.0)["correlation"] == pytest.approx(1.0)
    one = sft_plan.pooled_sd(
        {("de", i): d for i, d in enumerate([1, -1, 1, -1])}, baseline, 4, assumed_correlation=0.5
    )
    assert not one["measured"] and one["sd"] == pytest.approx(math.sqrt(4 / 3) * math.sqrt(2.5 / 4))
    assert sft_plan.items_needed(0.25, "answer_nll") == 100  # (2 × 0.25 / 0.05)²
    assert sft_plan.items_needed(30.0, "acc") == 225  # (2 × 30 / 4)²


def test_the_earlier_run_is_sized_from_the_records_in_the_experiment_folder():
    rows = {(row["comparison"], row["benchmark"]): row for row in sft_plan.earlier_sizing()}
    mkqa = rows["lora − base", "MKQA"]  # the README's sizing table
    assert (mkqa["measured_languages"], mkqa["items"], mkqa["items_needed"]) == (2, 16, 688)
    assert mkqa["sd_one_language"] == pytest.approx(0.964, abs=5e-4) and mkqa["sd"] == pytest.approx(0.655, abs=5e-4)
    xnli = rows["cc-paper − lora", "XNLI"]
    assert not xnli["measured"] and xnli["items_needed"] == 235
    assert sft_plan.EARLIER_RUN == experiment.PILOT_RATES.parent == experiment.EXPERIMENT_DIR / "results"
    assert {"smollm2", "gemma3"} <= set(json.loads(experiment.PILOT_RATES.read_text()))


def test_the_plan_multiplies_the_rates_by_the_token_counts_and_sizes(tmp_path, smollm2_tokenizer):
    root = tiny_root(tmp_path)
    args = experiment.parse_args(
        ["plan", "--data-root", root, "--systems", "base,lora", "--seeds", "0", "--languages-per-benchmark", "1"]
        + ["--loglik-items", "MKQA=5,XNLI=4", "--generation-items", "MKQA=2", "--steps", "10"]
    )
    rates = {
        "token": 0.01,
        "decode": 0.1,
        "connection": {"none": 1.0, "monolingual": 2.0},
        "step": {"lora": 3.0},
        "fixed": {"lora": 20.0},
        "loading": 10.0,
    }
    settings = experiment.evaluation_settings(args)
    parts = sft_evaluate.evaluation_parts(settings, args.sizes)
    tokens = [sft_plan.prompt_tokens(smollm2_tokenizer, root, part) for part in parts]
    # The chat-templated prompt (SmolLM2's system prompt included) and, for MKQA, the answer.
    messages = [{"role": "user", "content": "de MKQA #2"}]
    prompt = smollm2_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert 30 < len(prompt["input_ids"] if hasattr(prompt, "keys") else prompt) < tokens[1]
    expected = 10 + 2 * 2 * (2 * tokens[0] * 0.01 + 40 * 0.1) + 3 * 2 * 1 * tokens[1] * 0.01 + 4 * 2 * tokens[2] * 0.01

    def count(part):
        return sft_plan.prompt_tokens(smollm2_tokenizer, root, part)

    seconds = sft_plan.evaluation_seconds(settings, args.sizes, None, rates, count)
    assert seconds == pytest.approx(expected)
    mono = sft_plan.evaluation_seconds(settings, args.sizes, "monolingual", rates, count)
    assert mono - 10 == pytest.approx(2 * (expected - 10) - 2 * 2 * 40 * 0.1)  # forwards doubled, decoding not
    table = experiment.plan(args, rates)
    given = ["--data-root", root, "--steps", "10", "--languages-per-benchmark", "1", "--loglik-items", "MKQA=5,XNLI=4"]
    flags = shlex.join([*given, "--generation-items", "MKQA=2"])  # those of `args` but its schedule's
    script = "python benchmarks/multilingual_sft/multilingual_sft.py"
    assert f"| `{script} evaluate --model smollm2 --system base {flags}` | {expected:.0f} |" in table
    assert f"| `{script} train --model smollm2 --system lora --seed 0 {flags}` | 50 |" in table
    assert f"| total | {2 * expected + 50:.0f} " in table
    with pytest.raises(ValueError, match="no training rate for lora"):
        experiment.plan(args, rates | {"step": {}})


def test_plan_refuses_a_pilot_folder_without_finished_runs():
    """`plan --pilot-dir` given a folder of stored records (or a wrong path) says what to give, not an empty table."""
    records = experiment.EXPERIMENT_DIR / "results" / "multilingual_sft_smollm2_run1"
    with pytest.raises(SystemExit, match="holds no finished training .* give a pilot's model folder"):
        experiment.main(["plan", "--pilot-dir", str(records)])
