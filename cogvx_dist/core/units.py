"""Sizes as users write them: pixel resolutions ("480x720") and byte counts ("40GiB", "512MB"), and bytes as GiB."""

from __future__ import annotations

import re
from typing import Any

from cogvx_dist.core.errors import CogvxError

GIB = 1 << 30
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 1 << 10, "M": 1e6, "MB": 1e6, "MIB": 1 << 20,
          "G": 1e9, "GB": 1e9, "GIB": 1 << 30, "T": 1e12, "TB": 1e12, "TIB": 1 << 40}


def parse_size(text: Any, key: str = "resolution") -> tuple[int, int]:
    """'480x720' or [480, 720] -> (480, 720)."""
    if isinstance(text, (list, tuple)) and len(text) == 2:
        try:
            return int(text[0]), int(text[1])
        except (TypeError, ValueError) as err:
            raise CogvxError(f"{key}: {list(text)!r} is not [HEIGHT, WIDTH] in whole numbers") from err
    match = _SIZE.match(str(text))
    if not match:
        raise CogvxError(f"{key}: {text!r} is not HEIGHTxWIDTH (e.g. 480x720)")
    return int(match.group(1)), int(match.group(2))


def parse_bytes(text: Any, key: str) -> int:
    """'512MiB', '1GB', '1000000' -> bytes (GB = 10^9, GiB = 2^30)."""
    match = _BYTES.match(str(text))
    unit = (match.group(2) or "").upper() if match else ""
    if not match or unit not in _UNITS:
        raise CogvxError(f"{key}: {text!r} is not a size (e.g. 512MiB, 40GiB, 80GB, 1000000)")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(size: float) -> str:
    """Bytes as GiB with two decimals: '17.70 GiB'."""
    return f"{size / GIB:.2f} GiB"
