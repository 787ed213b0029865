"""MkDocs hook: fills docs/reference/cli.md from the command line's own parser.

Named in mkdocs.yml under ``hooks:``. The page's marked block is replaced by the top-level help and
each command's ``format_help()``, so the reference cannot drift from ``smoothcache <command> --help``.
"""

from __future__ import annotations

import argparse
import os
import re

PAGE = "reference/cli.md"
BLOCK = re.compile(r"<!-- cli-reference:.*?-->.*?<!-- /cli-reference -->", re.DOTALL)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    """Markdown: an introduction, the top-level help, then one section per command."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal's width; fix it for a stable page
    from smoothcache.cli import build_parser

    parser = build_parser()
    parts = [
        (
            "Generated from `smoothcache.cli.build_parser()` when this site was built: each section is "
            "exactly what `smoothcache <command> --help` prints. The [guide](../guide.md#command-line) "
            "shows the commands in use."
        ),
        "",
        "## smoothcache",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
    ]
    for name, sub in _subcommands(parser).items():
        parts += ["", f"## smoothcache {name}", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if not BLOCK.search(markdown):
        raise ValueError(f"docs/{PAGE} lost its <!-- cli-reference: ... --> block; put it back for the generated help")
    reference = cli_reference()
    return BLOCK.sub(lambda _: reference, markdown)
