"""Papyan's class / cross-class / within-class decomposition of ``G_l`` and knockouts (Concepts:
*The curvature matrices*).

With Jacobian rows ``v_{icc'} = grad_{w_l} z_{ic,c'}`` (unit weights: the MSE loss Hessian is
``I_K``), class-pair means ``v_{cc'} = mean_i v_{icc'}`` and class means ``v_c = mean_{c'} v_{cc'}``
(over the *output* index ``c'``), exactly and at every point,

    G_l = sum_c v_c v_c^T                                     G_class  (uncentred, rank <= K)
        + 1/K sum_{c,c'} (v_cc' - v_c)(v_cc' - v_c)^T         G_cross  (rank <= K(K-1))
        + 1/N sum_{i,c,c'} (v_icc' - v_cc')(v_icc' - v_cc')^T G_within

(no probability weights, the ``c' = c`` terms kept, as in the paper). A knockout is the spectrum of
``H_l - G_X``; for one layer ``H_l = G_l`` (``hessian.hessian_residual``).

Cross-entropy: the same three sums are taken over Papyan's (2020) loss-Hessian-weighted rows
``u_{icc'} = sqrt(p_{icc'}) (v_{icc'} - sum_k p_{ick} v_{ick})``, whose second moment
``1/N sum u u^T`` is again exactly ``G_l`` (``diag(p) - p p^T = M^T M``,
``M = diag(sqrt p)(I - 1 p^T)``). :attr:`PapyanDecomposition.form` says which form was used.

Labelled samples in any order and unbalanced classes (any network's layer, ``deepufm.analyze``):
:func:`labelled_papyan` weights the class terms by the class sizes ``n_c``
(``G_class = sum_c (K n_c/N) v_c v_c^T``, ``G_cross = sum_c (n_c/N) sum_r (...)``), which still
sum exactly to ``G``; :func:`papyan_decomposition` is its balanced, class-major case.

Structure: everything is built from ``v_{icc'} = ã_{ic,c'} ⊗ h_ic``. In the linear MSE model
(``ã`` shared) all four matrices are Kronecker products,

    G = (A^T A) ⊗ (H H^T / N),             G_class = (ā ā^T) ⊗ (M M^T),
    G_cross = (A^T S A / K) ⊗ (M M^T),     G_within = (A^T A) ⊗ (H_c H_c^T / N),

(``ā`` the mean row of ``A``, ``M`` the class means of ``H``, ``H_c = H - M ⊗ 1_n^T``), so their
spectra cost two small eigenproblems, and a knockout ``H_l - G_X`` is a :class:`KroneckerSum`,
diagonalised exactly in the shared ``K min(d, N)``-dimensional factor basis. Otherwise
``G_class``/``G_cross`` are held by their ``K`` and ``K^2`` rows and ``G_within`` as a
within-class-centred :class:`JacobianGram`; the knockouts ``H_l - G_class`` and
``H_l - G_cross`` are again :class:`JacobianGram` matrices ``V^T C V``, ``C`` a projector on the
sample side (``N R`` rows), so their exact spectrum comes from the ``N R x N R`` Gram when
``N R < p``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from deepufm.errors import ConfigError
from deepufm.matrices.hessian import check_layer, loss_weighted_factors
from deepufm.matrices.jacobian import layer_jacobian
from deepufm.matrices.operator import SymmetricMatrix
from deepufm.matrices.structured import JacobianGram, KroneckerGram, RowGram
from deepufm.models.ufm import DeepUFM

# stored in every decomposition (and in results); the MSE form is the paper's (v1 Thm 4.2, v2 Thm 2)
FORMS = {
    "mse": "mse (unit weights, v1 Thm 4.2 / v2 Thm 2)",
    "ce": "ce-loss-hessian-weighted (Papyan 2020)",
}


@dataclass(frozen=True)
class PapyanDecomposition:
    """``gauss_newton = class_ + cross + within`` for one layer (each ``(p, p)``).

    Attributes:
        gauss_newton: ``G_l`` (the layer Hessian ``H_l`` of a deep UFM; the Gauss–Newton part of
            a curved network's layer Hessian).
        class_, cross, within: the three terms of the decomposition (module docstring).
        form: ``"mse (unit weights, v1 Thm 4.2 / v2 Thm 2)"`` or
            ``"ce-loss-hessian-weighted (Papyan 2020)"`` (module docstring).
    """

    gauss_newton: SymmetricMatrix
    class_: SymmetricMatrix
    cross: SymmetricMatrix
    within: SymmetricMatrix
    form: str

    def components(self) -> dict[str, SymmetricMatrix]:
        """``{"class": G_class, "cross": G_cross, "within": G_within}``."""
        return {"class": self.class_, "cross": self.cross, "within": self.within}

    def knockouts(self) -> dict[str, SymmetricMatrix]:
        """``{X: H_l - G_X}`` — exact low-rank matrices whenever the row counts allow.

        ``H_l - G_within`` is taken as ``G_class + G_cross`` (``K + K^2`` rows): the same matrix by
        the decomposition (``H_l = G_l`` for one layer), without cancelling the large within-class
        part against itself.
        """
        G, within = self.gauss_newton, self.within
        if isinstance(G, JacobianGram) and isinstance(within, JacobianGram):
            # V^T (I - M_class) V and V^T (I - M_pair + M_class) V: still N R rows, so the
            # spectrum comes from the N R x N R Gram when that is smaller than p
            n = within.class_size
            minus_class = JacobianGram(G.A_w, G.H, class_size=n, part="minus_class")
            minus_cross = JacobianGram(G.A_w, G.H, class_size=n, part="minus_cross")
        else:  # Kronecker terms: a KroneckerSum, exact in the shared factor basis
            minus_class, minus_cross = G - self.class_, G - self.cross
        return {"class": minus_class, "cross": minus_cross, "within": self.class_ + self.cross}


def jacobian_rows(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> Tensor:
    """Rows ``v_{icc'}`` (loss-Hessian-weighted for CE): ``(K, n, K, p)`` indexed ``(c, i, c', :)``.

    Formed explicitly (``N K p`` numbers): for inspection and tests, not used by the decomposition.
    """
    check_layer(model, layer)
    cfg = model.config
    jac = layer_jacobian(model, layer, relu_tol)
    A = loss_weighted_factors(jac, cfg.loss)
    A = A.unsqueeze(0).expand(cfg.N, *A.shape) if A.dim() == 2 else A
    v = torch.einsum("nkd,en->nkde", A, jac.H)
    return v.reshape(cfg.K, cfg.n, cfg.K, -1)


def papyan_decomposition(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> PapyanDecomposition:
    """``G_class``, ``G_cross``, ``G_within`` of the layer Gauss–Newton matrix (the MSE form; for CE
    the loss-Hessian-weighted rows of Papyan 2020 — see the module docstring and ``form``).

    The balanced, class-major case of :func:`labelled_papyan` (``n_c = n`` for every class).
    ``relu_tol``: pre-activations ``u >= -relu_tol * max|u|`` count as non-negative.
    """
    check_layer(model, layer)
    cfg = model.config
    jac = layer_jacobian(model, layer, relu_tol)
    labels = torch.arange(cfg.K, device=jac.H.device).repeat_interleave(cfg.n)
    if jac.shared and cfg.loss == "mse":
        A = jac.A  # (K, d_out): the same rows a_c' for every sample
    else:
        A = loss_weighted_factors(jac, cfg.loss)
        A = A.unsqueeze(0).expand(cfg.N, *A.shape) if A.dim() == 2 else A
    return labelled_papyan(A, jac.H, labels, cfg.K, FORMS[cfg.loss])


def labelled_papyan(A: Tensor, H: Tensor, y: Tensor, K: int, form: str) -> PapyanDecomposition:
    """Papyan's three terms of ``G = 1/N sum_n (Ã_n^T Ã_n) ⊗ (h_n h_n^T)`` for labelled samples
    in any order and classes of any size ``n_c`` (``N = sum_c n_c``).

    Rows ``v_{nr} = ã_{n,r} ⊗ h_n``, class-pair means ``v_{cr} = mean_{n in c} v_{nr}``, class
    means ``v_c = mean_r v_{cr}`` (``R`` rows ``r``):

        G_class  = sum_c (K n_c / N) v_c v_c^T
        G_cross  = sum_c (n_c / N) sum_r (v_{cr} - v_c)(v_{cr} - v_c)^T
        G_within = 1/N sum_n sum_r (v_{nr} - v_{c_n r})(v_{nr} - v_{c_n r})^T

    sum exactly to ``G`` (the cross terms of each centring vanish within a class), and for
    ``n_c = N/K`` are the paper's (v2 Thm 2; ``K n_c / N = 1``, ``n_c / N = 1/K``).

    Args:
        A: ``(R, d_out)`` rows shared by every sample (linear MSE: all four matrices are then
            Kronecker products, class means weighted by ``sqrt(K n_c/N)`` and ``sqrt(n_c/N)``),
            or ``(N, R, d_out)`` per sample (loss-weighted, ``M_n J_n``).
        H: the layer's inputs ``(d_in, N)`` (``h~ = [h; 1]`` for a biased layer), column ``n``
            of sample ``n``.
        y: ``(N,)`` integer labels in ``[0, K)``, every class present.
        K: number of classes.
        form: what the rows are (recorded as ``PapyanDecomposition.form``).

    Returns:
        a :class:`PapyanDecomposition`. Balanced class-major labels keep ``G_within`` (and the
        knockouts) in the row-space form of :class:`JacobianGram` with a sample-side projector;
        otherwise ``G_within = G - sum_c (n_c/N) sum_r v_{cr} v_{cr}^T``.
    """
    N = H.shape[1]
    if y.shape != (N,):
        raise ConfigError("y", tuple(y.shape), f"(N,) = ({N},) labels, one per column of H")
    onehot = torch.nn.functional.one_hot(y.to(torch.long), K).to(H.dtype)  # (N, K)
    n_c = onehot.sum(dim=0)
    if bool((n_c == 0).any()):
        raise ConfigError("y", f"class sizes {n_c.tolist()}", "at least one sample of every class")
    means = H @ (onehot / n_c)  # (d_in, K): mu_c
    balanced = bool((n_c == n_c[0]).all())
    if A.dim() == 2:
        a_bar = A.mean(dim=0, keepdim=True)
        if balanced:  # K n_c / N = 1 and n_c / N = 1 / K: the paper's form as written
            class_ = KroneckerGram(a_bar, means)
            cross = KroneckerGram((A - a_bar) / math.sqrt(K), means)
        else:
            class_ = KroneckerGram(a_bar, means * (K * n_c / N).sqrt())
            cross = KroneckerGram(A - a_bar, means * (n_c / N).sqrt())
        return PapyanDecomposition(
            gauss_newton=KroneckerGram(A, H / math.sqrt(N)),
            class_=class_,
            cross=cross,
            within=KroneckerGram(A, (H - means[:, y.to(torch.long)]) / math.sqrt(N)),
            form=form,
        )
    R = A.shape[1]
    # v_{cr} = mean over class c of ã_{n,r} ⊗ h_n without forming any per-sample row: (K, R, p)
    v_pair = torch.einsum("nrd,en,nc->crde", A, H, onehot / n_c).reshape(K, R, -1)
    v_class = v_pair.mean(dim=1)  # (K, p)
    cross_rows = (v_pair - v_class.unsqueeze(1)).reshape(K * R, -1)
    pair_weights = (n_c / N).repeat_interleave(R)
    G = JacobianGram(A, H)
    n = int(n_c[0])
    class_major = balanced and torch.equal(
        y.to(torch.long), torch.arange(K, device=y.device).repeat_interleave(n)
    )
    if class_major:
        class_, cross = RowGram(v_class), RowGram(cross_rows, cross_rows.new_full((K * R,), 1 / K))
        within: SymmetricMatrix = JacobianGram(A, H, class_size=n)
    else:
        class_ = RowGram(v_class, K * n_c / N)
        cross = RowGram(cross_rows, pair_weights)
        within = G - RowGram(v_pair.reshape(K * R, -1), pair_weights)
    return PapyanDecomposition(G, class_, cross, within, form)


def knockout_spectra(
    model: DeepUFM, layer: int, k: int | None = None, relu_tol: float = 0.0
) -> dict[str, Tensor]:
    """Descending eigenvalues of ``H_l - G_X`` for ``X`` in ``class``, ``cross``, ``within``
    (v1 Figs 5-6, v2 Figs 9-10): ``{X: (k,)}``, all ``p`` of them when ``k`` is None.

    Exact: in the shared factor basis for linear MSE (:class:`KroneckerSum`), from the
    ``N R x N R`` row-space Gram (``JacobianGram`` with a sample-side projector) when that is smaller
    than ``p``, densely otherwise; ``H_l - G_within = G_class + G_cross`` from its ``K + K^2`` rows.
    At a DNC optimum the non-zero counts are ``K(K-1)``, ``K`` and ``K^2`` (v2 Theorem 2).
    """
    dec = papyan_decomposition(model, layer, relu_tol)
    out = {name: M.eigvalsh() for name, M in dec.knockouts().items()}
    return out if k is None else {name: vals[:k] for name, vals in out.items()}
