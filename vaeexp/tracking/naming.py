"""A run's name: the overrides that change what it trains (`latent_dim=8,epochs=10`)."""

from __future__ import annotations

from vaeexp.config import is_where_or_how


def trained_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """(key, value) of each `key=value` override that changes what is trained, in order."""
    pairs = [o.lstrip("+~").split("=", 1) for o in overrides if "=" in o]
    return [(k, v) for k, v in pairs if not is_where_or_how(k)]


def run_name(overrides: list[str], sep: str = ",") -> str:
    return sep.join(f"{k}={v}" for k, v in trained_overrides(overrides)) or "defaults"
