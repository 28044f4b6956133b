"""Griffe extension used by the documentation build (see mkdocs.yml).

The package's Google-style docstrings title their doctests ``Example:``.
Griffe's Google parser recognises only ``Examples:`` as an examples section
and renders any other title as an admonition whose body is Markdown, where
``>>>`` lines become quotations and ``# comments`` headings. This extension
retitles the section before the docstring is parsed, so the examples render
as Python sessions. It changes nothing in the package.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^([ \t]*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
  """Turns ``Example:`` section titles into ``Examples:``."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    if obj.docstring is not None:
      obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
