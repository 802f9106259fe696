"""gpumesh: a GPU cluster manager for AI models. See docs/architecture.md."""

__version__ = "0.1.0"
