"""Pipeline files (`dags/pipelines/NAME.yaml`): a run config plus the keys that say when a
pipeline runs. Parsed here, without Airflow, so `voxflow validate` checks them exactly as the
DAG factory reads them; every refusal is a `ConfigError` naming the field.

Pipeline keys: `schedule` (cron or preset), `assets` (URIs whose update triggers a run),
`watch` (files whose content is polled: a change starts a run; `model` means the run's
model file and weights), `watch_seconds`, `catchup`, `description`, `tags`,
`approve_above_usd` (a cost gate: runs estimated above it wait for a person's approval).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from pydantic import Field, ValidationError, field_validator

from .config import ConfigError, RunConfig, _error_from_pydantic, _Section, parse_config
from .storage import normalize_url

PRESETS = ("@once", "@continuous", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly",
           "@yearly", "@annually")


class PipelineKeys(_Section):
    """When a pipeline runs (the rest of its file is a run config)."""

    schedule: Optional[str] = Field(None, description="Cron expression or preset "
                                    "(@daily, ...); unset: runs only when triggered.")
    assets: list[str] = Field([], description="Asset URIs (e.g. another pipeline's output "
                              "layer) whose update starts a run.")
    watch: list[str] = Field([], description="Files polled for a change of content (file:// "
                             "or gs://, or a path relative to the pipeline file); `model` "
                             "means the run's model file and weights. A change starts a run.")
    watch_seconds: float = Field(60.0, gt=0, description="How often watched files are "
                                 "polled.")
    catchup: bool = Field(False, description="Run the schedule's missed intervals.")
    approve_above_usd: Optional[float] = Field(
        None, ge=0, allow_inf_nan=False, strict=True,
        description="Cost gate: a run whose plan estimate (the bill's dollars total) is above "
        "this many dollars waits for a person to approve it in Airflow before anything is "
        "published or any worker starts; rejecting it ends the run with nothing published. "
        "At or below it the run goes on by itself. 0: every run asks. Unset: no gate.")
    description: Optional[str] = None
    tags: list[str] = []

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: Optional[str]) -> Optional[str]:
        if value is None or value in PRESETS:
            return value
        from croniter import croniter
        if not croniter.is_valid(value):
            raise ValueError(f"{value!r} is neither a cron expression nor one of {PRESETS}")
        return value


PIPELINE_KEYS = tuple(PipelineKeys.model_fields)


def watched_urls(keys: PipelineKeys, config: RunConfig, base_dir: Path) -> list[str]:
    """The URLs `watch` names, `model` expanded to the model file and its weights."""
    urls: list[str] = []
    for entry in keys.watch:
        if entry == "model":
            urls += [config.model.path] + ([config.model.weights] if config.model.weights
                                           else [])
        elif "://" in entry:
            urls.append(entry)
        else:
            urls.append(str((base_dir / entry).resolve()))
    return [normalize_url(u) for u in dict.fromkeys(urls)]


def load_pipeline(path: str | Path) -> tuple[PipelineKeys, RunConfig]:
    """Read and validate a pipeline file (no I/O beyond the file itself)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError("config", f"file {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path} is not valid YAML: "
                          f"{' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"expected a mapping of keys, got {type(data).__name__}")
    pipeline = {k: data.pop(k) for k in PIPELINE_KEYS if k in data}
    try:
        keys = PipelineKeys.model_validate(pipeline)
    except ValidationError as exc:
        raise _error_from_pydantic(exc) from None
    return keys, parse_config(data, base_dir=path.resolve().parent)
