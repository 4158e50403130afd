"""Metrics of collapse, alignment and spectra (THEORY §4.1, §9)."""

from deepufm.metrics.collapse import class_means, etf_distance, nc1, orthogonal_frame_distance

__all__ = ["class_means", "etf_distance", "nc1", "orthogonal_frame_distance"]
