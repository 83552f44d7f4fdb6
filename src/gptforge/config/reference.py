"""The config reference, generated from the schema's field docstrings.

Field docstrings (a string literal right after the field) are not kept by Python at run time, so
they are read from the source with ``ast``. ``docs/config.md`` is this module's output; a test
checks that every field has a docstring and that the file is up to date.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

from gptforge.config.loader import section_types
from gptforge.config.schema import Config


def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} for a dataclass whose fields carry attribute docstrings."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def markdown() -> str:
    lines = ["# Config reference",
             "",
             "Generated from `src/gptforge/config/schema.py` by "
             "`python -m gptforge.config.reference > docs/config.md`. Set any key in a TOML "
             "file under its `[section]`, or on the command line as `section.key=value`.",
             ""]
    defaults = dataclasses.asdict(Config())
    for section, cls in section_types().items():
        lines += [f"## [{section}]", "", "| key | default | meaning |", "|---|---|---|"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = repr(defaults[section][f.name]).replace("|", "\\|")
            lines.append(f"| `{section}.{f.name}` | `{default}` | {docs.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
