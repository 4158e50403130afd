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

from deepufm.matrices.hessian import check_layer, loss_weighted_factors
from deepufm.matrices.jacobian import layer_jacobian
from deepufm.matrices.operator import SymmetricMatrix
from deepufm.matrices.structured import JacobianGram, KroneckerGram, RowGram
from deepufm.models.ufm import DeepUFM

FORMS = {"mse": "mse (unit weights, THEORY M3)", "ce": "ce-loss-hessian-weighted (Papyan 2020)"}


@dataclass(frozen=True)
class PapyanDecomposition:
    """``gauss_newton = class_ + cross + within`` for one layer (each ``(p, p)``).

    Attributes:
        gauss_newton: ``G_l`` (equal to the layer Hessian ``H_l``).
        class_, cross, within: the three terms of the decomposition (module docstring).
        form: ``"mse (unit weights, THEORY M3)"`` or
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

    ``relu_tol``: pre-activations ``u >= -relu_tol * max|u|`` count as non-negative.
    """
    check_layer(model, layer)
    cfg = model.config
    K, n, N = cfg.K, cfg.n, cfg.N
    jac = layer_jacobian(model, layer, relu_tol)
    H = jac.H  # (d_in, N)
    means = H.reshape(H.shape[0], K, n).mean(dim=2)  # (d_in, K): mu_c
    form = FORMS[cfg.loss]
    if jac.shared and cfg.loss == "mse":
        A = jac.A  # (K, d_out): rows a_c'
        a_bar = A.mean(dim=0, keepdim=True)
        centred = H - means.repeat_interleave(n, dim=1)
        return PapyanDecomposition(
            gauss_newton=KroneckerGram(A, H / math.sqrt(N)),
            class_=KroneckerGram(a_bar, means),
            cross=KroneckerGram((A - a_bar) / math.sqrt(K), means),
            within=KroneckerGram(A, centred / math.sqrt(N)),
            form=form,
        )
    A_w = loss_weighted_factors(jac, cfg.loss)
    A_w = A_w.unsqueeze(0).expand(N, *A_w.shape) if A_w.dim() == 2 else A_w
    R, d_out = A_w.shape[1], A_w.shape[2]
    # v_{cc'} = (1/n) sum_i ã_{ic,c'} ⊗ h_ic without forming any v_{icc'}: (K, R, p)
    v_pair = (
        torch.einsum("cird,eci->crde", A_w.reshape(K, n, R, d_out), H.reshape(-1, K, n)).reshape(
            K, R, -1
        )
        / n
    )
    v_class = v_pair.mean(dim=1)  # (K, p)
    cross_rows = (v_pair - v_class.unsqueeze(1)).reshape(K * R, -1)
    return PapyanDecomposition(
        gauss_newton=JacobianGram(A_w, H),
        class_=RowGram(v_class),
        cross=RowGram(cross_rows, cross_rows.new_full((K * R,), 1.0 / K)),
        within=JacobianGram(A_w, H, class_size=n),
        form=form,
    )


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
