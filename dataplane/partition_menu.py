"""Which SM splits a device allows: pure arithmetic, no CUDA, so it is tested on any machine.

On Hopper a green-context group is a multiple of 8 SMs (at least 8); the remainder of one split is
not rounded. A split is (prefill_sms, decode_sms) with decode taking the rounded group and prefill
the remainder. This module does not choose a split (the control plane does).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Split:
    decode_sms: int
    prefill_sms: int

    def __str__(self) -> str:
        return f"{self.prefill_sms}p/{self.decode_sms}d"


def granularity_for(major: int) -> tuple[int, int]:
    """(minimum group size, multiple) of an SM group for a compute capability (SGLang's table)."""
    if major >= 9:
        return 8, 8
    if major == 8:
        return 4, 2
    if major == 7:
        return 2, 2
    return 1, 1


def candidate_splits(total_sms: int, major: int = 9, min_prefill_sms: int = 8) -> list[Split]:
    """Every split the device allows, decode group smallest first."""
    minimum, multiple = granularity_for(major)
    first = max(minimum, multiple)
    out = []
    for decode in range(first, total_sms, multiple):
        if total_sms - decode >= max(min_prefill_sms, minimum):
            out.append(Split(decode_sms=decode, prefill_sms=total_sms - decode))
    return out


def choose_menu(splits: list[Split], decode_sizes: list[int] | None) -> list[Split]:
    """The splits to build: those whose decode size is listed (all when `decode_sizes` is None)."""
    if decode_sizes is None:
        return list(splits)
    wanted = set(decode_sizes)
    menu = [s for s in splits if s.decode_sms in wanted]
    missing = wanted - {s.decode_sms for s in menu}
    if missing:
        raise ValueError(f"decode partition sizes {sorted(missing)} are not allowed; choose from "
                         f"{[s.decode_sms for s in splits]}")
    return menu
