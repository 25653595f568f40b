"""The operator console's test support: a real Airflow with the console's pipelines and
an admin and a read-only user, Debian's chromium through Playwright, and page helpers.
The fixtures (`console_airflow`, `browser`) are registered in conftest.py, once per
session, so every console test module shares one Airflow."""
import json
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).with_name("artifacts")
CHROMIUM = "/usr/bin/chromium"
# the flags a sandboxed, offline machine needs (no background fetches, no GPU, no sandbox)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# A model that raises on the patch holding the input's one 255 voxel while a `poison` file
# lies beside it: one task dies until the file is removed, then a retry succeeds.
MODEL = """
import os, time, torch
POISON = os.path.join(os.path.dirname(__file__), "poison")

class Net(torch.nn.Module):
    def forward(self, x):
        if os.path.exists(POISON) and bool((x >= 1.0).any()):
            raise RuntimeError("poisoned patch")
        time.sleep(0.1)
        return torch.sigmoid(8 * x - 4)
"""
PIPELINE = """
input: {data}/image
output: {data}/out
model: {{path: {data}/model.py, input_patch: [32, 32, 8], output_channels: 1}}
inference: {{chunk: [32, 32, 8], blend: crop}}
storage_chunk: [32, 32, 8]
downsample: {{mips: 1}}
queue: {{url: "sqlite://{data}/queue.db", max_attempts: 2}}
workers:
  inference: {{group: local://2}}
  downsample: local://1
"""

# The pipeline the pipelines-page tests edit (tests/test_console_pipelines.py): asset-scheduled
# on an asset nothing updates, so it runs only when a test triggers it.
EDITABLE = """description: a pipeline the console's editor tests change
assets: ["file://{data}/upstream"]
input: {data}/image
output: {data}/editable-out
model: {{path: {data}/model.py, input_patch: [32, 32, 8], output_channels: 1}}
inference: {{chunk: [64, 64, 8], blend: crop}}
storage_chunk: [32, 32, 8]
queue: {{url: "sqlite://{data}/queue.db"}}
workers:
  inference: {{group: local://1}}
"""

# tests/test_restarts.py: the scheduler and triggerer are killed while this pipeline's
# inference stage runs; a per-patch sleep keeps the stage open long enough to land in it.
# Its own model, output and queue (never poisoned, never counted with the console's runs).
RESTARTS_MODEL = """
import time, torch

class Net(torch.nn.Module):
    def forward(self, x):
        time.sleep(0.15 * x.shape[0])
        return torch.sigmoid(8 * x - 4)
"""
RESTARTS = """description: killed mid-stage by tests/test_restarts.py
input: {data}/image
output: {data}/restarts/out
model: {{path: {data}/restarts/model.py, input_patch: [32, 32, 8], output_channels: 1}}
inference: {{chunk: [32, 32, 8], blend: crop}}
storage_chunk: [32, 32, 8]
downsample: {{mips: 0}}
queue: {{url: "sqlite://{data}/restarts/queue.db"}}
workers:
  inference: {{group: local://2}}
"""


def start_console_airflow(tmp_path_factory):
    from operators.local import start
    from voxflow.volume import Volume
    root = tmp_path_factory.mktemp("console")
    data = root / "data"
    data.mkdir()
    img = (np.random.default_rng(0).random((1, 16, 128, 128)) * 200).astype(np.uint8)
    img[0, 2, 10, 10] = 255                   # inference task 0's patch only
    vol = Volume.create(f"file://{data}/image", num_channels=1, dtype="uint8",
                        resolution=(8, 8, 40), voxel_offset=(0, 0, 0), size=(128, 128, 16),
                        chunk=(32, 32, 8))
    vol.write(vol.bounds, img)
    (data / "model.py").write_text(MODEL)
    dags = root / "dags"
    (dags / "pipelines").mkdir(parents=True)
    shutil.copy(REPO / "dags" / "voxflow_pipelines.py", dags)
    (dags / "pipelines" / "console.yaml").write_text(PIPELINE.format(data=data))
    (dags / "pipelines" / "editable.yaml").write_text(EDITABLE.format(data=data))
    # tests/test_cost_gate.py: every run of `gated` waits for approval; its own queue and a
    # model in its own folder (never poisoned by the dead-letter test)
    (data / "gated").mkdir()
    (data / "gated" / "model.py").write_text(MODEL)
    (dags / "pipelines" / "gated.yaml").write_text(
        PIPELINE.format(data=data).replace("/model.py", "/gated/model.py")
        .replace("/queue.db", "/gated-queue.db") + "approve_above_usd: 0\n")
    (data / "restarts").mkdir()
    (data / "restarts" / "model.py").write_text(RESTARTS_MODEL)
    (dags / "pipelines" / "restarts.yaml").write_text(RESTARTS.format(data=data))
    import os
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)
    os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = "admin:admin,viewer:viewer"
    try:
        af = start(root / "home", voxflow_home=root / "voxflow-home")
    finally:
        del os.environ["AIRFLOW__CORE__DAGS_FOLDER"]
        del os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    af.data = data
    try:
        af.tok = af.token()
        deadline = time.monotonic() + 120
        dag_ids = {"console", "gated"}
        while not dag_ids <= {d["dag_id"] for d in af.api("GET", "/dags")["dags"]}:
            assert time.monotonic() < deadline, "the pipeline DAGs never appeared"
            time.sleep(1)
        yield af
    finally:
        af.stop()


def start_browser():
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def login(browser, af, user):
    """A page logged in through Airflow's own login form."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(f"{af.url}/")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", af.password(user))
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/auth/login" not in url, timeout=60_000)
    return page


def trigger(af, conf):
    return af.api("POST", "/dags/console/dagRuns", {"logical_date": None, "conf": conf},
                  token=af.tok)["dag_run_id"]


def dag_state(af, dag_run):
    return af.api("GET", f"/dags/console/dagRuns/{urllib.parse.quote(dag_run)}",
                  token=af.tok)["state"]


def wait_dag_run(af, dag_run, states, timeout=300):
    deadline = time.monotonic() + timeout
    while (state := dag_state(af, dag_run)) not in states:
        assert time.monotonic() < deadline, f"DAG run {dag_run} still {state}"
        time.sleep(1)
    return state


def run_page(page, af, dag_run):
    """The DAG run's voxflow tab (the page Airflow embeds on the DAG run)."""
    page.goto(f"{af.url}/voxflow/dag-run/console/{urllib.parse.quote(dag_run, safe='')}")
    return page


def until(page, predicate, timeout=120):
    """Poll the page (which refreshes itself every 2 s) until `predicate(page)`."""
    deadline = time.monotonic() + timeout
    while not predicate(page):
        assert time.monotonic() < deadline, page.inner_text("body")[:2000]
        time.sleep(0.5)


def map_counts(page) -> dict:
    """State counts of every stage's chunk map as drawn."""
    return {el.get_attribute("id")[4:]: json.loads(el.get_attribute("data-counts"))
            for el in page.query_selector_all(".map")}


def plugin(af, path, token=None, body=None, content_type="application/json"):
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"{af.url}/voxflow{path}",
                                 None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST", headers=headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


