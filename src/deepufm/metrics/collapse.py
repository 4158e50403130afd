"""Neural-collapse metrics of a feature matrix (THEORY §4.1).

Features ``H`` are ``(d, N)`` with class-major columns: ``n`` consecutive columns per class.
"""

from __future__ import annotations

import torch
from torch import Tensor


def class_means(H: Tensor, K: int) -> Tensor:
    """Class means ``M = [mu_1, ..., mu_K]``: ``(d, N) -> (d, K)``."""
    d, N = H.shape
    return H.reshape(d, K, N // K).mean(dim=2)


def nc1(H: Tensor, K: int) -> float:
    """NC1 ``= tr(Sigma_W Sigma_B^+) / K`` (Papyan, Han & Donoho 2020).

    ``Sigma_W`` is the within-class covariance (mean over all N samples), ``Sigma_B`` the
    between-class covariance of the class means around the global mean; ``^+`` the pseudo-inverse.
    """
    d, N = H.shape
    M = class_means(H, K)
    within = (H.reshape(d, K, N // K) - M.unsqueeze(2)).reshape(d, N)
    sigma_w = within @ within.T / N
    centred = M - M.mean(dim=1, keepdim=True)
    sigma_b = centred @ centred.T / K
    try:
        pinv = torch.linalg.pinv(sigma_b, hermitian=True)
    except torch.linalg.LinAlgError:  # non-finite or wildly scaled features: NC1 is undefined
        return float("nan")
    return float(torch.trace(sigma_w @ pinv) / K)


def orthogonal_frame_distance(M: Tensor) -> float:
    """``|| M^T M / ||M^T M||_F - I_K / sqrt(K) ||_F`` (v2 App. G.1); zero iff DNC2. ``M``: ``(d, K)``."""
    gram = M.T @ M
    K = gram.shape[0]
    eye = torch.eye(K, dtype=gram.dtype, device=gram.device)
    return float(torch.linalg.norm(gram / torch.linalg.norm(gram) - eye / K**0.5))


def etf_distance(M: Tensor) -> float:
    """``|| Mc^T Mc / ||Mc^T Mc||_F - S / sqrt(K-1) ||_F`` with ``Mc`` globally centred (NC2)."""
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
    (any order, unbalanced classes; convention above): equal to :func:`nc1` for class-major
    balanced data."""
    N = H.shape[1]
    M = labelled_class_means(H, y, K)
    within = H - M[:, y.to(torch.long)]
    sigma_w = within @ within.T / N
    centred = M - M.mean(dim=1, keepdim=True)
    sigma_b = centred @ centred.T / K
    try:
        pinv = torch.linalg.pinv(sigma_b, hermitian=True)
    except torch.linalg.LinAlgError:
        return float("nan")
    return float(torch.trace(sigma_w @ pinv) / K)
