"""The reader of the benchmark data layout: parallel (non-English prompt, English prompt, answer) items.

The layout is that of the benchmark samples the project tests on (any copy in the same layout works)::

    <root>/<Benchmark>/prompts/<lang>.jsonl      one {"prompt": "..."} per line
    <root>/<Benchmark>/answers/<lang>.jsonl      one JSON value per line (a string, or a list of strings)
    <root>/<Benchmark>/prompts_en/<lang>.jsonl   optional: the English rendering of that language's line i

Line `i` of every language is the same item; its English counterpart is `prompts_en/<lang>.jsonl` line `i` where
that file exists (XLSum), else `prompts/en.jsonl` line `i`.

This is the repository's one reader of the layout, outside the package (which does not read it): the lm-eval tasks of
this folder (:mod:`data_root_tasks`), the multilingual SFT experiment and `examples/load_parallel_dataset.py` import
it by its bare name, with this folder on `sys.path` (see `benchmarks/tasks/README.md`). It needs the standard library
only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# The option labels of the multiple-choice benchmarks, as their prompts and gold answers write them; the other
# benchmarks (MKQA, XQuAD, XLSum) have open answers.
CHOICES: dict[str, tuple[str, ...]] = {
    "XNLI": ("1", "2", "3"),
    "XStoryCloze": ("1", "2"),
    "MMMLU": ("A", "B", "C", "D"),
}


@dataclass(frozen=True)
class ParallelItem:
    """One benchmark item in one language, with its English prompt.

    Attributes:
        benchmark: the benchmark folder name, e.g. `"MKQA"`.
        language: the language code of `prompt` and `answer`, e.g. `"de"`.
        index: the line number (0-based) of the item in the benchmark's files.
        prompt: the full instruction in `language` (no chat template applied).
        english_prompt: the same instruction in English.
        answer: the gold answer in `language`: a string, or a list of acceptable strings.
    """

    benchmark: str
    language: str
    index: int
    prompt: str
    english_prompt: str
    answer: str | list[str]

    @property
    def first_answer(self) -> str:
        """The gold answer, or the first of the acceptable ones (`""` if the list is empty)."""
        if isinstance(self.answer, str):
            return self.answer
        return self.answer[0] if self.answer else ""


def check_data_root(data_root: str | os.PathLike) -> None:
    """Raise a `FileNotFoundError` that says what data is expected, and where, if `data_root` is not a folder."""
    if not Path(data_root).is_dir():
        raise FileNotFoundError(
            f"The benchmark data root {data_root} is not a folder. It should hold the multilingual benchmark samples "
            "in the layout <root>/<Benchmark>/prompts/<lang>.jsonl and answers/<lang>.jsonl (English prompts in "
            "prompts/en.jsonl, line by line parallel); a clone of peft-cc expects them in ../shared/data/benchmarks. "
            "Point to your copy with --data-root (for the lm-eval tasks: --metadata '{\"data_root\": ...}' or "
            "$PEFT_CC_DATA_ROOT), or train on your own "
            "parallel data instead (--dataset with examples/train_cc.py, --dataset_name with `peft-cc sft`)."
        )


def _read_jsonl(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"Missing benchmark file {path}.")
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _prompts(path: Path) -> list[str]:
    rows = _read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{path}:{number}: expected an object {{"prompt": "..."}}, got {row!r:.80}.')
    return [row["prompt"] for row in rows]


def available_languages(data_root: str | os.PathLike, benchmark: str) -> list[str]:
    """The language codes that have prompts for `benchmark` under `data_root`, sorted."""
    check_data_root(data_root)
    folder = Path(data_root) / benchmark / "prompts"
    if not folder.is_dir():
        raise FileNotFoundError(f"No benchmark {benchmark!r} under {data_root} (expected the folder {folder}).")
    return sorted(path.stem for path in folder.glob("*.jsonl"))


def load_parallel_items(data_root: str | os.PathLike, benchmark: str, language: str) -> list[ParallelItem]:
    """All items of `benchmark` in `language`, each with its English prompt and gold answer.

    Raises:
        FileNotFoundError: `data_root` or a file of the layout is missing.
        ValueError: the files of the item do not have the same number of lines, or a line is malformed.
    """
    check_data_root(data_root)
    folder = Path(data_root) / benchmark
    prompts = _prompts(folder / "prompts" / f"{language}.jsonl")
    answers = _read_jsonl(folder / "answers" / f"{language}.jsonl")
    english_file = folder / "prompts_en" / f"{language}.jsonl"
    if not english_file.is_file():
        english_file = folder / "prompts" / "en.jsonl"
    english = _prompts(english_file)
    if not len(prompts) == len(answers) == len(english):
        raise ValueError(
            f"{benchmark}/{language}: {len(prompts)} prompts, {len(answers)} answers and {len(english)} English "
            f"prompts ({english_file.name}); they must be parallel, line by line."
        )
    return [
        ParallelItem(benchmark, language, index, prompt, english_prompt, answer)
        for index, (prompt, english_prompt, answer) in enumerate(zip(prompts, english, answers))
    ]
