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
from deepufm.theory.predictions import Prediction, block_prediction, ce_predictions, predictions
from deepufm.theory.threshold import b_crit, check_admissible, max_single_lambda, regularisation_b

__all__ = [
    "CEConstants",
    "DNCConstants",
    "Prediction",
    "b_crit",
    "block_prediction",
    "ce_constants",
    "ce_dnc_point",
    "ce_logit_scale",
    "ce_predictions",
    "check_admissible",
    "dnc_constant",
    "dnc_constants",
    "dnc_optimum",
    "effective_lambda",
    "flat_family_point",
    "fold_point",
    "max_single_lambda",
    "predictions",
    "reduced_loss",
    "regularisation_b",
    "simplex_basis",
]
