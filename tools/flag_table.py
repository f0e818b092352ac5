"""Markdown table of every `megalodon-serve` flag, generated from its one declaration.

Run `python -m tools.flag_table --write` to refresh docs/serving.md, which holds exactly this output
between its `flag-table` markers (a test checks it), so the docs cannot drift from `ServerSettings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megalodon_infer.config import DEMO_MODEL_DIR, ENV_PREFIX
from server.settings import ServerSettings

START, END = "<!-- flag-table:start -->", "<!-- flag-table:end -->"


def _default(name: str, value: Any) -> str:
    if isinstance(value, Path) and value == DEMO_MODEL_DIR:
        return "the bundled demo model"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def flag_table() -> str:
    rows = ["| Flag | Environment variable | Default | Meaning |", "|---|---|---|---|"]
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            flag = f"{flag}` / `--no-{flag[2:]}"
        default = _default(name, field.get_default(call_default_factory=True))
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{flag}` | `{ENV_PREFIX}{name.upper()}` | {default} | {description} |")
    return "\n".join(rows)


def replace_in(text: str) -> str:
    """`text` with the part between the markers replaced by the current table."""
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{flag_table()}\n{END}{tail}"


DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"

if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        DOC.write_text(replace_in(DOC.read_text()))
    else:
        print(flag_table())
