"""imgcls: an experiment-tracked image-classification pipeline (DVC + MLflow)."""

__version__ = "0.1.0"
