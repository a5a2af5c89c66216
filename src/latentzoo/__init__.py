"""latentzoo: autoencoder-style generative models trained by one DVC + Ray Train + MLflow pipeline."""

__version__ = "0.1.0"
