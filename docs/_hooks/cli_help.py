"""MkDocs hook: replace `<!-- cli-help -->` with the help of `dfa-kernels` and of each of its
subcommands, read from the command's own parser, so the reference cannot drift from the CLI."""

import argparse
import os

MARKER = "<!-- cli-help -->"


def _help(parser: argparse.ArgumentParser) -> str:
    os.environ.setdefault("COLUMNS", "100")  # argparse wraps to the terminal's width: fix it
    return parser.format_help().rstrip()


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    from dfa_kernels.cli import build_parser

    parser = build_parser()
    parts = ["```text\n" + _help(parser) + "\n```"]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        parts.append(f"## `dfa-kernels {name}`\n\n```text\n{_help(sub)}\n```")
    return markdown.replace(MARKER, "\n\n".join(parts))
