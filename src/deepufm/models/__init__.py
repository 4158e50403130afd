"""Models: deep unconstrained feature models and a real network (ResNet) with a deep linear head."""

from deepufm.models.config import UFMConfig
from deepufm.models.resnet import ResNetUFM, curvature_mode, head_state
from deepufm.models.ufm import DeepUFM

__all__ = ["DeepUFM", "ResNetUFM", "UFMConfig", "curvature_mode", "head_state"]
