"""The run-config reference (docs/config.md), generated from `RunConfig` so it cannot drift."""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import RunConfig

HEADER = """# Run config reference

Generated from `voxflow.config.RunConfig` by `voxflow config-doc`; do not edit by hand.
Sizes are voxels, x y z. Relative paths resolve against the config file's folder.
Unknown keys are refused.

| key | type | default | meaning |
|---|---|---|---|
"""


def _type(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("Annotated", "")
    for noise in ("voxflow.config.", "<class '", "'>"):
        text = text.replace(noise, "")
    if text.startswith("Optional["):
        text = text[len("Optional["):-1]
    if "Literal[" in text:
        return " \\| ".join(a.strip(" '") for a in text.split("Literal[", 1)[1].split("]")[0]
                            .split(","))
    if "list[" in text:
        return "[x, y, z]"
    return text.split("[")[0].strip()


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        sub = next((a for a in getattr(ann, "__args__", (ann,))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            rows.append(f"| `{key}` | section | | {field.description or sub.__doc__ or ''} |")
            rows += _rows(sub, key + ".")
            continue
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "**required**"
        elif field.default is None:
            default = "derived" if "Default:" in (field.description or "") else ""
        else:
            default = f"`{json.dumps(field.default)}`"
        rows.append(f"| `{key}` | {_type(ann)} | {default} | {field.description or ''} |")
    return rows


def config_reference() -> str:
    return HEADER + "\n".join(_rows(RunConfig)) + "\n"
