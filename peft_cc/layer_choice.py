"""Statistics of the Decision Maker's layer choices during training: the `cc/...` log entries and the run's summary.

The counts are one float64 vector per window: `[S]` choices per candidate source layer, then the number of
unconnected rows, of connected rows, and the sum over the connected rows of the entropy (nats) of the Decision Maker's
softmax. Counts are summed over processes by the `reduce` function the caller gives (the trainer's
`accelerator.reduce`), which every process must call at the same point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

LOG_PREFIX = "cc/"

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a float64 CPU tensor over processes and returns the sum as a float64 CPU tensor."""


class LayerChoiceStatistics:
    """Counts of the Decision Maker's choices in training forward calls: since the previous log, and since training
    began.

    Args:
        source_layers: the candidate source layers (layer indices), in the order of the `layer_choice` columns.
    """

    def __init__(self, source_layers: list[int]) -> None:
        self.source_layers = source_layers
        self._window = self._zeros()
        self._run = self._zeros()
        self._recorded = False  # whether the window saw a forward call (the same on every process)

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(len(self.source_layers) + 3, dtype=torch.float64)

    @torch.no_grad()
    def record(self, outputs: Mapping[str, Any]) -> None:
        """Add the choices of one training forward output (`connected_rows` `[B]`, `layer_choice` and `layer_logits`
        `[B, S]`) to the counts of this process."""
        connected = outputs["connected_rows"]
        choice = outputs["layer_choice"][connected].float()  # [B', S] one-hot
        log_probs = torch.log_softmax(outputs["layer_logits"][connected].float(), dim=-1)  # [B', S]
        entropy = -(log_probs.exp() * log_probs).sum()
        extra = torch.stack([(~connected).sum().float(), connected.sum().float(), entropy])
        counts = torch.cat([choice.sum(dim=0), extra]).to("cpu", torch.float64)
        self._window += counts
        self._run += counts
        self._recorded = True

    def window_logs(self, reduce: Reduce, per_layer: bool = True) -> dict[str, float]:
        """The `cc/...` log entries of the choices since the previous call, summed over processes (see the module
        docstring); `{}` when no training forward call was recorded since.

        Entries: `cc/unconnected_rows` (rows without an anchor), `cc/choice_entropy` (nats, of the chosen layers'
        frequencies), `cc/decision_entropy` (nats, mean entropy of the Decision Maker's softmax),
        `cc/most_chosen_layer`, `cc/most_chosen_frequency`, and with `per_layer` one `cc/layer_frequency/<layer>` per
        candidate.
        """
        if not self._recorded:
            return {}
        counts, self._window, self._recorded = reduce(self._window), self._zeros(), False
        return self._summary(counts, per_layer)

    def run_summary(self, reduce: Reduce) -> dict[str, Any] | None:
        """The choices since training began, summed over processes, for the model card; `None` without any row.

        Returns:
            `most_chosen` (`{layer: frequency}` of the (at most) five most chosen layers, none of them never chosen),
            `choice_entropy` and `max_entropy` (nats), `num_source_layers`, `connected_rows`, `unconnected_rows`.
        """
        counts = reduce(self._run)
        unconnected, connected = int(counts[-3]), int(counts[-2])
        if unconnected + connected == 0:
            return None
        summary = self._summary(counts, per_layer=True)
        prefix = f"{LOG_PREFIX}layer_frequency/"
        chosen = {int(key[len(prefix) :]): share for key, share in summary.items() if key.startswith(prefix) and share}
        return {
            "most_chosen": dict(sorted(chosen.items(), key=lambda item: -item[1])[:5]),
            "choice_entropy": summary.get(f"{LOG_PREFIX}choice_entropy", 0.0),
            "max_entropy": math.log(len(self.source_layers)),
            "num_source_layers": len(self.source_layers),
            "connected_rows": connected,
            "unconnected_rows": unconnected,
        }

    def _summary(self, counts: torch.Tensor, per_layer: bool) -> dict[str, float]:
        per_source = counts[: len(self.source_layers)]
        unconnected, connected, entropy_sum = (float(value) for value in counts[-3:])
        logs = {f"{LOG_PREFIX}unconnected_rows": unconnected}
        if connected == 0:
            return logs
        frequency = per_source / connected
        nonzero = frequency[frequency > 0]
        most = int(per_source.argmax())
        # sum of p·log(1/p): non-negative term by term, so a single chosen layer logs 0.0, not -0.0
        logs[f"{LOG_PREFIX}choice_entropy"] = float((nonzero * nonzero.reciprocal().log()).sum())
        logs[f"{LOG_PREFIX}decision_entropy"] = entropy_sum / connected
        logs[f"{LOG_PREFIX}most_chosen_layer"] = self.source_layers[most]
        logs[f"{LOG_PREFIX}most_chosen_frequency"] = float(frequency[most])
        if per_layer:
            width = len(str(max(self.source_layers)))  # zero-padded (`07`) so that the keys sort
            logs.update(
                {
                    f"{LOG_PREFIX}layer_frequency/{layer:0{width}d}": value
                    for layer, value in zip(self.source_layers, frequency.tolist())
                }
            )
        return logs
