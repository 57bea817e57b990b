"""Loading parallel data for CC-Tuning with `datasets`: from common layouts to the trainer's format.

`CCSFTTrainer` trains on prompt-completion rows that also hold the English version of the prompt:

    {"prompt":     [{"role": "user", "content": "Quelle est la capitale de la France ?"}],
     "completion": [{"role": "assistant", "content": "Paris."}],
     "prompt_en":  [{"role": "user", "content": "What is the capital of France?"}]}

(or the same three columns as plain strings, for a model without a chat template). This file turns the usual layouts of
parallel instruction data into that form:

1. one table with a column per field, e.g. `instruction`, `instruction_en`, `output` (the layout of the parallel
   Aya subset the paper trains on), from JSON Lines, CSV, Parquet or the Hub: :func:`from_columns`;
2. chat data with a parallel English conversation, `messages` and `messages_en`: :func:`from_parallel_chats`;
3. two aligned tables, one per language, joined on an id column: :func:`join_on_id`;
4. the benchmark layout of `../shared/data/benchmarks` (one JSON Lines file per language, English on the same line):
   :func:`from_benchmark_layout`.

    python examples/load_parallel_dataset.py                                   # demo of every layout
    python examples/load_parallel_dataset.py --data my.jsonl \
        --prompt-column instruction --english-column instruction_en --completion-column output
    python examples/load_parallel_dataset.py --benchmark MKQA --skip-items 100 \
        --save-to outputs/mkqa_train.jsonl        # the main job's training pairs, for `peft-cc sft`
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset

from peft_cc.scripts.sft import load_any

REPO_ROOT = Path(__file__).resolve().parents[1]
# The reader of the benchmark layout is the repository's, beside its lm-eval tasks (not part of the package).
sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "tasks"))
from parallel_data import load_parallel_items  # noqa: E402

DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data" / "benchmarks"


def _messages(role: str, content: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": role, "content": content}]


def from_columns(
    dataset: Dataset,
    prompt_column: str = "instruction",
    english_column: str = "instruction_en",
    completion_column: str = "output",
    conversational: bool = True,
    system_prompt: str | None = None,
    keep_columns: Sequence[str] = (),
    num_proc: int | None = None,
) -> Dataset:
    """Layout 1: one row per example, with the non-English prompt, its English version and the (non-English) answer.

    Args:
        dataset: the table, e.g. `load_any("aya_parallel.jsonl")`.
        prompt_column, english_column, completion_column: its column names.
        conversational: build chat messages (for a model with a chat template; the trainer applies the template);
            `False` keeps plain strings.
        system_prompt: an optional system message put before both prompts (the same for both, so that the English
            prompt is templated like the non-English one).
        keep_columns: other columns to keep (e.g. a language code).
        num_proc: processes for `Dataset.map`.

    Returns:
        A dataset with the columns `prompt`, `completion` and `prompt_en` (and `keep_columns`); rows with an empty
        field are dropped. Of several acceptable answers (a list), the first is the completion.
    """
    missing = [name for name in (prompt_column, english_column, completion_column) if name not in dataset.column_names]
    if missing:
        raise ValueError(f"Columns {missing} are not in the dataset (columns: {dataset.column_names}).")

    def convert(row: dict) -> dict:
        prompt, english, completion = row[prompt_column], row[english_column], row[completion_column]
        if isinstance(completion, list):  # several acceptable answers (e.g. MKQA): train on the first
            completion = completion[0] if completion else ""
        if not conversational:
            return {"prompt": prompt, "completion": completion, "prompt_en": english}
        return {
            "prompt": _messages("user", prompt, system_prompt),
            "completion": [{"role": "assistant", "content": completion}],
            "prompt_en": _messages("user", english, system_prompt),
        }

    def complete(row: dict) -> bool:
        return all(row[name] for name in (prompt_column, english_column, completion_column))

    dataset = dataset.filter(complete, num_proc=num_proc)
    removed = [name for name in dataset.column_names if name not in keep_columns]
    return dataset.map(convert, remove_columns=removed, num_proc=num_proc)


def from_parallel_chats(
    dataset: Dataset, messages_column: str = "messages", english_column: str = "messages_en"
) -> Dataset:
    """Layout 2: chat data whose rows hold a conversation and its English translation, turn by turn.

    The last message (the assistant's reply) becomes the completion; everything before it is the prompt, and the
    English conversation without its last message is the English prompt. Multi-turn history is kept.
    """

    def split(row: dict) -> dict:
        messages, english = row[messages_column], row[english_column]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError(f"Each conversation must end with an assistant message, got {messages!r:.120}.")
        english_prompt = english[:-1] if english and english[-1]["role"] == "assistant" else english
        return {"prompt": messages[:-1], "completion": messages[-1:], "prompt_en": english_prompt}

    return dataset.map(split, remove_columns=dataset.column_names)


def join_on_id(
    non_english: Dataset,
    english: Dataset,
    id_column: str = "id",
    prompt_column: str = "instruction",
    completion_column: str = "output",
    english_prompt_column: str = "instruction",
) -> Dataset:
    """Layout 3: two tables, one per language, aligned by an id: the English prompt is looked up by id.

    Returns a table with `instruction`, `instruction_en` and `output` (rows without an English match are dropped), to
    pass to :func:`from_columns`.
    """
    english_by_id = dict(zip(english[id_column], english[english_prompt_column]))
    kept = non_english.filter(lambda row: row[id_column] in english_by_id)
    return kept.map(
        lambda row: {
            "instruction": row[prompt_column],
            "instruction_en": english_by_id[row[id_column]],
            "output": row[completion_column],
        },
        remove_columns=kept.column_names,
    )


def from_benchmark_layout(
    data_root: str | os.PathLike,
    benchmark: str,
    languages: Sequence[str],
    skip_items: int = 0,
    limit_items: int | None = None,
    conversational: bool = True,
) -> Dataset:
    """Layout 4: `<root>/<benchmark>/prompts/<lang>.jsonl` and `answers/<lang>.jsonl`, English on the same line.

    Args:
        data_root: the root of the layout (e.g. `../shared/data/benchmarks`).
        benchmark: e.g. `"MKQA"`.
        languages: non-English language codes.
        skip_items: leave out the first `skip_items` items of every language (kept for evaluation).
        limit_items: keep at most this many items per language after the skipped ones.
        conversational: chat messages (default) or plain strings.

    Returns:
        `prompt`, `completion`, `prompt_en`, plus `language` and `item` (the line number) to trace every row. Items
        with an empty answer are left out; of several acceptable answers (MKQA) the first is the completion.
    """
    rows = []
    for language in languages:
        items = load_parallel_items(data_root, benchmark, language)[skip_items:]
        for item in items[:limit_items] if limit_items is not None else items:
            rows.append(
                {
                    "instruction": item.prompt,
                    "instruction_en": item.english_prompt,
                    "output": item.first_answer,
                    "language": language,
                    "item": item.index,
                }
            )
    return from_columns(Dataset.from_list(rows), conversational=conversational, keep_columns=("language", "item"))


def _demo(data_root: Path) -> None:
    table = Dataset.from_list(
        [
            {
                "instruction": "Quelle est la capitale de la France ?",
                "instruction_en": "What is the capital of France?",
                "output": "Paris.",
            },
            {
                "instruction": "Wie viele Beine hat eine Spinne?",
                "instruction_en": "How many legs does a spider have?",
                "output": "Acht.",
            },
        ]
    )
    print("1. columns instruction / instruction_en / output:")
    print(json.dumps(from_columns(table)[0], ensure_ascii=False))
    chats = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": "Hallo!"},
                    {"role": "assistant", "content": "Hallo, wie geht's?"},
                ],
                "messages_en": [
                    {"role": "user", "content": "Hello!"},
                    {"role": "assistant", "content": "Hi, how are you?"},
                ],
            }
        ]
    )
    print("2. parallel chats:")
    print(json.dumps(from_parallel_chats(chats)[0], ensure_ascii=False))
    english = Dataset.from_list([{"id": 7, "instruction": "What colour is snow?", "output": "White."}])
    french = Dataset.from_list([{"id": 7, "instruction": "De quelle couleur est la neige ?", "output": "Blanche."}])
    print("3. two tables joined on `id`:")
    print(json.dumps(from_columns(join_on_id(french, english))[0], ensure_ascii=False))
    if data_root.is_dir():
        benchmark = from_benchmark_layout(data_root, "MKQA", ["de", "ja"], skip_items=100, limit_items=3)
        print(f"4. benchmark layout ({data_root}): {len(benchmark)} rows, first:")
        print(json.dumps(benchmark[0], ensure_ascii=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", help="a .jsonl/.json/.csv/.parquet file, a saved dataset folder, or a Hub dataset id"
    )
    parser.add_argument("--split", default="train")
    parser.add_argument("--prompt-column", default="instruction")
    parser.add_argument("--english-column", default="instruction_en")
    parser.add_argument("--completion-column", default="output")
    parser.add_argument("--plain", action="store_true", help="plain strings instead of chat messages")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="root of the benchmark layout")
    parser.add_argument("--benchmark", help="instead of --data: this benchmark of the layout under --data-root")
    parser.add_argument("--languages", default="de,ja,pt,ru,zh", help="with --benchmark: comma-separated languages")
    parser.add_argument("--skip-items", type=int, default=0, help="with --benchmark: leave out the first N items")
    parser.add_argument("--save-to", help="write the rows to this .jsonl file (for `peft-cc sft --dataset_name`)")
    args = parser.parse_args()
    if args.benchmark:
        languages = [language.strip() for language in args.languages.split(",") if language.strip()]
        dataset = from_benchmark_layout(
            args.data_root, args.benchmark, languages, skip_items=args.skip_items, conversational=not args.plain
        )
    elif args.data:
        dataset = from_columns(
            load_any(args.data, args.split),
            args.prompt_column,
            args.english_column,
            args.completion_column,
            conversational=not args.plain,
        )
    else:
        _demo(Path(args.data_root))
        return
    print(dataset)
    print(json.dumps(dataset[0], ensure_ascii=False))
    if args.save_to:
        Path(args.save_to).parent.mkdir(parents=True, exist_ok=True)
        dataset.to_json(args.save_to, force_ascii=False)
        print(f"{len(dataset)} rows written to {args.save_to}")


if __name__ == "__main__":
    main()
