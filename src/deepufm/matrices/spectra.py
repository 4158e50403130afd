"""The spectral engine: certified top-k eigenpairs of any symmetric operator, and the rank rule.

Every ``topk`` of deepufm ends here. A route (a dense ``eigh``, an exact small eigenproblem of a
structured matrix, or block Lanczos on ``matmat``) proposes ``k`` eigenpairs; :func:`certify`
checks them with one product of the ``k`` vectors and returns a :class:`TopK` — unpacking as
``(values, vectors)`` — with a :class:`Certificate`: every pair's residual ``||M v - theta v||``,
the orthogonality ``max |V^T V - I|``, and ``deflated_max``, the largest eigenvalue of ``M`` on the
orthogonal complement of the returned space (exact for the exact routes; for the iterative route a
Ritz value from a fresh random block Krylov space, which can only underestimate it). The pairs
are certified when the residuals and the orthogonality are below tolerance and
``deflated_max <= theta_k`` up to tolerance: then no eigenvalue above ``theta_k`` was missed.

Collapse makes outliers *exactly* repeated (``K^2`` equal layer-Hessian eigenvalues at DNC). A
block Krylov method adds at most ``block`` new directions of an eigenspace per step, so with a
small block it can look converged while copies of a repeated eigenvalue are still missing. The
iterative route therefore (1) grows its basis to ``min(2k, max_basis - block)`` vectors before it
accepts convergence, so the copies enter through further blocks and through the fresh random
directions injected when the Krylov space becomes invariant, (2) certifies the result with the
deflated check, and (3) if that check still finds a missed eigenvalue, starts again with a doubled
block, up to ``k`` plus a margin — a block that holds every copy a top-``k`` can need, by
construction. A block of 8 with a ``3k`` basis needs far fewer products than a block of ``k``
on a spread spectrum (804 against 10,452 for the top 100 of a small CNN's Hessian; 588 against
2,724 for a ReLU layer Hessian, benchmarks/README.md). What cannot be certified is flagged
(``certified=False`` with a reason), or raised with ``strict=True``.

The iterative route spends at most ``max_products`` products (default ``40 p``; ``p``, the dense
crossover, for spectra known to be hard). A spectrum whose top ``k`` are packed against a wide
negative end (``E = H - G`` of a curved layer: top near 12, bottom near -2000) has a relative gap
of about ``1e-3`` and Lanczos needs many restarts; once the budget is spent, an operator of at
most :data:`DENSE_LIMIT` rows is decomposed exactly, a larger one returns its best Ritz pairs
flagged ``budget_spent`` with the budget in the reason.

The rank rule: an eigenvalue (or singular value) is a numerical zero when
``|lambda| <= size * eps(dtype) * max|lambda|`` (the rule of LAPACK-based ``matrix_rank``), one
rule for every rank, outlier count and null-space completion in deepufm (:func:`rank_rtol`).

The dense/iterative switch is :func:`use_exact`, the only one up front; the iterative route's
budget (above) is the only one after the fact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import scipy.linalg
import torch
from torch import Tensor

from deepufm.errors import ConfigError, ConvergenceError, UncertifiedError

if TYPE_CHECKING:  # the engine needs only size, dtype, device and matmat of an operator
    from deepufm.matrices.operator import SymmetricMatrix

# The size of the smallest exact eigenproblem up to which an exact (LAPACK) decomposition is
# used for a top-k; beyond it block Lanczos on the structured product is cheaper (one thread:
# a 1024 x 1024 subset ``syevr`` ~0.3 s, 2048 ~2 s; the certified top 100 of the p = 4096 ReLU
# layer Hessian by Lanczos ~1.5 s, see benchmarks/README.md).
DENSE_LIMIT = 1024


def use_exact(size: int, k: int, matrix_free: bool = False) -> bool:
    """Whether a top-``k`` of an operator whose smallest exact eigenproblem has ``size`` rows
    is best computed exactly. ``matrix_free``: forming that problem costs ``size`` products
    (a :class:`~deepufm.matrices.ModuleHessian`), so only when ``k`` is a large part of it."""
    if 4 * k >= size:
        return True
    if matrix_free:
        # dense costs `size` products; a certified solve typically about this many (measured
        # 162-319 at k=5, 412-2,790 at k=20, 420-732 at k=100 on spread spectra): ~6 restarts of
        # a basis of k + 4 first blocks, then the certificate's 48 + 2k
        return size <= 6 * (k + 4 * first_block(k)) + 48 + 2 * k
    return size <= DENSE_LIMIT


# -- the rank rule ----------------------------------------------------------------------------------
def rank_rtol(dtype: torch.dtype, size: int) -> float:
    """Relative threshold of a numerical zero: ``size * eps(dtype)`` (float64: 2.2e-16 per row,
    float32: 1.2e-7 per row)."""
    return max(int(size), 1) * torch.finfo(dtype).eps


def zero_threshold(
    values: Tensor, size: int | None = None, rtol: float | None = None, scale: float | None = None
) -> float:
    """Absolute threshold at or below which ``|value|`` is a numerical zero: ``rtol * scale``.

    ``rtol`` defaults to :func:`rank_rtol` of ``values``' dtype and ``size`` (the operator's
    dimension; default the number of values), ``scale`` to ``max|values|`` (pass the largest
    eigenvalue of the whole operator when ``values`` are one of its parts)."""
    if rtol is None:
        rtol = rank_rtol(values.dtype, values.numel() if size is None else size)
    else:
        rtol = check_rank_rtol(rtol)
    if scale is None:
        scale = float(values.abs().max()) if values.numel() else 0.0
    return rtol * abs(float(scale))


def check_rank_rtol(rtol: object) -> float:
    """A valid explicit rank tolerance: a finite number in ``[0, 1)``."""
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0 <= rtol < 1:
        raise ConfigError("rank_rtol", rtol, "a number in [0, 1) (default: size * eps(dtype))")
    return float(rtol)


def numerical_rank(
    values: Tensor, size: int | None = None, rtol: float | None = None, scale: float | None = None
) -> int:
    """Number of ``values`` (eigenvalues or singular values) above the numerical-zero threshold
    (:func:`zero_threshold`)."""
    if values.numel() == 0:
        return 0
    return int((values.abs() > zero_threshold(values, size, rtol, scale)).sum())


def certificate_rtol(dtype: torch.dtype, size: int) -> float:
    """Relative residual and orthogonality a certified top-k meets at ``tol = 0``:
    ``sqrt(size) eps^(2/3)`` (float64: 3.7e-11 sqrt(p); float32: 2.4e-5 sqrt(p)). Looser than
    the Lanczos stopping rule (``1e3 eps``) so that exact routes (round-off ``~ sqrt(p) eps``)
    and lifted small-Gram eigenvectors certify; eigenvalue errors are at most the residuals."""
    return math.sqrt(max(size, 1)) * torch.finfo(dtype).eps ** (2 / 3)


# -- results ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Certificate:
    """Evidence for a top-k (module docstring).

    Attributes:
        residuals: ``(k,)`` ``||M v_i - theta_i v_i||``, from one product after the solve.
        orthogonality: ``max |V^T V - I|``.
        deflated_max: the largest eigenvalue of ``M`` on the orthogonal complement of the
            returned space (``-inf`` when ``k = p``); exact on the exact routes, a Ritz value
            (a lower bound) on the iterative one.
        scale: ``max |theta|`` over what was computed, the scale of the tolerances.
        tol: the relative tolerance certified against (``max(tol, certificate_rtol)``).
        method: the route (``"dense"``, ``"gram"``, ``"kronecker"``, ``"lanczos"``, ...).
        products: operator columns applied (solve, certification and check).
        certified: every residual and the orthogonality within ``tol * scale`` and
            ``deflated_max <= theta_k + tol * scale``.
        reason: why not, when not certified.
        budget_spent: the iterative solve stopped at its product budget (``max_products``)
            before converging; the pairs are its best Ritz pairs (then ``certified`` is False
            unless the certificate happens to hold all the same).
    """

    residuals: Tensor
    orthogonality: float
    deflated_max: float
    scale: float
    tol: float
    method: str
    products: int
    certified: bool
    reason: str = ""
    budget_spent: bool = False


class _Pair(NamedTuple):
    values: Tensor
    vectors: Tensor


class TopK(_Pair):
    """``(values, vectors)`` — ``(k,)`` descending and ``(p, k)`` orthonormal — that unpacks as
    a pair, with its :class:`Certificate` as ``.certificate`` (also ``.certified``,
    ``.residuals``, ``.orthogonality``, ``.deflated_max``)."""

    certificate: Certificate

    def __new__(cls, values: Tensor, vectors: Tensor, certificate: Certificate) -> TopK:
        self = super().__new__(cls, values, vectors)
        self.certificate = certificate
        return self

    @property
    def certified(self) -> bool:
        """Whether the certificate holds (:attr:`Certificate.certified`)."""
        return self.certificate.certified

    @property
    def residuals(self) -> Tensor:
        """``||M v_i - theta_i v_i||`` of every pair: ``(k,)`` (:attr:`Certificate.residuals`)."""
        return self.certificate.residuals

    @property
    def orthogonality(self) -> float:
        """``max |V^T V - I|`` of the returned vectors (:attr:`Certificate.orthogonality`)."""
        return self.certificate.orthogonality

    @property
    def deflated_max(self) -> float:
        """The largest eigenvalue on the complement of the returned space (``-inf`` when
        ``k = p``; :attr:`Certificate.deflated_max`)."""
        return self.certificate.deflated_max


def check_k(k: object, size: int) -> int:
    """``k`` validated as a number of eigenpairs of a ``size x size`` operator, returned
    unchanged.

    Raises:
        ConfigError: ``k`` is not an integer in ``[1, size]`` (a ``bool`` is rejected).
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
        raise ConfigError("k", k, f"an integer in [1, {size}]")
    return k


def check_tol(tol: object) -> float:
    """``tol`` validated as a relative residual tolerance, returned as a ``float``.

    Raises:
        ConfigError: ``tol`` is not a number in ``[0, 1)`` (a ``bool`` is rejected).
    """
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 <= tol < 1:
        raise ConfigError("tol", tol, "a number in [0, 1) (0 = working accuracy)")
    return float(tol)


def default_max_products(size: int) -> int:
    """The default product budget of the iterative route for a ``size x size`` operator:
    ``40 size``, twice the iteration cap one Lanczos solve always had, so that what converged
    before does not stop at the budget now, a retry with a grown block included (a top 14 of
    multiplicity 6 at ``p = 80`` takes 1,726 products; a certified top 20 of small layer
    Hessians up to about ``11 p``). ``max_products = size`` is the dense crossover instead:
    forming the matrix costs ``size`` products, so switching there costs at most twice the
    cheaper route — the choice for a spectrum known to be hard (a packed top against a wide
    negative end, as ``E = H - G`` of a curved layer)."""
    return 40 * size


def check_max_products(max_products: object) -> int | None:
    """``max_products`` validated as a product budget: ``None`` (the default budget,
    :func:`default_max_products`) or a positive integer (a ``bool`` is rejected).

    Raises:
        ConfigError: anything else.
    """
    if max_products is None:
        return None
    if isinstance(max_products, bool) or not isinstance(max_products, int) or max_products < 1:
        raise ConfigError(
            "max_products", max_products, "an integer >= 1, or None (the size-derived default)"
        )
    return max_products


# -- certification ----------------------------------------------------------------------------------
def _residuals(MV: Tensor, V: Tensor, vals: Tensor) -> tuple[Tensor, float]:
    k = V.shape[1]
    eye = torch.eye(k, dtype=V.dtype, device=V.device)
    return torch.linalg.norm(MV - V * vals, dim=0), float((V.T @ V - eye).abs().max())


def rayleigh_ritz(op: SymmetricMatrix, Y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz pairs of ``op`` in the span of ``Y`` ``(p, m)``: values ``(m,)`` descending,
    orthonormal vectors ``(p, m)`` and their products ``op @ vectors`` (one product)."""
    Q = torch.linalg.qr(Y)[0]
    MQ = op.matmat(Q)
    T = Q.T @ MQ
    theta, Z = torch.linalg.eigh(0.5 * (T + T.T))
    theta, Z = theta.flip(0), Z.flip(1)
    return theta, Q @ Z, MQ @ Z


def certify(
    op: SymmetricMatrix,
    values: Tensor,
    vectors: Tensor,
    *,
    deflated_max: float,
    method: str,
    tol: float = 0.0,
    products: int = 0,
    scale: float | None = None,
    strict: bool = False,
) -> TopK:
    """Check proposed top-``k`` pairs with one product (module docstring) and return them as a
    :class:`TopK`. Pairs whose residuals or orthogonality miss the tolerance are first refined
    by Rayleigh–Ritz in their span (one more product). ``strict``: raise
    :class:`~deepufm.errors.UncertifiedError` instead of returning uncertified pairs."""
    k = values.numel()
    MV = op.matmat(vectors)
    products += k
    resid, ortho = _residuals(MV, vectors, values)
    top = float(values.abs().max()) if k else 0.0
    scale = max(top, abs(deflated_max) if math.isfinite(deflated_max) else 0.0, scale or 0.0)
    rtol = max(tol, certificate_rtol(op.dtype, op.size))
    bound = rtol * max(scale, torch.finfo(op.dtype).tiny)
    if ortho > rtol or bool((resid > bound).any()):
        values, vectors, MV = rayleigh_ritz(op, vectors)
        products += k
        resid, ortho = _residuals(MV, vectors, values)
    reasons = []
    if ortho > rtol:
        reasons.append(f"orthogonality {ortho:.2e} > {rtol:.2e}")
    if bool((resid > bound).any()):
        reasons.append(f"largest residual {float(resid.max()):.2e} > {bound:.2e}")
    if deflated_max > float(values[-1]) + bound:
        reasons.append(
            f"an eigenvalue {deflated_max:.6g} above theta_k = {float(values[-1]):.6g} lies "
            "outside the returned space"
        )
    cert = Certificate(
        residuals=resid,
        orthogonality=ortho,
        deflated_max=float(deflated_max),
        scale=scale,
        tol=rtol,
        method=method,
        products=products,
        certified=not reasons,
        reason="; ".join(reasons),
    )
    if strict and reasons:
        raise UncertifiedError(method, k, cert.reason)
    return TopK(values, vectors, cert)


# -- exact routes -----------------------------------------------------------------------------------
def dense_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """All eigenpairs of a dense symmetric ``M``, descending: ``(p,)``, ``(p, p)``."""
    vals, vecs = torch.linalg.eigh(0.5 * (M + M.T))
    return vals.flip(0), vecs.flip(1)


def dense_topk(M: Tensor, k: int) -> tuple[Tensor, Tensor, float]:
    """Top-``k`` eigenpairs of a dense symmetric ``M`` and the next eigenvalue (``-inf`` when
    ``k = p``): ``(k,)``, ``(p, k)``, float.

    On the CPU, for ``k`` well below ``p``, LAPACK's MRRR (``syevr``) for the wanted index range
    only (about 3x faster than a full ``eigh`` at ``p = 4096``)."""
    p = M.shape[0]
    want = min(k + 1, p)
    if M.device.type != "cpu" or 4 * want > p:
        vals, vecs = dense_eigh(M)
    else:
        S = (0.5 * (M + M.T)).numpy()
        v, w = scipy.linalg.eigh(S, subset_by_index=[p - want, p - 1], driver="evr")
        vals = torch.from_numpy(v[::-1].copy()).to(M.dtype)
        vecs = torch.from_numpy(w[:, ::-1].copy()).to(M.dtype)
    nxt = float(vals[k]) if k < p else -math.inf
    return vals[:k], vecs[:, :k], nxt


def orthonormal_complement(V: Tensor, count: int, seed: int = 0) -> Tensor:
    """``count`` orthonormal vectors orthogonal to the orthonormal columns of ``V`` ``(p, r)``:
    ``(p, count)`` (a Householder QR of ``V`` beside seeded random columns)."""
    p, r = V.shape
    if r + count > p:
        raise ConfigError("count", count, f"at most p - r = {p - r}")
    gen = torch.Generator().manual_seed(seed)
    R = torch.randn(p, count, generator=gen, dtype=V.dtype).to(V.device)
    for _ in range(2):  # against V explicitly first: QR alone keeps V's round-off
        R = R - V @ (V.T @ R)
    return torch.linalg.qr(torch.cat([V, R], dim=1))[0][:, r:]


def with_null_space(
    values: Tensor, vectors: Tensor, size: int, k: int
) -> tuple[Tensor, Tensor, float]:
    """Top-``k`` of an operator whose spectrum is ``values`` (with orthonormal ``vectors``
    ``(p, r)``) and ``size - r`` exact zeros on the complement: ``(k,)``, ``(p, k)`` and the next
    eigenvalue. Zeros in the top ``k`` get an orthonormal basis of that null space."""
    r = values.numel()
    nulls = size - r
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    if nulls == 0:
        nxt = float(values[k]) if k < r else -math.inf
        return values[:k], vectors[:, :k], nxt
    above = int((values >= 0).sum())  # zeros sort after the non-negative values
    if k <= above:
        nxt = max(float(values[k]), 0.0) if k < r else 0.0
        return values[:k], vectors[:, :k], nxt
    zeros = min(k - above, nulls)
    null = orthonormal_complement(vectors, zeros)
    rest = k - above - zeros
    vals = torch.cat([values[:above], values.new_zeros(zeros), values[above : above + rest]])
    vecs = torch.cat([vectors[:, :above], null, vectors[:, above : above + rest]], dim=1)
    if zeros < nulls:
        nxt = 0.0
    else:
        nxt = float(values[above + rest]) if above + rest < r else -math.inf
    return vals, vecs, nxt


def gram_lift(values: Tensor, lifted: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Eigenpairs of ``V^T V`` ``(p x p)`` from those of the Gram ``V V^T``: ``values``
    (descending) and the unnormalised lifts ``V^T u`` ``(p, r)``; keeps the pairs whose value is
    reliably non-zero and normalises them: ``(r',)``, ``(p, r')``.

    A lift of a Gram eigenvalue ``s`` carries the Gram's round-off amplified by
    ``sqrt(max s / s)``; below ``s = max s * max(rank_rtol, (eps / certificate_rtol)^2)`` its
    residual would exceed the certificate's bound, and such a value (at most that small) is
    taken as one of the exact zeros instead."""
    if values.numel() == 0:
        return values, lifted
    eps = torch.finfo(values.dtype).eps
    floor = max(rank_rtol(values.dtype, size), (eps / certificate_rtol(values.dtype, size)) ** 2)
    keep = values > floor * float(values.abs().max())
    vecs = lifted[:, keep]
    return values[keep], vecs / torch.linalg.norm(vecs, dim=0)


# Restarts without convergence after which a default Krylov basis doubles (block_lanczos): few
# enough that a slow spectrum is caught early, enough that what converged before is unchanged.
GROW_AFTER = 4


# -- the iterative route ----------------------------------------------------------------------------
def default_block(k: int) -> int:
    """``k`` plus a margin: a block Krylov method then finds every copy of any eigenvalue that
    the top ``k`` can hold."""
    return k + max(2, k // 8)


def first_block(k: int) -> int:
    """The block of the first solve: 8 columns (``k`` plus a margin when that is fewer)."""
    return min(default_block(k), 8)


def iterative_topk(
    op: SymmetricMatrix,
    k: int,
    tol: float = 0.0,
    *,
    seed: int = 0,
    block: int | None = None,
    max_basis: int | None = None,
    strict: bool = False,
    max_products: int | None = None,
) -> TopK:
    """Certified top-``k`` by thick-restarted block Lanczos (module docstring).

    Args:
        op: the symmetric operator (``size``, ``dtype``, ``device``, ``matmat``; ``matrix_free``).
        k: how many eigenpairs.
        tol: relative residual tolerance (as scipy's ``eigsh``; 0 = working accuracy).
        seed: seed of the random start blocks (repeated calls agree).
        block: block size of the first solve; default :func:`first_block`. A block smaller than
            a multiplicity finds at most ``block`` copies per solve: when the deflated check sees
            a missed eigenvalue the solve restarts with a doubled block, up to
            :func:`default_block`, which is right by construction.
        max_basis: Krylov basis size before a restart; default ``max(3 k, k + 4 block)`` (as
            ARPACK's ``2k + 1`` and more: a short basis multiplies the products), doubled after
            every 4 restarts without convergence up to 4 times that (a packed top against a
            wide spectrum: 8,948 products become 1,948, tests/test_spectra_budget.py). Memory:
            ``max_basis`` vectors of ``p`` (a given ``max_basis`` is never grown).
        strict: raise :class:`~deepufm.errors.UncertifiedError` instead of flagging.
        max_products: the products the Lanczos solves may spend (all attempts together; the
            certificate's check, at most ``48 + 2 k``, comes on top, and a solve always gets
            the blocks that hold ``k`` Ritz vectors); default :func:`default_max_products`.
            Once spent, an operator of at most :data:`DENSE_LIMIT` rows is decomposed exactly
            (``op.exact_topk``, ``p`` products when matrix-free): Lanczos on a spectrum whose
            top ``k`` are packed against a wide negative end converges slowly, and past the
            dense cost the exact route is the cheaper one. A larger operator returns the best
            Ritz pairs with ``budget_spent`` set and the budget in the ``reason``.
    """
    p = op.size
    budget = check_max_products(max_products)
    budget = default_max_products(p) if budget is None else budget
    formable = p <= DENSE_LIMIT
    b = first_block(k) if block is None else block
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ConfigError("block", block, "an integer >= 1")
    products, attempt, result = 0, 0, None
    while True:
        b_now = min(b, max(1, (p - k) // 3))
        m_max = max_basis if max_basis is not None else max(3 * k, k + 4 * b_now)
        m_max = min(m_max, p - b_now)
        if m_max < k + b_now:
            raise ConfigError(
                "max_basis", max_basis, f"at least k + block = {k + b_now} and below p - block"
            )
        enough = b_now >= default_block(k) or b_now >= (p - k) // 3
        try:
            # a default basis may grow on a slow spectrum (block_lanczos); a given one may not
            grow = None if max_basis is not None else min(4 * m_max, p - b_now)
            theta, V, used, scale, converged = block_lanczos(
                op, k, tol, seed + 7919 * attempt, b_now, m_max, budget=budget - products, grow=grow
            )
        except ConvergenceError as exc:  # a block too small for a cluster can stall: grow it
            products += exc.products
            if formable and products >= budget:
                return _formed(op, k, tol, products, budget, strict)
            if enough:
                raise ConvergenceError("block Lanczos", k, products) from None
            b, attempt = min(2 * b_now, default_block(k)), attempt + 1
            continue
        products += used
        if not converged and formable:
            return _formed(op, k, tol, products, budget, strict)
        check, check_products = deflated_ritz_max(op, V, seed + 104729 * (attempt + 1))
        products += check_products
        result = certify(
            op,
            theta,
            V,
            deflated_max=check,
            method=f"lanczos (block {b_now})",
            tol=tol,
            products=products,
            scale=scale,
        )
        spent = not converged or (not result.certified and not enough and products >= budget)
        if spent and formable:
            return _formed(op, k, tol, products, budget, strict)
        if spent:  # the budget is the caller's: say so, the certificate keeps its own verdict
            cert = result.certificate
            why = (
                f"the product budget max_products={budget} was spent before block Lanczos converged"
            )
            result = TopK(
                result.values,
                result.vectors,
                replace(
                    cert, budget_spent=True, reason="; ".join(filter(None, [why, cert.reason]))
                ),
            )
            break
        if result.certified or enough:
            break
        b, attempt = min(2 * b_now, default_block(k)), attempt + 1
    if strict and not result.certified:
        raise UncertifiedError(result.certificate.method, k, result.certificate.reason)
    return result


def _formed(op: SymmetricMatrix, k: int, tol: float, spent: int, budget: int, strict: bool) -> TopK:
    """The exact route after block Lanczos spent its budget (``spent`` products of ``budget``)."""
    vals, vecs, nxt, method = op.exact_topk(k)
    return certify(
        op,
        vals,
        vecs,
        deflated_max=nxt,
        method=f"{method} (block Lanczos spent its budget of {budget} products)",
        tol=tol,
        products=spent + (op.size if op.matrix_free else 0),
        strict=strict,
    )


def deflated_ritz_max(
    op: SymmetricMatrix, V: Tensor, seed: int, block: int = 8, steps: int = 6
) -> tuple[float, int]:
    """The largest Ritz value of ``op`` compressed to the orthogonal complement of ``V``
    ``(p, k)``, from a fresh random block Krylov space (``block`` vectors, ``steps`` blocks):
    a lower bound of the largest eigenvalue there. Returns it and the products used."""
    p, k = V.shape
    b = min(block, p - k)
    if b <= 0:
        return -math.inf, 0
    steps = max(1, min(steps, (p - k) // b))
    gen = torch.Generator().manual_seed(seed)

    def outside(X: Tensor, basis: list[Tensor]) -> Tensor:
        Q = torch.cat([V, *basis], dim=1)
        for _ in range(2):
            X = X - Q @ (Q.T @ X)
        return X

    def fresh(cols: int) -> Tensor:
        return torch.randn(p, cols, generator=gen, dtype=V.dtype).to(V.device)

    X = fresh(b)
    basis: list[Tensor] = []
    images: list[Tensor] = []
    for _ in range(steps):
        before = torch.linalg.norm(X, dim=0)
        X = outside(X, basis)
        dead = torch.linalg.norm(X, dim=0) <= 1e3 * torch.finfo(V.dtype).eps * before
        if bool(dead.any()):  # an invariant subspace was found: continue in fresh directions
            X[:, dead] = outside(fresh(int(dead.sum())), basis)
        X = torch.linalg.qr(outside(torch.linalg.qr(X)[0], basis))[0]
        basis.append(X)
        images.append(op.matmat(X))
        X = images[-1]
    B, MB = torch.cat(basis, dim=1), torch.cat(images, dim=1)
    # the compression P M P on span(B) ⊥ V: B^T M B, since B = P B
    T = B.T @ MB
    return float(torch.linalg.eigvalsh(0.5 * (T + T.T))[-1]), b * steps


def block_lanczos(
    op: SymmetricMatrix,
    k: int,
    tol: float,
    seed: int,
    block: int,
    max_basis: int,
    budget: int | None = None,
    grow: int | None = None,
) -> tuple[Tensor, Tensor, int, float, bool]:
    """The raw solve behind :func:`iterative_topk`: the ``k`` largest Ritz pairs of thick-
    restarted (Krylov–Schur) block Lanczos with full re-orthogonalisation, converged when every
    residual ``||M x_i - theta_i x_i|| <= max(tol |theta_i|, 1000 eps max|theta|)`` (read off the
    Krylov relation ``M Q = Q T + Q_next B E^T`` without extra products). Returns values
    ``(k,)``, vectors ``(p, k)``, the products used, ``max|theta|`` and whether it converged:
    ``False`` when the next block would pass ``budget`` products (the basis always gets the
    blocks that hold ``k`` vectors), and then the pairs are the best Ritz pairs so far.
    ``grow``: after every :data:`GROW_AFTER` restarts without convergence the basis doubles, up
    to ``grow`` vectors (``None``: fixed). A thick restart keeps about half the basis, so each
    cycle adds only ``max_basis / 2`` Krylov directions; when the wanted gap is small against
    the spread (a top near 12 above a bottom near -2000) that is too few, and a longer basis
    converges in a few times fewer products. Solves that converge within those restarts are
    unchanged. Uncertified: a block smaller than a multiplicity finds only ``block`` copies."""
    state = _BlockKrylov.start(op, block, max_basis, seed)
    eps = torch.finfo(op.dtype).eps
    p = op.size
    restarts = 0
    for _ in range(max(50, 20 * p // block)):
        if budget is not None and state.filled >= k and state.products + block > budget:
            theta, Y = state.ritz_pairs()  # (no residuals: the basis may just have restarted)
            scale = float(theta.abs().max())
            return theta[:k], state.vectors(Y[:, :k]), state.products, scale, False
        state.extend()
        full = state.filled + block > max_basis  # basis and next block must fit
        # accept convergence only once the basis could hold the missed copies of a cluster
        if state.filled < min(2 * k, max_basis - block) or not (full or state.due()):
            continue
        theta, Y, resid = state.ritz()
        scale = float(theta.abs().max())
        floor = 1e3 * eps * scale
        if bool((resid[:k] <= torch.clamp(tol * theta[:k].abs(), min=floor)).all()):
            return theta[:k], state.vectors(Y[:, :k]), state.products, scale, True
        if full:
            state.restart(theta, Y, keep=min(k + (max_basis - k) // 2, max_basis - block))
            restarts += 1
            if grow is not None and restarts % GROW_AFTER == 0 and max_basis < grow:
                max_basis = min(2 * max_basis, grow)
                state.reserve(max_basis)
    raise ConvergenceError("block Lanczos", k, state.products)


@dataclass
class _BlockKrylov:
    """Orthonormal basis ``Q`` (``filled`` vectors) with ``M Q = Q T + Q_next B E_last^T``.

    Vectors are stored as rows (``Q^T``, ``(m, p)``): the re-orthogonalisation reads the basis
    four times per block, and contiguous rows make those skinny GEMMs several times faster than
    a column-sliced ``(p, m)`` basis.
    """

    op: SymmetricMatrix
    Qt: Tensor  # (m_max + b, p): the basis as rows, then room for one more block
    T: Tensor  # (m_max + b, m_max + b): Q^T M Q, symmetric
    nxt: Tensor  # (b, p): the next block (rows), orthogonal to the basis
    B: Tensor  # (b, b): its coefficients, M Q_last - Q (Q^T M Q_last) = nxt^T B
    filled: int
    last: int  # first row of the last block
    gen: torch.Generator
    scale: float = 0.0  # running max of ||M q||, for the breakdown test
    products: int = 0
    since_ritz: int = 0

    @classmethod
    def start(cls, op: SymmetricMatrix, b: int, m_max: int, seed: int) -> _BlockKrylov:
        gen = torch.Generator().manual_seed(seed)
        Qt = torch.zeros(m_max + b, op.size, dtype=op.dtype, device=op.device)
        first = torch.randn(op.size, b, generator=gen, dtype=op.dtype).to(op.device)
        T = torch.zeros(m_max + b, m_max + b, dtype=op.dtype, device=op.device)
        nxt = torch.linalg.qr(first)[0].T.contiguous()
        B = torch.zeros(b, b, dtype=op.dtype, device=op.device)
        return cls(op, Qt, T, nxt, B, filled=0, last=0, gen=gen)

    def basis(self) -> Tensor:
        """``Q^T``: ``(filled, p)``."""
        return self.Qt[: self.filled]

    def due(self) -> bool:
        """Rayleigh–Ritz checks every few blocks (each costs an eigendecomposition of ``T``)."""
        return self.since_ritz * self.nxt.shape[0] >= max(16, self.filled // 4)

    def extend(self) -> None:
        """Append ``nxt`` to the basis, multiply it, and orthogonalise the product into ``nxt``."""
        b = self.nxt.shape[0]
        lo, hi = self.filled, self.filled + b
        self.Qt[lo:hi] = self.nxt
        self.filled, self.last = hi, lo
        W = self.op.matmat(self.nxt.T).T.contiguous()  # (b, p)
        self.products += b
        self.since_ritz += 1
        self.scale = max(self.scale, float(torch.linalg.norm(W, dim=1).max()))
        Qb = self.Qt[:hi]
        C = W @ Qb.T  # (b, hi)
        W = torch.addmm(W, C, Qb, alpha=-1)
        C2 = W @ Qb.T  # twice is enough (Kahan–Parlett)
        W = torch.addmm(W, C2, Qb, alpha=-1)
        C = C + C2
        self.T[lo:hi, :hi] = C
        self.T[:hi, lo:hi] = C.T
        diag = self.T[lo:hi, lo:hi]
        self.T[lo:hi, lo:hi] = 0.5 * (diag + diag.T)
        self.nxt, self.B = self._orthonormal(W, Qb)

    def _orthonormal(self, Wt: Tensor, Qb: Tensor) -> tuple[Tensor, Tensor]:
        """``W = U B`` (rows: ``Wt = B^T U^T``) with ``U`` orthonormal and orthogonal to the
        basis; directions that ``W`` lacks (an invariant subspace was found) are filled with
        fresh random ones and get coefficient 0."""
        floor = 1e3 * torch.finfo(Wt.dtype).eps * max(self.scale, torch.finfo(Wt.dtype).tiny)
        U, R = torch.linalg.qr(Wt.T)  # the common case: W has full column rank
        if bool((torch.diagonal(R).abs() > floor).all()):
            return U.T.contiguous(), R
        Z, s, Ut = torch.linalg.svd(Wt, full_matrices=False)  # Wt = Z diag(s) U^T
        dead = s <= floor
        if bool(dead.any()):
            fresh = torch.randn(int(dead.sum()), Wt.shape[1], generator=self.gen, dtype=Wt.dtype)
            keep = torch.cat([Qb, Ut[~dead]], dim=0)
            fresh = fresh.to(Wt.device)
            for _ in range(2):
                fresh = fresh - (fresh @ keep.T) @ keep
            Ut[dead] = torch.linalg.qr(fresh.T)[0].T
            s = torch.where(dead, torch.zeros_like(s), s)
        return Ut.contiguous(), s.unsqueeze(1) * Z.T

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (descending), their coordinates in the basis and residual norms
        ``||B y_last||``."""
        self.since_ritz = 0
        hi = self.filled
        theta, Y = torch.linalg.eigh(self.T[:hi, :hi])
        theta, Y = theta.flip(0), Y.flip(1)
        resid = torch.linalg.norm(self.B @ Y[self.last : hi], dim=0)
        return theta, Y, resid

    def ritz_pairs(self) -> tuple[Tensor, Tensor]:
        """Ritz values (descending) and their coordinates in the basis, at any point."""
        theta, Y = torch.linalg.eigh(self.T[: self.filled, : self.filled])
        return theta.flip(0), Y.flip(1)

    def vectors(self, Y: Tensor) -> Tensor:
        """Ritz vectors ``Q Y``: ``(p, columns of Y)``."""
        return self.basis().T @ Y

    def reserve(self, m_max: int) -> None:
        """Room for a basis of ``m_max`` vectors and the next block (the filled part is kept)."""
        b, hi = self.nxt.shape[0], self.filled
        Qt = self.Qt.new_zeros(m_max + b, self.Qt.shape[1])
        T = self.T.new_zeros(m_max + b, m_max + b)
        Qt[:hi], T[:hi, :hi] = self.Qt[:hi], self.T[:hi, :hi]
        self.Qt, self.T = Qt, T

    def restart(self, theta: Tensor, Y: Tensor, keep: int) -> None:
        """Compress the basis to the ``keep`` leading Ritz vectors; ``nxt`` is unchanged and still
        orthogonal to them, and their coupling to it is recomputed by the next :meth:`extend`."""
        self.Qt[:keep] = Y[:, :keep].T @ self.basis()
        self.T.zero_()
        self.T[:keep, :keep] = torch.diag(theta[:keep])
        self.filled = keep


# -- the entry point ----------------------------------------------------------------------------------
def topk(
    op: SymmetricMatrix,
    k: int,
    tol: float = 0.0,
    *,
    strict: bool = False,
    max_products: int | None = None,
) -> TopK:
    """Certified top-``k`` of ``op`` by the route its structure allows: ``op.exact_topk(k)`` when
    :func:`use_exact` says its smallest exact eigenproblem (``op.exact_size``) is cheaper, else
    :func:`iterative_topk` with the product budget ``max_products`` (default
    :func:`default_max_products`; spent, a small operator is decomposed exactly, a large one
    flagged)."""
    k = check_k(k, op.size)
    tol = check_tol(tol)
    max_products = check_max_products(max_products)
    if use_exact(op.exact_size, k, op.matrix_free):
        vals, vecs, nxt, method = op.exact_topk(k)
        return certify(op, vals, vecs, deflated_max=nxt, method=method, tol=tol, strict=strict)
    return iterative_topk(op, k, tol, strict=strict, max_products=max_products)


def lanczos_topk(
    op: SymmetricMatrix,
    k: int,
    tol: float = 0.0,
    seed: int = 0,
    block: int | None = None,
    max_basis: int | None = None,
    strict: bool = False,
    max_products: int | None = None,
) -> TopK:
    """The ``k`` algebraically largest eigenpairs by certified block Lanczos on ``op.matmat``
    (:func:`iterative_topk`, with its product budget ``max_products``), whatever the size:
    ``(k,)`` descending, ``(p, k)``, certificate.

    When ``k`` is a large part of ``p`` (``4 k >= p``) a Krylov basis could not be much smaller
    than ``p``: the answer then comes from a dense decomposition of ``op`` (``p`` products)."""
    k = check_k(k, op.size)
    tol = check_tol(tol)
    max_products = check_max_products(max_products)
    if 4 * k >= op.size:
        vals, vecs, nxt = dense_topk(op.dense(), k)
        return certify(
            op,
            vals,
            vecs,
            deflated_max=nxt,
            method="dense",
            tol=tol,
            products=op.size,
            strict=strict,
        )
    return iterative_topk(
        op,
        k,
        tol,
        seed=seed,
        block=block,
        max_basis=max_basis,
        strict=strict,
        max_products=max_products,
    )
