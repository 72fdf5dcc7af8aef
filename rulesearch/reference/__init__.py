"""Slow, obviously correct oracles used by tests and benchmarks only; the package never calls them."""

from .naive import naive_update

__all__ = ["naive_update"]
