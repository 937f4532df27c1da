"""A tiny TOML writer for test configs (the stdlib reads TOML but cannot write it)."""
from __future__ import annotations

import json
from typing import Any


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dumps(doc: dict[str, Any]) -> str:
    """Render a two-level dict (top-level scalars, then [sections]) as TOML."""
    lines = [f"{k} = {_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for section, body in doc.items():
        if isinstance(body, dict):
            lines.append(f"\n[{section}]")
            lines.extend(f"{k} = {_value(v)}" for k, v in body.items())
    return "\n".join(lines) + "\n"
