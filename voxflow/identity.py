"""Run identity: what determines the bytes a run writes.

A run resumes (skips the tasks done before) only onto output computed by the same model bytes
and the same byte-determining parameters. So the run id is derived from content, not from the
config's text: the digests of the model file and its weights, the input layer's URL and `info`,
and every config value except the operational ones below — worker groups, the queue and its
leases, whether temporaries are kept — which change how a run is carried out, never what it
writes. The model's path is left out too: its digest stands for it (a model moved to another
folder is the same model; a model retrained and saved over the same path is not).

Anything not listed as operational counts as identity, so a new setting is safe by default.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import ModelConfig, RunConfig

OPERATIONAL: dict[str, Optional[set[str]]] = {
    "queue": None,                       # None: the whole section
    "workers": None,
    "cost": None,                        # prices and throughputs: the bill, not the bytes
    "inference": {"keep_temporary"},
    "model": {"path", "weights"},        # their digests stand for them
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_model_bytes(model: bytes, weights: Optional[bytes]) -> str:
    """`sha256:…` of a model file and its weights (the same rule wherever a model is loaded)."""
    h = hashlib.sha256(model)
    if weights is not None:
        h.update(b"\0voxflow-weights\0")
        h.update(weights)
    return "sha256:" + h.hexdigest()


def read_model_files(cfg: ModelConfig) -> tuple[bytes, Optional[bytes]]:
    """The model file's and the weights' bytes (refusing a missing file, naming the field)."""
    from .config import ConfigError
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError("model.path", f"file {path} not found")
    if cfg.weights is None:
        return path.read_bytes(), None
    if not Path(cfg.weights).is_file():
        raise ConfigError("model.weights", f"file {cfg.weights} not found")
    return path.read_bytes(), Path(cfg.weights).read_bytes()


def model_digest(cfg: ModelConfig) -> str:
    """The digest of the model file (and weights) the config names, as `Model` computes it."""
    return digest_model_bytes(*read_model_files(cfg))


@dataclass(frozen=True)
class RunIdentity:
    """The content a run's output follows from; `digest` names it."""

    digest: str                  # sha256 hex of everything below
    model_digest: str
    input_info_digest: str
    settings: dict               # the byte-determining config values

    def run_id(self, output: str) -> str:
        """Readable and content-keyed: the output layer's name and 10 hex of the digest."""
        name = output.rstrip("/").rsplit("/", 1)[-1]
        return f"{name}-{self.digest[:10]}"

    def meta(self) -> dict:
        """What the queue keeps with the run (shown by `voxflow status`, checked by workers)."""
        return {"identity": self.digest, "model_digest": self.model_digest,
                "input_info_digest": self.input_info_digest}


def byte_settings(config: RunConfig) -> dict:
    """The config's values minus the operational ones."""
    values = config.model_dump(mode="json")
    for section, keys in OPERATIONAL.items():
        if keys is None:
            values.pop(section, None)
        else:
            for key in keys:
                values.get(section, {}).pop(key, None)
    return values


def run_identity(config: RunConfig) -> RunIdentity:
    """The run's identity: its config, the model's bytes and the input layer's `info` (read
    once; canonical JSON, so a rewritten but equal info file is the same input)."""
    from .volume import Volume
    settings = byte_settings(config)
    model = model_digest(config.model)
    info = "sha256:" + _sha256(json.dumps(Volume(config.input).info, sort_keys=True,
                                          separators=(",", ":")).encode())
    text = json.dumps({"settings": settings, "model": model, "input_info": info},
                      sort_keys=True, separators=(",", ":"))
    return RunIdentity(_sha256(text.encode()), model, info, settings)
