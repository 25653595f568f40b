"""The run-config reference (docs/config.md), generated from `RunConfig` so it cannot drift."""
from __future__ import annotations

import json
from typing import Annotated, Any, Union, get_args, get_origin

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
    if text.startswith("list[") and "Literal[" in text:
        return "list of " + _type(text[len("list["):-1])
    if "Literal[" in text:
        return " \\| ".join(a.strip(" '") for a in text.split("Literal[", 1)[1].split("]")[0]
                            .split(","))
    if "list[str]" in text:
        return "list of str"
    if "list[" in text:           # a vector (Size3, NonNeg3: 3 long), or a list of numbers
        return "[x, y, z]" if "max_length=3" in text else \
            "list of float" if "float" in text else "list of int"
    for name in ("int", "float", "str", "bool"):
        if text.lstrip("[").startswith(name):
            return name
    return text


def _tagged_models(annotation: Any) -> list[type[BaseModel]]:
    """The sections a list of a tagged union may hold (`postprocess`: its ops), else []."""
    if get_origin(annotation) is not list:
        return []
    item = get_args(annotation)[0]
    item = get_args(item)[0] if get_origin(item) is Annotated else item
    options = get_args(item) if get_origin(item) is Union else (item,)
    return [o for o in options if isinstance(o, type) and issubclass(o, BaseModel)]


def _rows(model: type[BaseModel], prefix: str = "",
          defaults: BaseModel | None = None) -> list[str]:
    """One row per field; `defaults` is the section's default instance, when it has one. A
    list of tagged sections gets a row per kind (`postprocess[op=channels]`) and its fields."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if name == "op" and prefix.endswith("]."):
            continue                                    # the tag: in the section's key
        tagged = _tagged_models(ann)
        if tagged:
            rows.append(f"| `{key}` | list | `[]` | {field.description or ''} |")
            for sub in tagged:
                tag = get_args(sub.model_fields["op"].annotation)[0]
                rows.append(f"| `{key}[op={tag}]` | section | | {sub.__doc__ or ''} |")
                rows += _rows(sub, f"{key}[op={tag}].")
            continue
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
        vector = any(getattr(m, "max_length", None) == 3 for m in field.metadata)
        kind = "[x, y, z]" if vector else _type(ann)
        rows.append(f"| `{key}` | {kind} | {default} | {field.description or ''} |")
    return rows


def config_reference() -> str:
    return HEADER + "\n".join(_rows(RunConfig)) + "\n"
