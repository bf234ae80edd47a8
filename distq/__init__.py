"""distq: reward-directed score-based diffusion trained by continuous-time q-learning from data (see README.md)."""

__version__ = "0.1.0"
