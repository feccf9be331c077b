"""Adaptation methods and policies (agents on the engine and the Gymnasium API)."""

__all__: list[str] = []
