"""The Decision Maker: which layer's English activation to inject."""

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

    def summarize(self, first_layer_input: torch.Tensor, source_activations: torch.Tensor) -> torch.Tensor:
        """`z = h_in + mean_l e_l`, in float32.

        Args:
            first_layer_input: `[B, d]` hidden state entering the first decoder layer at the anchor.
            source_activations: `[B, S, d]` FFN activations of the candidate layers at the anchor.

        Returns:
            `[B, d]` float32.
        """
        return first_layer_input.float() + source_activations.float().mean(dim=1)

    def forward(
        self,
        z: torch.Tensor,
        gumbel_noise: torch.Tensor | None = None,
        temperature: float = 1.0,
        hard: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose a source layer for each row.

        Args:
            z: `[B, d]` input of the Decision Maker.
            gumbel_noise: `[B, S]` standard Gumbel noise for a training sample (see :func:`sample_gumbel_noise`),
                or `None` for no noise.
            temperature: Gumbel-Softmax temperature.
            hard: a one-hot choice: the Gumbel-Softmax sample with straight-through gradients (the paper), or without
                noise the arg-max of the logits. `False` returns the soft mixture itself: the soft Gumbel-Softmax
                sample, or without noise `softmax(logits / temperature)`.

        Returns:
            `(choice, logits)`: `choice` `[B, S]` float32, one-hot in value (or a soft mixture when `hard=False`);
            `logits` `[B, S]` float32.
        """
        # float32 even where a wrapper casts the weight to bf16 or mixed precision autocasts matrix products
        with torch.autocast(z.device.type, enabled=False):
            logits = z.float() @ self.weight.float().T
        if gumbel_noise is None and hard:
            return nn.functional.one_hot(logits.argmax(dim=-1), self.num_sources).float(), logits
        noisy = logits if gumbel_noise is None else logits + gumbel_noise
        soft = torch.softmax(noisy / temperature, dim=-1)
        if not hard:
            return soft, logits
        one_hot = nn.functional.one_hot(soft.argmax(dim=-1), self.num_sources).to(soft.dtype)
        return one_hot - soft.detach() + soft, logits


def sample_gumbel_noise(batch_size: int, num_sources: int, device: torch.device) -> torch.Tensor:
    """`[B, S]` float32 standard Gumbel noise from torch's global generator (reproducible under `manual_seed`)."""
    return -torch.empty(batch_size, num_sources, dtype=torch.float32, device=device).exponential_().log()


class ConnectionChoice:
    """The Decision Maker's choice for one forward pass, and the vector it injects.

    Args:
        decision_maker: the adapter's Decision Maker.
        source_activations: `[B', S, d]` English (or simulated English) activations of the candidate layers.
        temperature: the Gumbel-Softmax temperature.
        sample: draw Gumbel noise (training); otherwise no noise.
        hard: a one-hot choice (with `sample`, straight-through gradients as in the paper; otherwise the arg-max), or
            the soft mixture (see :meth:`DecisionMaker.forward`).
        scale_to_residual: rescale every source activation to the norm of the residual stream it is added to.
        learn: whether the Decision Maker learns from this choice; `False` applies the choice with zero gradients.
    """

    def __init__(
        self,
        decision_maker: DecisionMaker,
        source_activations: torch.Tensor,
        temperature: float = 1.0,
        sample: bool = False,
        hard: bool = True,
        scale_to_residual: bool = False,
        learn: bool = True,
    ) -> None:
        self.decision_maker = decision_maker
        self.learn = learn
        self.source_activations = source_activations
        self.temperature = temperature
        self.hard = hard
        self.scale_to_residual = scale_to_residual
        rows, num_sources = source_activations.shape[:2]
        self.noise = sample_gumbel_noise(rows, num_sources, source_activations.device) if sample else None
        self.choice: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.probabilities: torch.Tensor | None = None

    def vectors_for(self, first_layer_input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`c = Σ_l s_l e_l`: the `[B', d]` float32 vectors to inject.

        Args:
            first_layer_input: `[B', d]` `h_in`, the hidden state entering the first decoder layer at the anchors.
            residual: `[B', d]` the residual stream the vectors are added to (the injection layer's output).
        """
        z = self.decision_maker.summarize(first_layer_input, self.source_activations)
        choice, logits = self.decision_maker(z, self.noise, self.temperature, hard=self.hard)
        if not self.learn:
            # Zero gradients rather than none: distributed data parallel expects one for every trainable parameter.
            choice = choice.detach() + 0.0 * choice
        self.choice, self.logits = choice.detach(), logits.detach()
        self.probabilities = torch.softmax(logits, dim=-1)
        sources = self.source_activations.float()
        if self.scale_to_residual:
            target = residual.float().norm(dim=-1, keepdim=True).unsqueeze(1)  # [B', 1, 1]
            sources = sources / sources.norm(dim=-1, keepdim=True).clamp_min(1e-6) * target
        return (choice.unsqueeze(-1) * sources).sum(dim=1)

    def balance_loss(self) -> torch.Tensor | None:
        """`KL(p̄ || uniform)` of the mean choice probabilities over the rows: 0 when every layer is equally likely."""
        if self.probabilities is None or not len(self.probabilities):
            return None
        mean = self.probabilities.mean(dim=0)
        return (mean * (mean.clamp_min(1e-12) * mean.numel()).log()).sum()

    def per_row(self, rows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(layer_choice, layer_logits)`, each `[batch_size, S]` float32, zeros on rows not in `rows`."""
        num_sources = self.source_activations.shape[1]
        layer_choice = torch.zeros(batch_size, num_sources, device=rows.device)
        layer_logits = torch.zeros_like(layer_choice)
        if self.choice is not None:
            layer_choice[rows] = self.choice.to(rows.device)
            layer_logits[rows] = self.logits.to(rows.device)
        return layer_choice, layer_logits
