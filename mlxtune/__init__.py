"""mlxtune: the fine-tuning workflow on MLX as one CLI."""

__version__ = "0.1.0"
