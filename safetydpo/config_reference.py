"""The config reference: every key of :class:`safetydpo.config.Config` with its type, default and description,
generated from the pydantic models (a field's docstring is its description), so it is written once.

    python -m safetydpo.config_reference            # print it
    python -m safetydpo.config_reference --update   # rewrite README.md's section between the markers
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from safetydpo.config import PROJECT_ROOT, Config

README = PROJECT_ROOT / "README.md"
BEGIN, END = "<!-- config-reference: begin -->", "<!-- config-reference: end -->"


def _type(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\btyping\.", "", str(annotation))


def _default(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, str) and value.startswith(str(PROJECT_ROOT)):
        value = value.replace(str(PROJECT_ROOT), "<project>")
    return repr(value) if isinstance(value, str) else str(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference() -> str:
    """Markdown: top-level keys, then one table per section, in the order of :class:`Config`."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    sections = []
    for name, field in Config.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections.append((name, annotation, field.description))
        else:
            lines.append(f"| `{name}` | `{_cell(_type(annotation))}` | `{_cell(_default(field))}` | "
                         f"{_cell(field.description or '')} |")
    for name, model, description in sections:
        lines += ["", f"**`{name}`**: {_cell(model.__doc__ or description or '')}", "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        for key, field in model.model_fields.items():
            lines.append(f"| `{name}.{key}` | `{_cell(_type(field.annotation))}` | `{_cell(_default(field))}` | "
                         f"{_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def _bounds(text: str) -> tuple[int, int]:
    """Where README.md's generated section starts and ends (between the markers)."""
    return text.index(BEGIN) + len(BEGIN), text.index(END)


def readme_section(text: str) -> str:
    """What README.md holds between the markers."""
    start, end = _bounds(text)
    return text[start:end].strip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--update", action="store_true", help=f"rewrite the section of {README.name}")
    args = p.parse_args(argv)
    if not args.update:
        sys.stdout.write(reference())
        return 0
    text = README.read_text()
    start, end = _bounds(text)
    README.write_text(text[:start] + "\n" + reference() + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
