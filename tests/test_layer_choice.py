"""The layer-choice statistics of the training logs and the model card, on hand-made forward outputs."""

from __future__ import annotations

import math

import pytest
import torch

from peft_cc.layer_choice import LayerChoiceStatistics


def outputs(chosen: list[int | None], num_sources: int = 4) -> dict[str, torch.Tensor]:
    """A forward output whose row `i` chose candidate `chosen[i]` (None: not connected), with uniform logits."""
    connected = torch.tensor([choice is not None for choice in chosen])
    layer_choice = torch.zeros(len(chosen), num_sources)
    for row, choice in enumerate(chosen):
        if choice is not None:
            layer_choice[row, choice] = 1.0
    return {"connected_rows": connected, "layer_choice": layer_choice, "layer_logits": torch.zeros_like(layer_choice)}


def test_a_window_logs_the_frequencies_entropies_and_unconnected_rows_then_starts_again():
    statistics = LayerChoiceStatistics([0, 5, 10, 15])
    statistics.record(outputs([0, 0, 2, None]))
    statistics.record(outputs([2, 3]))
    logs = statistics.window_logs(lambda counts: counts)
    assert logs["cc/unconnected_rows"] == 1.0
    assert logs["cc/layer_frequency/00"] == pytest.approx(0.4) and logs["cc/layer_frequency/10"] == pytest.approx(0.4)
    assert logs["cc/layer_frequency/05"] == 0.0 and logs["cc/layer_frequency/15"] == pytest.approx(0.2)
    assert logs["cc/most_chosen_layer"] == 0 and logs["cc/most_chosen_frequency"] == pytest.approx(0.4)
    assert logs["cc/choice_entropy"] == pytest.approx(-2 * 0.4 * math.log(0.4) - 0.2 * math.log(0.2))
    assert logs["cc/decision_entropy"] == pytest.approx(math.log(4))  # uniform logits
    assert statistics.window_logs(lambda counts: counts) == {}  # nothing since


def test_counts_are_summed_over_processes_and_the_run_summary_names_only_chosen_layers():
    statistics = LayerChoiceStatistics([0, 1, 2, 3])
    statistics.record(outputs([1, 1, None]))
    summary = statistics.run_summary(lambda counts: 2 * counts)  # two processes that saw the same rows
    assert summary["most_chosen"] == {1: 1.0}
    assert (summary["connected_rows"], summary["unconnected_rows"]) == (4, 2)
    assert summary["max_entropy"] == pytest.approx(math.log(4)) and summary["choice_entropy"] == 0.0
    assert LayerChoiceStatistics([0, 1]).run_summary(lambda counts: counts) is None
