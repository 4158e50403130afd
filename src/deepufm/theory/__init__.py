"""The closed-form theory: threshold, constants, the exact DNC optimum and every prediction.

The Concepts page states them: *Deep neural collapse* (threshold, ``c``, construction), *Predictions
at the optimum* (linear MSE, ReLU Definition 2, cross-entropy). Numbering of the paper's theorems is
kept in each ``Prediction``.
"""

from deepufm.theory.ce import CEConstants, ce_constants, ce_logit_scale, effective_lambda
from deepufm.theory.constants import (
    DNCConstants,
    dnc_constant,
    dnc_constants,
    fold_point,
    reduced_loss,
)
from deepufm.theory.optimum import ce_dnc_point, dnc_optimum, flat_family_point, simplex_basis
from deepufm.theory.predictions import (
    THEOREMS,
    Prediction,
    ScalarPrediction,
    block_prediction,
    ce_model_predictions,
    ce_predictions,
    full_hessian_prediction,
    predictions,
    relu_predictions,
    scalar_prediction,
    scalar_predictions,
    theorem_label,
)
from deepufm.theory.threshold import b_crit, check_admissible, max_single_lambda, regularisation_b

__all__ = [
    "THEOREMS",
    "CEConstants",
    "DNCConstants",
    "Prediction",
    "ScalarPrediction",
    "b_crit",
    "block_prediction",
    "ce_constants",
    "ce_dnc_point",
    "ce_logit_scale",
    "ce_model_predictions",
    "ce_predictions",
    "check_admissible",
    "dnc_constant",
    "dnc_constants",
    "dnc_optimum",
    "effective_lambda",
    "flat_family_point",
    "fold_point",
    "full_hessian_prediction",
    "max_single_lambda",
    "predictions",
    "reduced_loss",
    "regularisation_b",
    "relu_predictions",
    "scalar_prediction",
    "scalar_predictions",
    "simplex_basis",
    "theorem_label",
]
