"""Parse-time range checks of numeric command-line flags, shared by train.py, latent_cache.py and the eval scripts.

Each script keeps a table {dest: range} beside its parser and calls `check_ranges(parser, args, table)` right after
parsing, so a bad number (negative, infinite, NaN, out of range) stops the run with one line naming the flag before
anything loads. Ranges are written as they read: "> 0", ">= 1", "[0, 1)", "(0, 1]", or "finite" (any finite number).
tests/test_flag_ranges.py walks every parser's actions: an int or float flag missing from its table fails the suite.
"""

from __future__ import annotations

import math
import re

_BOUND = re.compile(r"^(>=|>|<=|<)\s*(-?[\d.e+-]+)$")
_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])])$")


def within(value, spec: str) -> bool:
    """Whether a finite `value` satisfies the range `spec`."""
    if spec == "finite":
        return True
    bound = _BOUND.match(spec)
    if bound:
        op, limit = bound.group(1), float(bound.group(2))
        return {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[op]
    interval = _INTERVAL.match(spec)
    if interval is None:
        raise ValueError(f"not a range: {spec!r}")
    left, low, high, right = interval.group(1), float(interval.group(2)), float(interval.group(3)), interval.group(4)
    return (value >= low if left == "[" else value > low) and (value <= high if right == "]" else value < high)


def describe(spec: str) -> str:
    return "a finite number" if spec == "finite" else f"in {spec}" if spec[0] in "[(" else spec


def flag_name(action) -> str:
    return next((s for s in action.option_strings if s.startswith("--")), action.dest)


def range_problem(flag: str, value, spec: str) -> str | None:
    """One line naming the flag, its range and the value given; None if the value is in range."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{flag} must be a finite number{'' if spec == 'finite' else ' ' + describe(spec)}, got {value}"
    if not within(value, spec):
        return f"{flag} must be {describe(spec)}, got {value}"
    return None


def check_ranges(parser, args, ranges: dict[str, str]):
    """parser.error for the first flag in `ranges` whose value (each value, for nargs) is out of its range; a flag left
    at a None default is not checked."""
    for action in parser._actions:
        if action.dest not in ranges:
            continue
        value = getattr(args, action.dest, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            problem = None if item is None else range_problem(flag_name(action), item, ranges[action.dest])
            if problem:
                parser.error(problem)
