"""lookalike: look-alike and duplicate images, found where their records live."""

__version__ = "0.1.0"
