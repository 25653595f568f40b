"""Google Cloud backends together: a whole run on gs:// layers (GCS emulator) with a Pub/Sub
queue (emulator) whose ledger is on gs:// too, served by worker processes, one of them killed
mid-stage, with a segmentation layer on gs:// as well; and what the Pub/Sub queue sends and
cleans up."""
import json
import os

import numpy as np
import torch

from voxflow.config import load_config
from voxflow.queues import open_queue
from voxflow.queues.pubsub import PubSubQueue, dead_letter_attempts, run_token
from voxflow.runner import run
from voxflow.volume import Volume

from conftest import INLINE, SmallConv, sigkill, worker_pids, write_config


def _layer(url: str, data: np.ndarray, offset=(3, 5, 1), chunk=(16, 16, 4)) -> None:
    c, z, y, x = data.shape
    vol = Volume.create(url, num_channels=c, dtype=str(data.dtype), resolution=(8, 8, 40),
                        voxel_offset=offset, size=(x, y, z), chunk=chunk)
    vol.write(vol.bounds, data)


def _topics(project: str, prefix: str) -> list[str]:
    from google.cloud import pubsub_v1
    publisher = pubsub_v1.PublisherClient()
    return [t.name for t in publisher.list_topics(request={"project": f"projects/{project}"})
            if t.name.rsplit("/", 1)[1].startswith(prefix + "-")]


def test_run_on_gs_with_pubsub_and_worker_processes(tmp_path, gcs, pubsub):
    img = (np.random.default_rng(7).random((1, 12, 44, 72)) * 255).astype(np.uint8)
    gs_in, gs_out, ledger = gcs.path("img"), gcs.path("out"), gcs.path("ledger")
    gs_seg = gcs.path("seg")
    _layer(gs_in, img)
    _layer(f"file://{tmp_path}/img", img)
    torch.jit.script(SmallConv().eval()).save(str(tmp_path / "m.pt"))
    prefix = f"r{os.getpid()}"
    base = dict(model={"path": "m.pt", "input_patch": [16, 16, 8], "output_channels": 2},
                inference={"chunk": [32, 32, 8], "patch_overlap": [6, 6, 3]},
                storage_chunk=[16, 16, 4], downsample={"mips": 1})
    seg = {"channel": 0, "threshold": 0.98, "invert": True, "connectivity": 26}   # ~300 objects
    groups = {kind: {"group": "local://2"} for kind in ("inference", "blend", "downsample")}
    cloud = write_config(tmp_path / "cloud.yaml", input=gs_in, output=gs_out,
                         queue={"url": f"pubsub://test-project/{prefix}?ledger={ledger}",
                                "lease_seconds": 10},
                         workers={**groups, "segmentation": {"group": "local://1"}},
                         segmentation={"output": gs_seg, **seg}, **base)
    local = write_config(tmp_path / "local.yaml", input="img", output="out",
                         workers={**INLINE, "segmentation": "local://0"},
                         segmentation={"output": "seg", **seg}, **base)

    killed = []

    class KillOneWorker:
        """Reporter: once inference has made progress, SIGKILL one worker process."""

        def begin(self, run, queue):
            pass

        def start(self, stage, total, skipped):
            self.stage = stage

        def update(self, done, dead):
            if self.stage == "inference" and done >= 1 and not killed:
                pids = worker_pids()
                if pids:
                    killed.append(sigkill(next(iter(pids.values()))))

        def finish(self):
            pass

    config = load_config(cloud)
    summary = run(config, reporter=KillOneWorker(), run_id="cloud")
    assert killed == [True]                         # a worker vanished mid-stage ...
    assert all(s.tasks > 0 and s.skipped == 0 for s in summary.stages)
    run(load_config(local), run_id="local")
    for mip in (0, 1):                              # ... and the output is still exact
        got, want = Volume(gs_out, mip), Volume(f"file://{tmp_path}/out", mip)
        a, b = got.read(got.bounds), want.read(want.bounds)
        assert a.any() and np.abs(a - b).max() <= 1e-6, (mip, np.abs(a - b).max())
        got, want = Volume(gs_seg, mip), Volume(f"file://{tmp_path}/seg", mip)
        a, b = got.read(got.bounds), want.read(want.bounds)   # deterministic ids: equal
        assert len(np.unique(a)) > 2 and np.array_equal(a, b), mip

    queue = open_queue(config.queue.url)
    stats = queue.stats("cloud")
    assert {s: (st.done, st.open, st.dead) for s, st in stats.items()} == {
        s.name: (s.tasks, 0, 0) for s in summary.stages}
    assert _topics("test-project", prefix) == []    # finish deleted topics and subscriptions
    assert gcs.names(gs_out + ".voxflow-tmp/") == []
    assert any(n.endswith("/run.json") or "/runs/" in n for n in gcs.names(ledger + "/"))

    again = run(config, run_id="cloud")              # resume: everything is done already
    assert all(s.skipped == s.tasks for s in again.stages)
    queue.close()


def test_pubsub_subscription_request_and_dead_letter_backstop(tmp_path, pubsub):
    url = f"pubsub://test-project/d{os.getpid()}?ledger=file://{tmp_path}/ledger"
    queue = PubSubQueue(url, lease_seconds=45, max_attempts=4)
    queue.register_run("run:1+x", "{}", 4)            # a run id Pub/Sub names cannot hold
    sent = []
    create = queue.subscriber.create_subscription

    def spy(request):
        sent.append(request)
        return create(request=request)
    queue.subscriber.create_subscription = spy
    assert queue.publish("run:1+x", "inference", "inference", ((i, "b") for i in range(3))) == 3
    main = next(r for r in sent if not r["name"].endswith("-dead"))
    rid = queue.resource("run:1+x", "inference", "inference")
    assert main["name"].endswith(f"/subscriptions/{rid}") and ":" not in rid
    assert main["ack_deadline_seconds"] == 45
    assert main["dead_letter_policy"] == {
        "dead_letter_topic": f"projects/test-project/topics/{rid}-dead",
        "max_delivery_attempts": dead_letter_attempts(4)}
    assert 5 <= dead_letter_attempts(1) and dead_letter_attempts(4) > 4 \
        and dead_letter_attempts(50) == 100                 # Pub/Sub's allowed range

    # Pub/Sub forwards a message that was delivered too often to the dead-letter topic (the
    # emulator ignores the policy, so forward one by hand): the driver's heartbeat records
    # it as dead.
    (lease,) = queue.pull(["inference"], 1, "w")
    queue.publisher.publish(f"projects/test-project/topics/{rid}-dead", lease.body.encode(),
                            run="run:1+x", stage="inference", kind="inference",
                            index=str(lease.index)).result()
    queue.heartbeat("run:1+x")
    s = queue.stats("run:1+x")["inference"]
    assert (s.dead, s.done, s.total) == (1, 0, 3)
    (dead,) = queue.dead_letters("run:1+x")
    assert dead.index == lease.index and "dead-letter topic" in dead.error
    queue.heartbeat("run:1+x")
    assert queue.stats("run:1+x")["inference"].dead == 1     # drained once, counted once

    queue.forget_run("run:1+x")
    assert _topics("test-project", f"d{os.getpid()}") == []
    assert queue.stats("run:1+x") == {}
    record = json.loads(queue.ledger.get(f"runs/{run_token('run:1+x')}.json"))
    assert record["run"] == "run:1+x"                # the parameters stay
    queue.close()
