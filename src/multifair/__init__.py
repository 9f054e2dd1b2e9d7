"""multifair: train and audit multimodal medical classifiers that are balanced across
modalities and fair across demographic groups."""

__version__ = "0.1.0"
