"""Paired, item-by-item comparison of two lm-evaluation-harness runs of the same tasks (`peft-cc compare`).

A run is what `lm_eval --output_path DIR --log_samples` writes: `DIR/<model_name_sanitized>/results_<timestamp>.json`
(aggregate scores, `group_subtasks`, `higher_is_better`, the task configurations) and, next to it, one
`samples_<task>_<timestamp>.jsonl` per task: a line per document and filter with the document's `doc_id` and
`doc_hash`, the `filter`, the names of its `metrics` and each metric's value under its name. A metric is identified
as lm-eval names it in the results, `metric,filter` (e.g. `acc,none`, `exact_match,strict-match`).
:func:`read_run` reads such a run (the folder, its model subfolder or the results file) into per-task, per-metric
`{doc_id: (doc_hash, value)}`; :func:`compare_runs` pairs two runs on every task and metric they share and computes
the statistics. This module reads JSON only (the standard library): it imports neither lm-eval nor torch.

Statistics (B − A, per item):

- A task (one language): the mean of the per-item differences B − A over the `n` paired documents, with the ordinary
  paired standard error, the sample standard deviation of the differences / √n. Every item is scored by both
  systems, so the item-to-item spread of difficulty cancels: this is far smaller than either run's own standard
  error would suggest.
- A group (`group_subtasks`: e.g. `xnli` over `xnli_de`, `xnli_fr`, ...), or a benchmark's per-language tasks run
  without their group (`xnli_de`, `xnli_fr` given as tasks: a pooled row `xnli_*`): the mean difference over all paired
  items of its subtasks (nested groups included), and a standard error that treats each `doc_id` as one unit: the
  differences of one `doc_id` in all the subtasks are averaged first, then the sample standard deviation of these
  unit means / √(number of doc_ids). Multilingual benchmarks are parallel (doc_id i is the same item translated),
  so the differences of one item in several languages are correlated and are not independent observations; an
  ordinary standard error over all items would be too small. Clustering by doc_id is valid either way: where the
  subtasks are unrelated (doc_id i of one subject and of another), it only costs some precision.
- A difference "beyond two standard errors" (|B − A| > 2 SE) is unlikely to be item noise (about 5 % of the time
  when the systems are equally good). With fewer than two units there is no standard error (`None`).

Direction: `higher_is_better` of the results file (per task and metric, e.g. `False` for `answer_nll`) says whether
B − A > 0 means B is better; `None` where the run does not say.

Languages: where tasks are per-language (the task children of a group, or tasks run without a group that share a
name stem, named `<common prefix>_<language code>`: `xnli_de`, `peft_cc_xnli_ru`, `belebele_deu_Latn`), each gets
its language code (:func:`task_languages`); other tasks get none.

Metrics whose per-item values are not numbers (corpus-level metrics such as BLEU log a tuple per item) cannot be
paired item by item: they are skipped with a note. Input that cannot be compared (no sample logs, no shared task,
different documents, a metric on one side only) raises :class:`ComparisonError`, whose message says what differs and
how to fix it.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ItemScores = dict[int, tuple[str, Any]]
"""`{doc_id: (doc_hash, value)}`: one metric of one task, as the sample log has it (the value as logged)."""

LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(?:[_-][A-Za-z]{2,4})?")
"""A language code as task names end in it: `de`, `ara`, `zh-cn`, `deu_Latn`."""

RUN_HELP = (
    "give lm-eval's --output_path folder, its model subfolder or a results_<timestamp>.json file, of a run made "
    "with `lm_eval ... --output_path DIR --log_samples`"
)


class ComparisonError(ValueError):
    """Two runs that cannot be compared, or a run that cannot be read; the message says why and how to fix it."""


@dataclass(frozen=True)
class Run:
    """One lm-eval run, as :func:`read_run` reads it.

    Attributes:
        results_file: the `results_<timestamp>.json` file.
        model_name: the evaluated model as lm-eval named it (`model_name`), if it did.
        limit: the run's `--limit` (`config.limit`), None if none or not recorded.
        documents: `{task: {doc_id: doc_hash}}`, every document of every task's sample log.
        scores: `{task: {metric key "metric,filter": {doc_id: (doc_hash, value)}}}`, in the sample log's order.
        group_subtasks: `{group: [its subtasks and subgroups]}` of the results file.
        higher_is_better: `{task or group: {metric (without filter): True, False or None}}` of the results file.
    """

    results_file: Path
    model_name: str | None
    limit: int | float | None
    documents: dict[str, dict[int, str]]
    scores: dict[str, dict[str, ItemScores]]
    group_subtasks: dict[str, list[str]]
    higher_is_better: dict[str, dict[str, bool | None]]


@dataclass(frozen=True)
class PairedStatistics:
    """The paired comparison of B against A over some items (:func:`paired_statistics`).

    Attributes:
        mean_a, mean_b: each run's mean over the paired items (the metric's unit).
        difference: the mean of the per-item differences B − A (= mean_b − mean_a).
        standard_error: the standard error of `difference`, units as independent observations; None with fewer
            than 2 units.
        items: the number of paired items.
        units: the number of independent units (items for a task, doc_ids for a group).
    """

    mean_a: float
    mean_b: float
    difference: float
    standard_error: float | None
    items: int
    units: int

    @property
    def beyond_two_standard_errors(self) -> bool:
        """Whether |B − A| > 2 standard errors (False without a standard error)."""
        return self.standard_error is not None and abs(self.difference) > 2 * self.standard_error


@dataclass(frozen=True)
class Row:
    """One compared task or group and metric.

    Attributes:
        kind: `"task"` or `"group"`.
        name: the task's or group's name.
        language: the task's language code (:func:`task_languages`), None for a group or a task not per-language.
        metric: lm-eval's metric key, `metric,filter`.
        higher_is_better: whether B − A > 0 means B is better; None if the runs do not say.
        statistics: the paired statistics.
        subtasks: a group row's pooled tasks (its leaf tasks that both runs have); empty for a task row.
    """

    kind: Literal["task", "group"]
    name: str
    language: str | None
    metric: str
    higher_is_better: bool | None
    statistics: PairedStatistics
    subtasks: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The row as plain JSON values: its attributes, `metric` split into `metric_name` and `filter`, the
        statistics flattened and `beyond_2se`."""
        metric_name, filter_name = split_metric_key(self.metric)
        numbers = self.statistics
        return {
            "kind": self.kind,
            "name": self.name,
            "language": self.language,
            "metric": self.metric,
            "metric_name": metric_name,
            "filter": filter_name,
            "higher_is_better": self.higher_is_better,
            "mean_a": numbers.mean_a,
            "mean_b": numbers.mean_b,
            "difference": numbers.difference,
            "standard_error": numbers.standard_error,
            "items": numbers.items,
            "units": numbers.units,
            "beyond_2se": numbers.beyond_two_standard_errors,
            "subtasks": list(self.subtasks),
        }


@dataclass(frozen=True)
class Comparison:
    """Two runs compared (:func:`compare_runs`).

    Attributes:
        run_a, run_b: the runs.
        rows: the task rows (tasks by name, metrics in the sample log's order), then the group rows.
        groups: `{group: [its subtasks and subgroups that have rows or compared tasks]}`, the groups both runs have.
        notes: one line each on what was not compared (a task of one run only, a metric that cannot be paired).
    """

    run_a: Run
    run_b: Run
    rows: list[Row]
    groups: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The comparison as plain JSON values: `run_a`/`run_b` (results file, model name), `rows`
        (:meth:`Row.to_dict`), `groups` and `notes`."""

        def describe(run: Run) -> dict[str, Any]:
            return {"results_file": str(run.results_file), "model_name": run.model_name, "limit": run.limit}

        return {
            "run_a": describe(self.run_a),
            "run_b": describe(self.run_b),
            "rows": [row.to_dict() for row in self.rows],
            "groups": self.groups,
            "notes": self.notes,
        }


def split_metric_key(key: str) -> tuple[str, str]:
    """`(metric, filter)` of lm-eval's metric key `metric,filter` (`"acc,none"` -> `("acc", "none")`)."""
    metric, _, filter_name = key.partition(",")
    return metric, filter_name or "none"


def metric_label(key: str) -> str:
    """The metric key as shown to a reader: the metric alone where its filter is `none`, else `metric,filter`."""
    metric, filter_name = split_metric_key(key)
    return metric if filter_name == "none" else f"{metric},{filter_name}"


def find_results_file(run: str | os.PathLike[str]) -> Path:
    """The `results_<timestamp>.json` of `run`: that file itself, or the one results file in the folder `run` or in
    its subfolders (lm-eval's `--output_path` folder holds one subfolder per model).

    Raises:
        ComparisonError: `run` does not exist, holds no results file, or holds several (several runs).
    """
    path = Path(run)
    if path.is_file():
        if path.suffix != ".json":
            raise ComparisonError(f"{path} is not an lm-eval results file (results_<timestamp>.json): {RUN_HELP}.")
        return path
    if not path.is_dir():
        raise ComparisonError(f"{path} does not exist: {RUN_HELP}.")
    found = sorted(path.glob("results_*.json")) + sorted(path.glob("*/results_*.json"))
    if not found:
        raise ComparisonError(
            f"{path} holds no lm-eval results file (results_<timestamp>.json), nor do its subfolders: {RUN_HELP}."
        )
    if len(found) > 1:
        listed = "; ".join(str(file) for file in found)
        raise ComparisonError(
            f"{path} holds {len(found)} lm-eval runs: {listed}. Pass the results file of the run to compare as RUN."
        )
    return found[0]


def samples_file(results_file: Path, task: str) -> Path:
    """Where lm-eval writes the sample log of `task` for `results_file`: `samples_<task>_<timestamp>.jsonl`, next to
    it, with the timestamp of its name (what follows its last `_`)."""
    timestamp = results_file.stem[results_file.stem.rfind("_") + 1 :]
    return results_file.parent / f"samples_{task}_{timestamp}.jsonl"


def read_samples(path: Path) -> tuple[dict[int, str], dict[str, ItemScores]]:
    """The sample log `path` of one task.

    Returns:
        `({doc_id: doc_hash}, {metric key "metric,filter": {doc_id: (doc_hash, value)}})`, the values as logged
        (a number, or e.g. a list for a corpus-level metric).

    Raises:
        ComparisonError: a line that is not JSON or lacks lm-eval's fields.
    """
    documents: dict[int, str] = {}
    scores: dict[str, ItemScores] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
                doc_id, doc_hash = int(sample["doc_id"]), str(sample["doc_hash"])
                for metric in sample["metrics"]:
                    scores.setdefault(f"{metric},{sample['filter']}", {})[doc_id] = (doc_hash, sample[metric])
            except (ValueError, KeyError, TypeError) as error:
                raise ComparisonError(
                    f"Line {number} of {path} is not an lm-eval sample ({error!r}): each line must be a JSON object "
                    "with doc_id, doc_hash, filter, metrics and each metric's value, as lm-eval >= 0.4 writes them."
                ) from error
            documents[doc_id] = doc_hash
    return documents, scores


def read_run(run: str | os.PathLike[str]) -> Run:
    """The run `run` (lm-eval's `--output_path` folder, its model subfolder or a `results_<timestamp>.json` file)
    with the sample logs of all its tasks.

    Raises:
        ComparisonError: no single results file (:func:`find_results_file`), a file that is not lm-eval's, or
            tasks without a sample log (a run without `--log_samples`).
    """
    results_file = find_results_file(run)
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
        tasks = list(results["configs"])
    except (ValueError, KeyError, TypeError) as error:
        raise ComparisonError(
            f"{results_file} is not an lm-eval results file ({error!r}): it must be the JSON that lm-eval writes "
            f"with its task configurations ('configs'); {RUN_HELP}."
        ) from error
    missing = [task for task in tasks if not samples_file(results_file, task).is_file()]
    if missing:
        expected = samples_file(results_file, missing[0]).name
        scope = "any of its tasks" if len(missing) == len(tasks) else f"the tasks {', '.join(missing)}"
        raise ComparisonError(
            f"{results_file} has no sample log for {scope} (e.g. {expected} next to it): lm-eval wrote the aggregate "
            "scores only. Rerun lm-eval with --log_samples (and --output_path), which writes each document's scores."
        )
    documents: dict[str, dict[int, str]] = {}
    scores: dict[str, dict[str, ItemScores]] = {}
    for task in tasks:
        documents[task], scores[task] = read_samples(samples_file(results_file, task))
    config = results.get("config") or {}
    return Run(
        results_file=results_file,
        model_name=results.get("model_name"),
        limit=config.get("limit"),
        documents=documents,
        scores=scores,
        group_subtasks={group: list(children) for group, children in (results.get("group_subtasks") or {}).items()},
        higher_is_better=results.get("higher_is_better") or {},
    )


def is_number(value: Any) -> bool:
    """Whether a logged per-item value is a number (booleans count: True is 1) and so can be paired."""
    return isinstance(value, int | float)


def paired_items(items_a: ItemScores, items_b: ItemScores) -> list[tuple[int, float, float]]:
    """`[(doc_id, score in A, score in B)]` of the documents that both scored, by doc_id: one metric of one task
    paired item by item (the values numbers, :func:`is_number`; the documents checked by
    :func:`check_same_documents`)."""
    return [(doc_id, items_a[doc_id][1], items_b[doc_id][1]) for doc_id in sorted(items_a.keys() & items_b.keys())]


def paired_statistics(
    scores_a: Sequence[float], scores_b: Sequence[float], units: Sequence[Hashable] | None = None
) -> PairedStatistics:
    """The paired comparison of B against A over items scored by both: `scores_a[i]` and `scores_b[i]` are the
    runs' scores of item i.

    Args:
        units: per item, the independent unit it belongs to (a group's doc_id); items of one unit have their
            differences averaged before the standard error. Default: every item its own unit (the ordinary paired
            standard error, sample standard deviation of the differences / √n).

    Returns:
        The means of A and B, the mean difference B − A, its standard error (sample standard deviation of the
        per-unit mean differences / √units; None with fewer than 2 units), the numbers of items and units.

    Raises:
        ValueError: no item, or sequences of different lengths.
    """
    if not scores_a or len(scores_a) != len(scores_b) or (units is not None and len(units) != len(scores_a)):
        raise ValueError("paired_statistics needs the same, positive number of scores from both runs (and units).")
    differences = [b - a for a, b in zip(scores_a, scores_b)]
    by_unit: dict[Hashable, list[float]] = {}
    for unit, difference in zip(range(len(differences)) if units is None else units, differences):
        by_unit.setdefault(unit, []).append(difference)
    unit_differences = [statistics.fmean(values) for values in by_unit.values()]
    standard_error = None
    if len(unit_differences) >= 2:
        standard_error = statistics.stdev(unit_differences) / math.sqrt(len(unit_differences))
    return PairedStatistics(
        mean_a=statistics.fmean(scores_a),
        mean_b=statistics.fmean(scores_b),
        difference=statistics.fmean(differences),
        standard_error=standard_error,
        items=len(differences),
        units=len(unit_differences),
    )


def leaf_tasks(name: str, group_subtasks: Mapping[str, Sequence[str]]) -> list[str]:
    """The tasks under `name`: itself if it is not a group, else its subtasks', subgroups' included, in order and
    each once."""
    if name not in group_subtasks:
        return [name]
    found: list[str] = []
    for child in group_subtasks[name]:
        found.extend(task for task in leaf_tasks(child, group_subtasks) if task not in found)
    return found


def task_languages(tasks: Iterable[str], group_subtasks: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """The language code of each per-language task of `tasks`.

    Tasks are per-language in families: the tasks that are direct children of one group, and the tasks of no group
    that share their name up to the last `_`. A family of two or more tasks is per-language if their names, after
    their longest common prefix that ends in `_`, are all language codes (:data:`LANGUAGE_CODE`: `de`, `deu_Latn`);
    a group's only task is if its name is the group's name, `_`, a language code.

    Returns:
        `{task: language code}` for the per-language tasks only.
    """
    tasks = list(tasks)
    grouped = {child for children in group_subtasks.values() for child in children}
    families: list[tuple[list[str], str | None]] = [
        ([child for child in children if child in tasks], group) for group, children in group_subtasks.items()
    ]
    stems: dict[str, list[str]] = {}
    for task in tasks:
        if task not in grouped:
            stems.setdefault(task.rpartition("_")[0], []).append(task)
    families.extend((family, None) for family in stems.values())
    languages: dict[str, str] = {}
    for family, group in families:
        if len(family) >= 2:
            common = os.path.commonprefix(family)
            prefix = common[: common.rfind("_") + 1]
        elif family and group is not None:
            prefix = f"{group}_"
        else:
            continue
        suffixes = [task[len(prefix) :] for task in family]
        if prefix and all(
            task.startswith(prefix) and LANGUAGE_CODE.fullmatch(suffix) for task, suffix in zip(family, suffixes)
        ):
            languages.update(zip(family, suffixes))
    return languages


def _doc_ids_text(doc_ids: Iterable[int], shown: int = 5) -> str:
    """`3, 7, 9, ...`: the first `shown` of `doc_ids`, sorted."""
    ordered = sorted(doc_ids)
    return ", ".join(str(doc_id) for doc_id in ordered[:shown]) + (", ..." if len(ordered) > shown else "")


def _limit_text(limit: int | float | None) -> str:
    return "no --limit" if limit is None else f"--limit {limit}"


def check_same_documents(task: str, run_a: Run, run_b: Run) -> None:
    """Check that both runs scored the same documents of `task`: the same doc_ids, with the same doc_hash.

    Raises:
        ComparisonError: saying how many documents each run has (and which doc_ids only one has), or the first
            doc_id whose document differs.
    """
    documents_a, documents_b = run_a.documents[task], run_b.documents[task]
    if documents_a.keys() != documents_b.keys():
        only_a, only_b = documents_a.keys() - documents_b.keys(), documents_b.keys() - documents_a.keys()
        differences = []
        if only_a:
            differences.append(f"doc_ids only in A: {_doc_ids_text(only_a)}")
        if only_b:
            differences.append(f"doc_ids only in B: {_doc_ids_text(only_b)}")
        raise ComparisonError(
            f"Task {task} was evaluated on different documents: run A has {len(documents_a)} items, run B has "
            f"{len(documents_b)} ({'; '.join(differences)}); run A was made with {_limit_text(run_a.limit)}, run B "
            f"with {_limit_text(run_b.limit)}. Evaluate both with the same --limit (or none) and the same --samples, "
            "so that they score the same items."
        )
    differing = sorted(doc_id for doc_id, doc_hash in documents_a.items() if documents_b[doc_id] != doc_hash)
    if differing:
        first = differing[0]
        raise ComparisonError(
            f"Task {task}: doc_id {first} is a different document in the two runs (doc_hash "
            f"{documents_a[first][:12]}... in A, {documents_b[first][:12]}... in B; {len(differing)} of "
            f"{len(documents_a)} documents differ). The task's dataset or its processing changed between the runs "
            "(task version, dataset revision, lm-eval version or --limit/--samples selection): evaluate both with "
            "the same ones."
        )


def _direction(runs: Sequence[Run], name: str, metric: str) -> bool | None:
    """`higher_is_better` of `metric` (a key) for the task or group `name`: the first run's that says."""
    metric_name = split_metric_key(metric)[0]
    for run in runs:
        value = run.higher_is_better.get(name, {}).get(metric_name)
        if value is not None:
            return bool(value)
    return None


def _compare_task(task: str, run_a: Run, run_b: Run, language: str | None, notes: list[str]) -> list[Row]:
    """The rows of `task`, one per metric that both runs scored with numbers (others noted in `notes`)."""
    check_same_documents(task, run_a, run_b)
    scores_a, scores_b = run_a.scores[task], run_b.scores[task]
    for one, other, one_name, other_name in ((scores_a, scores_b, "A", "B"), (scores_b, scores_a, "B", "A")):
        missing = [key for key in one if key not in other]
        if missing:
            raise ComparisonError(
                f"Task {task}: metric {missing[0]} (metric,filter) is in run {one_name}'s sample log but not in run "
                f"{other_name}'s (A has {', '.join(scores_a)}; B has {', '.join(scores_b)}). The runs evaluated the "
                "task with different configurations (metrics or filters): evaluate both with the same task version "
                "and configuration."
            )
    rows = []
    for key in scores_a:
        items_a, items_b = scores_a[key], scores_b[key]
        if not all(is_number(value) for _, value in (*items_a.values(), *items_b.values())):
            notes.append(
                f"{task} {metric_label(key)}: skipped, its per-item values are not numbers (a corpus-level metric, "
                "e.g. BLEU), so it cannot be paired item by item."
            )
            continue
        pairs = paired_items(items_a, items_b)
        if len(pairs) < max(len(items_a), len(items_b)):
            notes.append(
                f"{task} {metric_label(key)}: paired on the {len(pairs)} documents both runs scored "
                f"(A scored {len(items_a)}, B {len(items_b)})."
            )
        if not pairs:
            continue
        _, values_a, values_b = zip(*pairs)
        numbers = paired_statistics(values_a, values_b)
        rows.append(Row("task", task, language, key, _direction((run_a, run_b), task, key), numbers))
    return rows


def _compare_group(
    group: str,
    leaves: Sequence[str],
    run_a: Run,
    run_b: Run,
    task_rows: Mapping[tuple[str, str], Row],
    notes: list[str],
) -> list[Row]:
    """The rows of `group` (whose tasks are `leaves`), one per metric every one of its compared tasks has, pooling
    their items."""
    compared = {task for task, _ in task_rows}
    tasks = [task for task in leaves if task in compared]
    if not tasks:
        return []
    metrics = [key for name, key in task_rows if name == tasks[0]]
    shared = [key for key in metrics if all((task, key) in task_rows for task in tasks)]
    if not shared:
        notes.append(f"{group}: no group row, its tasks share no metric that could be paired.")
    rows = []
    for key in shared:
        pairs = [pair for task in tasks for pair in paired_items(run_a.scores[task][key], run_b.scores[task][key])]
        units, values_a, values_b = zip(*pairs)
        direction = _direction((run_a, run_b), group, key)
        if direction is None:
            directions = {task_rows[task, key].higher_is_better for task in tasks}
            direction = directions.pop() if len(directions) == 1 else None
        numbers = paired_statistics(values_a, values_b, units)
        rows.append(Row("group", group, None, key, direction, numbers, tuple(tasks)))
    return rows


def compare_runs(run_a: Run, run_b: Run) -> Comparison:
    """Pair `run_b` against `run_a` on every task and metric they share, and on the groups both have.

    Returns:
        The :class:`Comparison`: a row per task and metric, then per group and metric (B − A, paired standard
        errors; see the module's docstring), with notes on what was left out.

    Raises:
        ComparisonError: no task in common, a shared task with different documents (:func:`check_same_documents`),
            or a metric that one run has and the other has not.
    """
    shared_tasks = sorted(run_a.scores.keys() & run_b.scores.keys())
    if not shared_tasks:
        raise ComparisonError(
            f"The runs share no task: run A ({run_a.results_file}) has {', '.join(sorted(run_a.scores)) or 'none'}; "
            f"run B ({run_b.results_file}) has {', '.join(sorted(run_b.scores)) or 'none'}. Evaluate both on the same "
            "--tasks."
        )
    notes = []
    for label, run, other in (("A", run_a, run_b), ("B", run_b, run_a)):
        alone = sorted(run.scores.keys() - other.scores.keys())
        if alone:
            notes.append(f"Only in run {label}, not compared: {', '.join(alone)}.")
    groups = {
        group: [child for child in children if set(leaf_tasks(child, run_a.group_subtasks)) & set(shared_tasks)]
        for group, children in run_a.group_subtasks.items()
        if group in run_b.group_subtasks
    }
    groups = {group: children for group, children in groups.items() if children}
    group_subtasks = {**run_b.group_subtasks, **run_a.group_subtasks}
    languages = task_languages(shared_tasks, group_subtasks)
    task_rows: dict[tuple[str, str], Row] = {}
    for task in shared_tasks:
        for row in _compare_task(task, run_a, run_b, languages.get(task), notes):
            task_rows[task, row.metric] = row
    leaves = {group: leaf_tasks(group, run_a.group_subtasks) for group in groups}
    for family, tasks in language_families(languages, group_subtasks).items():
        groups[family] = leaves[family] = tasks
    group_rows = [
        row for group in groups for row in _compare_group(group, leaves[group], run_a, run_b, task_rows, notes)
    ]
    return Comparison(run_a, run_b, [*task_rows.values(), *group_rows], groups, notes)


def language_families(
    languages: Mapping[str, str], group_subtasks: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """The per-language tasks that were run without their group, by benchmark: `{"xnli_*": ["xnli_de", "xnli_ru"]}`.

    Each family of two or more such tasks gets a pooled row, like a group's (the same items in several languages).

    Args:
        languages: `{task: language code}` of the per-language tasks (:func:`task_languages`).
        group_subtasks: every group's children, in either run.
    """
    grouped = {child for children in group_subtasks.values() for child in children}
    families: dict[str, list[str]] = {}
    for task, language in languages.items():
        if task not in grouped:
            families.setdefault(f"{task[: -len(language)]}*", []).append(task)
    return {family: sorted(tasks) for family, tasks in families.items() if len(tasks) >= 2}
