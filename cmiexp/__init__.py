"""cmiexp: information-theoretic fine-tuning experiments for language models."""

__version__ = "0.1.0"
