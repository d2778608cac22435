"""argparse value types for the CLI's numeric flags: a value out of its range is refused at parse time
with a message naming the flag (as `duetserve <command>: error: ...`), not deep in a run as a
traceback. Parsing only; what a value means belongs to the command."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def checked(kind: type, name: str, low: float, inclusive: bool = True,
            high: float | None = None) -> Callable[[str], object]:
    """An argparse type: `kind` parsed and kept within [low (or above it, not `inclusive`), high]."""
    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if value != value or (value < low if inclusive else value <= low) or (high is not None and value > high):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}{f' and <= {high}' if high is not None else ''}, "
                                             f"got {text}")
        return value
    return parse
