"""Least squares in `O(d²)` memory: the normal equations of `V ≈ U T`, accumulated batch by batch in float64."""

from __future__ import annotations

import warnings

import torch

DEFAULT_RIDGE = 1e-4


class NormalEquations:
    """Running sufficient statistics of a linear least-squares fit `V ≈ U T`, in float64, in `O(d²)` memory.

    Rows are added in batches with :meth:`add`; only the following are kept (never the rows):

    - `gram`: `[d_in, d_in]` `UᵀU`;
    - `cross`: `[d_in, d_out]` `UᵀV`;
    - `target_sum`: `[d_out]` `Σ v` (column sums of `V`);
    - `target_sq_sum`: `tr(VᵀV) = Σ ||v||²` (a float64 scalar tensor);
    - `num_rows`: the number of rows added.

    They suffice to solve the (ridge-regularised) normal equations (:meth:`solve`) and to score any `T` on the rows
    added (:meth:`r_squared`), so the same class serves as the fit's accumulator and as the held-out evaluator.

    Args:
        in_features: `d_in`, the width of a row `u`.
        out_features: `d_out`, the width of a row `v` (default: `d_in`).
        device: where to keep the statistics (default: CPU). Rows added on another device are moved here.
    """

    def __init__(
        self, in_features: int, out_features: int | None = None, device: torch.device | str | None = None
    ) -> None:
        out_features = in_features if out_features is None else out_features
        options = dict(dtype=torch.float64, device=device)
        self.gram = torch.zeros(in_features, in_features, **options)
        self.cross = torch.zeros(in_features, out_features, **options)
        self.target_sum = torch.zeros(out_features, **options)
        self.target_sq_sum = torch.zeros((), **options)
        self.num_rows = 0

    @property
    def in_features(self) -> int:
        return self.gram.shape[0]

    @property
    def out_features(self) -> int:
        return self.cross.shape[1]

    def add(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Add rows: `u` `[n, d_in]` and `v` `[n, d_out]` (any float dtype; cast to float64 first)."""
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != v.shape[0]:
            raise ValueError(
                f"Expected u [n, d_in] and v [n, d_out] with the same n, got {tuple(u.shape)} and {tuple(v.shape)}."
            )
        if u.shape[1] != self.in_features or v.shape[1] != self.out_features:
            raise ValueError(
                f"Expected rows of width {self.in_features} (u) and {self.out_features} (v), got {u.shape[1]} and "
                f"{v.shape[1]}."
            )
        u = u.detach().to(device=self.gram.device, dtype=torch.float64)
        v = v.detach().to(device=self.gram.device, dtype=torch.float64)
        self.gram.addmm_(u.T, u)
        self.cross.addmm_(u.T, v)
        self.target_sum += v.sum(dim=0)
        self.target_sq_sum += v.square().sum()
        self.num_rows += u.shape[0]

    def ridge_value(self, ridge: float = DEFAULT_RIDGE) -> float:
        """The absolute ridge `λ = ridge · tr(UᵀU) / d_in` (`ridge` is relative to the mean diagonal of `UᵀU`)."""
        if not ridge >= 0:
            raise ValueError(f"`ridge` must be >= 0, got {ridge!r}.")
        return float(ridge * self.gram.diagonal().sum() / self.in_features) if ridge else 0.0

    def solve(self, ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, float]:
        """Solve `(UᵀU + λI) T = UᵀV` in float64.

        Args:
            ridge: relative ridge strength; `λ = ridge · tr(UᵀU) / d_in` (see :meth:`ridge_value`). `0` gives plain
                least squares. When `UᵀU + λI` is (numerically) singular, e.g. with `ridge=0` and fewer independent
                rows than `d_in`, the minimum-norm least-squares solution is returned (as `numpy.linalg.lstsq`
                gives), with a warning.

        Returns:
            `(T, λ)`: `T` `[d_in, d_out]` float64 on this accumulator's device, and the absolute ridge added.

        Raises:
            ValueError: if no rows were added, or the statistics are not finite.
        """
        if self.num_rows == 0:
            raise ValueError("Cannot solve the normal equations: no rows were added.")
        if not (torch.isfinite(self.gram).all() and torch.isfinite(self.cross).all()):
            raise ValueError("Cannot solve the normal equations: the rows added were not all finite.")
        lam = self.ridge_value(ridge)
        system = self.gram.clone()
        system.diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0:
            # (min/max pivot)² estimates 1/cond(UᵀU + λI) from below; trust the factor unless it is at rounding level.
            pivots = factor.diagonal()
            if float((pivots.min() / pivots.max()) ** 2) > self.in_features * torch.finfo(torch.float64).eps:
                return torch.cholesky_solve(self.cross, factor), lam
        warnings.warn(
            f"UᵀU + λI (λ={lam:.3g}) is singular ({self.num_rows} rows of width {self.in_features}): returning the "
            "minimum-norm least-squares solution. Use more rows or a ridge > 0 for a well-posed fit.",
            stacklevel=2,
        )
        return torch.linalg.pinv(system, hermitian=True) @ self.cross, lam

    def residual_sum_of_squares(self, transform: torch.Tensor) -> float:
        """`||U T − V||² = tr(Tᵀ UᵀU T) − 2 tr(Tᵀ UᵀV) + tr(VᵀV)` over the rows added (clamped at 0)."""
        transform = transform.to(device=self.gram.device, dtype=torch.float64)
        fitted = ((self.gram @ transform) * transform).sum()
        sse = fitted - 2 * (self.cross * transform).sum() + self.target_sq_sum
        return max(float(sse), 0.0)

    def total_sum_of_squares(self) -> float:
        """`Σ ||v − mean(v)||²` over the rows added (the mean taken per dimension)."""
        if self.num_rows == 0:
            return 0.0
        return float(self.target_sq_sum - self.target_sum.square().sum() / self.num_rows)

    def r_squared(self, transform: torch.Tensor) -> float | None:
        """`R² = 1 − SSE/SST` of `V̂ = U T` against `V` over the rows added; `None` without rows or variance.

        `SST` is taken around the per-dimension mean of these rows and summed over dimensions, so `R²` is the
        fraction of the total variance of `v` that `u T` explains (1: perfect; 0: no better than the mean; it can
        be negative).
        """
        sst = self.total_sum_of_squares()
        if self.num_rows == 0 or not sst > 0:
            return None
        return 1.0 - self.residual_sum_of_squares(transform) / sst
