"""Analyse your own classifier: the paper's per-layer analysis for any ``nn.Module``.

``deepufm.analyze(model, data, loss)`` measures, for every ``nn.Linear`` layer (weight and bias in
homogeneous coordinates), the layer-Hessian spectrum, its Gauss–Newton part and residual, Papyan's
decomposition and knockouts, eigenvector alignment, gradient coefficients, weight spectra, NC1 and
effective ranks; ``Analysis.write(out_dir)`` writes ``results.json``, figures and ``report.html``.
``TrainingProbe`` logs the same records during a user's own training loop, and
``overtraining_figures(run_dir)`` draws the paper's over-training figures from them.
"""

from deepufm.analysis.api import CONVENTIONS, Analysis, analyze
from deepufm.analysis.inputs import DataLoss, data_loss
from deepufm.analysis.training import TrainingProbe, draw_overtraining, overtraining_figures

__all__ = [
    "CONVENTIONS",
    "Analysis",
    "DataLoss",
    "TrainingProbe",
    "analyze",
    "data_loss",
    "draw_overtraining",
    "overtraining_figures",
]
