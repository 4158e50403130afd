"""The product budget of the iterative top-k (``max_products``) on the spectrum where block
Lanczos is slow: a packed top cluster against a wide negative end, as ``E = H - G`` of a curved
layer (top near 12, bottom near -2000, most eigenvalues near 0).

The operator is matrix-free and built from a known spectrum ``D`` and an orthogonal reflection
``Q = I - 2 U (U^T U)^{-1} U^T`` (``U`` random ``(p, 48)``): ``M = Q D Q``, applied as three skinny
products, so its eigenpairs are known without a decomposition and the ``p = 3000`` case costs
no ``p^3``. References: ``numpy.linalg.eigh`` of the matrix formed from its columns (``p = 600``)
and the construction itself.

Products, measured before the budget existed (``spectra.iterative_topk`` with no budget, seed 0):
the top 12 of the ``p = 600`` operator took 8,948 products in float64 and 2,020 in float32
(``p = 3000``, float64: 9,060). Two changes: the budget, and a default basis that doubles after
every 4 restarts without convergence (up to 4 times its size).
"""

import numpy as np
import pytest
import torch
from torch import Tensor

from deepufm.errors import ConfigError, UncertifiedError
from deepufm.matrices import spectra
from deepufm.matrices.operator import SymmetricMatrix

K = 12  # the packed top cluster; the top-k asks for exactly it


def hard_spectrum(p: int, seed: int) -> Tensor:
    """``(p,)`` descending: 12 values in [10, 12], the rest in [-2000, 0], dense near 0 (the
    cube of a uniform), with both ends -2000 and 0 attained so the spread is fixed."""
    gen = torch.Generator().manual_seed(seed)
    top = torch.linspace(12.0, 10.0, K, dtype=torch.float64)
    rest = -2000.0 * torch.rand(p - K, generator=gen, dtype=torch.float64) ** 3
    rest[0], rest[1] = 0.0, -2000.0
    return torch.cat([top, rest]).sort(descending=True).values


class HardSpectrum(SymmetricMatrix):
    """``M = Q diag(values) Q`` with ``Q`` a random reflection, products only (matrix-free)."""

    matrix_free = True

    def __init__(self, p: int, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__(p, dtype, "cpu")
        gen = torch.Generator().manual_seed(seed + 1)
        U = torch.linalg.qr(torch.randn(p, 48, generator=gen, dtype=torch.float64))[0]
        self.values = hard_spectrum(p, seed)
        self.U, self.d = U.to(dtype), self.values.to(dtype)
        self.calls = 0

    def reflect(self, V: Tensor) -> Tensor:
        """``Q V``: ``(p, m) -> (p, m)`` (``U`` orthonormal, so ``Q = I - 2 U U^T``)."""
        return V - 2.0 * self.U @ (self.U.T @ V)

    def matmat(self, V: Tensor) -> Tensor:
        """``Q D Q V``: ``(p, m) -> (p, m)``; counts the columns."""
        self.calls += V.shape[1]
        return self.reflect(self.d[:, None] * self.reflect(V))


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_below_the_dense_limit_the_budget_switches_to_the_exact_route(dtype):
    """``max_products = p`` (the dense crossover) at ``p = 600 <= DENSE_LIMIT``: after ``p``
    Lanczos products the engine forms the matrix (``p`` more) and decomposes it; the pairs agree
    with numpy's ``eigh`` and cost at most ``2 p + 2 k`` products (the certificate's ``k``, and
    ``k`` for a refinement) — 1,224 against 8,948 (float64) and 2,020 (float32) before."""
    p = 600
    op = HardSpectrum(p, dtype)
    result = spectra.topk(op, K, max_products=p)
    cert = result.certificate
    assert result.certified and not cert.budget_spent, cert.reason
    assert cert.method.startswith("dense") and f"budget of {p} products" in cert.method
    assert cert.products == op.calls <= 2 * p + 2 * K
    ref_vals, ref_vecs = np.linalg.eigh(op.dense().double().numpy())
    ref = torch.from_numpy(ref_vals[::-1][:K].copy())
    scale = float(np.abs(ref_vals).max())
    # independent check of the reference against the construction
    assert float((ref - op.values[:K]).abs().max()) <= 10 * eps(dtype) * scale
    # float64: 1e-8 relative; float32: a backward-stable eigh's error, a few eps ||M||
    bound = (1e-8 if dtype == torch.float64 else 10 * eps(dtype)) * scale
    assert float((result.values.double() - ref).abs().max()) <= bound
    # the vectors span the top-12 eigenspace: sin(angle) <= residual / gap (Davis–Kahan), the
    # gap to the 13th eigenvalue being 10, the residual of a stable eigh a few eps ||M||
    top = torch.from_numpy(ref_vecs[:, ::-1][:, :K].copy())
    V = result.vectors.double()
    gap = float(op.values[K - 1] - op.values[K])
    assert (
        float(torch.linalg.matrix_norm(top @ top.T - V @ V.T, 2)) <= 10 * eps(dtype) * scale / gap
    )


@pytest.mark.parametrize(
    ("p", "dtype", "before"),
    [(600, torch.float64, 8948), (600, torch.float32, 2020), (3000, torch.float64, 9060)],
)
def test_without_a_budget_the_grown_basis_converges_in_fewer_products(p, dtype, before):
    """The default (budget ``40 p``, basis allowed to grow): Lanczos converges and certifies,
    agrees with the construction, and within half the products it needed with a fixed basis
    (``before``, measured on the old engine; now 2,020, 772 and 2,180)."""
    op = HardSpectrum(p, dtype)
    result = spectra.topk(op, K)
    cert = result.certificate
    assert result.certified and cert.method.startswith("lanczos") and not cert.budget_spent
    assert cert.products == op.calls <= before / 2
    bound = (1e-8 if dtype == torch.float64 else 10 * eps(dtype)) * 2000
    assert float((result.values.double() - op.values[:K]).abs().max()) <= bound


def test_a_given_basis_is_not_grown():
    """``max_basis`` given: the basis stays as asked (the old solve, products as before)."""
    op = HardSpectrum(600, torch.float64)
    result = spectra.lanczos_topk(op, K, max_basis=44)
    assert result.certified and result.certificate.products == op.calls == 8948


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_above_the_dense_limit_a_spent_budget_is_flagged(dtype):
    """``p = 3000 > DENSE_LIMIT`` and a budget of 300: the best Ritz pairs come back flagged
    (``budget_spent``, the budget in the reason), within the budget plus the certificate's
    check (``48 + 2 k``); ``strict=True`` raises naming the budget."""
    p, budget = 3000, 300
    assert p > spectra.DENSE_LIMIT
    op = HardSpectrum(p, dtype)
    result = spectra.topk(op, K, max_products=budget)
    cert = result.certificate
    assert cert.budget_spent and not result.certified
    assert f"max_products={budget} was spent" in cert.reason
    assert cert.products == op.calls <= budget + 48 + 2 * K
    assert result.values.shape == (K,) and result.vectors.shape == (p, K)
    # Ritz values of a symmetric operator lie below the eigenvalues they approximate
    assert bool((result.values.double() <= op.values[:K] + 1e3 * eps(dtype) * 2000).all())
    with pytest.raises(UncertifiedError, match=f"max_products={budget}"):
        spectra.topk(op, K, max_products=budget, strict=True)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "100"])
def test_max_products_is_validated(bad):
    op = HardSpectrum(200, torch.float64)
    with pytest.raises(ConfigError, match=r"max_products=.*integer >= 1"):
        spectra.topk(op, 3, max_products=bad)
    with pytest.raises(ConfigError, match="max_products"):
        spectra.lanczos_topk(op, 3, max_products=bad)
