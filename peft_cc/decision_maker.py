"""The Decision Maker: which candidate layer's English FFN activation the connection injects, per row."""

from __future__ import annotations

import torch
from torch import nn


class DecisionMaker(nn.Module):
    """A bias-free linear map `W ∈ R^{S×d}` (float32) from a summary of the prompt to logits over `S` source layers.

    Its input is `z = h_in + mean_l e_l` at the anchor, where `h_in` is the hidden state entering the first decoder
    layer and `e_l` the English FFN activation of candidate layer `l`. The choice is one-hot: during training a hard
    Gumbel-Softmax sample (straight-through: one-hot forward value, gradients of the soft sample), at inference the
    arg-max.

    Args:
        num_sources: `S`, the number of candidate source layers.
        hidden_size: `d`, the width of the residual stream.
        init_std: standard deviation of the normal initialisation (the model's `initializer_range`).
    """

    def __init__(self, num_sources: int, hidden_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_sources, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, mean=0.0, std=init_std)

    @property
    def num_sources(self) -> int:
        return self.weight.shape[0]

    @staticmethod
    def summarize(first_layer_input: torch.Tensor, source_activations: torch.Tensor) -> torch.Tensor:
        """`z = h_in + mean_l e_l`, in float32.

        Args:
            first_layer_input: `[B, d]` hidden state entering the first decoder layer at the anchor.
            source_activations: `[B, S, d]` FFN activations of the candidate layers at the anchor.

        Returns:
            `[B, d]` float32.
        """
        return first_layer_input.float() + source_activations.float().mean(dim=1)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, S]` float32 logits `z Wᵀ` of `[B, d]` inputs, in float32 even under autocast or a bf16 weight."""
        with torch.autocast(z.device.type, enabled=False):
            return z.float() @ self.weight.float().T

    def forward(
        self, z: torch.Tensor, gumbel_noise: torch.Tensor | None = None, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose a source layer for each row.

        Args:
            z: `[B, d]` input of the Decision Maker.
            gumbel_noise: `[B, S]` standard Gumbel noise for a training sample (see :func:`sample_gumbel_noise`): the
                choice is the hard Gumbel-Softmax sample at `temperature`, with straight-through gradients (the
                paper). `None`: the arg-max of the logits, without gradients.
            temperature: Gumbel-Softmax temperature.

        Returns:
            `(choice, logits)`, each `[B, S]` float32; `choice` is one-hot in value.
        """
        logits = self.logits(z)
        if gumbel_noise is None:
            return nn.functional.one_hot(logits.argmax(dim=-1), self.num_sources).float(), logits
        soft = torch.softmax((logits + gumbel_noise) / temperature, dim=-1)
        one_hot = nn.functional.one_hot(soft.argmax(dim=-1), self.num_sources).to(soft.dtype)
        return one_hot - soft.detach() + soft, logits


def sample_gumbel_noise(batch_size: int, num_sources: int, device: torch.device) -> torch.Tensor:
    """`[B, S]` float32 standard Gumbel noise from torch's global generator (reproducible under `manual_seed`)."""
    return -torch.empty(batch_size, num_sources, dtype=torch.float32, device=device).exponential_().log()


class ConnectionChoice:
    """The Decision Maker's choice for one forward pass, and the vector it injects.

    The Gumbel noise of a training sample is drawn when the choice is made, once: a layer that runs again (gradient
    checkpointing) cannot draw another sample.

    Args:
        decision_maker: the adapter's Decision Maker.
        source_activations: `[B', S, d]` English (or simulated English) activations of the candidate layers.
        temperature: the Gumbel-Softmax temperature.
        sample: draw a hard Gumbel-Softmax sample (training); otherwise take the arg-max.

    After :meth:`vectors_for`: `choice` and `logits` (`[B', S]` float32), detached.
    """

    def __init__(
        self,
        decision_maker: DecisionMaker,
        source_activations: torch.Tensor,
        temperature: float = 1.0,
        sample: bool = False,
    ) -> None:
        self.decision_maker = decision_maker
        self.source_activations = source_activations
        self.temperature = temperature
        rows, num_sources = source_activations.shape[:2]
        self.noise = sample_gumbel_noise(rows, num_sources, source_activations.device) if sample else None
        self.choice: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def vectors_for(self, first_layer_input: torch.Tensor) -> torch.Tensor:
        """`c = Σ_l s_l e_l`: the `[B', d]` float32 vectors to inject.

        Args:
            first_layer_input: `[B', d]` `h_in`, the hidden state entering the first decoder layer at the anchors.
        """
        z = self.decision_maker.summarize(first_layer_input, self.source_activations)
        choice, logits = self.decision_maker(z, self.noise, self.temperature)
        self.choice, self.logits = choice.detach(), logits.detach()
        return (choice.unsqueeze(-1) * self.source_activations.float()).sum(dim=1)

    def per_row(self, rows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(layer_choice, layer_logits)`, each `[batch_size, S]` float32, zeros on rows not in `rows`."""
        num_sources = self.source_activations.shape[1]
        layer_choice = torch.zeros(batch_size, num_sources, device=rows.device)
        layer_logits = torch.zeros_like(layer_choice)
        if self.choice is not None:
            layer_choice[rows] = self.choice.to(rows.device)
            layer_logits[rows] = self.logits.to(rows.device)
        return layer_choice, layer_logits
