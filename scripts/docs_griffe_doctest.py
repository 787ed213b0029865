"""Griffe extension for the API reference: our docstrings are reST-flavoured (``>>>`` examples,
``:class:`Name``` roles); turn them into the Markdown that mkdocstrings renders.

Named in mkdocs.yml under the python handler's ``extensions``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|exc|data):`~?\.?([^`]+)`")


def markdown_docstring(text: str) -> str:
    """Fence runs of ``>>>`` / ``...`` lines as Python; turn Sphinx roles into code spans."""
    out: list[str] = []
    fenced = False
    for line in text.splitlines():
        is_doctest = line.lstrip().startswith((">>>", "..."))
        if is_doctest and not fenced:
            out += ["", "```python"]
            fenced = True
        elif not is_doctest and fenced:
            out += ["```", ""]
            fenced = False
        if is_doctest:
            code = re.sub(r"^\s*(>>>|\.\.\.) ?", "", line)
            out.append(re.sub(r"\s*# doctest:.*$", "", code))
        else:
            out.append(ROLE.sub(lambda m: f"`{m.group(1)}`", line))
    if fenced:
        out.append("```")
    return "\n".join(out)


class DoctestToMarkdown(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
