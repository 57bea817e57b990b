"""Evaluation of base models and PEFT / CC-Tuning adapters on the multilingual benchmarks (XNLI, XStoryCloze, MMMLU,
XQuAD, MKQA, XLSum), as a library and as `python -m peft_cc.evaluation` (see docs/evaluation.md).

    from peft_cc.evaluation import evaluate, write_report

    results = evaluate(model, tokenizer, data_root="../shared/data/benchmarks", limit=16, connection="monolingual")
    write_report({"cc (monolingual)": results}, "results/cc/results.json")
"""

from .benchmarks import BENCHMARKS, Benchmark, get_benchmark
from .loading import load_system
from .report import load_results, markdown_report, plot_results, write_report
from .runner import EvaluationConfig, evaluate

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "EvaluationConfig",
    "evaluate",
    "get_benchmark",
    "load_results",
    "load_system",
    "markdown_report",
    "plot_results",
    "write_report",
]
