"""The offline stand-ins of tests/fixtures/offline_hub.py: Bactrian-X loads with the recipe's loading call and joins
across languages by `id`; the copies of lm-eval's datasets have the Hub configurations and schemas; the task YAMLs keep
the installed tasks' configuration; and lm-eval's command line runs them offline on a tiny random model, writing
per-item samples."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from datasets import ClassLabel, load_dataset
from fixtures.offline_hub import (
    BACTRIAN_X_COLUMNS,
    BACTRIAN_X_EMPTY_OUTPUTS,
    FIXTURE_LANGUAGES,
    RECIPE_TASKS_DIR,
    bactrian_x_ids,
    bactrian_x_parquet_export_files,
    bactrian_x_rows,
    load_bactrian_x,
    write_bactrian_x,
    write_bactrian_x_parquet_export,
    write_offline_lm_eval,
)

ROWS = 40


@pytest.fixture(scope="module")
def bactrian_root(tmp_path_factory) -> Path:
    return write_bactrian_x(tmp_path_factory.mktemp("hub"), rows=ROWS)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Offline copies of XNLI, XStoryCloze, XQuAD and Global-MMLU in the fixture languages, 4 rows per language."""
    pytest.importorskip("lm_eval")
    return write_offline_lm_eval(tmp_path_factory.mktemp("lm_eval"), rows_per_language=4)


def test_bactrian_x_layout_is_the_hubs(bactrian_root):
    assert sorted(path.name for path in bactrian_root.iterdir()) == ["Bactrian-X.py", "README.md", "data"]
    assert sorted(path.name for path in (bactrian_root / "data").iterdir()) == sorted(
        f"{language}.json.gz" for language in FIXTURE_LANGUAGES
    )
    card = (bactrian_root / "README.md").read_text(encoding="utf-8")
    assert "license: cc-by-nc-4.0" in card and "configs:" not in card


def test_bactrian_x_loads_with_the_recipes_call_and_joins_by_id(bactrian_root, tmp_path):
    tables = {
        language: load_bactrian_x(bactrian_root, language, cache_dir=str(tmp_path)) for language in FIXTURE_LANGUAGES
    }
    for language, table in tables.items():
        assert table.column_names == list(BACTRIAN_X_COLUMNS)
        assert {feature.dtype for feature in table.features.values()} == {"string"}
        assert table.num_rows == ROWS and len(set(table["id"])) == ROWS
        assert table.to_list() == bactrian_x_rows(language, ROWS)
    english = {row["id"]: row for row in tables["en"]}
    assert set(english) == set(bactrian_x_ids(ROWS))
    for language, table in tables.items():
        assert set(table["id"]) == set(english)  # one to one
        if language != "en":
            assert table["id"] != tables["en"]["id"]  # a positional join would pair the wrong rows
            pairs = [(row, english[row["id"]]) for row in table]
            assert all(bool(row["input"]) == bool(source["input"]) for row, source in pairs)
            assert all(row["instruction"] != source["instruction"] for row, source in pairs)
    assert sum(bool(row["input"]) for row in tables["de"]) == 2 * ROWS // 5  # 40% have an input, as on the Hub
    empty = {(language, row["id"]) for language, table in tables.items() for row in table if not row["output"]}
    assert empty == set(BACTRIAN_X_EMPTY_OUTPUTS)


def test_bactrian_x_by_name_is_refused_as_on_the_hub(bactrian_root, tmp_path):
    """A repository with a loading script: datasets >= 4 refuses `load_dataset(<repo>, <lang>)`, as for the Hub's."""
    with pytest.raises(RuntimeError, match="Dataset scripts are no longer supported"):
        load_dataset(str(bactrian_root), "de", split="train", cache_dir=str(tmp_path))


def test_bactrian_x_parquet_export_holds_the_same_rows(tmp_path):
    root = write_bactrian_x_parquet_export(tmp_path / "hub", languages=("en", "zh"), rows=ROWS)
    assert (root / "zh" / "train" / "0000.parquet").is_file()
    table = load_dataset(
        "parquet", data_files=bactrian_x_parquet_export_files(root, "zh"), split="train", cache_dir=str(tmp_path)
    )
    assert table.to_list() == bactrian_x_rows("zh", ROWS)


def test_dataset_copies_have_the_hub_configurations_splits_and_features(offline, tmp_path):
    def load(family: str, config: str):
        return load_dataset(str(offline.dataset_dirs[family]), config, cache_dir=str(tmp_path))

    xnli = load("xnli", "de")
    assert sorted(xnli) == ["test", "train", "validation"] and xnli["validation"].num_rows == 4
    assert xnli["validation"].features["label"] == ClassLabel(names=["entailment", "neutral", "contradiction"])
    story = load("xstorycloze", "ru")
    assert sorted(story) == ["eval", "train"]
    assert story["eval"].column_names[-3:] == ["sentence_quiz1", "sentence_quiz2", "answer_right_ending"]
    xquad = load("xquad", "xquad.de")["validation"]
    for row in xquad:
        start, text = row["answers"]["answer_start"][0], row["answers"]["text"][0]
        assert row["context"][start : start + len(text)] == text
    assert load("xquad", "xquad.zh")["validation"]["id"] == xquad["id"]  # parallel across languages
    mmlu = load("global_mmlu_full", "ru")
    assert sorted(mmlu) == ["dev", "test"] and len(set(mmlu["test"]["subject"])) == 57
    assert set(mmlu["test"]["answer"]) <= set("ABCD")


def test_task_yamls_keep_the_installed_configuration_and_change_only_the_data(offline):
    from lm_eval.tasks._yaml_loader import load_yaml

    installed_tasks = Path(sys.modules["lm_eval.tasks"].__file__).parent
    expected_tasks = {
        "xnli": "xnli_{}",
        "xstorycloze": "xstorycloze_{}",
        "xquad": "xquad_{}",
        "global_mmlu_full": "global_mmlu_full_{}_anatomy",
    }
    for family, pattern in expected_tasks.items():
        assert pattern.format("ru") in offline.tasks[family]
    assert len(offline.tasks["global_mmlu_full"]) == 57 * len(FIXTURE_LANGUAGES)
    assert "xstorycloze_de" not in offline.tasks["xstorycloze"]  # XStoryCloze has no German
    assert "xquad_gold_nll_ru" in offline.tasks["xquad"]  # the recipe's gold-answer tasks over the same copy
    cases = {
        "xnli/xnli_de": installed_tasks / "xnli" / "xnli_de.yaml",
        "xstorycloze/xstorycloze_ru": installed_tasks / "xstorycloze" / "default_ru.yaml",
        "global_mmlu_full/global_mmlu_full_de_anatomy": installed_tasks
        / "global_mmlu/full/de/global_mmlu_full_de_anatomy.yaml",
        "xquad/xquad_de": installed_tasks / "xquad" / "xquad_de.yaml",
    }
    for copy, installed in cases.items():
        family = copy.split("/")[0]
        ours = load_yaml(offline.task_dir / f"{copy}.yaml", resolve_func=False)
        theirs = load_yaml(installed, resolve_func=False)
        assert ours.pop("dataset_path") == str(offline.dataset_dirs[family])
        assert theirs.pop("dataset_path") != str(offline.dataset_dirs[family])
        if family == "xquad":  # the scoring function only: the installed one needs transformers 4
            assert ours.pop("process_results").endswith("ab_8b_qlora/tasks/xquad_metrics.process_results_qa")
            assert theirs.pop("process_results").endswith("xquad/utils.process_results_qa")
        assert ours == theirs
    group = load_yaml(offline.task_dir / "xnli" / "_xnli.yaml", resolve_func=False)
    assert group["group"] == "xnli" and group["task"] == offline.tasks["xnli"]


def test_xquad_metrics_are_squad_exact_match_and_f1():
    sys.path.insert(0, str(RECIPE_TASKS_DIR))
    try:
        import xquad_metrics
    finally:
        sys.path.pop(0)
    doc = {"answers": {"text": ["Die Bibliothek öffnet um neun Uhr."], "answer_start": [0]}}
    assert xquad_metrics.process_results_qa(doc, ["die bibliothek öffnet um neun uhr"]) == {
        "f1": 1.0,
        "exact_match": 1,
    }
    result = xquad_metrics.process_results_qa(doc, [" Bibliothek öffnet um neun"])
    assert result["exact_match"] == 0 and result["f1"] == pytest.approx(0.8)  # precision 1, recall 4/6
    assert xquad_metrics.exact_match("The cat.", "cat") == 1  # English articles and punctuation dropped
    assert xquad_metrics.token_f1("cat", "") == 0 and xquad_metrics.token_f1("", "") == 1
