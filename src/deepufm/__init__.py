"""deepufm: deep unconstrained feature models, their curvature matrices and closed-form theory.

Garrod & Keating, "Unifying Low Dimensional Observations in Deep Learning through the Deep Linear
Unconstrained Feature Model" (arXiv 2404.06106). Data flows one way through the subpackages:
``models`` -> ``training`` (trained state) -> ``matrices`` -> spectra -> ``metrics`` ->
``experiments`` (figures and report). ``theory`` holds the closed-form predictions.
"""

from deepufm.errors import ConfigError, DeepUFMError, DivergenceError
from deepufm.models import DeepUFM, UFMConfig

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "ConfigError",
    "DeepUFM",
    "DeepUFMError",
    "DivergenceError",
    "TrainingProbe",
    "UFMConfig",
    "__version__",
    "analyze",
    "overtraining_figures",
]


def __getattr__(name: str):
    # deepufm.analyze, deepufm.Analysis, deepufm.TrainingProbe ... load the analysis stack
    # (matrices, metrics, figures) only when used, so that `import deepufm` stays light.
    if name in ("analyze", "Analysis", "TrainingProbe", "overtraining_figures"):
        from deepufm import analysis

        return getattr(analysis, name)
    raise AttributeError(f"module 'deepufm' has no attribute {name!r}")
