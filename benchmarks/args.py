"""Command-line values shared by the benchmark commands: counts and lists of them."""

from __future__ import annotations

from argparse import ArgumentTypeError
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def positive_int(text: str) -> int:
    """A count >= 1, written as an integer ("4096") or in scientific notation ("1e6")."""
    text = text.strip()
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise ArgumentTypeError(f"{text!r} is not a number") from None
        if not number.is_integer():
            raise ArgumentTypeError(f"{text!r} is not a whole number") from None
        value = int(number)
    if value < 1:
        raise ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def comma_list(text: str, kind: Callable[[str], T]) -> list[T]:
    """The comma-separated values of `text`, each parsed by `kind` and kept once, in order."""
    values = [kind(item) for item in text.split(",") if item.strip()]
    if not values:
        raise ArgumentTypeError("the list is empty")
    return list(dict.fromkeys(values))


def counts(text: str) -> list[int]:
    return comma_list(text, positive_int)
