"""hlsa: hybrid linear + sparse attention language models."""

__version__ = "0.1.0"
