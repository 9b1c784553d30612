"""NTONIX: an AI inference gateway for OpenAI-compatible LLM backends."""

from ntonix._version import __version__

__all__ = ["__version__"]
