"""The trigger form: Airflow Params for what a user changes per run, from the `RunConfig`
JSON schema.

Each per-run leaf of the config becomes one Param named by its dotted path
(`inference.chunk`), grouped in the form by section in the order a run uses them (volume,
mask, normalize, model, inference, output, segmentation, downsample, workers), with the
pipeline YAML's value as default and the field's description. An optional section (`mask`,
`normalize`, `segmentation`) is on when its switch is set (`SWITCHES`: a layer, or a
checkbox) and left out when it is empty, whatever its other keys say; a section the YAML
lacks shows its fields' own defaults, so the form can turn it on. What belongs to the
deployment — queue, prices and throughputs, where and on what machines workers run — is not
in the form: it stays as the pipeline YAML says (`fixed_config`), and an API caller may
still override any dotted key in the run's conf.
An `[x, y, z]` is a one-line field ("64 64 8", "64, 64, 8" or JSON), a list of choices
(`augment`) a multi-select, a list of sections (`postprocess`) a JSON field validated
against the sections' own schema. `config_from_params`
folds a run's params back onto the fixed part, so a bad value is refused naming the same
dotted field.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterator, Mapping

from airflow.sdk import Param

from voxflow.config import RunConfig

_SCHEMA_KEYS = ("type", "enum", "items", "minItems", "maxItems", "minimum", "maximum",
                "exclusiveMinimum", "exclusiveMaximum", "minLength")
# form sections in the order a run uses them: (section, dotted prefixes or keys)
SECTIONS = (
    ("volume", ("input", "mip", "bbox.", "input_missing")),
    ("mask", ("mask.", "skip_empty")),
    ("normalize", ("normalize.",)),
    ("model", ("model.",)),
    ("inference", ("inference.", "augment")),
    ("output", ("output", "postprocess", "output_dtype", "storage_chunk", "sharding",
                "shard_bytes")),
    # dtype (uint32 holds 4e9 objects; the merge pass names it) and chunk stay in the YAML
    ("segmentation", ("segmentation.output", "segmentation.channel", "segmentation.threshold",
                      "segmentation.invert", "segmentation.connectivity",
                      "segmentation.min_size")),
    ("downsample", ("downsample.",)),
    ("workers", ("workers.inference.max", "workers.blend.max", "workers.downsample.max")),
)
# optional section -> the key that turns it on: empty (None, "", unchecked) leaves it out
SWITCHES = {"mask": "mask.layer", "normalize": "normalize.per_section",
            "segmentation": "segmentation.output"}
_VECTOR = re.compile(r"^\s*\[?\s*(-?\d+)\s*[,\s]\s*(-?\d+)\s*[,\s]\s*(-?\d+)\s*\]?\s*$")


def _section(key: str) -> str | None:
    for name, keys in SECTIONS:
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys):
            return name
    return None


def _resolve(node: dict, defs: dict) -> dict:
    if "$ref" in node:
        return defs[node["$ref"].rsplit("/", 1)[1]]
    return node


def _inline(node: Any, defs: dict) -> Any:
    """`node` with every `$ref` replaced by its definition (a Param's schema has no `$defs`)
    and no `discriminator` (its mapping names `$defs`; `oneOf` alone validates the same)."""
    if isinstance(node, list):
        return [_inline(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = _resolve(node, defs)
    return {k: _inline(v, defs) for k, v in node.items() if k != "discriminator"}


def _leaf_schema(node: dict, defs: dict) -> dict:
    """The JSON schema of a leaf, with Optional[X] turned into type [X, null]; a list of
    choices gets them as `examples` (Airflow's form draws that as a multi-select)."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        options = [_resolve(o, defs) for o in node["anyOf"]]
        concrete = [o for o in options if o.get("type") != "null"]
        out = {k: v for k, v in concrete[0].items() if k in _SCHEMA_KEYS}
        if len(concrete) < len(options):
            out["type"] = [out.get("type", "string"), "null"]
        return out
    out = {k: _inline(v, defs) for k, v in node.items() if k in _SCHEMA_KEYS}
    if "enum" in out.get("items", {}):
        out["examples"] = out["items"]["enum"]
    return out


def _leaves(props: dict, defs: dict, prefix: str = "") -> Iterator[tuple[str, dict]]:
    for name, node in props.items():
        target = _resolve(node, defs)
        if "anyOf" in node:
            models = [_resolve(o, defs) for o in node["anyOf"] if "$ref" in o]
            target = models[0] if models else target
        if target.get("type") == "object" and "properties" in target:
            yield from _leaves(target["properties"], defs, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", {**_leaf_schema(node, defs), "default": node.get("default"),
                                      "description": node.get("description")
                                      or target.get("description", "")}


def _get(mapping: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if mapping is None:
            return None
        mapping = mapping.get(part)
    return mapping


def _one_line(leaf: dict, default: Any) -> tuple[dict, Any]:
    """An [x, y, z] leaf as a one-line text field: Airflow's form draws an array (or a leaf
    of several types) as a multi-line code editor, but a leaf without a `type` whose
    value is a string as a text field. So the schema is `anyOf` a "x y z" string or the
    list (API callers may send either), and the default is shown as "x y z"."""
    types = leaf["type"] if isinstance(leaf.get("type"), list) else [leaf.get("type")]
    if "array" not in types or not leaf.get("minItems") == leaf.get("maxItems") == 3:
        return leaf, default
    array = {k: v for k, v in leaf.items() if k != "type"}
    options = [{"type": "string", "pattern": _VECTOR.pattern}, {"type": "array", **array}]
    if "null" in types:
        options.append({"type": "null"})
    text = " ".join(map(str, default)) if isinstance(default, list) else default
    return {"anyOf": options}, text


def config_params(config: RunConfig) -> dict[str, Param]:
    """One Param per per-run config leaf, in `SECTIONS` order, defaults from `config` (the
    pipeline YAML, validated)."""
    schema = RunConfig.model_json_schema()
    defs = schema.get("$defs", {})
    values = config.model_dump(mode="json")
    leaves = {key: leaf for key, leaf in _leaves(schema["properties"], defs)}
    params = {}
    for name, _ in SECTIONS:
        for key, leaf in leaves.items():
            if _section(key) != name:
                continue
            leaf = dict(leaf)
            description = leaf.pop("description", "")
            default, own = _get(values, key), leaf.pop("default")
            section = key.split(".")[0]
            if section in SWITCHES and values.get(section) is None:      # the YAML lacks it
                default = (False if leaf.get("type") == "boolean" else None) \
                    if key == SWITCHES[section] else own
            if default is None and "null" not in leaf.get("type", []):
                leaf["type"] = [leaf.get("type", "string"), "null"]
            leaf, default = _one_line(leaf, default)
            params[key] = Param(default, description=description, section=name, **leaf)
    return params


def fixed_config(config: RunConfig) -> dict:
    """The config values the form does not show (the deployment's), nested."""
    schema = RunConfig.model_json_schema()
    values = config.model_dump(mode="json", exclude_none=True)
    return _nest({key: _get(values, key) for key, _ in
                  _leaves(schema["properties"], schema.get("$defs", {}))
                  if _section(key) is None and _get(values, key) is not None})


def _vector(value: Any) -> Any:
    """"64 64 8", "64, 64, 8" or "[64, 64, 8]" -> [64, 64, 8]; anything else as given
    (the config refuses it, naming the field)."""
    if isinstance(value, str):
        m = _VECTOR.match(value)
        if m:
            return [int(v) for v in m.groups()]
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except ValueError:
                pass
    return value


def _nest(flat: Mapping[str, Any], into: dict | None = None) -> dict:
    nested: dict = into if into is not None else {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def config_from_params(params: Mapping[str, Any], fixed: Mapping | None = None) -> dict:
    """Nested config mapping from flat dotted params over the `fixed` part; unset (None)
    leaves are left out so their defaults are derived as in a YAML file, and so is an
    optional section whose switch is empty (with what the YAML fixed of it)."""
    nested = json.loads(json.dumps(fixed or {}))
    flat = {key: _vector(value) for key, value in params.items()
            if value is not None and not key.startswith("_")}
    for section, switch in SWITCHES.items():
        if switch in params and params[switch] in (None, "", False):
            nested.pop(section, None)
            flat = {k: v for k, v in flat.items() if not k.startswith(section + ".")}
    return _nest(flat, nested)
