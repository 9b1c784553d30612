"""The NTONIX mock OpenAI-compatible LLM backend (installed as ``ntonix_mock``)."""

from ntonix_mock.server import Knobs, MockLLM, make_site

__all__ = ["Knobs", "MockLLM", "make_site"]
