"""The voxflow console in the Airflow UI: every run of the deployment with its progress, rate,
ETA and cost; a run page with its stages, chunk map and dead letters (retry needs the DAG's
edit permission). A FastAPI app mounted by the plugin under /voxflow, behind Airflow's login;
the pages are static HTML that poll the JSON API below (no front-end build).

API (all GET need a logged-in user; docs/console.md lists the fields):
- `GET /voxflow/api/runs` — runs of every known queue, newest first;
- `GET /voxflow/api/runs/{run}?queue=URL` — one run: stages, overall, dead letters, config;
- `GET /voxflow/api/runs/{run}/map/{stage}?queue=URL` — the stage's chunk map;
- `GET /voxflow/api/dag-runs/{dag_id}/{dag_run_id}` — the voxflow run a DAG run drives;
- `POST /voxflow/api/runs/{run}/retry?queue=URL` — JSON `{}` (every dead task), `{"stage":
  S}` or `{"stage": S, "index": I}`: fresh attempts, and the DAG run's tasks from that
  stage's group on are cleared so the run resumes them.

It opens only the queues the deployment knows — the embedded default and the `queue.url` of
each pipeline in the DAG folder — and opens them read-only but for a retry: a logged-in user
cannot make the API server create SQLite files or read another project's Pub/Sub by typing a
URL, and a GET changes nothing. A POST must be JSON and, when the browser says where it comes
from, same-origin: a page elsewhere cannot make a logged-in user's browser retry (a form
cannot send JSON, and a script from elsewhere gets no CORS permission).
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict

from airflow.api_fastapi.core_api.security import GetUserDep, requires_authenticated

from .editor import router as editor_router

app = FastAPI(title="voxflow", dependencies=[Depends(requires_authenticated())])
app.include_router(editor_router)
PAGES = Path(__file__).with_name("console")
_meter_lock = threading.Lock()
_meter = None
_cache: dict[tuple, tuple[float, Any]] = {}


def known_queues() -> list[str]:
    """The embedded default queue, then the queues the deployed pipeline files name."""
    from airflow.configuration import conf
    from voxflow.config import ConfigError, QueueConfig
    from voxflow.pipeline_file import load_pipeline
    urls = [QueueConfig().url]
    folder = Path(conf.get("core", "dags_folder")) / "pipelines"
    for path in sorted(folder.glob("*.yaml")):
        try:
            urls.append(load_pipeline(path)[1].queue.url)
        except ConfigError:
            continue                         # its refused DAG reports it
    return list(dict.fromkeys(urls))


def _open(url: Optional[str], readonly: bool = True):
    """A known queue (the default if `url` is None), or None if it holds nothing yet."""
    from voxflow.queues import open_queue
    known = known_queues()
    url = known[0] if url is None else url
    if url not in known:
        raise HTTPException(404, "no such queue in this deployment")
    try:
        return open_queue(url, readonly=readonly)
    except FileNotFoundError:
        return None


def _rate_meter():
    global _meter
    with _meter_lock:
        if _meter is None:
            from voxflow.progress import RateMeter
            _meter = RateMeter()
        return _meter


def _cached(key: tuple, seconds: float, make):
    """`make()`, remembered for `seconds` (plans read the input's info; spent lists logs)."""
    hit = _cache.get(key)
    if hit and time.monotonic() - hit[0] < seconds:
        return hit[1]
    value = make()
    _cache[key] = (time.monotonic(), value)
    if len(_cache) > 512:
        _cache.pop(next(iter(_cache)))
    return value


def _plan(queue, run: str):
    """The run's plan from its registered config (content-keyed runs: it never changes)."""
    from voxflow.pipeline import plan
    from voxflow.progress import run_config
    return _cached(("plan", queue.url, run), 3600,
                   lambda: plan(run_config(queue, run), check_model=False))


def _planned_tasks(queue, run: str) -> tuple[Optional[dict[str, int]], dict[str, int]]:
    """Tasks each stage publishes, and those outside the mask (skipped, never published)."""
    from voxflow.stages import stage_grid, stage_names
    try:
        p = _plan(queue, run)
    except Exception:                    # input gone, or a config this version refuses
        return None, {}
    masked = {"inference": p.masked} if p.masked else {}
    return {name: len(stage_grid(p, name)) - masked.get(name, 0)
            for name in stage_names(p)}, masked


def _spent_usd(queue, run: str) -> Optional[float]:
    """Dollars of the worker-hours measured so far (`voxflow.cost.spent`), at most every 30 s."""
    def measure():
        from voxflow.cost import spent
        from voxflow.progress import run_config
        workers = spent(run_config(queue, run), run)["workers"]
        return sum(w.get("dollars") or 0.0 for w in workers.values())
    try:
        return _cached(("spent", queue.url, run), 30, measure)
    except Exception:
        return None


def _links(queue, run: str, config) -> dict:
    """Neuroglancer on the run's input and output, centred on its bbox; local layers as
    `voxflow view` serves them (its link is stable: `voxflow.view.view_link`), with the
    command that does."""
    from voxflow.view import neuroglancer_link, view_link
    layers = [config.input, config.output]
    try:
        p = _plan(queue, run)
        view = {"center": [(a + b) / 2 for a, b in zip(p.bbox.start, p.bbox.stop)],
                "resolution": p.resolution}
    except Exception:                            # no plan: the layers' default view
        view = {}
    if any(u.startswith("file://") for u in layers):
        try:
            link = view_link(layers, **view)
        except FileNotFoundError:                # not written yet
            link = None
        return {"neuroglancer": link, "view_command": f"voxflow view {' '.join(layers)}"}
    return {"neuroglancer": neuroglancer_link({"image": config.input,
                                               "output": config.output}, **view),
            "view_command": None}


def _summary(queue, run: str) -> dict:
    from voxflow.progress import overall, run_config, stage_rows
    state = queue.run_state(run)
    meta = state.meta if state else {}
    rows = stage_rows(queue, run, _rate_meter(), *_planned_tasks(queue, run))
    try:
        config = run_config(queue, run)
        output, links = config.output, _links(queue, run, config)
    except Exception:
        output, links = None, {}
    return {"run": run, "queue": queue.url, "state": state.state if state else "unknown",
            "heartbeat": state.heartbeat if state else None,
            "orchestrator": meta.get("orchestrator", {}), "model_digest":
            meta.get("model_digest"), "estimate_usd": meta.get("estimate_usd"),
            "spent_usd": _spent_usd(queue, run), "output": output, **links,
            "overall": overall(rows), "stages": rows}


def runs_report(queue_url: Optional[str] = None, limit: int = 50) -> list[dict]:
    """Newest runs first, of one known queue or of all of them."""
    report = []
    for url in [queue_url] if queue_url else known_queues():
        queue = _open(url)
        if queue is None:
            continue
        try:
            report += [_summary(queue, run) for run in reversed(queue.runs()[-limit:])]
        finally:
            queue.close()
    return sorted(report, key=lambda r: -(r["heartbeat"] or 0))[:limit]


def _with_queue(url: Optional[str], run: str, readonly: bool = True):
    queue = _open(url, readonly)
    if queue is None or queue.run_state(run) is None:
        if queue is not None:
            queue.close()
        raise HTTPException(404, f"no run {run!r} in {url or 'the default queue'}")
    return queue


def _dead_letters(queue, run: str) -> list[dict]:
    from voxflow.stages import stage_grid
    try:
        p = _plan(queue, run)
    except Exception:
        p = None
    out = []
    for d in queue.dead_letters(run):
        box = None
        if p is not None:
            try:
                b = stage_grid(p, d.stage).box(d.index)
                box = {"start": list(b.start), "stop": list(b.stop)}
            except (KeyError, IndexError):
                pass
        out.append({"stage": d.stage, "index": d.index, "attempts": d.attempts,
                    "error": d.headline, "traceback": d.error, "box": box})
    return out


def _may_edit(user, dag_id: Optional[str]) -> bool:
    """Whether `user` may change the DAG's runs (retrying is editing a run)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import (DagAccessEntity,
                                                                            DagDetails)
    return get_auth_manager().is_authorized_dag(
        method="PUT", access_entity=DagAccessEntity.RUN,
        details=DagDetails(id=dag_id) if dag_id else None, user=user)


@app.get("/api/runs")
def api_runs(queue: Optional[str] = None) -> list[dict]:
    return runs_report(queue)


def _workers(queue, run: str, stages: list[dict]) -> list[dict]:
    """Per kind of stage the run has: its group URL(s), the workers holding its tasks (from
    the queue: any backend), and for a local group an Airflow run drives (its state folder)
    the live workers and the size it was last given; None where this machine cannot see
    them (a cloud group: its VMs; a `voxflow run` driver's own group)."""
    from voxflow.config import voxflow_home
    from voxflow.groups.local import group_state
    from voxflow.progress import run_config
    from voxflow.stages import stage_kind
    config = run_config(queue, run)
    out = []
    for kind in dict.fromkeys(stage_kind(s["stage"]) for s in stages):
        urls = getattr(config.workers, kind).urls
        state = {"running": None, "target": None}
        folder = voxflow_home() / "groups" / run / kind
        if all(u.startswith("local://") for u in urls) and folder.is_dir():
            state = group_state(folder)
        out.append({"kind": kind, "group": " + ".join(urls),
                    "busy": len(queue.busy_workers(kind, run)), **state})
    return out


@app.get("/api/runs/{run}")
def api_run(run: str, user: GetUserDep, queue: Optional[str] = None) -> dict:
    q = _with_queue(queue, run)
    try:
        report = _summary(q, run)
        config = json.loads(q.run_params(run))
        report.update(dead=_dead_letters(q, run), config=config,
                      workers=_workers(q, run, report["stages"]),
                      may_retry=_may_edit(user, report["orchestrator"].get("dag_id")))
        return report
    finally:
        q.close()


@app.get("/api/runs/{run}/map/{stage}")
def api_map(run: str, stage: str, queue: Optional[str] = None) -> dict:
    from voxflow.progress import chunk_map
    from voxflow.stages import stage_grid
    q = _with_queue(queue, run)
    try:
        try:
            p = _plan(q, run)
            grid = stage_grid(p, stage)
        except KeyError:
            raise HTTPException(404, f"run {run} has no stage {stage!r}") from None
        runs = p.tissue.tasks if stage == "inference" and p.tissue is not None else None
        return chunk_map(q, run, stage, grid, runs=runs)
    finally:
        q.close()


@app.get("/api/runs/{run}/preview/{layer}.png")
def api_preview(run: str, layer: str, queue: Optional[str] = None,
                z: Optional[int] = None) -> Response:
    """A section of the run's input or output at a coarse mip (`voxflow.progress.section_png`),
    the middle z of the bbox unless `z` says; at most every 10 s per section."""
    from voxflow.progress import section_png
    if layer not in ("input", "output"):
        raise HTTPException(404, "layer: input or output")
    q = _with_queue(queue, run)
    try:
        p = _plan(q, run)
        url = getattr(p.config, layer)
        png = _cached(("preview", q.url, run, layer, z), 10,
                      lambda: section_png(url, p.bbox, z))
    except HTTPException:
        raise
    except Exception as exc:
        raise HTTPException(404, f"no preview of the {layer}: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}") from None
    finally:
        q.close()
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@app.get("/api/dag-runs/{dag_id}/{dag_run_id}")
def api_dag_run(dag_id: str, dag_run_id: str, request: Request) -> dict:
    """The voxflow run this DAG run registered (runs are content-keyed: a later DAG run of
    the same content takes the run over), or why there is none: the plan task's refusal."""
    for url in known_queues():
        queue = _open(url)
        if queue is None:
            continue
        try:
            for run in reversed(queue.runs()):
                state = queue.run_state(run)
                who = (state.meta if state else {}).get("orchestrator", {})
                if who.get("dag_id") == dag_id and who.get("dag_run_id") == dag_run_id:
                    return {"run": run, "queue": url}
        finally:
            queue.close()
    from .listeners import PLAN_TASK, REFUSED_KEY, refusal_note
    refused = _airflow(request, "GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(dag_run_id)}/"
                       f"taskInstances/{PLAN_TASK}/xcomEntries/{REFUSED_KEY}")
    if isinstance(refused, dict) and isinstance(refused.get("value"), dict):
        raise HTTPException(404, refusal_note(refused["value"]))
    raise HTTPException(404, f"DAG run {dag_run_id} of {dag_id} has registered no voxflow "
                        "run yet (its plan task has not finished)")


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _airflow(request: Request, method: str, path: str, body: Optional[dict] = None):
    """Airflow's own REST API (/api/v2), called with the caller's credentials so that
    Airflow checks them. Returns the JSON answer, or an error text."""
    from airflow.configuration import conf
    token = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
        request.cookies.get("_token", "")
    base = conf.get("api", "base_url").rstrip("/")
    req = urllib.request.Request(f"{base}/api/v2{path}",
                                 None if body is None else json.dumps(body).encode(),
                                 method=method, headers={"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read()
        return json.loads(text) if text else {}
    except urllib.error.HTTPError as exc:
        return f"Airflow answered {exc.code}: {exc.read()[:300]!r}"
    except OSError as exc:
        return f"could not reach Airflow's API at {base}: {exc}"


def _same_origin(request: Request) -> None:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPException(415, "send JSON (Content-Type: application/json)")
    origin = request.headers.get("origin")
    if origin and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise HTTPException(403, f"cross-origin request from {origin} refused")


def _clear_dag_run(request: Request, who: dict, kind: str) -> Optional[str]:
    """Clear the DAG run's tasks from the `kind` group on (publish, scale_up, wait, …,
    finalize) so it runs them again. Returns Airflow's error, if any."""
    answer = _airflow(request, "POST", f"/dags/{_q(who['dag_id'])}/clearTaskInstances", {
        "dry_run": False, "dag_run_id": who["dag_run_id"],
        "task_ids": [f"{kind}.{task}" for task in ("publish", "scale_up", "wait",
                                                   "scale_down")],
        "include_downstream": True, "only_failed": False, "reset_dag_runs": True})
    return answer if isinstance(answer, str) else None


class RetryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Optional[str] = None
    index: Optional[int] = None


@app.post("/api/runs/{run}/retry")
def api_retry(run: str, request: Request, user: GetUserDep, body: RetryBody,
              queue: Optional[str] = None) -> dict:
    """(A plain def: FastAPI runs it on a thread, so the API server's event loop is free to
    serve the clear request it makes to Airflow's own API.)"""
    from voxflow.stages import stage_kind
    _same_origin(request)
    stage, index = body.stage, body.index
    if index is not None and stage is None:
        raise HTTPException(400, "index: give its stage too")
    q = _with_queue(queue, run, readonly=False)
    try:
        state = q.run_state(run)
        who = state.meta.get("orchestrator", {})
        if not _may_edit(user, who.get("dag_id")):
            raise HTTPException(403, "retrying needs permission to edit the DAG's runs")
        dead = [d for d in q.dead_letters(run, limit=1_000_000)
                if stage in (None, d.stage) and index in (None, d.index)]
        retried = q.retry_dead(run, stage, index)
    finally:
        q.close()
    result = {"retried": retried, "resumed": None}
    if retried and who.get("driver") == "airflow":
        from .dag_factory import KINDS
        first = min({stage_kind(d.stage) for d in dead}, key=KINDS.index)
        error = _clear_dag_run(request, who, first)
        result["resumed"] = error is None
        if error:
            result["error"] = error
    elif retried:
        result["note"] = "run the config again (voxflow run) to process them"
    return result


def _page(name: str, request: Request) -> str:
    """A page of `console/`, its links to the static files made absolute (pages live at
    different depths under the plugin's prefix)."""
    base = request.scope.get("root_path", "").rstrip("/")
    return (PAGES / name).read_text().replace("{{BASE}}", base)


@app.get("/static/{name}")
def static(name: str) -> Response:
    types = {".css": "text/css", ".js": "text/javascript"}
    path = PAGES / name
    if path.suffix not in types or path.name != name or not path.is_file():
        raise HTTPException(404, "no such file")
    return Response(path.read_bytes(), media_type=types[path.suffix])


@app.get("/", response_class=HTMLResponse)
def runs_page(request: Request) -> str:
    return _page("runs.html", request)


@app.get("/run/{run}", response_class=HTMLResponse)
def run_page(run: str, request: Request) -> str:
    return _page("run.html", request)


@app.get("/dag-run/{dag_id}/{dag_run_id}", response_class=HTMLResponse)
def dag_run_page(dag_id: str, dag_run_id: str, request: Request) -> str:
    """The DAG run page's voxflow tab: the run page of the voxflow run it drives."""
    return _page("run.html", request)
