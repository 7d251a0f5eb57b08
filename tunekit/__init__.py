"""tunekit: a small, pure-PyTorch toolkit for fine-tuning large language models."""

__version__ = "0.1.0"
