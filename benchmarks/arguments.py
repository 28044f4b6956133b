"""Argument types shared by the benchmark scripts (not a script itself)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def count(minimum: int = 1) -> Callable[[str], int]:
  """An ``argparse`` type: an integer of at least ``minimum``.

  A count below it (no tasks, no timed repeats, a negative number of steps)
  is refused when the arguments are parsed, with the argument's name,
  instead of failing after minutes of compiling or writing empty results.

  >>> count(1)("3")
  3
  >>> count(0)("-1")
  Traceback (most recent call last):
  ...
  argparse.ArgumentTypeError: must be >= 0, got -1
  """

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
        f"must be an integer, got {text!r}"
      ) from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value

  return parse
