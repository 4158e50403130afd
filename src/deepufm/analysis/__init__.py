"""Analyse your own classifier: the paper's per-layer analysis for any ``nn.Module``.

``deepufm.analyze(model, data, loss)`` measures, for every ``nn.Linear`` layer (weight and bias in
homogeneous coordinates), the layer-Hessian spectrum, its Gauss–Newton part and residual, Papyan's
decomposition and knockouts, eigenvector alignment, gradient coefficients, weight spectra, NC1 and
effective ranks; ``Analysis.write(out_dir)`` writes ``results.json``, figures and ``report.html``.
"""

from deepufm.analysis.api import CONVENTIONS, Analysis, analyze
from deepufm.analysis.inputs import DataLoss, data_loss

__all__ = ["CONVENTIONS", "Analysis", "DataLoss", "analyze", "data_loss"]
