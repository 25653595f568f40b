"""docs/security.md, tested: a message can make a worker run only a named operation on a box
of the run's plan, and no credential reaches the logs, the queue or its messages."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
import yaml

from voxflow.config import load_config
from voxflow.geometry import Box
from voxflow.messages import encode
from voxflow.pipeline import plan
from voxflow.queues import open_queue
from voxflow.runner import register
from voxflow.stages import StageCache
from voxflow.volume import Volume
from voxflow.worker import JsonLog, Worker

from conftest import Pointwise, make_layer, write_config

REPO = Path(__file__).resolve().parents[1]


def test_a_worker_runs_only_named_operations_on_boxes_of_the_plan(tmp_path):
    """Messages that name a box outside the plan, a task index outside it, or an operation
    that is no stage are refused by the worker: dead letters, nothing read or written."""
    make_layer(tmp_path / "img", np.zeros((1, 8, 32, 32), np.uint8), chunk=(16, 16, 8))
    torch.jit.script(Pointwise().eval()).save(str(tmp_path / "m.pt"))
    cfg = load_config(write_config(
        tmp_path / "run.yaml", input="img", output="out",
        model={"path": "m.pt", "input_patch": [16, 16, 8], "output_channels": 2},
        inference={"chunk": [16, 16, 8], "blend": "crop", "patch_overlap": [0, 0, 0]},
        storage_chunk=[16, 16, 8], downsample={"mips": 0},
        queue={"url": f"sqlite://{tmp_path}/q.db", "max_attempts": 1}))
    p = plan(cfg)
    run, _ = register(cfg, p, "r")
    q = open_queue(cfg.queue.url)
    outside = encode(run, "inference", 0, Box((64, 64, 0), (80, 80, 8)))
    q.publish(run, "inference", "inference", [
        (0, outside),                                              # box not task 0's
        (7, encode(run, "inference", 7, p.grid.box(0))),           # index not in the plan
    ])
    q.publish(run, "os.system", "inference", [(1, encode(run, "os.system", 1, p.grid.box(1)))])
    worker = Worker(q, StageCache(q), ["inference"], worker_id="w",
                    log=JsonLog("w", open(tmp_path / "w.log", "w")))
    worker.run(exit_when_idle=0.3)
    worker.shutdown()
    worker.log.stream.close()
    dead = {(d.stage, d.index): d.error.splitlines()[0] for d in q.dead_letters(run)}
    assert dead == {
        ("inference", 0): "MalformedMessage: box [64,64,0 : 80,80,8) is not task 0's box "
                          "[0,0,0 : 16,16,8) in the run's plan",
        ("inference", 7): "TaskOutsidePlan: task index 7 is outside stage inference's 4 "
                          "task(s) in the run's plan",
        ("os.system", 1): "UnknownStage: unknown stage 'os.system': this run's stages are "
                          "inference"}
    assert worker.done == 0
    assert [f.name for f in (tmp_path / "out").rglob("*") if f.is_file()] == ["info"]
    q.close()


# -- no credentials in logs, the queue or its messages ------------------------------------

class _TokenServer(BaseHTTPRequestHandler):
    """Google's OAuth token endpoint, as a service account key's `token_uri` names it:
    every exchange of the key for an access token comes here."""

    token = ""
    exchanges = 0

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).exchanges += 1
        body = json.dumps({"access_token": self.token, "expires_in": 3600,
                           "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _service_account_key(token_uri: str, marker: str) -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {"type": "service_account", "project_id": "voxflow-test",
            "private_key_id": f"keyid{marker}", "private_key": pem,
            "client_email": f"sa-{marker}@voxflow-test.iam.gserviceaccount.com",
            "client_id": "100000000000000000001", "token_uri": token_uri}


def test_no_credential_in_logs_queue_or_messages(tmp_path, gcs):
    """A run on the GCS emulator whose driver and worker process authenticate with a
    service account key (exchanged for an access token at a local token endpoint): neither
    the key's secrets nor the token appear in the driver's output, the worker's and
    driver's logs, the queue (its messages, run parameters, dead letters) or the output."""
    marker = os.urandom(8).hex()
    _TokenServer.token = f"ya29.token-{marker}"
    _TokenServer.exchanges = 0
    tokens = ThreadingHTTPServer(("127.0.0.1", 0), _TokenServer)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    try:
        key = _service_account_key(f"http://127.0.0.1:{tokens.server_address[1]}/token",
                                   marker)
        secrets_dir = tmp_path / "cloudfiles" / "secrets"
        secrets_dir.mkdir(parents=True)
        (secrets_dir / "google-secret.json").write_text(json.dumps(key))
        img = (np.random.default_rng(0).random((1, 8, 32, 64)) * 255).astype(np.uint8)
        gs_in, gs_out = gcs.path("img"), gcs.path("out")
        vol = Volume.create(gs_in, num_channels=1, dtype="uint8", resolution=(8, 8, 40),
                            voxel_offset=(0, 0, 0), size=(64, 32, 8), chunk=(16, 16, 8))
        vol.write(vol.bounds, img)
        torch.jit.script(Pointwise().eval()).save(str(tmp_path / "m.pt"))
        home = tmp_path / "home"
        cfg = tmp_path / "run.yaml"
        cfg.write_text(yaml.safe_dump({
            "input": gs_in, "output": gs_out, "sharding": "off",
            "model": {"path": "m.pt", "input_patch": [16, 16, 8], "output_channels": 2},
            "inference": {"chunk": [32, 32, 8], "blend": "overlap"},
            "storage_chunk": [16, 16, 8], "downsample": {"mips": 1},
            "queue": {"url": f"sqlite://{tmp_path}/queue.db"},
            "workers": {"inference": "local://1", "blend": "local://0",
                        "downsample": "local://0"}}))
        env = {**os.environ, "VOXFLOW_HOME": str(home),
               "CLOUD_FILES_DIR": str(tmp_path / "cloudfiles"),
               "CLOUD_VOLUME_DIR": str(tmp_path / "cloudfiles")}
        res = subprocess.run([sys.executable, "-m", "voxflow", "run", str(cfg)], env=env,
                             capture_output=True, text=True, timeout=240, cwd=REPO)
        assert res.returncode == 0, res.stderr[-3000:]
        assert _TokenServer.exchanges >= 2          # the driver and the worker used the key
    finally:
        tokens.shutdown()
        tokens.server_close()
    out = Volume(gs_out)
    assert out.read(out.bounds).any()
    logs = sorted((home / "logs").rglob("*.log"))
    assert any("worker_started" in p.read_text() for p in logs)
    assert {p.name.split("-")[0] for p in logs} >= {"driver"}        # and the worker's own
    assert len(logs) >= 2
    secrets = {
        "access token": _TokenServer.token,
        "key id": key["private_key_id"],
        "private key": key["private_key"].splitlines()[5],           # a line of its body
        "client email": key["client_email"],
        "marker": marker,
    }
    places = {"driver stdout": res.stdout.encode(), "driver stderr": res.stderr.encode()}
    for path in [*home.rglob("*"), *tmp_path.glob("queue.db*")]:
        if path.is_file():
            places[str(path)] = path.read_bytes()
    q = open_queue(f"sqlite://{tmp_path}/queue.db", readonly=True)
    (run,) = q.runs()
    places["run parameters"] = q.run_params(run).encode()
    q.close()
    assert any(p.endswith("queue.db") for p in places)
    for where, data in places.items():
        for what, value in secrets.items():
            assert value.encode() not in data, f"{what} found in {where}"
        assert b"Bearer" not in data and b"BEGIN PRIVATE KEY" not in data, where
