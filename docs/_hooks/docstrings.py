"""Griffe extension: the public API's docstrings, written for reading in a terminal, as Markdown.
They describe arguments as `name: text` lines (with indented continuation lines), which Markdown
would join into one paragraph: each such entry becomes its own list item, the name in code. Sphinx
roles (:class:`X`) become code spans. Other lines are left as written."""

import re

import griffe

FIELD = re.compile(r"([A-Za-z_]\w*(?:, [A-Za-z_]\w*)*): (.*)")
ROLE = re.compile(r":(?:mod|class|func|meth|attr|data|exc):`~?([^`]+)`")


def fields_as_list(text: str) -> str:
    out, in_code = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        m = None if in_code else FIELD.fullmatch(line)
        if m:
            names = ", ".join(f"`{n}`" for n in m.group(1).split(", "))
            if out and out[-1].strip() and not out[-1].startswith(("- ", "  ")):
                out.append("")  # a list must not continue the paragraph above it
            out.append(f"- {names}: {m.group(2)}")
        else:
            out.append(line)
    return ROLE.sub(r"`\1`", "\n".join(out))


class FieldLists(griffe.Extension):
    def on_object(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fields_as_list(obj.docstring.value)
