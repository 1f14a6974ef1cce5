"""pydantic's validation errors as one line a person reads: `where: what; where: what`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def dotted(loc: Sequence[Any]) -> str:
    """A field's place as pydantic gives it, e.g. `images.0`."""
    return ".".join(str(part) for part in loc)


def problems(
    errors: Sequence[Any],
    *,
    where: Callable[[Sequence[Any]], str] = dotted,
    default: str = "",
    limit: int | None = None,
) -> str:
    """`errors` (`ValidationError.errors()`) joined by "; ", each as `where(loc): msg`; `default` names a place
    `where` leaves empty (the whole body); `limit`: the first few only."""
    chosen = list(errors)[:limit]
    return "; ".join(f"{where(error['loc']) or default}: {error['msg']}" for error in chosen)
