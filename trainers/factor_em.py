"""EM for the deep latent factor model of Gaussian distillation (seed 002), on tensors.

Data: M teacher members evaluated at N design points, `observations` `(M, N, D)` (y_mi = y_m(x_i)),
and the model's `inputs` `(N, F)` at the same points. Model (`hf_eu.gaussian`):

    y_mi = μ(x_i) + Φ(x_i)ᵀ z_m + ε_mi,   z_m ~ N(0, I_q) (one per member, shared by all its points),
    ε_mi ~ N(0, Ψ),  Ψ = σ² I ("isotropic") or diag(ψ) ("diagonal"),  (μ_i, Φ_i) = model(x_i).

E-step, closed form as in factor analysis, over all N design points at once (r_mi = y_mi − μ_i):

    Λ = I + Σ_i Φ_i Ψ⁻¹ Φ_iᵀ,   Σ_post = Λ⁻¹,   m_m = Σ_post Σ_i Φ_i Ψ⁻¹ r_mi,   E[z_m z_mᵀ] = Σ_post + m_m m_mᵀ.

M-step: SGD over minibatches of design points on the expected complete-data negative log-likelihood
with the moments fixed (`expected_nll`), ½ Σ_m Σ_i [‖r_mi − Φ_iᵀ m_m‖²_Ψ⁻¹ + tr(Φ_i Ψ⁻¹ Φ_iᵀ Σ_post)]
(+ ½ M N log|Ψ|), then Ψ in closed form. Everything but the SGD reads the sufficient statistics of one
no-grad pass (`FactorStatistics`: Σ_i Φ_i[:, d] Φ_i[:, d]ᵀ, Σ_i Φ_i[:, d] r_mid, Σ_i r_mid², all per
dimension d, in float64): the noise update, the E-step, the marginal log-likelihood

    log p(y_m) = −½ [N D log 2π + N log|Ψ| + log|Λ| + Σ_i r_miᵀ Ψ⁻¹ r_mi − b_mᵀ Λ⁻¹ b_m],  b_m = Σ_i Φ_i Ψ⁻¹ r_mi,

and the expected complete-data log-likelihood Q that the M-step must not lower.

Initialisation pulls the posterior of z towards N(0, I) (the paper found such an initialisation
indispensable): the first moments are the members' whitened principal-component scores, whose
empirical mean and covariance across members are exactly 0 and I, and the first M-step fits μ and Φ
to them. `fit_factor_model` runs generalised EM: an M-step that lowers Q is undone (and its learning
rate halved), so the marginal likelihood never decreases. `trainers.gaussian_trainer` uses the same
`FactorEM` with `transformers.Trainer` as the M-step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["INITS", "NOISE_MODELS", "FactorEM", "FactorMoments", "FactorStatistics", "expected_nll", "fit_factor_model"]

NOISE_MODELS = ("isotropic", "diagonal")
INITS = ("pca", "random")
_VARIANCE_FLOOR = 1e-10  # relative to the mean residual variance: keeps Ψ⁻¹ finite


@dataclass
class FactorMoments:
    """Posterior moments of the members' latent factors: z_m ~ N(means[m], covariance)."""

    means: torch.Tensor  # (M, q) float64
    covariance: torch.Tensor  # (q, q) float64, shared by all members

    def second_moment_sum(self) -> torch.Tensor:
        """Σ_m E[z_m z_mᵀ] = M Σ_post + Σ_m m_m m_mᵀ, `(q, q)`."""
        return self.means.shape[0] * self.covariance + self.means.T @ self.means


@dataclass
class FactorStatistics:
    """Sufficient statistics of one pass over the design points (float64), per output dimension d."""

    gram: torch.Tensor  # (D, q, q): Σ_i Φ_i[:, d] Φ_i[:, d]ᵀ
    cross: torch.Tensor  # (M, q, D): Σ_i Φ_i[:, d] r_mid
    squares: torch.Tensor  # (M, D): Σ_i r_mid²
    count: int = 0  # N

    @classmethod
    def of_chunk(cls, mean: torch.Tensor, factors: torch.Tensor, observations: torch.Tensor) -> FactorStatistics:
        """Statistics of `mean` `(n, D)`, `factors` `(n, q, D)` and `observations` `(M, n, D)`."""
        factors = factors.double()
        residuals = observations.double() - mean.double()  # (M, n, D)
        # elementwise products summed over n: many times faster on CPU than the batched tiny matmuls of einsum
        gram = torch.stack([(factors[:, j : j + 1] * factors).sum(0) for j in range(factors.shape[1])])  # (q, q, D)
        cross = torch.stack([(factors * member.unsqueeze(1)).sum(0) for member in residuals])  # (M, q, D)
        return cls(gram=gram.permute(2, 0, 1), cross=cross, squares=residuals.square().sum(1), count=mean.shape[0])

    def __add__(self, other: FactorStatistics) -> FactorStatistics:
        return FactorStatistics(self.gram + other.gram, self.cross + other.cross, self.squares + other.squares,
                                self.count + other.count)

    def noise_update(self, moments: FactorMoments, noise_model: str) -> torch.Tensor:
        """Ψ's diagonal `(D,)` maximising the expected complete-data likelihood given `moments`:
        ψ_d = (1/MN) Σ_m E Σ_i (r_mid − (Φ_iᵀ z_m)_d)²; isotropic: its mean over d."""
        num_members = self.cross.shape[0]
        per_dim = (self.squares.sum(0) - 2 * torch.einsum("mq,mqd->d", moments.means, self.cross)
                   + torch.einsum("dqp,qp->d", self.gram, moments.second_moment_sum()))
        psi = per_dim / (num_members * self.count)  # (D,)
        if noise_model == "isotropic":
            psi = psi.mean().expand_as(psi).clone()
        return psi.clamp_min(_VARIANCE_FLOOR * float(self.squares.mean()) / self.count + 1e-300)

    def _precision_and_projection(self, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_factors = self.gram.shape[-1]
        precision = torch.eye(num_factors, dtype=torch.float64) + torch.einsum("dqp,d->qp", self.gram, 1 / psi)
        projection = torch.einsum("mqd,d->mq", self.cross, 1 / psi)  # (M, q): b_m
        return precision, projection

    def posterior(self, psi: torch.Tensor) -> FactorMoments:
        """E-step: Σ_post = Λ⁻¹ and m_m = Σ_post b_m for every member."""
        precision, projection = self._precision_and_projection(psi)
        covariance = torch.cholesky_inverse(torch.linalg.cholesky(precision))  # (q, q)
        return FactorMoments(means=projection @ covariance, covariance=covariance)

    def log_likelihood(self, psi: torch.Tensor) -> float:
        """Σ_m log p(y_m) of the members' observations with z integrated out (nats)."""
        precision, projection = self._precision_and_projection(psi)
        chol = torch.linalg.cholesky(precision)
        logdet = 2 * chol.diagonal().log().sum()
        quadratic = (self.squares / psi).sum(1) - (projection * torch.cholesky_solve(projection.T, chol).T).sum(1)
        num_members, dims = self.squares.shape
        constant = self.count * (dims * math.log(2 * math.pi) + psi.log().sum()) + logdet
        return float(-0.5 * (num_members * constant + quadratic.sum()))

    def expected_log_likelihood(self, psi: torch.Tensor, moments: FactorMoments) -> float:
        """Q: Σ_m E_{z_m ~ moments} log p(y_m | z_m) (the prior term, constant in μ, Φ, Ψ, left out)."""
        num_members, dims = self.squares.shape
        per_dim = (self.squares.sum(0) - 2 * torch.einsum("mq,mqd->d", moments.means, self.cross)
                   + torch.einsum("dqp,qp->d", self.gram, moments.second_moment_sum()))
        constant = num_members * self.count * (dims * math.log(2 * math.pi) + psi.log().sum())
        return float(-0.5 * (constant + (per_dim / psi).sum()))


def expected_nll(mean: torch.Tensor, factors: torch.Tensor, observations: torch.Tensor, moments: FactorMoments,
                 psi: torch.Tensor) -> torch.Tensor:
    """The M-step loss on a minibatch: expected complete-data NLL per member, point and dimension.

    ½ Σ_m Σ_i [‖r_mi − Φ_iᵀ m_m‖²_Ψ⁻¹ + tr(Φ_i Ψ⁻¹ Φ_iᵀ Σ_post)] / (M n D) for `mean` `(n, D)`, `factors`
    `(n, q, D)` and `observations` `(M, n, D)`; the terms constant in μ and Φ are left out.
    """
    num_members, count, dims = observations.shape
    means = moments.means.to(factors)
    inverse_psi = (1 / psi).to(factors)  # (D,)
    residuals = observations.to(factors) - mean - torch.einsum("mq,nqd->mnd", means, factors)  # (M, n, D)
    fit = (residuals.square() * inverse_psi).sum()
    num_factors = factors.shape[1]
    weighted = (factors * inverse_psi).transpose(0, 1).reshape(num_factors, -1)  # (q, n·D)
    gram = weighted @ factors.transpose(0, 1).reshape(num_factors, -1).T  # (q, q): Σ_i Φ_i Ψ⁻¹ Φ_iᵀ
    spread = num_members * (gram * moments.covariance.to(factors)).sum()
    return 0.5 * (fit + spread) / (num_members * count * dims)


def _check_inputs(inputs: torch.Tensor, observations: torch.Tensor, num_factors: int, noise_model: str,
                  init: str) -> None:
    if observations.dim() != 3:
        raise ValueError(f"`observations` must have shape (members, design points, dims), got {tuple(observations.shape)}.")
    if inputs.shape[0] != observations.shape[1]:
        raise ValueError(f"`inputs` has {inputs.shape[0]} design points but `observations` has {observations.shape[1]}.")
    num_members = observations.shape[0]
    if not isinstance(num_factors, int) or not 1 <= num_factors <= num_members - 1:
        raise ValueError(f"`num_factors` must be an integer in [1, members - 1] = [1, {num_members - 1}] (M members "
                         f"identify at most M - 1 factors), got {num_factors!r}. Add teacher members or lower it.")
    if noise_model not in NOISE_MODELS:
        raise ValueError(f"`noise_model` must be one of {NOISE_MODELS}, got {noise_model!r}.")
    if init not in INITS:
        raise ValueError(f"`init` must be one of {INITS}, got {init!r}.")


@dataclass
class FactorEM:
    """The EM state of one fit: data, noise variance Ψ, posterior moments, and the history of the fit.

    `model(inputs[index])` must return `(mean (n, D), factors (n, q, D))` (e.g. `GaussianFactorHead`).
    """

    inputs: torch.Tensor  # (N, F)
    observations: torch.Tensor  # (M, N, D)
    num_factors: int
    noise_model: str = "isotropic"
    init: str = "pca"
    seed: int = 0
    chunk_size: int = 4096
    psi: torch.Tensor | None = None  # (D,) float64
    moments: FactorMoments | None = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        _check_inputs(self.inputs, self.observations, self.num_factors, self.noise_model, self.init)

    @property
    def num_points(self) -> int:
        return self.observations.shape[1]

    def initialize(self) -> None:
        """Moments of z from whitened principal-component scores (or N(0, I) draws), Ψ from the residual variance."""
        member_mean = self.observations.double().mean(0, keepdim=True)  # (1, N, D)
        gram = torch.zeros(self.observations.shape[0], self.observations.shape[0], dtype=torch.float64)
        variance = torch.zeros(self.observations.shape[2], dtype=torch.float64)
        for start in range(0, self.num_points, self.chunk_size):
            residuals = self.observations[:, start : start + self.chunk_size].double() - member_mean[:, start : start + self.chunk_size]
            flat = residuals.flatten(1)  # (M, n·D)
            gram += flat @ flat.T
            variance += residuals.square().sum((0, 1))
        num_members = gram.shape[0]
        self.psi = variance / (num_members * self.num_points)
        if self.noise_model == "isotropic":
            self.psi = self.psi.mean().expand_as(self.psi).clone()
        if self.init == "pca":
            eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
            if eigenvalues[-self.num_factors] <= 1e-12 * eigenvalues[-1].clamp_min(1e-300):
                raise ValueError("The teacher members barely differ (their residuals have rank < num_factors); lower "
                                 "`num_factors` or use members that disagree.")
            scores = math.sqrt(num_members) * eigenvectors[:, -self.num_factors :].flip(-1)  # (M, q): mean 0, cov I
        else:
            generator = torch.Generator().manual_seed(self.seed)
            scores = torch.randn(num_members, self.num_factors, generator=generator, dtype=torch.float64)
        self.moments = FactorMoments(means=scores, covariance=torch.zeros(self.num_factors, self.num_factors,
                                                                          dtype=torch.float64))

    def _device(self, model: nn.Module) -> torch.device:
        parameter = next(model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def predict(self, model: nn.Module, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """`model` at the design points `index`: mean `(n, D)` and factors `(n, q, D)`."""
        return model(self.inputs[index].to(self._device(model)))

    def statistics(self, model: nn.Module) -> FactorStatistics:
        """Sufficient statistics of `model` over all design points (one pass, no gradients)."""
        total = None
        with torch.no_grad():
            for start in range(0, self.num_points, self.chunk_size):
                index = slice(start, start + self.chunk_size)
                mean, factors = self.predict(model, index)
                chunk = FactorStatistics.of_chunk(mean.cpu(), factors.cpu(), self.observations[:, index])
                total = chunk if total is None else total + chunk
        return total

    def loss(self, model: nn.Module, index: torch.Tensor) -> torch.Tensor:
        """The M-step loss (`expected_nll`) of `model` on the design points `index`, moments and Ψ fixed."""
        if self.moments is None:
            raise RuntimeError("Call `initialize()` (or `update(model)`) before the first M-step.")
        index = index.cpu()
        mean, factors = self.predict(model, index)
        observations = self.observations[:, index].to(mean.device)
        return expected_nll(mean, factors, observations, self.moments, self.psi)

    def objective(self, model: nn.Module) -> float:
        """Q of `model` under the current moments and Ψ (what a generalised M-step must not lower)."""
        return self.statistics(model).expected_log_likelihood(self.psi, self.moments)

    def update(self, model: nn.Module, noise: bool = True) -> dict:
        """After an M-step: Ψ in closed form (unless `noise=False`), then the E-step; returns the record logged."""
        stats = self.statistics(model)
        if noise and self.moments is not None:
            self.psi = stats.noise_update(self.moments, self.noise_model)
        self.moments = stats.posterior(self.psi)
        scores = self.moments.means
        record = {"log_likelihood": stats.log_likelihood(self.psi),
                  "noise_variance": float(self.psi.mean()),
                  "factor_variance": float(stats.gram.diagonal(dim1=1, dim2=2).sum() / stats.count),
                  "posterior_mean_norm": float(scores.mean(0).norm()),
                  "posterior_spread": float((scores.T @ scores / scores.shape[0] + self.moments.covariance).trace()
                                            / self.num_factors)}
        self.history.append(record)
        return record


def fit_factor_model(model: nn.Module, inputs: torch.Tensor, observations: torch.Tensor, *, num_factors: int,
                     num_iterations: int = 20, m_step_steps: int = 50, batch_size: int = 256,
                     learning_rate: float = 1e-2, noise_model: str = "isotropic", init: str = "pca", seed: int = 0,
                     optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam) -> FactorEM:
    """Fit `model` (inputs → (μ, Φ)) to the members' `observations` by generalised EM.

    Each iteration: an M-step of `m_step_steps` optimizer steps on minibatches of `batch_size` design
    points (a fresh optimizer each time), undone and its learning rate halved if it lowered Q; Ψ in
    closed form; the E-step. The marginal log-likelihood after each iteration is in `history`; with
    exact E-steps it never decreases. Returns the `FactorEM` (Ψ, moments, history); `model` is fitted in place.
    """
    for name, value in (("num_iterations", num_iterations), ("m_step_steps", m_step_steps),
                        ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer ≥ 1, got {value!r}.")
    em = FactorEM(inputs, observations, num_factors, noise_model=noise_model, init=init, seed=seed)
    em.initialize()
    generator = torch.Generator().manual_seed(seed)
    for iteration in range(num_iterations):
        before, snapshot = em.objective(model), copy.deepcopy(model.state_dict())
        trainable = [p for p in model.parameters() if p.requires_grad]
        step = optimizer(trainable, lr=learning_rate)
        for _ in range(m_step_steps):
            index = torch.randint(em.num_points, (min(batch_size, em.num_points),), generator=generator)
            loss = em.loss(model, index)
            step.zero_grad()
            loss.backward()
            step.step()
        accepted = em.objective(model) >= before
        if not accepted:  # a generalised M-step may not lower Q: keep the old parameters, take smaller steps
            model.load_state_dict(snapshot)
            learning_rate /= 2
        em.update(model)
        em.history[-1].update(iteration=iteration, accepted=accepted, learning_rate=learning_rate)
    return em
