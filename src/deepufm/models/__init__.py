"""Models: deep unconstrained feature models (and, later, real networks with a linear head)."""

from deepufm.models.config import UFMConfig
from deepufm.models.ufm import DeepUFM

__all__ = ["DeepUFM", "UFMConfig"]
