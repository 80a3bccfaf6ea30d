"""awqpad: exact zero-padding of quantized checkpoints for tensor parallelism."""

__version__ = "0.1.0"
