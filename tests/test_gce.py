"""The gce:// worker group against a recorded fake Compute Engine (no emulator exists).

The fakes take and return the real `compute_v1` request/resource messages and real
`ExtendedOperation`s; every request is recorded serialised (`to_dict`), and the tests assert
what would go over the wire: the template body, template reuse, the resize calls the real
`Autoscaler` makes, zone spreading on stockouts, target vs actual, the teardown, one MIG per
run, and a VM leaving its MIG (with a tiny HTTP server standing in for the metadata server).
"""
from __future__ import annotations

import http.server
import itertools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

compute_v1 = pytest.importorskip("google.cloud.compute_v1")
from google.api_core import exceptions, extended_operation  # noqa: E402

from voxflow.config import ConfigError, GceConfig, parse_config  # noqa: E402
from voxflow.groups import Autoscaler, open_group  # noqa: E402
from voxflow.groups.gce import GceGroup, leave_group  # noqa: E402

PROJECT, ZONE, NAME = "vox-proj", "us-central1-a", "vox-gpu"
URL = f"gce://{PROJECT}/{ZONE}/{NAME}"
RUN_A = "vox-pipeline.manual__2025-06-01T08:00:00+00:00"     # Airflow-style run ids
RUN_B = "vox-pipeline.manual__2025-06-01T09:30:00+00:00"
RFC1035 = re.compile(r"[a-z](?:[-a-z0-9]*[a-z0-9])?")
QUEUE = "pubsub://vox-proj/run1?ledger=gs://vox-bucket/ledger&x=1"
IMAGE = "us-docker.pkg.dev/vox-proj/voxflow/worker-gpu:1.0"
SA = "voxflow-worker@vox-proj.iam.gserviceaccount.com"
API = "https://www.googleapis.com/compute/v1"
STOCKOUT = ("The zone 'projects/vox-proj/zones/{zone}' does not have enough resources "
            "available to fulfill the request. Try a different zone, or try again later.")


class _Operation(extended_operation.ExtendedOperation):
    """As compute_v1's clients wrap `compute_v1.Operation`."""

    @property
    def error_message(self):
        return self._extended_operation.http_error_message

    @property
    def error_code(self):
        return self._extended_operation.http_error_status_code


class Compute:
    """Recorded fake of the two clients; `calls` holds (method, request as a dict).

    MIGs and their VMs are keyed by (zone, MIG name), as Compute Engine scopes zonal MIGs;
    VMs are named like the real ones, baseInstanceName + "-" + 4 characters."""

    def __init__(self, capacity: dict[str, int] | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.templates: dict[str, compute_v1.InstanceTemplate] = {}
        self.migs: dict[tuple[str, str], compute_v1.InstanceGroupManager] = {}
        self.instances: dict[tuple[str, str], list[compute_v1.ManagedInstance]] = {}
        self.capacity = capacity or {}               # zone -> VMs it can start (else any)
        self.fail_next: dict[str, tuple[int, str]] = {}
        self._ids = itertools.count()

    # recording
    def record(self, method: str, request, expected: type) -> None:
        assert isinstance(request, expected), (method, type(request))
        self.calls.append((method, type(request).to_dict(request)))

    def sent(self, method: str) -> list[dict]:
        return [r for m, r in self.calls if m == method]

    def mutations(self) -> list[str]:
        return [m for m, _ in self.calls if m not in ("templates.get", "get", "list")]

    def touching(self, mig: str) -> list[tuple[str, dict]]:
        """Recorded calls that name the MIG `mig` (by its name or, for inserts, its body)."""
        return [(m, r) for m, r in self.calls if mig in (
            r.get("instance_group_manager"),
            r.get("instance_group_manager_resource", {}).get("name"))]

    def operation(self, method: str, target: str, zone: str | None = None):
        code, message = self.fail_next.pop(method, (0, ""))
        op = compute_v1.Operation(
            name=f"operation-{next(self._ids)}", operation_type=method, target_link=target,
            status=compute_v1.Operation.Status.DONE, progress=100,
            zone=f"{API}/projects/{PROJECT}/zones/{zone}" if zone else "",
            http_error_status_code=code, http_error_message=message)
        return _Operation.make(lambda *a, **k: op, lambda *a, **k: None, op)

    # state helpers
    def _vm(self, key: tuple[str, str]) -> compute_v1.ManagedInstance:
        zone = key[0]
        name = f"{self.migs[key].base_instance_name}-{next(self._ids):04x}"
        started = sum(mi.last_attempt.errors.errors == []
                      for (z, _), vms in self.instances.items() if z == zone for mi in vms)
        mi = compute_v1.ManagedInstance(
            name=name, instance=f"{API}/projects/{PROJECT}/zones/{zone}/instances/{name}",
            current_action="CREATING", id=next(self._ids))
        if started >= self.capacity.get(zone, 10 ** 6):
            mi.last_attempt = compute_v1.ManagedInstanceLastAttempt(errors={"errors": [{
                "code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": STOCKOUT.format(zone=zone)}]})
        return mi

    def boot(self) -> None:
        """Time passes: VMs that could be created are running."""
        for vms in self.instances.values():
            for mi in vms:
                if mi.current_action == "CREATING" and not mi.last_attempt.errors.errors:
                    mi.current_action, mi.instance_status = "NONE", "RUNNING"

    def names(self, zone: str, mig: str) -> list[str]:
        return [mi.name for mi in self.instances.get((zone, mig), [])]

    def running(self, zone: str, mig: str) -> list[str]:
        return [mi.name for mi in self.instances.get((zone, mig), [])
                if mi.instance_status == "RUNNING"]

    def state(self, mig: str) -> dict:
        """Everything stored about the MIGs named `mig` and their VMs, serialised."""
        return {key: (type(m).to_dict(m),
                      [type(mi).to_dict(mi) for mi in self.instances[key]])
                for key, m in self.migs.items() if key[1] == mig}


class FakeTemplates:
    def __init__(self, compute: Compute):
        self.c = compute

    def get(self, request):
        self.c.record("templates.get", request, compute_v1.GetInstanceTemplateRequest)
        if request.instance_template not in self.c.templates:
            raise exceptions.NotFound(f"instanceTemplates/{request.instance_template}")
        return self.c.templates[request.instance_template]

    def insert(self, request):
        self.c.record("templates.insert", request, compute_v1.InsertInstanceTemplateRequest)
        t = request.instance_template_resource
        if not RFC1035.fullmatch(t.name) or len(t.name) > 63:
            raise exceptions.BadRequest(f"invalid instance template name {t.name!r}")
        if t.name in self.c.templates:
            raise exceptions.Conflict(f"instanceTemplates/{t.name} already exists")
        self.c.templates[t.name] = t
        return self.c.operation("insert", f"{API}/projects/{PROJECT}/global/"
                                          f"instanceTemplates/{t.name}")


def _instance_path(url: str) -> str:
    """zones/Z/instances/N of a full or partial instance URL, as deleteInstances accepts."""
    return url.removeprefix(f"{API}/").removeprefix(f"projects/{PROJECT}/")


class FakeManagers:
    def __init__(self, compute: Compute):
        self.c = compute

    def _key(self, request) -> tuple[str, str]:
        assert request.project == PROJECT
        key = (request.zone, request.instance_group_manager)
        if key not in self.c.migs:
            raise exceptions.NotFound(f"zones/{key[0]}/instanceGroupManagers/{key[1]}")
        return key

    def get(self, request):
        self.c.record("get", request, compute_v1.GetInstanceGroupManagerRequest)
        mig = self.c.migs[self._key(request)]
        return type(mig).deserialize(type(mig).serialize(mig))

    def list_managed_instances(self, request):
        self.c.record("list", request,
                      compute_v1.ListManagedInstancesInstanceGroupManagersRequest)
        return iter(list(self.c.instances[self._key(request)]))

    def insert(self, request):
        self.c.record("insert", request, compute_v1.InsertInstanceGroupManagerRequest)
        mig = request.instance_group_manager_resource
        assert mig.target_size == 0
        if not RFC1035.fullmatch(mig.name) or len(mig.name) > 63:         # Compute's limits
            raise exceptions.BadRequest(f"invalid MIG name {mig.name!r}")
        if not RFC1035.fullmatch(mig.base_instance_name) or len(mig.base_instance_name) > 58:
            raise exceptions.BadRequest(f"invalid base instance name {mig.base_instance_name!r}")
        key = (request.zone, mig.name)
        if key in self.c.migs:
            raise exceptions.Conflict(f"zones/{key[0]}/instanceGroupManagers/{key[1]}")
        self.c.migs[key] = compute_v1.InstanceGroupManager(
            mig, zone=f"{API}/projects/{PROJECT}/zones/{request.zone}",
            instance_template=f"{API}/{mig.instance_template}")
        self.c.instances[key] = []
        return self.c.operation("insert", mig.name, request.zone)

    def resize(self, request):
        self.c.record("resize", request, compute_v1.ResizeInstanceGroupManagerRequest)
        key = self._key(request)
        mig, vms = self.c.migs[key], self.c.instances[key]
        while len(vms) < request.size:
            vms.append(self.c._vm(key))
        while len(vms) > request.size:        # the MIG drops VMs not yet running first
            vms.remove(min(vms, key=lambda mi: mi.instance_status == "RUNNING"))
        mig.target_size = request.size
        return self.c.operation("resize", key[1], request.zone)

    def delete_instances(self, request):
        self.c.record("delete_instances", request,
                      compute_v1.DeleteInstancesInstanceGroupManagerRequest)
        key = self._key(request)
        mig, vms = self.c.migs[key], self.c.instances[key]
        body = request.instance_group_managers_delete_instances_request_resource
        paths = {_instance_path(u) for u in body.instances}
        assert all(p.startswith(f"zones/{request.zone}/instances/") for p in paths), \
            "deleteInstances names a VM of another zone (the operation would fail)"
        gone = [mi for mi in vms if _instance_path(mi.instance) in paths]
        assert len(gone) == len(paths), "deleteInstances names a VM not in this group"
        for mi in gone:
            vms.remove(mi)
        mig.target_size -= len(gone)
        return self.c.operation("deleteInstances", key[1], request.zone)

    def set_instance_template(self, request):
        self.c.record("set_instance_template", request,
                      compute_v1.SetInstanceTemplateInstanceGroupManagerRequest)
        mig = self.c.migs[self._key(request)]
        link = request.instance_group_managers_set_instance_template_request_resource
        mig.instance_template = f"{API}/{link.instance_template}"
        return self.c.operation("setInstanceTemplate", mig.name, request.zone)

    def delete(self, request):
        self.c.record("delete", request, compute_v1.DeleteInstanceGroupManagerRequest)
        key = self._key(request)
        del self.c.migs[key]
        del self.c.instances[key]
        return self.c.operation("delete", key[1], request.zone)


def gce_config(**overrides) -> GceConfig:
    values = dict(image=IMAGE, machine_type="n1-standard-8",
                  accelerator_type="nvidia-tesla-t4", accelerator_count=1, service_account=SA)
    return GceConfig(**{**values, **overrides})


def make_group(compute: Compute, kind: str = "inference", run: str | None = RUN_A,
               **overrides) -> GceGroup:
    group = open_group(URL, QUEUE, kind, gce=gce_config(**overrides), run=run,
                       lease_seconds=60.0, log_dir=Path("/nonexistent"), capacity=8,
                       state_dir=Path("/x"))
    assert isinstance(group, GceGroup)
    group._templates, group._managers = FakeTemplates(compute), FakeManagers(compute)
    return group


def template_body(compute: Compute, index: int = -1) -> dict:
    return compute.sent("templates.insert")[index]["instance_template_resource"]


def metadata(body: dict) -> dict[str, str]:
    return {i["key"]: i["value"] for i in body["properties"]["metadata"]["items"]}


def mig_run(insert: dict) -> dict[str, str]:
    """The instance metadata a MIG insert gives all its VMs (allInstancesConfig)."""
    return insert["instance_group_manager_resource"]["all_instances_config"][
        "properties"]["metadata"]


# -- the template --------------------------------------------------------------------------

def test_gpu_template_body():
    compute = Compute()
    make_group(compute).resize(2, set())
    (insert,) = compute.sent("templates.insert")
    assert insert["project"] == PROJECT
    body = template_body(compute)
    props = body["properties"]
    assert body["name"].startswith(f"{NAME}-") and len(body["name"]) == len(NAME) + 9
    assert props["machine_type"] == "n1-standard-8"
    assert props["guest_accelerators"] == [{"accelerator_type": "nvidia-tesla-t4",
                                            "accelerator_count": 1}]
    sched = props["scheduling"]
    assert (sched["provisioning_model"], sched["instance_termination_action"],
            sched["on_host_maintenance"], sched["automatic_restart"]) == \
        ("SPOT", "DELETE", "TERMINATE", False)
    assert props["service_accounts"] == [{
        "email": SA, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}]
    assert props["labels"] == {"voxflow-kind": "inference", "voxflow-group": NAME}
    (disk,) = props["disks"]
    assert disk["boot"] and disk["auto_delete"]
    assert disk["initialize_params"]["source_image"].startswith(
        "projects/deeplearning-platform-release/global/images/family/common-cu")
    assert disk["initialize_params"]["disk_size_gb"] == "100"    # int64: a JSON string
    (nic,) = props["network_interfaces"]
    assert nic["network"] == f"projects/{PROJECT}/global/networks/default"
    assert nic["access_configs"][0]["type_"] == "ONE_TO_ONE_NAT"
    meta = metadata(body)
    assert set(meta) == {"startup-script", "shutdown-script", "google-logging-enabled",
                         "install-nvidia-driver"}                 # nothing secret
    assert "docker stop --time 25 voxflow-worker" in meta["shutdown-script"]
    startup = meta["startup-script"]
    assert "ExecStop=/usr/bin/docker stop --time 25" in startup
    unit = startup.split("<<'VOXFLOW_UNIT'\n", 1)[1]
    assert [ln for ln in unit.splitlines() if ln.startswith("Restart")] == [
        "Restart=on-failure", "RestartSec=10"]     # exit 0 (left its group) stays down
    (run,) = [ln for ln in startup.replace("\\\n", " ").splitlines()
              if ln.startswith("exec docker run")]
    assert shlex.split(run) == [
        "exec", "docker", "run", "--rm", "--name", "voxflow-worker-$slot", "--gpus",
        "device=$slot", IMAGE, "voxflow", "worker", QUEUE, "--kind", "inference",
        "--lease-seconds", "60", "--leave-group", "--worker-id", "$name", "${run:+--run",
        "$run}"]
    assert startup.rstrip().endswith("systemctl enable --now voxflow-worker@0.service")
    assert RUN_A not in json.dumps(body)               # the run reaches VMs via the MIG


def test_cpu_and_standard_templates():
    compute = Compute()
    make_group(compute, kind="blend", accelerator_type=None, machine_type="n2-highmem-8",
               zones=["us-central1-b"], subnetwork="vox-subnet",
               external_ip=False).resize(1, set())
    props = template_body(compute)["properties"]
    assert props["machine_type"] == "n2-highmem-8"
    assert props.get("guest_accelerators", []) == []
    assert props["disks"][0]["initialize_params"]["source_image"] == \
        "projects/cos-cloud/global/images/family/cos-stable"
    assert props["scheduling"]["provisioning_model"] == "SPOT"
    assert props["labels"]["voxflow-kind"] == "blend"
    nic = props["network_interfaces"][0]
    assert nic["subnetwork"] == f"projects/{PROJECT}/regions/us-central1/subnetworks/vox-subnet"
    assert nic.get("access_configs", []) == []
    meta = metadata(template_body(compute))
    assert "install-nvidia-driver" not in meta
    assert "--gpus" not in meta["startup-script"] and "nvidia-smi" not in meta["startup-script"]

    standard = Compute()
    make_group(standard, accelerator_type=None, spot=False).resize(1, set())
    sched = template_body(standard)["properties"]["scheduling"]
    assert "provisioning_model" not in sched and "instance_termination_action" not in sched
    assert "on_host_maintenance" not in sched          # CPU VMs may live-migrate

    gpu_standard = Compute()
    make_group(gpu_standard, spot=False).resize(1, set())
    sched = template_body(gpu_standard)["properties"]["scheduling"]
    assert sched["on_host_maintenance"] == "TERMINATE" and "provisioning_model" not in sched


# A stand-in for curl against the metadata server: the last argument is the URL; without
# the Metadata-Flavor header the real server answers 403 (curl -f: exit 22).
FAKE_CURL = r"""#!/bin/bash
for url; do :; done
case " $* " in *" Metadata-Flavor: Google "*) ;; *) exit 22 ;; esac
case "$url" in
  */computeMetadata/v1/instance/name) echo "$VM" ;;
  */computeMetadata/v1/instance/attributes/voxflow-run)
    [ -n "$CURL_FAILS" ] && exit "$CURL_FAILS"
    [ -n "$RUN" ] || exit 22
    printf %s "$RUN" ;;
  *) exit 22 ;;
esac
"""


def worker_wrapper(startup: str, tmp_path: Path) -> Path:
    """The startup script's worker wrapper as tmp_path/run-worker.sh, and a bin folder of
    stand-ins for what it calls: docker (writes its arguments to $ARGS, exits $RC), the
    metadata server's curl, nvidia-smi."""
    wrapper = startup.split("<<'VOXFLOW_WORKER'\n", 1)[1].split("\nVOXFLOW_WORKER\n", 1)[0]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool, body in {"docker": '#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS"\nexit "${RC:-0}"\n',
                       "curl": FAKE_CURL, "nvidia-smi": "#!/bin/sh\ntrue\n"}.items():
        (bindir / tool).write_text(body)
        (bindir / tool).chmod(0o755)
    (tmp_path / "run-worker.sh").write_text(wrapper)
    return bindir


def test_startup_script_parses_and_runs_the_worker_container(tmp_path):
    """bash -n accepts the script; its worker wrapper, run with a fake docker and metadata
    server, passes the queue URL (with ? and &), the VM's name and its MIG's run through
    intact, runs no --run for a group that is not per run, refuses to start when the
    metadata server is unreachable, and exits with the container's status (what systemd's
    Restart=on-failure looks at)."""
    compute = Compute()
    make_group(compute).resize(1, set())
    startup = metadata(template_body(compute))["startup-script"]
    script = tmp_path / "startup.sh"
    script.write_text(startup)
    subprocess.run(["bash", "-n", str(script)], check=True)
    bindir = worker_wrapper(startup, tmp_path)
    args = tmp_path / "args"

    def boot(**env: str) -> int:
        args.unlink(missing_ok=True)
        return subprocess.run(
            ["bash", str(tmp_path / "run-worker.sh")], timeout=30, env={
                **os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "ARGS": str(args),
                "VM": "vox-gpu-1a2b3c4d-7f3a", "RC": "0", **env}).returncode

    command = ["run", "--rm", "--name", "voxflow-worker-0", "--gpus", "device=0", IMAGE,
               "voxflow", "worker", QUEUE, "--kind", "inference", "--lease-seconds", "60",
               "--leave-group", "--worker-id", "vox-gpu-1a2b3c4d-7f3a"]
    odd = RUN_A + " $HOME 'x'"                         # quoting holds for any run id
    assert boot(RUN=odd) == 0
    assert args.read_text().splitlines() == command + ["--run", odd]
    assert boot() == 0                                 # no voxflow-run: not per run
    assert args.read_text().splitlines() == command
    assert boot(RUN=RUN_A, CURL_FAILS="7") == 1        # unreachable: never serve every run
    assert not args.exists()
    assert boot(RUN=RUN_A, RC="137") == 137            # a killed worker: systemd restarts it


def test_a_vm_with_four_gpus_runs_four_workers_one_gpu_each(tmp_path):
    """accelerator_count 4: four units, each container given one GPU and its own worker id;
    the autoscaler's target counts workers (6 -> 2 VMs); a VM one of whose workers holds a
    lease is busy; preemption stops all four containers."""
    compute = Compute()
    group = make_group(compute, accelerator_count=4)
    assert group.slots == 4
    group.resize(6, set())
    assert compute.sent("resize")[-1]["size"] == 2 and group.size() == 8
    meta = metadata(template_body(compute))
    startup = meta["startup-script"]
    assert startup.rstrip().endswith("systemctl enable --now " + " ".join(
        f"voxflow-worker@{i}.service" for i in range(4)))
    assert "docker stop --time 25 voxflow-worker-0 voxflow-worker-1 voxflow-worker-2 " \
           "voxflow-worker-3" in meta["shutdown-script"]
    bindir = worker_wrapper(startup, tmp_path)
    seen = []
    for slot in range(4):                               # what systemd's %i passes
        subprocess.run(["bash", str(tmp_path / "run-worker.sh"), str(slot)], check=True,
                       timeout=30, env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
                                        "ARGS": str(tmp_path / "args"), "VM": "vm-1",
                                        "RUN": RUN_A})
        args = (tmp_path / "args").read_text().splitlines()
        seen.append((args[args.index("--name") + 1], args[args.index("--gpus") + 1],
                     args[args.index("--worker-id") + 1]))
    assert seen == [(f"voxflow-worker-{i}", f"device={i}", f"vm-1.gpu{i}") for i in range(4)]
    compute.boot()
    vms = compute.names(ZONE, group.name)
    compute.calls.clear()
    group.resize(1, {f"{vms[1]}.gpu3"})                 # one worker busy on the second VM
    (delete,) = compute.sent("delete_instances")
    urls = delete["instance_group_managers_delete_instances_request_resource"]["instances"]
    assert [u.rsplit("/", 1)[1] for u in urls] == [vms[0]]


def test_template_is_reused_unless_the_config_changes():
    compute = Compute()
    make_group(compute).resize(2, set())
    first = template_body(compute)["name"]
    compute.calls.clear()
    again = make_group(compute)                        # a later Airflow task, same config
    again.resize(3, set())
    assert compute.sent("templates.insert") == []
    assert compute.sent("templates.get")[0]["instance_template"] == first
    assert compute.sent("set_instance_template") == []
    assert compute.sent("resize")[-1]["size"] == 3

    compute.calls.clear()
    changed = make_group(compute, image=IMAGE.replace(":1.0", ":1.1"))
    changed.resize(3, set())
    (insert,) = compute.sent("templates.insert")
    second = insert["instance_template_resource"]["name"]
    assert second != first and second.startswith(f"{NAME}-")
    (switch,) = compute.sent("set_instance_template")
    assert switch["zone"] == ZONE and switch[
        "instance_group_managers_set_instance_template_request_resource"][
        "instance_template"] == f"projects/{PROJECT}/global/instanceTemplates/{second}"
    assert compute.sent("insert") == []                # the MIG itself is reused
    assert set(compute.templates) == {first, second}


def test_a_template_inserted_meanwhile_is_reused():
    compute = Compute()
    group = make_group(compute)
    name = group.template_name()
    compute.templates[name] = compute_v1.InstanceTemplate(name=name)
    real_get = FakeTemplates.get

    def get_misses_once(self, request):                # another task inserts between calls
        self.get = lambda request: real_get(self, request)
        raise exceptions.NotFound(name)
    group._templates.get = get_misses_once.__get__(group._templates)
    group.resize(1, set())
    assert len(compute.sent("templates.insert")) == 1  # Conflict swallowed
    assert compute.sent("resize")[-1]["size"] == 1


# -- sizing --------------------------------------------------------------------------------

def test_autoscaler_drives_the_mig_resizes():
    compute = Compute()
    group = make_group(compute)
    scaler = Autoscaler(group, 0, 8, 4)
    assert scaler.step(100, set()) == 8
    (mig,) = compute.sent("insert")
    assert mig["zone"] == ZONE
    created = mig["instance_group_manager_resource"]
    name = group.name
    assert re.fullmatch(rf"{NAME}-[0-9a-f]{{8}}", name)           # the run's own MIG
    assert (created["name"], created["base_instance_name"], created["target_size"]) == \
        (name, name, 0)
    assert mig_run(mig) == {"voxflow-run": RUN_A}
    assert created["instance_template"] == \
        f"projects/{PROJECT}/global/instanceTemplates/{template_body(compute)['name']}"
    assert [(r["zone"], r["instance_group_manager"], r["size"])
            for r in compute.sent("resize")] == [(ZONE, name, 8)]
    assert group.size() == 8
    assert all(n.startswith(f"{name}-") for n in compute.names(ZONE, name))  # worker ids

    compute.boot()
    compute.calls.clear()
    assert scaler.step(90, set()) == 8                 # steady: reads only
    assert compute.mutations() == []
    assert {r["instance_group_manager"] for _, r in compute.calls if "zone" in r} == {name}

    busy = set(compute.names(ZONE, name)[:5])
    assert scaler.step(18, busy) == 5                  # ceil(18 / 4): shrink by 3 idle VMs
    (delete,) = compute.sent("delete_instances")
    urls = delete["instance_group_managers_delete_instances_request_resource"]["instances"]
    assert len(urls) == 3 and not {u.rsplit("/", 1)[1] for u in urls} & busy
    assert compute.sent("resize") == []                # deleteInstances lowered the target
    assert set(compute.names(ZONE, name)) == busy and group.size() == 5

    compute.calls.clear()
    assert scaler.step(4, busy) == 1                   # 4 to go, but all 5 VMs are busy
    assert compute.mutations() == [] and group.size() == 5
    assert scaler.step(4, set(list(busy)[:1])) == 1    # now 4 idle: they go
    assert compute.names(ZONE, name) == [n for n in compute.names(ZONE, name) if n in busy]
    assert len(compute.names(ZONE, name)) == 1

    assert scaler.step(0, set()) == 0                  # drained
    assert compute.sent("resize")[-1] == {"project": PROJECT, "zone": ZONE,
                                          "instance_group_manager": name, "size": 0}
    assert group.size() == 0


def test_shrink_prefers_vms_not_yet_running():
    compute = Compute()
    group = make_group(compute)
    group.resize(2, set())
    compute.boot()
    group.resize(4, set())                             # two more, still starting
    vms = lambda: set(compute.names(ZONE, group.name))  # noqa: E731
    starting = vms() - set(compute.running(ZONE, group.name))
    group.resize(2, set())
    assert vms() == set(compute.running(ZONE, group.name)) and len(vms()) == 2
    assert not starting & vms()


def test_stockout_spills_to_the_next_zones():
    compute = Compute(capacity={ZONE: 2, "us-central1-b": 1, "us-central1-c": 0})
    group = make_group(compute, zones=["us-central1-b", "us-central1-c"])
    scaler = Autoscaler(group, 0, 8, 4)
    scaler.step(24, set())                             # 6 VMs: 2 fit in the primary zone
    assert [(r["zone"], r["size"]) for r in compute.sent("resize")] == [(ZONE, 6)]
    status = group.status()
    assert (status.target, status.running) == (6, 0)
    assert status.zones[0].out_of_stock == 4
    assert any("ZONE_RESOURCE_POOL_EXHAUSTED" in e for e in status.zones[0].errors)

    compute.boot()
    compute.calls.clear()
    scaler.step(24, set())                             # next step: 4 move to zone b
    (delete,) = compute.sent("delete_instances")
    assert delete["zone"] == ZONE and len(
        delete["instance_group_managers_delete_instances_request_resource"]["instances"]) == 4
    (spill,) = compute.sent("insert")
    assert (spill["zone"], spill["instance_group_manager_resource"]["name"]) == \
        ("us-central1-b", group.name)                  # the run's name in every zone
    assert mig_run(spill) == {"voxflow-run": RUN_A}
    assert [(r["zone"], r["size"]) for r in compute.sent("resize")] == [("us-central1-b", 4)]
    assert len(compute.running(ZONE, group.name)) == 2

    compute.boot()
    scaler.step(24, set())                             # b ran 1: 3 move on to zone c
    compute.boot()
    scaler.step(24, set())                             # c is the last: it keeps retrying
    status = group.status()
    assert [(z.zone, z.target, z.running, z.out_of_stock) for z in status.zones] == [
        (ZONE, 2, 2, 0), ("us-central1-b", 1, 1, 0), ("us-central1-c", 3, 0, 3)]
    assert (status.target, status.running, group.size()) == (6, 3, 6)
    assert str(status).startswith("3 of 6 running")

    compute.calls.clear()                              # growth avoids the stocked-out zone c
    compute.capacity[ZONE] = 10                        # ... and tries the primary again
    scaler.step(32, set())
    assert [(r["zone"], r["size"]) for r in compute.sent("resize")] == [(ZONE, 4)]

    compute.boot()
    busy = set(compute.running("us-central1-b", group.name))
    compute.calls.clear()
    scaler.step(8, busy)                               # 2: the 3 failing VMs in c go first,
    deleted = {r["zone"]: len(r["instance_group_managers_delete_instances_request_resource"]
                              ["instances"]) for r in compute.sent("delete_instances")}
    assert deleted == {"us-central1-c": 3, ZONE: 3}    # then idle ones; b's VM is busy
    assert group.size() == 2 and compute.names("us-central1-b", group.name) == list(busy)


def test_growth_skips_a_zone_that_just_stocked_out():
    compute = Compute(capacity={ZONE: 0})
    group = make_group(compute, zones=["us-central1-b"])
    group.resize(2, set())
    compute.calls.clear()
    group.resize(5, set())                             # 2 spill, 3 new: all to zone b
    assert [(r["zone"], r["size"]) for r in compute.sent("resize")] == [("us-central1-b", 5)]
    assert group.status().zones[0].target == 0


def test_single_zone_keeps_retrying_a_stockout():
    compute = Compute(capacity={ZONE: 1})
    group = make_group(compute)
    group.resize(3, set())
    compute.calls.clear()
    group.resize(3, set())
    assert compute.mutations() == []                   # nowhere to go: the MIG retries
    assert group.status().zones[0].out_of_stock == 2


def test_failed_operation_raises():
    compute = Compute()
    group = make_group(compute)
    group.resize(1, set())
    compute.fail_next["resize"] = (403, "Quota 'NVIDIA_T4_GPUS' exceeded. Limit: 1.0")
    with pytest.raises(exceptions.Forbidden, match="NVIDIA_T4_GPUS"):
        group.resize(4, set())


def test_close_deletes_the_migs_and_keeps_templates():
    compute = Compute(capacity={ZONE: 1})
    group = make_group(compute, zones=["us-central1-b", "us-central1-c"])
    group.resize(3, set())
    group.resize(3, set())                             # spills into zone b
    assert set(compute.migs) == {(ZONE, group.name), ("us-central1-b", group.name)}
    compute.calls.clear()
    group.close()
    zones = [ZONE, "us-central1-b", "us-central1-c"]
    assert sorted(r["zone"] for r in compute.sent("delete")) == zones  # c: NotFound, fine
    assert all(r["instance_group_manager"] == group.name for r in compute.sent("delete"))
    assert compute.migs == {} and len(compute.templates) == 1
    assert group.size() == 0
    group.close()                                      # idempotent: nothing left
    assert len(compute.sent("delete")) == 6 and compute.migs == {}


# -- one group per run ----------------------------------------------------------------------

def test_two_runs_on_one_url_never_touch_each_other():
    """Each run sizes, spills and deletes only its own MIGs: closing run A leaves run B's
    MIGs and VMs exactly as they were, and no call of A's names B's MIG."""
    compute = Compute(capacity={ZONE: 4})
    a, b = (make_group(compute, run=r, zones=["us-central1-b"]) for r in (RUN_A, RUN_B))
    assert a.name != b.name
    scale_a, scale_b = Autoscaler(a, 0, 8, 4), Autoscaler(b, 0, 8, 4)
    scale_a.step(100, set())                           # A: 8, 4 fit in ZONE
    scale_b.step(12, set())                            # B: 3, ZONE is full now
    compute.boot()
    scale_a.step(100, set())                           # both spill to zone b, each to its
    scale_b.step(12, set())                            # own MIG there
    compute.boot()
    zones = (ZONE, "us-central1-b")
    assert set(compute.migs) == {(z, g.name) for z in zones for g in (a, b)}
    assert (a.size(), b.size()) == (8, 3)              # independent targets
    assert [(z.zone, z.target, z.running) for z in b.status().zones] == [
        (ZONE, 0, 0), ("us-central1-b", 3, 3)]
    for g in (a, b):
        inserts = [m for m in compute.sent("insert")
                   if m["instance_group_manager_resource"]["name"] == g.name]
        assert len(inserts) == 2
        assert all(mig_run(m) == {"voxflow-run": g.run} for m in inserts)
        assert all(n.startswith(f"{g.name}-") for z in zones for n in compute.names(z, g.name))
    before = compute.state(b.name)
    b_vms = {z: compute.names(z, b.name) for z in zones}

    compute.calls.clear()
    busy_a = set(compute.names(ZONE, a.name)[:1])
    assert scale_a.step(4, busy_a) == 1                # A shrinks to its one busy VM
    assert a.size() == 1
    a.close()
    assert compute.touching(b.name) == [] and compute.touching(a.name)
    assert compute.state(b.name) == before and compute.state(a.name) == {}
    assert {z: compute.names(z, b.name) for z in b_vms} == b_vms
    assert b.size() == 3
    compute.calls.clear()
    assert scale_b.step(12, set()) == 3 and compute.mutations() == []   # B carries on


def test_runs_share_one_template_and_carry_their_run():
    """The template body holds no run, so runs of one config insert it once; each MIG
    gives its VMs `voxflow-run` through allInstancesConfig (read by the startup script, see
    test_startup_script_parses_and_runs_the_worker_container). run=None sets none."""
    compute = Compute()
    a, b, shared = (make_group(compute, run=r) for r in (RUN_A, RUN_B, None))
    for g in (a, b, shared):
        g.resize(1, set())
    (insert,) = compute.sent("templates.insert")
    link = (f"projects/{PROJECT}/global/instanceTemplates/"
            f"{insert['instance_template_resource']['name']}")
    migs = {m["instance_group_manager_resource"]["name"]: m for m in compute.sent("insert")}
    assert set(migs) == {a.name, b.name, NAME}
    assert {n: m["instance_group_manager_resource"]["instance_template"]
            for n, m in migs.items()} == dict.fromkeys(migs, link)
    assert mig_run(migs[a.name]) == {"voxflow-run": RUN_A}
    assert mig_run(migs[b.name]) == {"voxflow-run": RUN_B}
    assert "all_instances_config" not in migs[NAME]["instance_group_manager_resource"]
    body = json.dumps(insert)
    assert RUN_A not in body and RUN_B not in body and a.name not in body
    assert "attributes/voxflow-run" in metadata(template_body(compute))["startup-script"]


def test_names_fit_compute_engine_limits():
    """A 54-character GROUP (the longest the config accepts) and a long run id: the MIG name
    (also the base instance name) fits 58 characters, VM names 63, the template name 63, all
    RFC 1035; distinct for distinct runs, stable for one run, distinct for two GROUPs that
    are cut alike."""
    group = "a" * 48 + "-bcdef"
    assert len(group) == 54
    long_run = "vox-pipeline.scheduled__2025-06-01T00:00:00+00:00" * 4

    def opened(name: str, run: str | None) -> GceGroup:
        return GceGroup.from_url(f"gce://{PROJECT}/{ZONE}/{name}", QUEUE, "inference",
                                 gce_config(), run=run)

    names = {opened(group, r).name for r in (long_run, long_run + "x", RUN_A, RUN_B)}
    assert len(names) == 4
    for name in names:
        assert len(name) <= 58 and RFC1035.fullmatch(name) and name.startswith("a" * 48)
    assert opened(group, long_run).name == opened(group, long_run).name
    twin = group[:-1] + "g"                            # same first 49 characters
    assert opened(twin, RUN_A).name != opened(group, RUN_A).name
    assert opened(group, None).name == group

    compute = Compute()                                # the fake refuses names over the limits
    g = opened(group, long_run)
    g._templates, g._managers = FakeTemplates(compute), FakeManagers(compute)
    g.resize(2, set())
    assert len(template_body(compute)["name"]) <= 63
    vms = compute.names(ZONE, g.name)
    assert len(vms) == 2 and all(len(n) <= 63 and RFC1035.fullmatch(n) for n in vms)


# -- a VM leaving its group ----------------------------------------------------------------

class MetadataServer(http.server.ThreadingHTTPServer):
    """The part of the Compute Engine metadata server `leave_group` reads (403 without the
    Metadata-Flavor header, as the real one); `values` maps paths under
    /computeMetadata/v1/."""

    def __init__(self, values: dict[str, str]):
        self.values = values

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):                       # noqa: N805
                path = handler.path.removeprefix("/computeMetadata/v1/")
                if handler.headers.get("Metadata-Flavor") != "Google":
                    handler.send_error(403)
                elif path not in self.values:
                    handler.send_error(404)
                else:
                    data = self.values[path].encode()
                    handler.send_response(200)
                    handler.send_header("Content-Length", str(len(data)))
                    handler.end_headers()
                    handler.wfile.write(data)

            def log_message(handler, *args):           # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


def vm_metadata(vm: str, mig: str) -> dict[str, str]:
    return {"instance/name": vm, "instance/zone": f"projects/123456789/zones/{ZONE}",
            "project/project-id": PROJECT,
            "instance/attributes/created-by":
                f"projects/123456789/zones/{ZONE}/instanceGroupManagers/{mig}"}


def test_leave_group_deletes_this_vm_from_its_mig(monkeypatch):
    """Each VM deletes exactly itself from exactly its run's MIG (the target drops by one);
    once every VM of run A left, A's group is at zero and run B's is untouched."""
    compute = Compute()
    a, b = make_group(compute, run=RUN_A), make_group(compute, run=RUN_B)
    a.resize(3, set())
    b.resize(2, set())
    compute.boot()
    before_b = compute.state(b.name)
    server = MetadataServer({})
    monkeypatch.setenv("GCE_METADATA_HOST", server.host)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")    # never used for the metadata
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    try:
        vms = compute.names(ZONE, a.name)
        for left, vm in enumerate(vms, 1):
            server.values = vm_metadata(vm, a.name)
            compute.calls.clear()
            assert leave_group(managers_client=FakeManagers(compute)) is True
            (call,) = compute.calls
            assert call[0] == "delete_instances"
            assert (call[1]["zone"], call[1]["instance_group_manager"]) == (ZONE, a.name)
            assert call[1]["instance_group_managers_delete_instances_request_resource"][
                "instances"] == [f"zones/{ZONE}/instances/{vm}"]
            assert compute.names(ZONE, a.name) == vms[left:]
            assert a.size() == len(vms) - left
        assert compute.state(b.name) == before_b

        server.values = {k: v for k, v in vm_metadata("lone-vm", a.name).items()
                         if k != "instance/attributes/created-by"}
        compute.calls.clear()                          # a VM in no MIG: nothing to leave
        assert leave_group(managers_client=FakeManagers(compute)) is False
        assert compute.calls == []
    finally:
        server.shutdown()
        server.server_close()


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"called the Compute API ({name}) off Compute Engine")


def test_leave_group_off_compute_engine_returns_false_quickly(monkeypatch):
    """No metadata server: nothing listening (refused at once), or a host that accepts and
    never answers (the request timeout): False within 2 s, no API call, no exception."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_host = f"127.0.0.1:{closed.getsockname()[1]}"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)                               # the kernel accepts; nobody answers
        for env, url in ((refused_host, None), (None, f"http://127.0.0.1:"
                                                      f"{silent.getsockname()[1]}/v1/")):
            if env:
                monkeypatch.setenv("GCE_METADATA_HOST", env)
            t0 = time.monotonic()
            assert leave_group(metadata_url=url, managers_client=Untouchable()) is False
            assert time.monotonic() - t0 < 2.0


def test_import_is_lazy_and_open_group_routes_by_url():
    code = ("import sys, voxflow.groups.gce, voxflow.groups; "
            "g = voxflow.groups.open_group("
            f"{URL!r}, 'q', 'inference', gce=voxflow.config.GceConfig(image='i'), "
            "log_dir='/x', capacity=3, state_dir='/y', lease_seconds=5); "
            "assert 'google.cloud.compute_v1' not in sys.modules, 'imported'; "
            "assert (g.project, g.zone, g.group, g.name, g.run, g.lease_seconds) == "
            f"({PROJECT!r}, {ZONE!r}, {NAME!r}, {NAME!r}, None, 5)")   # run=None: GROUP
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(ValueError, match="gce settings"):
        open_group(URL, QUEUE, "inference")
    per_run = open_group(URL, QUEUE, "inference", gce=gce_config(), run=RUN_A)
    assert (per_run.group, per_run.run) == (NAME, RUN_A) and per_run.name != NAME
    local = open_group("local://0", QUEUE, "blend", gce=gce_config(), run=RUN_A)
    assert local is None                               # local ignores gce= and run=


# -- config --------------------------------------------------------------------------------

BASE = {"input": "gs://b/in", "output": "gs://b/out",
        "queue": "pubsub://vox-proj/voxflow?ledger=gs://b/ledger",
        "model": {"path": "m.pt", "input_patch": [8, 8, 8], "output_channels": 1}}


def inference(group: dict) -> dict:
    return {**BASE, "workers": {"inference": group}}


def refused(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return exc.value


def test_config_accepts_a_gce_group():
    cfg = parse_config(inference({"group": URL, "max": 8, "gce": {
        "image": IMAGE, "accelerator_type": "nvidia-l4", "machine_type": "g2-standard-8",
        "zones": ["us-central1-b", "us-central1-c"]}}))
    group = cfg.workers.inference
    assert (group.group, group.max, group.min) == (URL, 8, 0)
    assert group.gce.zones == ["us-central1-b", "us-central1-c"]
    assert (group.gce.spot, group.gce.disk_gb, group.gce.accelerator_count) == (True, 100, 1)
    assert cfg.workers.blend.gce is None                       # local groups need none
    g = GceGroup.from_url(group.group, QUEUE, "inference", group.gce)
    assert g.zones == [ZONE, "us-central1-b", "us-central1-c"]


@pytest.mark.parametrize("group, field, words", [
    ({"group": URL, "max": 4, "gce": {"machine_type": "n1-standard-4"}},
     "workers.inference.gce.image", "required"),
    ({"group": URL, "max": 4}, "workers.inference.gce", "required"),
    ({"group": URL, "gce": {"image": IMAGE}}, "workers.inference.max", "required"),
    ({"group": URL, "max": 4, "gce": {"image": IMAGE, "zones": ["us-east1-b"]}},
     "workers.inference.gce.zones", "not in region us-central1"),
    ({"group": URL, "max": 4, "gce": {"image": IMAGE, "zones": [ZONE]}},
     "workers.inference.gce.zones", "own zone"),
    ({"group": URL, "max": 4, "gce": {"image": IMAGE, "zones": ["central"]}},
     "workers.inference.gce.zones", "not a zone"),
    ({"group": "gce://Vox_Proj/us-central1-a/g", "max": 4, "gce": {"image": IMAGE}},
     "workers.inference.group", "project id"),
    ({"group": "gce://vox-proj/uscentral1/g", "max": 4, "gce": {"image": IMAGE}},
     "workers.inference.group", "not a zone"),
    ({"group": "gce://vox-proj/us-central1-a/GPU_group", "max": 4, "gce": {"image": IMAGE}},
     "workers.inference.group", "group name"),
    ({"group": f"gce://vox-proj/us-central1-a/{'g' * 55}", "max": 4, "gce": {"image": IMAGE}},
     "workers.inference.group", "group name"),
    ({"group": "gce://vox-proj/us-central1-a", "max": 4, "gce": {"image": IMAGE}},
     "workers.inference.group", "gce://PROJECT/ZONE/GROUP"),
    ({"group": URL, "max": 4, "gce": {"image": IMAGE, "service_account": "nobody"}},
     "workers.inference.gce.service_account", "email"),
])
def test_config_refusals_name_the_field(group, field, words):
    error = refused(inference(group))
    assert error.field == field and words in str(error) and str(error).startswith(field)


@pytest.mark.parametrize("change, field", [
    ({"queue": "sqlite:///tmp/q.db"}, "queue.url"),
    ({"queue": "pubsub://vox-proj/voxflow?ledger=/tmp/ledger"}, "queue.url"),
    ({"input": "/data/em/image"}, "input"),
    ({"output": "file:///data/em/out"}, "output"),
    ({"inference": {"temporary": "/scratch/tmp"}}, "inference.temporary"),
])
def test_gce_groups_refuse_what_vms_cannot_reach(change, field):
    group = {"group": URL, "max": 4, "gce": {"image": IMAGE}}
    error = refused({**inference(group), **change})
    assert error.field == field and "Compute Engine VMs, which cannot reach" in str(error)


@pytest.mark.parametrize("hybrid", [True, False])
def test_hybrid_groups_refuse_what_vms_cannot_reach(hybrid):
    """A hybrid group with a cloud member needs a queue the VMs reach: SQLite is refused,
    naming queue.url and the group."""
    urls = ["local://auto", URL] if hybrid else URL
    error = refused({**inference({"group": urls, "max": 4, "gce": {"image": IMAGE}}),
                     "queue": "sqlite:///tmp/q.db"})
    assert error.field == "queue.url" and "workers.inference.group" in str(error)


@pytest.mark.parametrize("group, words", [
    (["local://2"], "two or more"),
    (["local://2", "local://0"], "cannot be part"),
    (["local://2", "external://"], "cannot be part"),
    (["local://2", URL, URL.replace(NAME, "other")], "at most one gce://"),
])
def test_hybrid_group_refusals(group, words):
    error = refused(inference({"group": group, "max": 4, "gce": {"image": IMAGE}}))
    assert error.field == "workers.inference.group" and words in str(error)


def test_a_hybrid_group_fills_local_workers_first_and_empties_the_cloud_first(
        tmp_path, request):
    """[local://2, gce://...]: the lab's two workers take the first of the backlog, Spot VMs
    the rest; shrinking removes VMs before local workers; to zero, everything stops."""
    from types import SimpleNamespace
    from voxflow.config import GroupConfig
    from voxflow.groups import HybridGroup, open_stage_group
    from conftest import queue_url_for
    queue_url = queue_url_for("pubsub", tmp_path, request)    # every member reaches it
    workers = GroupConfig(group=["local://2", URL], max=6, gce=gce_config())
    config = SimpleNamespace(workers=SimpleNamespace(inference=workers),
                             queue=SimpleNamespace(url=queue_url, lease_seconds=60.0))
    group = open_stage_group(config, "inference", RUN_A)
    assert isinstance(group, HybridGroup)
    (local, two), (cloud, six) = group.members
    assert (two, six) == (2, 6)
    compute = Compute()
    cloud._templates, cloud._managers = FakeTemplates(compute), FakeManagers(compute)
    scaler = Autoscaler(group, 0, workers.max, 1)
    try:
        assert scaler.step(5, set()) == 5
        assert local.size() == 2 and cloud.size() == 3 and group.size() == 5
        compute.boot()
        scaler.step(3, set())                             # the cloud shrinks first
        assert local.size() == 2 and cloud.size() == 1
        scaler.step(1, set())
        assert local.size() == 1 and cloud.size() == 0
        assert compute.sent("resize")[-1]["size"] == 0
        scaler.step(0, set())
        assert group.size() == 0
    finally:
        group.close()


def test_gce_config_in_a_cpu_group_and_max_bounds():
    cfg = parse_config({**BASE, "workers": {"downsample": {
        "group": "gce://vox-proj/europe-west4-b/vox-cpu", "max": 100, "min": 2,
        "gce": {"image": "voxflow/worker-cpu:1", "zones": ["europe-west4-a"]}}}})
    assert cfg.workers.downsample.max == 100                   # no local capacity bound
    error = refused({**BASE, "workers": {"downsample": {
        "group": "gce://vox-proj/europe-west4-b/vox-cpu", "max": 1, "min": 2,
        "gce": {"image": "voxflow/worker-cpu:1"}}}})
    assert error.field == "workers.downsample" and "min 2 exceeds max 1" in str(error)
