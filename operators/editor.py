"""The console's pipelines page: each pipeline file of the DAG folder with its validation
state, schedule, assets, last DAG runs and plan summary, and an editor that saves only a
file that becomes a DAG.

API (under /voxflow, behind Airflow's login like the rest of the console; docs/console.md):
- `GET /api/pipelines` — every `pipelines/*.yaml`: valid or its error, keys, runs, plan;
- `GET /api/pipelines/{name}` — the file's text, its sha256 and whether the caller may save;
- `POST /api/pipelines/{name}/validate` — JSON `{"text": ...}`: `ok` and `errors`;
- `PUT /api/pipelines/{name}` — JSON `{"text": ..., "sha256": the text it was edited from}`.

A file is checked the way the dag-processor reads it: `dag_factory.build_dag`, then the DAG
bag's `validate`/`check_cycle` and Airflow's serialization, so a file that saves is a file
that becomes a DAG. A save is the DAG's edit permission, JSON and same-origin (like a
retry), replaces the file atomically (a temporary file in the same folder, `os.replace`) and
keeps the previous text as `pipelines/.history/NAME.yaml.~N~` (the factory reads only
`pipelines/*.yaml`, and the dag-processor only Python files). A DAG folder that cannot be
written — a read-only mount, a git-managed bundle, a folder its owner marked read-only — makes
the page read-only and a save 409.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Optional

import yaml
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict

from airflow.api_fastapi.core_api.security import GetUserDep

router = APIRouter()
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")   # a DAG id; no path separators
HISTORY = ".history"
KEEP_VERSIONS = 20
PLAN_SECONDS = 300          # how long a plan summary is reused (plans read the input's info)
PLAN_WAIT = 5.0             # how long a listing waits for a plan before saying "pending"
_build_lock = threading.Lock()    # DAG construction uses a process-wide DAG context stack
_save_lock = threading.Lock()
_checked: dict[tuple, list[dict]] = {}
_plans: dict[tuple, tuple[float, Any]] = {}
_planner = ThreadPoolExecutor(max_workers=2, thread_name_prefix="voxflow-plan")


def pipelines_folder() -> Path:
    """The folder the DAG factory reads: `[core] dags_folder`/pipelines."""
    from airflow.configuration import conf
    return Path(conf.get("core", "dags_folder")) / "pipelines"


def read_only_reason(folder: Path) -> Optional[str]:
    """Why files in `folder` cannot be saved, or None. The write bits count even for root
    (who may write anyway): a folder whose owner cleared them is meant to be left alone."""
    why = ("edit the file where it comes from (a git-managed bundle or a read-only mount "
           "is deployed, not edited here)")
    try:
        mode = folder.stat().st_mode
    except OSError as exc:
        return f"the DAG folder {folder} cannot be read ({exc.strerror})"
    if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return f"the DAG folder {folder} is read-only: {why}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the DAG folder {folder} is not writable by Airflow's API server: {why}"
    return None


def _path(name: str) -> Path:
    if not NAME.match(name):
        raise HTTPException(404, f"no pipeline {name!r}")
    path = pipelines_folder() / f"{name}.yaml"
    if not path.is_file():
        raise HTTPException(404, f"no pipeline file pipelines/{name}.yaml")
    return path


def _field_line(text: str, field: str) -> Optional[int]:
    """The 1-based line of the deepest key of a dotted field (`inference.chunk`) in `text`."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in field.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def _syntax_errors(text: str) -> list[dict]:
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        return [{"field": "config", "line": mark.line + 1 if mark else None,
                 "message": f"not valid YAML: {what}"
                 + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")}]
    return []


def check_file(path: Path) -> list[dict]:
    """The errors that would keep `path` from becoming a DAG (none: it would). The same
    steps as the dag-processor: the factory's `build_dag`, the DAG bag's checks and
    serialization."""
    from airflow.serialization.serialized_objects import DagSerialization
    from voxflow.config import ConfigError
    from .dag_factory import build_dag
    text = path.read_text()
    errors = _syntax_errors(text)
    if errors:
        return errors
    try:
        with _build_lock:
            dag = build_dag(path)
        dag.validate()
        dag.check_cycle()
        DagSerialization.to_dict(dag)
    except ConfigError as exc:
        return [{"field": exc.field, "message": exc.message,
                 "line": _field_line(text, exc.field)}]
    except Exception as exc:                       # what Airflow refuses (a Param, a trigger)
        return [{"field": "config", "line": None,
                 "message": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}]
    return []


def check_text(name: str, text: str) -> list[dict]:
    """`check_file` of `text` as `pipelines/NAME.yaml`, without touching the DAG folder: it is
    written as NAME.yaml in a private folder (parsing does no I/O, so where relative paths
    resolve changes no verdict; messages name the real folder)."""
    folder = pipelines_folder()
    with tempfile.TemporaryDirectory(prefix="voxflow-check-") as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_bytes(text.encode())
        errors = check_file(path)
    for e in errors:
        e["message"] = e["message"].replace(str(Path(tmp).resolve()), str(folder)) \
            .replace(tmp, str(folder))
    return errors


def _checked_file(path: Path) -> list[dict]:
    """`check_file`, remembered while the file's size and mtime stay the same."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _checked:
        if len(_checked) > 256:
            _checked.clear()
        _checked[key] = check_file(path)
    return _checked[key]


def _plan_summary(path: Path, config) -> "Future[dict]":
    """A future of the plan summary: tasks per stage and the bill's dollars
    (`voxflow.pipeline.plan`, `voxflow.cost.bill`), computed on a worker thread and reused
    for PLAN_SECONDS. A plan reads the input layer's info, which may be slow or fail: a
    listing waits for it only briefly (`_resolve`) and shows its error, never fails with it."""
    def make() -> dict:
        from voxflow.cost import bill
        from voxflow.pipeline import plan
        try:
            b = bill(plan(config, check_model=False))
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
        return {"tasks": b["tasks"], "estimate_usd": b["dollars"]["total"]}
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    hit = _plans.get(key)
    if hit is None or time.monotonic() - hit[0] > PLAN_SECONDS:
        if len(_plans) > 256:
            _plans.clear()
        hit = _plans[key] = (time.monotonic(), _planner.submit(make))
    return hit[1]


def _resolve(entries: list[dict]) -> None:
    """Replace each entry's plan future by its summary, waiting PLAN_WAIT in all."""
    deadline = time.monotonic() + PLAN_WAIT
    for entry in entries:
        if entry["plan"] is not None:
            try:
                entry["plan"] = entry["plan"].result(max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                entry["plan"] = {"pending": True}


def _airflow_get(request: Request, path: str) -> dict:
    """GET Airflow's REST API with the caller's own credentials (Airflow then applies its
    per-DAG read permissions to what the console shows)."""
    from airflow.configuration import conf
    token = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
        request.cookies.get("_token", "")
    base = conf.get("api", "base_url").rstrip("/")
    req = urllib.request.Request(f"{base}/api/v2{path}",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _dag_activity(request: Request, dag_id: str, runs: int = 5) -> dict:
    """The DAG's last runs and latest version, or why Airflow gave none."""
    dag = urllib.parse.quote(dag_id, safe="")
    try:
        got = _airflow_get(request, f"/dags/{dag}/dagRuns?order_by=-run_after&limit={runs}")
        versions = _airflow_get(request, f"/dags/{dag}/dagVersions?order_by=-version_number"
                                "&limit=1")
    except urllib.error.HTTPError as exc:
        why = "not parsed by Airflow yet" if exc.code == 404 else f"Airflow answered {exc.code}"
        return {"runs": [], "dag_version": None, "runs_error": why}
    except OSError as exc:
        return {"runs": [], "dag_version": None, "runs_error": f"Airflow's API: {exc}"}
    latest = versions.get("dag_versions") or [{}]
    return {"runs": [{k: r.get(k) for k in ("dag_run_id", "state", "run_after", "run_type",
                                             "start_date", "end_date")}
                     for r in got.get("dag_runs", [])],
            "dag_version": latest[0].get("version_number"), "runs_error": None}


def _may_edit(user, dag_id: str) -> bool:
    from .ui import _may_edit as may_edit      # the console's one permission rule
    return may_edit(user, dag_id)


def _entry(request: Request, user, path: Path) -> dict:
    from voxflow.config import ConfigError
    from voxflow.pipeline_file import load_pipeline
    name = path.stem
    errors = _checked_file(path)
    entry: dict[str, Any] = {
        "name": name, "file": f"pipelines/{path.name}", "valid": not errors,
        "error": {**errors[0], "file": f"pipelines/{path.name}"} if errors else None,
        "schedule": None, "assets": [], "watch": [], "description": None, "tags": [],
        "plan": None, "may_edit": _may_edit(user, name)}
    if not errors:
        try:
            keys, config = load_pipeline(path)
        except ConfigError:                        # rewritten since it was checked
            return {**entry, "valid": False, "error": {"file": entry["file"], "field": "config",
                    "line": None, "message": "changed while being read: reload"},
                    **_dag_activity(request, name)}
        entry.update(schedule=keys.schedule, assets=keys.assets, watch=keys.watch,
                     description=keys.description, tags=keys.tags,
                     plan=_plan_summary(path, config))
    entry.update(_dag_activity(request, name))
    return entry


def _history(path: Path) -> list[Path]:
    """The kept versions of `path`, oldest first."""
    found = []
    for p in (path.parent / HISTORY).glob(f"{path.name}.~*~"):
        n = p.name[len(path.name) + 2:-1]
        if n.isdigit():
            found.append((int(n), p))
    return [p for _, p in sorted(found)]


@router.get("/api/pipelines")
def api_pipelines(request: Request, user: GetUserDep) -> dict:
    folder = pipelines_folder()
    entries = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            entries.append(_entry(request, user, path))
        except FileNotFoundError:                  # removed while listing
            continue
    _resolve(entries)
    return {"folder": str(folder), "read_only": read_only_reason(folder),
            "pipelines": entries}


@router.get("/api/pipelines/{name}")
def api_pipeline(name: str, user: GetUserDep) -> dict:
    path = _path(name)
    data = path.read_bytes()
    return {"name": name, "file": f"pipelines/{path.name}", "text": data.decode(errors="replace"),
            "sha256": hashlib.sha256(data).hexdigest(),
            "read_only": read_only_reason(path.parent), "may_edit": _may_edit(user, name),
            "history": [f"pipelines/{HISTORY}/{p.name}" for p in _history(path)]}


class PipelineText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    sha256: Optional[str] = None     # the text the edit started from: refuse if it changed


@router.post("/api/pipelines/{name}/validate")
def api_validate(name: str, body: PipelineText) -> dict:
    _path(name)
    errors = check_text(name, body.text)
    return {"ok": not errors, "errors": errors}


def _keep_previous(path: Path) -> Path:
    """Copy the current file to `.history/NAME.yaml.~N~` (N one past the newest kept) and
    drop all but the newest KEEP_VERSIONS."""
    history = path.parent / HISTORY
    history.mkdir(exist_ok=True)
    kept = _history(path)
    n = int(kept[-1].name[len(path.name) + 2:-1]) + 1 if kept else 1
    target = history / f"{path.name}.~{n}~"
    target.write_bytes(path.read_bytes())
    for old in (kept + [target])[:-KEEP_VERSIONS]:
        old.unlink(missing_ok=True)
    return target


def save(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (temp file in the same folder, fsync, os.replace),
    with `path`'s permissions; returns where the previous version was kept."""
    previous = _keep_previous(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return previous


@router.put("/api/pipelines/{name}")
def api_save(name: str, body: PipelineText, request: Request, user: GetUserDep) -> dict:
    from .ui import _same_origin
    _same_origin(request)
    path = _path(name)
    if not _may_edit(user, name):
        raise HTTPException(403, f"saving {name} needs permission to edit the DAG")
    reason = read_only_reason(path.parent)
    if reason:
        raise HTTPException(409, reason)
    errors = check_text(name, body.text)
    if errors:
        raise HTTPException(422, {"errors": [{**e, "file": f"pipelines/{path.name}"}
                                             for e in errors]})
    with _save_lock:
        current = hashlib.sha256(path.read_bytes()).hexdigest()
        if body.sha256 and body.sha256 != current:
            raise HTTPException(409, f"pipelines/{path.name} changed since it was opened: "
                                "reload it and edit again")
        try:
            previous = save(path, body.text)
        except OSError as exc:
            raise HTTPException(409, f"could not write pipelines/{path.name}: "
                                f"{exc.strerror or exc}") from None
    return {"saved": True, "file": f"pipelines/{path.name}",
            "sha256": hashlib.sha256(body.text.encode()).hexdigest(),
            "previous": f"pipelines/{HISTORY}/{previous.name}"}


@router.get("/pipelines", response_class=HTMLResponse)
def pipelines_page(request: Request) -> str:
    from .ui import _page
    return _page("pipelines.html", request)
