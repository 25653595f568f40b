"""`gce://PROJECT/ZONE/GROUP`: a Compute Engine managed instance group of Spot VMs per run.

Each VM runs one worker container, `voxflow worker QUEUE --kind KIND [--lease-seconds S]
--leave-group --worker-id NAME --run RUN`, where NAME is the VM's instance name (so the `busy`
worker ids the queue reports are VM names) and RUN the run its MIG serves.

Why it is built this way:

- **One MIG per run** (`mig_name`): GROUP (cut to fit) + "-" + 8 hex of a hash of the run, in
  every zone. Two runs that name the same URL never share a MIG: one run's `close()` or
  autoscaler never deletes, resizes or retargets the other's VMs. The MIG name is also its
  `baseInstanceName`, so VM names (the worker ids) start with it. `run=None` names the MIG
  GROUP itself (a group that is not per run).
- **The run reaches the VMs through the MIG, not the template**: the MIG's
  `allInstancesConfig` sets the instance metadata item `voxflow-run`, which the startup script
  reads and passes as `--run`. The template body never depends on the run, so all runs of one
  config share one template.
- **A VM leaves its MIG when its run is over** (`leave_group`, called by the worker under
  `--leave-group`): `deleteInstances` on itself, which lowers the target by one, so a run
  cancelled without any teardown still shrinks to zero VMs. The worker then exits 0, which the
  systemd unit does not restart (`Restart=on-failure`).
- **One instance template per distinct body**, named `GROUP-<8 hex of sha256(properties)>`.
  An unchanged config finds its template and reuses it (no insert); any change (image, machine,
  GPU, queue URL, kind, ...) hashes to a new name, so templates are immutable as Compute
  Engine wants them, and a group never runs a template that differs from its config. Templates
  are kept after `close()`: they cost nothing, the next run of the same config reuses them,
  and a template still referenced by a MIG elsewhere could not be deleted anyway. Prune old
  ones with `gcloud compute instance-templates list --filter="name~^GROUP-"`.
- **The template**: the machine type; a boot disk from a Deep Learning VM image (NVIDIA
  driver, Docker and the NVIDIA container toolkit; `GPU_BOOT_IMAGE`, whose driver
  `GPU_BOOT_IMAGE_DRIVER` is at least what the GPU image's default CUDA build needs,
  `CUDA_MIN_DRIVER`) for GPU groups,
  Container-Optimized OS (`CPU_BOOT_IMAGE`, Docker built in) for CPU groups, either
  overridable with `gce.boot_image`; the accelerators, with `onHostMaintenance=TERMINATE` as
  GPUs require (they cannot live-migrate); Spot provisioning with
  `instanceTerminationAction=DELETE` (a preempted VM is deleted and the MIG recreates it when
  capacity returns, so no stopped disks linger); the workers' service account with the
  `cloud-platform` scope (access is then governed by IAM roles alone); labels `voxflow-kind`
  and `voxflow-group` (GROUP); metadata holding only the startup and shutdown scripts, never
  a secret (credentials come from the service account through the metadata server).
- **The startup script** writes a systemd unit per worker slot (`voxflow-worker@SLOT`) that
  runs a container: on a GPU VM one per GPU (`--gpus device=SLOT`, worker id `NAME.gpuSLOT`
  when there are several; the autoscaler's target counts workers, a VM holds `slots`, and
  a VM is busy while any of its workers is), on a CPU VM one; with `Restart=on-failure`: a
  worker that crashes, is killed or fails to start is restarted; one that exits 0 is done
  on purpose (its run is over and it left its MIG; no
  `--exit-when-idle` is passed). Its stop is `docker stop --time 25`: the worker releases its
  leases on SIGTERM, within the 30 s a Spot preemption gives. A `shutdown-script` runs the
  same `docker stop`, so preemption, a MIG deleting the VM and a plain shutdown all release
  leases at once. The wrapper refuses to start (exit 1, restarted) if the metadata server
  cannot say whether the VM has a run, rather than serve every run.
- **The MIG** is created in ZONE from the template if missing (target 0, then resized; with
  its `allInstancesConfig`), or reused; when the template changed, `setInstanceTemplate`
  switches it with the default opportunistic update policy: VMs already running keep their
  template (no busy worker is recreated), new ones use the new template. Groups are deleted
  when a stage ends, so a changed config normally meets a group with no VMs at all.
- **`resize(target, busy)`** (stateless: every call reads the MIGs, so any Airflow task may
  open the same group): growing calls `resize` on the MIG. Shrinking first lowers targets
  that no listed VM backs yet, then deletes *idle* VMs with `deleteInstances` (which also
  lowers the target), VMs not yet running first and fallback zones first; VMs whose worker
  holds a lease (`busy`) are never picked, exactly like the local backend: a later autoscaler
  step removes them once idle. A deleted VM's worker still gets SIGTERM (shutdown script),
  so even a race with a lease just taken only redelivers that task. Resizing to 0 (the stage
  drained) is a plain `resize(0)`.
- **Zone spreading on stockouts.** `gce.zones` lists fallback zones of the same region, in
  order: zones = [ZONE] + fallbacks, each with a MIG of the run's name (zonal MIG names are
  per zone; the template is global). On every `resize`, VMs that a zone's MIG keeps failing to
  create with a stockout (`ZONE_RESOURCE_POOL_EXHAUSTED[_WITH_DETAILS]` in the managed
  instance's `lastAttempt` errors) are deleted there and their count is added to the next
  zone's MIG: the shortfall moves down the chain, one zone per autoscaler step. Growth goes to
  the first zone that reported no stockout in this step. The last zone keeps its failing VMs
  (the MIG retries until capacity returns). Nothing moves back: VMs that run stay where they
  run; a later growth tries the primary zone again. Quota errors are not stockouts (quota is
  regional) and are reported by `status()`, not spread. (A regional MIG with a distribution
  policy would spread by itself, but chooses zones on its own; the URL names a zone, and this
  chain keeps every VM in it while it has capacity, with a behaviour the tests pin.)
- **`size()`** is the sum of the MIGs' target sizes (VMs running or starting); `status()`
  gives target vs actually running per zone, with stockouts and other creation errors, for
  operators to report.
- **`close()`** deletes the run's MIGs (which deletes their VMs; each worker gets SIGTERM
  through the shutdown script) and waits for the deletions.
- google-cloud-compute is imported only when a client is first needed, never at import of
  this module (so never at Airflow DAG parse time); tests inject fake clients.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import GceConfig, gce_region, parse_gce_url
from ..geometry import ceil_div

GPU_BOOT_IMAGE = ("projects/deeplearning-platform-release/global/images/family/"
                  "common-cu128-ubuntu-2204-nvidia-570")
# The NVIDIA driver major GPU_BOOT_IMAGE's family ships (its name says so). The GPU image's torch
# must need no newer one, or CUDA fails in the container on every default GPU VM.
GPU_BOOT_IMAGE_DRIVER = 570
# Minimum NVIDIA driver major (Linux) of the CUDA builds of PyTorch wheels, by wheel tag
# (download.pytorch.org/whl/<tag>): the GA driver of each CUDA toolkit in NVIDIA's CUDA Toolkit
# release notes (12.6: 560.28.03, 12.8: 570.26, 13.0: 580.65.06). CUDA 12 minor version
# compatibility may run 12.x on older drivers too; voxflow does not count on it.
CUDA_MIN_DRIVER: dict[str, int] = {"cu126": 560, "cu128": 570, "cu130": 580}
CPU_BOOT_IMAGE = "projects/cos-cloud/global/images/family/cos-stable"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
STOCKOUT_CODES = frozenset({"ZONE_RESOURCE_POOL_EXHAUSTED",
                            "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"})
CREATING = frozenset({"CREATING", "CREATING_WITHOUT_RETRIES", "RECREATING"})
GOING = frozenset({"DELETING", "ABANDONING"})
CONTAINER = "voxflow-worker"
STOP_SECONDS = 25                 # Spot preemption gives 30 s from notice to power-off
OPERATION_TIMEOUT = 600.0
# Compute Engine names are RFC 1035 ([a-z]([-a-z0-9]*[a-z0-9])?): a MIG's name has at most 63
# characters, its baseInstanceName at most 58 (the MIG names each VM baseInstanceName + "-" +
# 4 random characters, and an instance name has at most 63). A per-run MIG name is also its
# base instance name, so it keeps to the smaller limit.
BASE_INSTANCE_NAME_MAX = 58
RUN_HASH_HEX = 8
RUN_METADATA = "voxflow-run"      # instance metadata key: the run a MIG's VMs serve
METADATA_HOST = "metadata.google.internal"
METADATA_TIMEOUT = 1.0            # seconds per metadata request: off GCE, fail fast
_CREATED_BY = re.compile(r"projects/[^/]+/zones/([^/]+)/instanceGroupManagers/([^/]+)")


def _compute():
    from google.cloud import compute_v1
    return compute_v1


def _api_errors():
    from google.api_core import exceptions
    return exceptions


def _last(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _stocked_out(mi) -> bool:
    """A managed instance the MIG keeps failing to create because the zone lacks capacity."""
    if mi.current_action not in CREATING:
        return False
    return any(e.code in STOCKOUT_CODES for e in mi.last_attempt.errors.errors)


def _running(mi) -> bool:
    return mi.current_action == "NONE" and mi.instance_status == "RUNNING"


def mig_name(group: str, run: Optional[str]) -> str:
    """The MIG (and base instance) name of `run`'s workers of GROUP; GROUP itself for None.

    GROUP is cut so the name fits a base instance name; the hash covers the whole GROUP too,
    so two long GROUPs that cut alike still get distinct MIGs for one run."""
    if run is None:
        return group
    digest = hashlib.sha256(f"{group}\n{run}".encode()).hexdigest()[:RUN_HASH_HEX]
    return f"{group[:BASE_INSTANCE_NAME_MAX - 1 - RUN_HASH_HEX]}-{digest}"


@dataclass
class ZoneStatus:
    zone: str
    target: int
    running: int
    starting: int
    out_of_stock: int
    errors: list[str] = field(default_factory=list)


@dataclass
class GroupStatus:
    """Target vs actual: `target` VMs asked for, `running` of them up and serving."""

    target: int
    running: int
    zones: list[ZoneStatus]

    def __str__(self) -> str:
        parts = [f"{z.zone} {z.running}/{z.target}"
                 + (f" ({z.out_of_stock} out of stock)" if z.out_of_stock else "")
                 for z in self.zones if z.target or z.running]
        return f"{self.running} of {self.target} running" + (
            f": {', '.join(parts)}" if parts else "")


@dataclass
class _Zone:
    zone: str
    mig: Any = None                                  # compute_v1.InstanceGroupManager
    instances: list = field(default_factory=list)    # compute_v1.ManagedInstance

    @property
    def target(self) -> int:
        return int(self.mig.target_size) if self.mig is not None else 0

    @property
    def live(self) -> list:
        return [mi for mi in self.instances if mi.current_action not in GOING]


class GceGroup:
    """A WorkerGroup of Compute Engine VMs: `run`'s MIG of GROUP `group` in `zone` (+ fallback
    zones); `name` is the MIG's name (`mig_name`), `group` names the shared templates."""

    def __init__(self, project: str, zone: str, group: str, queue_url: str, kind: str,
                 gce: GceConfig, lease_seconds: Optional[float] = None, *,
                 run: Optional[str] = None, threads: Optional[int] = None,
                 templates_client: Any = None,
                 managers_client: Any = None, operation_timeout: float = OPERATION_TIMEOUT):
        self.project, self.zone, self.group, self.run = project, zone, group, run
        self.name = mig_name(group, run)
        self.queue_url, self.kind, self.gce = queue_url, kind, gce
        self.lease_seconds = lease_seconds
        self.threads = threads
        self.zones = [zone] + [z for z in gce.zones if z != zone]
        self.operation_timeout = operation_timeout
        self._templates = templates_client
        self._managers = managers_client
        self._template_ready: Optional[str] = None

    @classmethod
    def from_url(cls, url: str, queue_url: str, kind: str, gce: GceConfig,
                 **kwargs) -> "GceGroup":
        project, zone, group = parse_gce_url(url)
        return cls(project, zone, group, queue_url, kind, gce, **kwargs)

    # -- clients (lazy) ---------------------------------------------------------------------

    @property
    def templates(self):
        if self._templates is None:
            self._templates = _compute().InstanceTemplatesClient()
        return self._templates

    @property
    def managers(self):
        if self._managers is None:
            self._managers = _compute().InstanceGroupManagersClient()
        return self._managers

    def _wait(self, operations: list) -> None:
        """Wait for operations (ExtendedOperation); a failed one raises its API error."""
        for op in operations:
            op.result(timeout=self.operation_timeout)

    # -- the template -----------------------------------------------------------------------

    @property
    def gpu(self) -> bool:
        return bool(self.gce.accelerator_type)

    @property
    def slots(self) -> int:
        """Workers per VM: one per GPU (each container sees its own), one on a CPU VM."""
        return self.gce.accelerator_count if self.gpu else 1

    def worker_command(self) -> list[str]:
        """The container's command, without the worker id (the VM's name) and the run (its
        MIG's `voxflow-run` metadata): both are read at boot, so the template is shared."""
        cmd = ["voxflow", "worker", self.queue_url, "--kind", self.kind]
        if self.lease_seconds:
            cmd += ["--lease-seconds", f"{self.lease_seconds:g}"]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        return cmd + ["--leave-group"]

    def startup_script(self) -> str:
        """One systemd unit per worker slot (`voxflow-worker@SLOT`): on a VM with N GPUs, N
        containers, each given GPU SLOT alone and named `NAME.gpuSLOT` (one worker: NAME)."""
        image = shlex.quote(self.gce.image)
        gpus = '--gpus "device=$slot" ' if self.gpu else ""
        worker_id = '"$name.gpu$slot"' if self.slots > 1 else '"$name"'
        units = " ".join(f"{CONTAINER}@{i}.service" for i in range(self.slots))
        command = " ".join(shlex.quote(a) for a in self.worker_command())
        wait_gpu = ("# The Deep Learning VM image may install the NVIDIA driver on first boot.\n"
                    "until nvidia-smi >/dev/null 2>&1; do sleep 5; done\n") if self.gpu else ""
        return f"""#!/bin/bash
# voxflow {self.kind} worker VM of gce://{self.project}/{self.zone}/{self.group}.
# No secrets here: the worker authenticates as the VM's service account.
export HOME=/var/lib/voxflow
mkdir -p "$HOME"
registry={image}
registry="${{registry%%/*}}"
case "$registry" in
  *.pkg.dev|gcr.io|*.gcr.io)
    if command -v docker-credential-gcr >/dev/null; then
      docker-credential-gcr configure-docker --registries="$registry"
    else
      gcloud auth configure-docker "$registry" --quiet
    fi ;;
esac
cat > "$HOME/run-worker.sh" <<'VOXFLOW_WORKER'
#!/bin/bash
slot=${{1:-0}}
{wait_gpu}metadata=http://{METADATA_HOST}/computeMetadata/v1/instance
name=$(curl -sf -H 'Metadata-Flavor: Google' "$metadata/name" || hostname -s)
# The run this VM's MIG serves; curl's 22 is HTTP 404: a group that is not per run.
run=$(curl -sf --retry 5 --retry-connrefused -H 'Metadata-Flavor: Google' \\
  "$metadata/attributes/{RUN_METADATA}")
case $? in 0|22) ;; *) echo "metadata server unreachable" >&2; exit 1 ;; esac
exec docker run --rm --name {CONTAINER}-$slot {gpus}{image} {command} \\
  --worker-id {worker_id} ${{run:+--run "$run"}}
VOXFLOW_WORKER
cat > /etc/systemd/system/{CONTAINER}@.service <<'VOXFLOW_UNIT'
[Unit]
Description=voxflow worker %i
Requires=docker.service
After=docker.service network-online.target
StartLimitIntervalSec=0

[Service]
Environment=HOME=/var/lib/voxflow
ExecStartPre=-/usr/bin/docker rm -f {CONTAINER}-%i
ExecStart=/bin/bash /var/lib/voxflow/run-worker.sh %i
ExecStop=/usr/bin/docker stop --time {STOP_SECONDS} {CONTAINER}-%i
TimeoutStopSec={STOP_SECONDS + 5}
# Exit 0: the run is over and the VM left its group. Crashes and kills restart.
Restart=on-failure
RestartSec=10

[Install]
WantedBy=multi-user.target
VOXFLOW_UNIT
systemctl daemon-reload
systemctl enable --now {units}
"""

    def shutdown_script(self) -> str:
        names = " ".join(f"{CONTAINER}-{i}" for i in range(self.slots))
        return (f"#!/bin/bash\n# Spot preemption or deletion: SIGTERM, the workers release "
                f"their leases.\ndocker stop --time {STOP_SECONDS} {names} || true\n")

    def _network(self, value: str, scope: str) -> str:
        if value.startswith(("projects/", "https://")):
            return value
        if "/" not in value:
            value = f"{scope}/{value}"
        return f"projects/{self.project}/{value}"

    def template_properties(self):
        """The instance template's body (`compute_v1.InstanceProperties`)."""
        c, g = _compute(), self.gce
        boot = g.boot_image or (GPU_BOOT_IMAGE if self.gpu else CPU_BOOT_IMAGE)
        nic = c.NetworkInterface(network=self._network(g.network, "global/networks"))
        if g.subnetwork:
            nic.subnetwork = self._network(
                g.subnetwork, f"regions/{gce_region(self.zone)}/subnetworks")
        if g.external_ip:
            nic.access_configs = [c.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
        scheduling = c.Scheduling()
        if g.spot:
            scheduling.provisioning_model = "SPOT"
            scheduling.instance_termination_action = "DELETE"
            scheduling.automatic_restart = False
        if self.gpu or g.spot:
            scheduling.on_host_maintenance = "TERMINATE"
        metadata = [("startup-script", self.startup_script()),
                    ("shutdown-script", self.shutdown_script()),
                    ("google-logging-enabled", "true")]
        if self.gpu:
            metadata.append(("install-nvidia-driver", "True"))
        props = c.InstanceProperties(
            machine_type=g.machine_type,
            disks=[c.AttachedDisk(boot=True, auto_delete=True, type_="PERSISTENT",
                                  initialize_params=c.AttachedDiskInitializeParams(
                                      source_image=boot, disk_size_gb=g.disk_gb,
                                      disk_type="pd-balanced"))],
            network_interfaces=[nic],
            scheduling=scheduling,
            service_accounts=[c.ServiceAccount(email=g.service_account or "default",
                                               scopes=[SCOPE])],
            labels={"voxflow-kind": self.kind, "voxflow-group": self.group},
            metadata=c.Metadata(items=[c.Items(key=k, value=v) for k, v in metadata]),
        )
        if self.gpu:
            props.guest_accelerators = [c.AcceleratorConfig(
                accelerator_type=g.accelerator_type, accelerator_count=g.accelerator_count)]
        return props

    def template_name(self) -> str:
        body = _compute().InstanceProperties.to_json(self.template_properties(),
                                                     sort_keys=True, indent=0)
        return f"{self.group}-{hashlib.sha256(body.encode()).hexdigest()[:8]}"

    def ensure_template(self) -> str:
        """The template's name; inserted unless a template of that name (body) exists."""
        if self._template_ready:
            return self._template_ready
        c, errors = _compute(), _api_errors()
        name = self.template_name()
        try:
            self.templates.get(request=c.GetInstanceTemplateRequest(
                project=self.project, instance_template=name))
        except errors.NotFound:
            template = c.InstanceTemplate(
                name=name, properties=self.template_properties(),
                description=f"voxflow {self.kind} workers of gce://{self.project}/"
                            f"{self.zone}/{self.group}")
            try:
                self._wait([self.templates.insert(request=c.InsertInstanceTemplateRequest(
                    project=self.project, instance_template_resource=template))])
            except errors.Conflict:
                pass                              # another task inserted the same body
        self._template_ready = name
        return name

    def _template_link(self, name: str) -> str:
        return f"projects/{self.project}/global/instanceTemplates/{name}"

    # -- the MIGs ---------------------------------------------------------------------------

    def _get(self, zone: str):
        c, errors = _compute(), _api_errors()
        try:
            return self.managers.get(request=c.GetInstanceGroupManagerRequest(
                project=self.project, zone=zone, instance_group_manager=self.name))
        except errors.NotFound:
            return None

    def _read(self) -> list[_Zone]:
        c, out = _compute(), []
        for zone in self.zones:
            state = _Zone(zone, self._get(zone))
            if state.mig is not None:
                state.instances = list(self.managers.list_managed_instances(
                    request=c.ListManagedInstancesInstanceGroupManagersRequest(
                        project=self.project, zone=zone, instance_group_manager=self.name)))
            out.append(state)
        return out

    def _create(self, zone: str, template: str) -> None:
        c, errors = _compute(), _api_errors()
        mig = c.InstanceGroupManager(
            name=self.name, base_instance_name=self.name,
            instance_template=self._template_link(template), target_size=0,
            update_policy=c.InstanceGroupManagerUpdatePolicy(type_="OPPORTUNISTIC"),
            description=f"voxflow {self.kind} workers of gce://{self.project}/{self.zone}/"
                        f"{self.group}" + (f" for run {self.run}" if self.run else ""))
        if self.run is not None:
            mig.all_instances_config = c.InstanceGroupManagerAllInstancesConfig(
                properties=c.InstancePropertiesPatch(metadata={RUN_METADATA: self.run}))
        try:
            self._wait([self.managers.insert(request=c.InsertInstanceGroupManagerRequest(
                project=self.project, zone=zone, instance_group_manager_resource=mig))])
        except errors.Conflict:
            pass                                  # created meanwhile by another task

    def _set_template(self, zone: str, template: str):
        c = _compute()
        return self.managers.set_instance_template(
            request=c.SetInstanceTemplateInstanceGroupManagerRequest(
                project=self.project, zone=zone, instance_group_manager=self.name,
                instance_group_managers_set_instance_template_request_resource=(
                    c.InstanceGroupManagersSetInstanceTemplateRequest(
                        instance_template=self._template_link(template)))))

    def _resize(self, zone: str, size: int):
        c = _compute()
        return self.managers.resize(request=c.ResizeInstanceGroupManagerRequest(
            project=self.project, zone=zone, instance_group_manager=self.name, size=size))

    def _delete_instances(self, zone: str, instances: list):
        c = _compute()
        return self.managers.delete_instances(
            request=c.DeleteInstancesInstanceGroupManagerRequest(
                project=self.project, zone=zone, instance_group_manager=self.name,
                instance_group_managers_delete_instances_request_resource=(
                    c.InstanceGroupManagersDeleteInstancesRequest(
                        instances=[mi.instance for mi in instances],
                        skip_instances_on_validation_error=True))))

    # -- WorkerGroup ------------------------------------------------------------------------

    def size(self) -> int:
        """Workers asked for: the MIGs' target sizes (VMs running or starting) x slots."""
        vms = sum(int(m.target_size) for m in map(self._get, self.zones) if m is not None)
        return vms * self.slots

    def status(self) -> GroupStatus:
        """Target vs actual, per zone, with stockouts and other creation errors."""
        zones = []
        for z in self._read():
            errors = sorted({f"{e.code}: {e.message}" for mi in z.live
                             if mi.current_action in CREATING
                             for e in mi.last_attempt.errors.errors})
            zones.append(ZoneStatus(
                zone=z.zone, target=z.target, running=sum(map(_running, z.live)),
                starting=sum(mi.current_action in CREATING for mi in z.live),
                out_of_stock=sum(map(_stocked_out, z.live)), errors=errors))
        return GroupStatus(sum(z.target for z in zones), sum(z.running for z in zones), zones)

    def resize(self, target: int, busy: set[str]) -> None:
        """Grow to `target` workers' VMs (a VM holds `slots`), or shrink by deleting idle
        ones (a VM is busy while any of its workers is); move stockouts on."""
        target = ceil_div(max(0, int(target)), self.slots)
        busy = {b.split(".gpu", 1)[0] for b in busy}        # worker NAME.gpuSLOT -> VM NAME
        zones = self._read()
        if target == 0:                                  # drained: nothing is busy
            self._wait([self._resize(z.zone, 0) for z in zones if z.target])
            return
        template = self.ensure_template()
        ops = [self._set_template(z.zone, template) for z in zones
               if z.mig is not None and _last(z.mig.instance_template) != template]
        want = {z.zone: z.target for z in zones}
        doomed: dict[str, list] = {z.zone: [] for z in zones}
        out_of_stock = set()
        for i, z in enumerate(zones):                    # 1. stockouts move down the chain
            stuck = [mi for mi in z.live if _stocked_out(mi)]
            if stuck:
                out_of_stock.add(z.zone)
            if stuck and i + 1 < len(zones):
                doomed[z.zone] += stuck
                want[z.zone] -= len(stuck)
                want[zones[i + 1].zone] += len(stuck)
        total = sum(want.values())
        if target > total:                               # 2. grow where there was stock
            first = next((z.zone for z in zones if z.zone not in out_of_stock),
                         zones[-1].zone)
            want[first] += target - total
        elif target < total:                             # 3. shrink
            excess = total - target
            for z in reversed(zones):                    # a. targets no listed VM backs
                unbacked = want[z.zone] - (len(z.live) - len(doomed[z.zone]))
                cut = min(max(unbacked, 0), excess)
                want[z.zone] -= cut
                excess -= cut
            order = {z.zone: i for i, z in enumerate(zones)}
            gone = {mi.name for mis in doomed.values() for mi in mis}
            idle = sorted(((z.zone, mi) for z in zones for mi in z.live
                           if mi.name not in gone and mi.name not in busy),
                          key=lambda t: (_running(t[1]), -order[t[0]], t[1].name))
            for zone, mi in idle[:excess]:               # b. idle VMs, not running first
                doomed[zone].append(mi)
                want[zone] -= 1
        for z in zones:
            if doomed[z.zone]:
                ops.append(self._delete_instances(z.zone, doomed[z.zone]))
            if want[z.zone] != z.target - len(doomed[z.zone]):
                if z.mig is None:
                    self._create(z.zone, template)
                ops.append(self._resize(z.zone, want[z.zone]))
        self._wait(ops)

    def close(self) -> None:
        """Delete this run's MIGs (their VMs get SIGTERM through the shutdown script);
        templates are kept for the next run."""
        c, errors = _compute(), _api_errors()
        ops = []
        for zone in self.zones:
            try:
                ops.append(self.managers.delete(request=c.DeleteInstanceGroupManagerRequest(
                    project=self.project, zone=zone, instance_group_manager=self.name)))
            except errors.NotFound:
                pass
        self._wait(ops)


def _metadata_root() -> str:
    """The metadata server's base URL; GCE_METADATA_HOST (or the older GCE_METADATA_ROOT)
    overrides the host as in google-auth."""
    host = (os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_ROOT")
            or METADATA_HOST)
    return f"http://{host}/computeMetadata/v1/"


def leave_group(metadata_url: Optional[str] = None, managers_client: Any = None) -> bool:
    """Delete this VM from its MIG: what a worker does once its run is over.

    `deleteInstances` also lowers the MIG's target by one, so when every VM of a finished or
    cancelled run does this the group is at zero and stops costing money even if no teardown
    runs. The VM, its name and its MIG (the `created-by` attribute Compute Engine sets on MIG
    members) come from the metadata server at `metadata_url`, a base URL ending in "/"
    (default: `_metadata_root()`).
    Returns False, quickly and without raising, when there is no metadata server (not a
    Compute Engine VM) or the VM is in no zonal MIG; API errors (say a missing
    `compute.instanceGroupManagers.update` permission) raise. The operation is not waited
    for: it is DONE once the deletion is scheduled, and polling would need another
    permission (`compute.zoneOperations.get`).
    """
    root = metadata_url or _metadata_root()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never a proxy

    def read(path: str) -> str:
        request = urllib.request.Request(root + path, headers={"Metadata-Flavor": "Google"})
        with opener.open(request, timeout=METADATA_TIMEOUT) as response:
            return response.read().decode()

    try:
        name = read("instance/name")
        created_by = read("instance/attributes/created-by")   # 404: in no MIG
        project = read("project/project-id")
    except (OSError, ValueError):        # URLError, HTTPError, timeouts; a malformed host
        return False
    member = _CREATED_BY.fullmatch(created_by.strip())
    if member is None:                   # a regional MIG: voxflow creates none
        return False
    zone, mig = member.groups()
    c = _compute()
    managers = managers_client or c.InstanceGroupManagersClient()
    managers.delete_instances(request=c.DeleteInstancesInstanceGroupManagerRequest(
        project=project, zone=zone, instance_group_manager=mig,
        instance_group_managers_delete_instances_request_resource=(
            c.InstanceGroupManagersDeleteInstancesRequest(
                instances=[f"zones/{zone}/instances/{name}"],
                skip_instances_on_validation_error=True))))   # already being deleted: fine
    return True
