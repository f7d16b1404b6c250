"""Write a mesh config file: the one TOML writer, used by the lab and the tests.

The standard library reads TOML but does not write it; kvmesh's config needs only strings,
numbers, booleans, lists and inline tables, which this module spells out. A signing key is
made here too, so every mesh a tool builds signs its tasks.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def new_signing_key() -> str:
    """A task signing key: 32 random bytes, hex (what `kvmesh keygen` prints)."""
    return secrets.token_hex(32)


def write_secret(path: Path, text: str) -> Path:
    """Write a secret file readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")
    return path


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a TOML basic string is a JSON string
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML spelling for {type(value).__name__}")


def render(doc: Mapping[str, Any]) -> str:
    """Top-level tables (mappings) and arrays of tables (lists of mappings) of *doc*."""
    lines: list[str] = []
    for name, body in doc.items():
        tables = body if isinstance(body, list) else [body]
        for table in tables:
            lines.append(f"[[{name}]]" if isinstance(body, list) else f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if v is not None]
            lines.append("")
    return "\n".join(lines)


def mesh_config(
    *,
    broker_url: str,
    clusters: Sequence[Mapping[str, Any]],
    signing_key_file: Path | None,
    broker: Mapping[str, Any] | None = None,
    sync: Mapping[str, Any] | None = None,
    worker: Mapping[str, Any] | None = None,
) -> str:
    """The text of a mesh config: each cluster a mapping of `[[clusters]]` fields."""
    doc: dict[str, Any] = {
        "broker": {
            **({"url": broker_url} if broker_url else {}),
            **({"signing_key_file": signing_key_file} if signing_key_file else {}),
            **(broker or {}),
        }
    }
    if sync:
        doc["sync"] = dict(sync)
    if worker:
        doc["worker"] = dict(worker)
    doc["clusters"] = [dict(c) for c in clusters]
    return render(doc)
