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
    if text.startswith("Optional[") or text.startswith("Union["):
        text = text.split("[", 1)[1][:-1]
        if text.endswith(", NoneType"):
            text = text[:-len(", NoneType")]
    if "Literal[" in text:
        return " \\| ".join(a.strip(" '") for a in text.split("Literal[", 1)[1].split("]")[0]
                            .split(","))
    if "list[str]" in text:
        return "list of str"
    if "list[" in text:
        return "[x, y, z]"
    for name in ("int", "float", "str", "bool"):
        if text.lstrip("[").startswith(name):
            return name
    return text


def _rows(model: type[BaseModel], prefix: str = "",
          defaults: BaseModel | None = None) -> list[str]:
    """One row per field; `defaults` is the section's default instance, when it has one."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        sub = next((a for a in getattr(ann, "__args__", (ann,))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            rows.append(f"| `{key}` | section | | {field.description or sub.__doc__ or ''} |")
            section = getattr(defaults, name, None) if defaults is not None else None
            if section is None and field.default_factory is not None:
                section = field.default_factory()
            rows += _rows(sub, key + ".", section)
            continue
        value = getattr(defaults, name) if defaults is not None else field.default
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "**required**"
        elif field.default_factory is not None and defaults is None:
            default = "derived"                  # machine-dependent (e.g. $VOXFLOW_HOME)
        elif value is None or value is PydanticUndefined:
            default = "derived" if "Default:" in (field.description or "") else ""
        elif field.default_factory is not None and key.endswith(".url"):
            default = "derived"
        else:
            default = f"`{json.dumps(value)}`"
        rows.append(f"| `{key}` | {_type(ann)} | {default} | {field.description or ''} |")
    return rows


def config_reference() -> str:
    return HEADER + "\n".join(_rows(RunConfig)) + "\n"
