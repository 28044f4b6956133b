"""Griffe extension used by the documentation build (see mkdocs.yml).

It adapts two habits of the package's docstrings to Markdown before they
are parsed, and changes nothing in the package:

* Doctests sit under ``Example:``. Griffe's Google parser recognises only
  ``Examples:`` as an examples section and renders any other title as an
  admonition whose body is Markdown, where ``>>>`` lines become quotations
  and ``# comments`` headings. The section is retitled ``Examples:``, so the
  examples render as Python sessions.
* Cross-references use Sphinx roles (``:func:`name```, ``:class:`~a.B```),
  which Markdown would show verbatim. They become code spans (``name``,
  ``B``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^([ \t]*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`(~?)([^`]+)`")


def _role_to_code(match: re.Match) -> str:
  target = match.group(2)
  if match.group(1):  # ~a.b.C shows as C
    target = target.rsplit(".", 1)[-1]
  return f"`{target}`"


class DocstringMarkdown(griffe.Extension):
  """Retitles ``Example:`` sections and turns Sphinx roles into code."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    if obj.docstring is not None:
      value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
      obj.docstring.value = _ROLE.sub(_role_to_code, value)
