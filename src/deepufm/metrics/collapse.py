"""Neural-collapse metrics of a feature matrix (Concepts: *Deep neural collapse*).

Features ``H`` are ``(d, N)`` with class-major columns: ``n`` consecutive columns per class.

At degenerate points the metrics are undefined, and they say so instead of returning a number
that looks like collapse: when every class mean is (numerically) zero — the trivial zero solution
— or all class means coincide (``Sigma_B = 0``), NC1 and the ETF distance are ``nan``; zero means
also make the orthogonal-frame distance ``nan``. :func:`collapse_note` gives the reason.
"""

from __future__ import annotations

import torch
from torch import Tensor

NOTES = {
    "zero": "every class mean is zero (the trivial zero solution): NC1 and the frame and ETF "
    "distances are undefined (nan), not collapsed",
    "coincide": "all class means coincide (Sigma_B = 0): NC1 and the ETF distance are undefined "
    "(nan), not collapsed",
}


def class_means(H: Tensor, K: int) -> Tensor:
    """Class means ``M = [mu_1, ..., mu_K]``: ``(d, N) -> (d, K)``."""
    d, N = H.shape
    return H.reshape(d, K, N // K).mean(dim=2)


def means_degeneracy(M: Tensor, scale: float | None = None, terms: int | None = None) -> str | None:
    """``"zero"``, ``"coincide"`` or ``None``: whether the class means ``M`` ``(d, K)`` are
    numerically all zero, numerically all equal (``Sigma_B = 0``), or neither.

    ``scale`` is the magnitude the means were computed from (default ``max|M|``; pass ``max|H|``
    for means of features ``H``) and ``terms`` the number of terms summed per mean (default ``K``).
    The means coincide when their spread around the global mean is within the round-off of
    those sums, ``4 (terms + K) eps scale``; they are zero when ``max|M|`` is below the smallest
    normal number of the dtype (a subnormal mean has no relative precision left).
    """
    finfo = torch.finfo(M.dtype)
    size = float(M.abs().max()) if M.numel() else 0.0
    if not size > finfo.tiny:
        return "zero"
    K = M.shape[1]
    scale = size if scale is None else max(scale, size)
    terms = K if terms is None else terms
    spread = float((M - M.mean(dim=1, keepdim=True)).abs().max())
    if spread <= 4 * (terms + K) * finfo.eps * scale:
        return "coincide"
    return None


def _feature_degeneracy(H: Tensor, K: int) -> str | None:
    return means_degeneracy(class_means(H, K), float(H.abs().max()), H.shape[1] // K)


def collapse_note(H: Tensor, K: int) -> str | None:
    """Why :func:`nc1` (and the frame/ETF distances of the class means) of ``H`` ``(d, N)`` are
    ``nan``, or ``None`` when they are defined (see :func:`means_degeneracy`)."""
    kind = _feature_degeneracy(H, K)
    return None if kind is None else NOTES[kind]


def nc1(H: Tensor, K: int) -> float:
    """NC1 ``= tr(Sigma_W Sigma_B^+) / K`` (Papyan, Han & Donoho 2020) of class-major features
    ``H`` ``(d, N)``: :func:`labelled_nc1` with ``n = N / K`` consecutive samples per class.

    ``Sigma_W`` is the within-class covariance (mean over all N samples), ``Sigma_B`` the
    between-class covariance of the class means around the global mean; ``^+`` the pseudo-inverse.
    ``nan`` when ``Sigma_B`` is numerically zero (all class means coincide, e.g. the trivial zero
    solution; :func:`collapse_note` says which) or the features are not finite: the pseudo-inverse
    of a zero ``Sigma_B`` would report 0, perfect collapse, for the very point NC1 rules out.
    """
    y = torch.arange(K, device=H.device).repeat_interleave(H.shape[1] // K)
    return labelled_nc1(H, y, K)


def orthogonal_frame_distance(M: Tensor) -> float:
    """``|| M^T M / ||M^T M||_F - I_K / sqrt(K) ||_F`` (v2 App. G.1); zero iff DNC2. ``M``: ``(d, K)``.

    ``nan`` when every mean is zero (no frame to normalise; :func:`means_degeneracy`).
    """
    if means_degeneracy(M) == "zero":
        return float("nan")
    gram = M.T @ M
    K = gram.shape[0]
    eye = torch.eye(K, dtype=gram.dtype, device=gram.device)
    return float(torch.linalg.norm(gram / torch.linalg.norm(gram) - eye / K**0.5))


def etf_distance(M: Tensor) -> float:
    """``|| Mc^T Mc / ||Mc^T Mc||_F - S / sqrt(K-1) ||_F`` with ``Mc`` globally centred (NC2).

    ``nan`` when the centred means vanish — all means zero or equal (:func:`means_degeneracy`).
    """
    if means_degeneracy(M) is not None:
        return float("nan")
    Mc = M - M.mean(dim=1, keepdim=True)
    gram = Mc.T @ Mc
    K = gram.shape[0]
    S = torch.eye(K, dtype=gram.dtype, device=gram.device) - 1.0 / K
    return float(torch.linalg.norm(gram / torch.linalg.norm(gram) - S / (K - 1) ** 0.5))


# -- labelled features (any sample order, unbalanced classes) ---------------------------------------
# Convention for unbalanced classes: mu_c is the mean of the samples of class c, the global mean is
# the *unweighted* mean of the class means, mu_G = (1/K) sum_c mu_c, Sigma_W averages over all N
# samples and Sigma_B over the K classes. For balanced classes this is exactly Papyan, Han & Donoho
# (2020)'s NC1; with the unweighted mu_G, Sigma_B depends on the class means alone (every class
# counts once, however many samples it has), which is what the geometry of the means (ETF /
# orthogonal frame) is judged on.


def labelled_class_means(H: Tensor, y: Tensor, K: int) -> Tensor:
    """Class means of features ``H`` ``(d, N)`` with labels ``y`` ``(N,)`` in ``[0, K)``, any order:
    ``(d, K)``. Every class must have a sample (column ``c`` would be undefined)."""
    onehot = torch.nn.functional.one_hot(y.to(torch.long), K).to(H.dtype)  # (N, K)
    counts = onehot.sum(dim=0)
    if bool((counts == 0).any()):
        raise ValueError(f"class {int((counts == 0).nonzero()[0])} has no sample")
    return (H @ onehot) / counts


def labelled_nc1(H: Tensor, y: Tensor, K: int) -> float:
    """NC1 ``= tr(Sigma_W Sigma_B^+) / K`` for features ``H`` ``(d, N)`` with labels ``y`` ``(N,)``
    (any order, unbalanced classes; convention above); ``nan`` at degenerate means or non-finite
    features, as :func:`nc1`."""
    N = H.shape[1]
    if not bool(torch.isfinite(H).all()):
        return float("nan")
    M = labelled_class_means(H, y, K)
    largest = int(torch.bincount(y.to(torch.long), minlength=K).max())
    if means_degeneracy(M, float(H.abs().max()), largest) is not None:
        return float("nan")
    within = H - M[:, y.to(torch.long)]
    sigma_w = within @ within.T / N
    centred = M - M.mean(dim=1, keepdim=True)
    sigma_b = centred @ centred.T / K
    try:
        pinv = torch.linalg.pinv(sigma_b, hermitian=True)
    except torch.linalg.LinAlgError:  # wildly scaled features: NC1 is undefined
        return float("nan")
    return float(torch.trace(sigma_w @ pinv) / K)
