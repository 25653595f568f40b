"""The chunk operations a run can compose (`voxflow ops`, docs/ops.md), described from the
config's own models and registries so the list cannot drift: each operation's parameters
(name, type, default, meaning) come from its pydantic fields, the postprocess ops from
`voxflow.postprocess.OPS`, the augment transforms from `voxflow.augment.TRANSFORMS`. What is
written here by hand is only where an operation sits in the run: the stages it adds, and the
stages it acts in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .augment import TRANSFORMS
from .config import RunConfig
from .configdoc import _type
from .postprocess import OPS
from .segmentation import STEPS

# config field -> (stages it adds, stages it acts in); a field RunConfig does not have (yet)
# is left out
PLACES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mask": ((), ("inference",)),
    "skip_empty": ((), ("inference",)),
    "normalize": (("levels", "levels-merge"), ("inference",)),
    "augment": ((), ("inference",)),
    # where a value becomes final: crop mode's inference, overlap mode's inference (a task's
    # exclusive box) and blend (the summed bands)
    "postprocess": ((), ("inference", "blend")),
    "segmentation": ((*(f"segmentation-{s}" for s in STEPS), "downsample-segmentation-N"), ()),
}
# a run's stages in the order they run, each with the config key that asks for it
RUN_ORDER = (("levels", "normalize"), ("levels-merge", "normalize"), ("inference", None),
             ("blend", "inference.blend: overlap"),
             *((f"segmentation-{s}", "segmentation") for s in STEPS),
             ("downsample-N", "downsample.mips"), ("downsample-segmentation-N", "segmentation"))
TEXT_WIDTH = 88


@dataclass(frozen=True)
class Param:
    name: str                 # the dotted key a user types (`segmentation.threshold`)
    type: str
    default: str              # JSON, "required", "derived" (see the meaning) or ""
    description: str


@dataclass(frozen=True)
class Operation:
    key: str                  # config key; a postprocess op: `postprocess[op=NAME]`
    summary: str
    adds: tuple[str, ...]     # stages it adds to the run
    acts_in: tuple[str, ...]  # stages whose tasks it changes
    params: tuple[Param, ...]
    choices: tuple[str, ...] = ()   # augment: its transform names


def run_order() -> list[tuple[str, Optional[str]]]:
    """`RUN_ORDER` without the stages of operations RunConfig does not have."""
    return [(stage, key) for stage, key in RUN_ORDER
            if key is None or key.split(".")[0] in RunConfig.model_fields]


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is None:
        return "derived" if "Default:" in (field.description or "") else ""
    return json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)


def _param(name: str, field: FieldInfo) -> Param:
    vector = any(getattr(m, "max_length", None) == 3 for m in field.metadata)
    kind = "[x, y, z]" if vector else _type(field.annotation).replace(" \\| ", " | ")
    return Param(name, kind, _default(field), " ".join((field.description or "").split()))


def _section(field: FieldInfo) -> Optional[type[BaseModel]]:
    """The section model a field holds (`mask: Optional[MaskConfig]`), else None."""
    return next((a for a in getattr(field.annotation, "__args__", (field.annotation,))
                 if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _params(model: type[BaseModel], prefix: str) -> tuple[Param, ...]:
    return tuple(_param(prefix + name, f) for name, f in model.model_fields.items()
                 if name != "op")


def _doc(model: type) -> str:
    return " ".join((model.__doc__ or "").split())


def operations() -> list[Operation]:
    """Every chunk operation, in run-config order: the sections and switches of `PLACES`
    RunConfig has, each postprocess op of `OPS` on its own."""
    ops = []
    for key, (adds, acts_in) in PLACES.items():
        field = RunConfig.model_fields.get(key)
        if field is None:
            continue
        if key == "postprocess":
            ops += [Operation(f"postprocess[op={name}]", f"{_doc(op)} A `postprocess:` "
                              f"entry `{{op: {name}, ...}}`; entries apply in order.", adds,
                              acts_in, _params(op, ""))
                    for name, op in OPS.items()]
            continue
        section = _section(field)
        summary = " ".join((field.description or _doc(section)).split())
        # a switch or a list (skip_empty, augment) is its own one parameter: its meaning is
        # the summary
        params = _params(section, key + ".") if section else (
            Param(**{**vars(_param(key, field)), "description": ""}),)
        ops.append(Operation(key, summary, adds, acts_in, params,
                             TRANSFORMS if key == "augment" else ()))
    return ops


def _where(op: Operation) -> list[tuple[str, tuple[str, ...]]]:
    return [(label, stages) for label, stages in (("adds", op.adds), ("acts in", op.acts_in))
            if stages]


def ops_text() -> str:
    """What `voxflow ops` prints: every operation, where it sits, its parameters."""
    from textwrap import wrap

    def para(text: str, indent: str) -> list[str]:
        return wrap(text, TEXT_WIDTH, initial_indent=indent, subsequent_indent=indent,
                    break_on_hyphens=False)
    lines = ["Chunk operations: config keys that add stages to a run or act in its stages",
             "(docs/ops.md). A run's stages, in the order they run:",
             *para(" -> ".join(stage for stage, _ in run_order()), "  ")]
    for op in operations():
        lines += ["", op.key, *para(op.summary, "  ")]
        for label, stages in _where(op):
            lines += para(f"{label}: {', '.join(stages)}", "  ")
        if op.choices:
            lines.append(f"  transforms: {', '.join(op.choices)}")
        for p in op.params:
            default = f" = {p.default}" if p.default else ""
            lines += [f"  - {p.name}: {p.type}{default}", *para(p.description, "      ")]
    return "\n".join(lines) + "\n"


MARKDOWN_HEADER = """# Chunk operations

Generated from `voxflow.config.RunConfig`, `voxflow.postprocess.OPS` and
`voxflow.augment.TRANSFORMS` by `voxflow ops --markdown` (`voxflow/ops.py`); do not edit by
hand. `voxflow ops` prints the same as text. Every key is also in
[config.md](config.md); unknown ops and bad parameters are refused at `validate` and `plan`,
naming the field (`postprocess[0].op`, `postprocess[0].select`).

A run's stages follow from its config, in this order:
"""


def ops_markdown() -> str:
    """docs/ops.md."""
    out = [MARKDOWN_HEADER, *(f"1. `{stage}`" + (f" ({key})" if key else "")
                              for stage, key in run_order())]
    for op in operations():
        out += ["", f"## `{op.key}`", "", op.summary]
        if op.adds or op.acts_in:
            out += ["", "; ".join(f"{label.capitalize()}: " + ", ".join(f"`{s}`" for s in stages)
                                  for label, stages in _where(op)) + "."]
        if op.choices:
            out += ["", "Transforms: " + ", ".join(f"`{c}`" for c in op.choices) + "."]
        if op.params:
            out += ["", "| parameter | type | default | meaning |", "|---|---|---|---|"]
            out += [f"| `{p.name}` | {_escape(p.type)} | {_cell(p.default)} | {p.description} |"
                    for p in op.params]
    return "\n".join(out) + "\n"


def _escape(text: str) -> str:
    return text.replace(" | ", " \\| ")            # a Markdown table's cell


def _cell(default: str) -> str:
    return {"required": "**required**", "derived": "derived", "": ""}.get(default,
                                                                          f"`{default}`")
