"""The trigger form: Airflow Params generated from the `RunConfig` JSON schema.

Each leaf of the config becomes one Param named by its dotted path (`inference.chunk`),
grouped in the form by its top-level section, with the pipeline YAML's value as default and
the field's description. `config_from_params` folds a run's params back into the nested
mapping that `RunConfig` validates, so a bad value is refused naming the same dotted field.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from airflow.sdk import Param

from voxflow.config import RunConfig

_SCHEMA_KEYS = ("type", "enum", "items", "minItems", "maxItems", "minimum", "maximum",
                "exclusiveMinimum", "exclusiveMaximum", "minLength")


def _resolve(node: dict, defs: dict) -> dict:
    if "$ref" in node:
        return defs[node["$ref"].rsplit("/", 1)[1]]
    return node


def _leaf_schema(node: dict, defs: dict) -> dict:
    """The JSON schema of a leaf, with Optional[X] turned into type [X, null]."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        options = [_resolve(o, defs) for o in node["anyOf"]]
        concrete = [o for o in options if o.get("type") != "null"]
        out = {k: v for k, v in concrete[0].items() if k in _SCHEMA_KEYS}
        if len(concrete) < len(options):
            out["type"] = [out.get("type", "string"), "null"]
        return out
    return {k: v for k, v in node.items() if k in _SCHEMA_KEYS}


def _leaves(props: dict, defs: dict, prefix: str = "") -> Iterator[tuple[str, dict]]:
    for name, node in props.items():
        target = _resolve(node, defs)
        if "anyOf" in node:
            models = [_resolve(o, defs) for o in node["anyOf"] if "$ref" in o]
            target = models[0] if models else target
        if target.get("type") == "object" and "properties" in target:
            yield from _leaves(target["properties"], defs, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", {**_leaf_schema(node, defs),
                                      "description": node.get("description")
                                      or target.get("description", "")}


def _get(mapping: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if mapping is None:
            return None
        mapping = mapping.get(part)
    return mapping


def config_params(config: RunConfig) -> dict[str, Param]:
    """One Param per config leaf, defaults from `config` (the pipeline YAML, validated)."""
    schema = RunConfig.model_json_schema()
    defs = schema.get("$defs", {})
    values = config.model_dump(mode="json")
    params = {}
    for key, leaf in _leaves(schema["properties"], defs):
        section = key.split(".", 1)[0] if "." in key else "run"
        description = leaf.pop("description", "")
        default = _get(values, key)
        if default is None and "null" not in leaf.get("type", []):
            leaf["type"] = [leaf.get("type", "string"), "null"]
        params[key] = Param(default, description=description, section=section, **leaf)
    return params


def config_from_params(params: Mapping[str, Any]) -> dict:
    """Nested config mapping from flat dotted params; unset (None) leaves are left out so
    their defaults are derived as in a YAML file."""
    nested: dict = {}
    for key, value in params.items():
        if value is None or key.startswith("_"):
            continue
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested
