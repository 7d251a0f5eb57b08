"""Up-front checks of recipe config values, so a bad value fails at start-up with the key's name
instead of as a ZeroDivisionError hundreds of steps in."""

from __future__ import annotations


def check_positive_ints(cfg, *keys: str, optional: tuple[str, ...] = ()) -> None:
    """Raise ValueError unless every ``cfg.<key>`` is an int >= 1 (``optional`` keys may also be null)."""
    for key in (*keys, *optional):
        value = cfg[key]
        if value is None and key in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            allowed = "a positive integer or null" if key in optional else "a positive integer"
            raise ValueError(f"config key {key} must be {allowed}, got {value!r}")
