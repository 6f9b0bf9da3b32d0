"""Using a model: feature extraction, the fast inference path, the demo. Imports weights and below."""

from .optimize import optimize_for_inference

__all__ = ["optimize_for_inference"]
