"""The library's version, in a module of its own so that any module can read it without import circles."""

__version__ = "0.2.0"
