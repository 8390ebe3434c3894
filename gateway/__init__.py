"""An OpenAI-compatible gateway in front of LLM providers: limits, admission, resilience."""

__version__ = "0.1.0"
