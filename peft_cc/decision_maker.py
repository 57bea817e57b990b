"""The Decision Maker: which layer's English activation to inject, and how it learns."""

from __future__ import annotations

import math

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
        gate_init: if set, a learned gate `g ∈ R^S` (float32) starting at this value for every layer: the chosen
            activation is injected as `g_l e_l`. `None` (the paper): no gate, `e_l` as it is.
    """

    def __init__(
        self, num_sources: int, hidden_size: int, init_std: float = 0.02, gate_init: float | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_sources, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, mean=0.0, std=init_std)
        self.gate = None if gate_init is None else nn.Parameter(torch.full((num_sources,), float(gate_init)))

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

    @torch.no_grad()
    def favour(self, log_prior: torch.Tensor, z: torch.Tensor) -> None:
        """Shift the logits by a prior over the source layers, around the inputs `z`.

        Adds the rank-one term `(log_prior − mean(log_prior)) ⊗ z̄ / ||z̄||²` to the weight, where `z̄` is the mean of
        `z`: at `z̄` the logits move by the centred log prior, and each row's own part of the initialisation stays.

        Args:
            log_prior: `[S]` log-probabilities (up to a constant) of the source layers.
            z: `[N, d]` Decision Maker inputs of some training examples.
        """
        centred = log_prior.float() - log_prior.float().mean()
        mean_input = z.float().mean(dim=0)
        self.weight += torch.outer(
            centred.to(self.weight.device), (mean_input / mean_input.square().sum()).to(self.weight.device)
        )


def english_variance_prior(source_activations: torch.Tensor) -> torch.Tensor:
    """Each source layer's share of the variance of the activations across examples, as a log-probability.

    A layer whose activation at the anchor is the same for every prompt carries nothing about the prompt; the share
    of `Σ_l Var_n(e_l)` (summed over the `d` features) measures how much prompt-dependent signal each candidate
    layer would inject.

    Args:
        source_activations: `[N, S, d]` English activations of `N` prompts at the anchor (`N ≥ 2`).

    Returns:
        `[S]` float32 log of each layer's share, floored at `log(1e-8)` (a layer that does not vary at all); uniform
        when no layer varies.
    """
    if source_activations.shape[0] < 2:
        raise ValueError(f"The variance across prompts needs at least 2 prompts, got {source_activations.shape[0]}.")
    activations = source_activations.float()
    variance = (activations - activations.mean(dim=0)).square().sum(dim=-1).mean(dim=0)
    if not variance.sum() > 0:  # every prompt gives the same activations: no layer is favoured
        return torch.full_like(variance, -math.log(len(variance)))
    return (variance / variance.sum()).clamp_min(1e-8).log()


def completion_alignment(source_activations: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """How much each source layer's activation varies across prompts as their completions do: debiased linear CKA.

    For each layer, the centred kernel alignment between the Gram matrices `K_l = e_l e_lᵀ` (`[N, N]`, the
    activations of the `N` prompts) and `L = y yᵀ` (the completions' representations),
    `HSIC(K_l, L) / sqrt(HSIC(K_l, K_l) HSIC(L, L))`, with the unbiased HSIC estimator of Song et al. (2012): about 0
    for a layer whose activation is unrelated to the completion, whatever its scale, and 1 for one that is a rotation
    and rescaling of `y`. It does not depend on the activations' norm, so it does not presume that variance means
    information.

    Args:
        source_activations: `[N, S, d]` English activations of `N` prompts at the anchor (`N ≥ 4`).
        completions: `[N, d_y]` a representation of each prompt's completion (e.g. the mean output embedding of its
            tokens).

    Returns:
        `[S]` float32 alignments (≤ 1; 0 for a layer or completions that do not vary).
    """
    rows = source_activations.shape[0]
    if rows < 4 or completions.shape[0] != rows:
        raise ValueError(
            f"The completion alignment needs at least 4 prompts and one completion per prompt, got activations "
            f"{tuple(source_activations.shape)} and completions {tuple(completions.shape)}."
        )
    activations = source_activations.float()
    layer_gram = torch.einsum("nsd,msd->snm", activations, activations)  # [S, N, N]
    completion_gram = completions.float() @ completions.float().T  # [N, N]
    cross = _unbiased_hsic(layer_gram, completion_gram)
    scale = (_unbiased_hsic(layer_gram, layer_gram) * _unbiased_hsic(completion_gram, completion_gram)).clamp_min(0)
    return torch.where(scale > 0, cross / scale.sqrt(), torch.zeros_like(cross))


def _unbiased_hsic(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator (Song et al., 2012) of `[..., N, N]` and `[..., N, N]` Gram matrices (`N ≥ 4`)."""
    n = first.shape[-1]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=first.device)
    first, second = first * off_diagonal, second * off_diagonal
    trace = (first * second).sum(dim=(-2, -1))
    totals = first.sum(dim=(-2, -1)) * second.sum(dim=(-2, -1)) / ((n - 1) * (n - 2))
    row_sums = (first.sum(dim=-1) * second.sum(dim=-1)).sum(dim=-1)
    return (trace + totals - 2 * row_sums / (n - 2)) / (n * (n - 3))


def completion_alignment_prior(source_activations: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Each source layer's share of the positive :func:`completion_alignment`, as a log-probability.

    Args:
        source_activations: `[N, S, d]` English activations of `N` prompts at the anchor (`N ≥ 4`).
        completions: `[N, d_y]` a representation of each prompt's completion.

    Returns:
        `[S]` float32 log of each layer's share, floored at `log(1e-8)` (a layer not aligned at all); uniform when no
        layer is.
    """
    alignment = completion_alignment(source_activations, completions).clamp_min(0)
    if not alignment.sum() > 0:  # no layer varies as the completions do: no layer is favoured
        return torch.full_like(alignment, -math.log(len(alignment)))
    return (alignment / alignment.sum()).clamp_min(1e-8).log()


def sample_gumbel_noise(batch_size: int, num_sources: int, device: torch.device) -> torch.Tensor:
    """`[B, S]` float32 standard Gumbel noise from torch's global generator (reproducible under `manual_seed`)."""
    return -torch.empty(batch_size, num_sources, dtype=torch.float32, device=device).exponential_().log()


class ConnectionChoice:
    """The Decision Maker's choice for one forward pass, and the vector it injects.

    Args:
        decision_maker: the adapter's Decision Maker.
        source_activations: `[B', S, d]` English (or simulated English) activations of the candidate layers.
        temperature: the Gumbel-Softmax temperature.
        sample: draw a hard Gumbel-Softmax sample (training); otherwise take the arg-max.
        learn: whether the Decision Maker learns from this choice; `False` applies the choice with zero gradients.
        reinforce: the Decision Maker learns from :meth:`reinforce_loss` instead of the straight-through gradient
            (the injected vector then carries zero gradients to it).

    After :meth:`vectors_for`: `summary` (`[B', d]` the Decision Maker's input `z`), `choice` and `logits`
    (`[B', S]`), detached.
    """

    def __init__(
        self,
        decision_maker: DecisionMaker,
        source_activations: torch.Tensor,
        temperature: float = 1.0,
        sample: bool = False,
        learn: bool = True,
        reinforce: bool = False,
    ) -> None:
        self.decision_maker = decision_maker
        self.source_activations = source_activations
        self.temperature = temperature
        self.learn = learn
        self.reinforce = reinforce
        rows, num_sources = source_activations.shape[:2]
        self.noise = sample_gumbel_noise(rows, num_sources, source_activations.device) if sample else None
        self.choice: torch.Tensor | None = None
        self.summary: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self._log_probabilities: torch.Tensor | None = None  # [B', S], gradients to the Decision Maker only

    def vectors_for(self, first_layer_input: torch.Tensor) -> torch.Tensor:
        """`c = Σ_l s_l g_l e_l`: the `[B', d]` float32 vectors to inject (`g_l = 1` without a gate).

        Args:
            first_layer_input: `[B', d]` `h_in`, the hidden state entering the first decoder layer at the anchors.
        """
        z = self.decision_maker.summarize(first_layer_input, self.source_activations)
        self.summary = z.detach()
        choice, logits = self.decision_maker(z, self.noise, self.temperature)
        if not self.learn or self.reinforce:
            # Zero gradients rather than none: distributed data parallel expects one for every trainable parameter.
            choice = choice.detach() + 0.0 * choice
        if self.learn and self.reinforce:
            self._log_probabilities = torch.log_softmax(self.decision_maker.logits(z.detach()), dim=-1)
        self.choice, self.logits = choice.detach(), logits.detach()
        sources = self.source_activations.float()
        gate = self.decision_maker.gate
        if gate is not None:  # learns from every step, `learn` or not: how much to inject, not which layer
            sources = sources * gate.float().unsqueeze(-1)
        return (choice.unsqueeze(-1) * sources).sum(dim=1)

    def reinforce_loss(
        self, row_losses: torch.Tensor, single_row_baseline: float | None = None
    ) -> torch.Tensor | None:
        """The REINFORCE term of the Decision Maker, whose gradient is `mean_r (ℓ_r − b_r) ∇ log p_r(chosen layer)`.

        `ℓ_r` is row `r`'s loss with the layer it injected and the baseline `b_r` the mean loss of the other rows. Its
        value is 0, so adding it to the loss changes no reported number.

        Args:
            row_losses: `[B']` the loss of each connected row (gradients are not taken through it).
            single_row_baseline: the baseline when there is one row only (e.g. a running mean of past losses).

        Returns:
            A scalar, or `None` when the Decision Maker does not learn from this choice, or there is no row, or one
            row and no `single_row_baseline`.
        """
        rows = len(row_losses)
        if self._log_probabilities is None or rows == 0 or (rows == 1 and single_row_baseline is None):
            return None
        losses = row_losses.detach().float().to(self._log_probabilities.device)
        if rows == 1:
            baseline = torch.full_like(losses, single_row_baseline)
        else:
            baseline = (losses.sum() - losses) / (rows - 1)
        chosen = (self.choice * self._log_probabilities).sum(dim=-1)  # [B'] log p of the injected layer
        surrogate = ((losses - baseline) * chosen).mean()
        return surrogate - surrogate.detach()

    def per_row(self, rows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(layer_choice, layer_logits)`, each `[batch_size, S]` float32, zeros on rows not in `rows`."""
        num_sources = self.source_activations.shape[1]
        layer_choice = torch.zeros(batch_size, num_sources, device=rows.device)
        layer_logits = torch.zeros_like(layer_choice)
        if self.choice is not None:
            layer_choice[rows] = self.choice.to(rows.device)
            layer_logits[rows] = self.logits.to(rows.device)
        return layer_choice, layer_logits
