"""Parsing of human sizes and durations used in configs and flags."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.IGNORECASE)
_MULT = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value: str | int) -> int:
    """``"2G"`` -> bytes. Binary units; a bare number is bytes. Raises ``ValueError``."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"not a size: {value!r} (try 512M or 2G)")
    return int(float(m.group(1)) * _MULT[m.group(2).lower()])


def parse_duration(value: str | float | int) -> float:
    """``"15m"``, ``"1h30m"``, ``"500ms"`` or a number of seconds -> seconds."""
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value}")
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if text[pos : m.start()].strip():
            break
        total += float(m.group(1)) * _SECONDS[m.group(2).lower()]
        pos = m.end()
    if pos == 0 or text[pos:].strip():
        raise ValueError(f"not a duration: {value!r} (try 90s, 15m or 1h)")
    return total
