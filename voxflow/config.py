"""The run config: one pydantic model, the single source of truth for every interface.

The CLI, YAML files, the Airflow trigger form and the docs all come from `RunConfig`. Checks that
need no I/O live here; checks that read the input layer or load the model live in
`voxflow.pipeline.plan`, which runs before anything is written. Every refusal is a
`ConfigError` whose text starts with the field's dotted name.
"""
from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from .augment import TRANSFORMS
from .groups.local import local_capacity
from .postprocess import OPS, OpError

Size3 = Annotated[list[PositiveInt], Field(min_length=3, max_length=3)]
NonNeg3 = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=3, max_length=3)]
Int3 = Annotated[list[int], Field(min_length=3, max_length=3)]


class ConfigError(ValueError):
    """A refused config value; `str()` is one line that starts with the field name."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """Resolve a local path against the config file's folder; leave remote URLs alone."""
    base = Path((info.context or {}).get("base_dir") or os.getcwd())
    if "://" in value and not value.startswith("file://"):
        return value
    local = value[len("file://"):] if value.startswith("file://") else value
    return str((base / os.path.expanduser(local)).resolve())


READ_SCHEMES = ("file", "gs", "s3", "http", "https")    # cloud-volume reads these
WRITE_SCHEMES = ("file", "gs", "s3")                    # ... and writes these


def _as_layer_url(value: str, info: ValidationInfo, schemes=WRITE_SCHEMES) -> str:
    """A layer's URL: a local path becomes file://; a remote scheme must be one voxflow
    reads (inputs) or writes (the rest), refused here rather than by a library later."""
    if not value.strip():
        raise ValueError("must not be empty")
    if "://" in value and not value.startswith("file://"):
        scheme = value.removeprefix("precomputed://").split("://", 1)[0]
        if scheme not in schemes:
            raise ValueError(f"{value}: unsupported scheme {scheme}:// (use "
                             f"{', '.join(s + '://' for s in schemes)}, or a local path)")
        return value.rstrip("/")
    return "file://" + _resolve_path(value, info)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BBox(_Section):
    """A half-open voxel box at the run's mip, x, y, z."""

    start: Int3 = Field(description="First voxel, x y z (inclusive).")
    stop: Int3 = Field(description="End voxel, x y z (exclusive).")

    @model_validator(mode="after")
    def _non_empty(self) -> "BBox":
        if any(b <= a for a, b in zip(self.start, self.stop)):
            raise ValueError(f"stop {self.stop} must exceed start {self.start} on every axis")
        return self


class Normalize(_Section):
    """Input normalisation: integer images are first scaled to [0, 1] by their dtype's maximum."""

    mean: float = Field(0.0, description="Subtracted after scaling to [0, 1].")
    std: float = Field(1.0, gt=0, description="Divides after subtracting the mean.")


class ModelConfig(_Section):
    """The ConvNet and how it sees its input."""

    path: str = Field(description="A torch.export program (.pt2), a TorchScript file (.pt, .ts, "
                                  ".jit), or a Python file (.py) defining an nn.Module.")
    weights: Optional[str] = Field(None, description="Weights for a .py model: .safetensors, "
                                   "or a torch state dict loaded with weights_only=True.")
    entry: Optional[str] = Field(None, description="For a .py model: the class or factory "
                                 "called with no arguments. Default: build_model, else the "
                                 "file's only public nn.Module subclass.")
    input_patch: Size3 = Field(description="Patch the model reads, x y z.")
    output_patch: Optional[Size3] = Field(None, description="Centre of the patch the model's "
                                          "output covers, x y z. Default: input_patch.")
    output_channels: PositiveInt = Field(description="Channels the model outputs.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast precision on CUDA; the CPU always runs fp32.")
    compile: bool = Field(False, description="torch.compile the model (.py or .pt2) for the "
                          "run's batch size, Inductor's kernels cached per model digest "
                          "under $VOXFLOW_HOME/compile (a worker's first forward pays the "
                          "compile, logged as model_loaded compile_seconds; later starts "
                          "reuse it); shorter batches are padded.")
    cudnn_benchmark: bool = Field(False, description="On CUDA, let cuDNN time its conv "
                                  "algorithms and keep the fastest (torch.backends.cudnn."
                                  "benchmark): faster, but the choice may differ between "
                                  "workers, so outputs are no longer bit-identical across "
                                  "workers and reruns.")
    normalize: Normalize = Field(default_factory=Normalize)

    @field_validator("path", "weights")
    @classmethod
    def _resolve(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        return None if value is None else _resolve_path(value, info)

    @model_validator(mode="after")
    def _patches(self) -> "ModelConfig":
        if self.output_patch is None:
            self.output_patch = list(self.input_patch)
        for axis, i, o in zip("xyz", self.input_patch, self.output_patch):
            if o > i:
                raise ConfigError("model.output_patch",
                                  f"{self.output_patch} is larger than input_patch "
                                  f"{self.input_patch} along {axis}")
            if (i - o) % 2:
                raise ConfigError("model.output_patch",
                                  f"input_patch - output_patch must be even along {axis} "
                                  "(the output is the input patch's centre)")
        return self

    @property
    def patch_margin(self) -> list[int]:
        """Voxels the model's output lacks on each side of its input patch."""
        return [(i - o) // 2 for i, o in zip(self.input_patch, self.output_patch)]


class InferenceConfig(_Section):
    """How the volume is cut into chunks and patches."""

    chunk: Size3 = Field([1536, 1536, 192], description="Output chunk per task, x y z; a "
                         "multiple of storage_chunk. In overlap mode the nominal size: a "
                         "task is a block of whole lattice patches cut near it. The default "
                         "keeps overlap mode's temporary bytes under a quarter of the "
                         "output's for patches up to 256x256x20 (docs/blending.md).")
    margin: Optional[NonNeg3] = Field(None, description="Context read around each chunk in "
                                      "crop mode, x y z. Default: patch_overlap plus the "
                                      "model's patch margin.")
    patch_overlap: Optional[NonNeg3] = Field(None, description="Overlap of neighbouring "
                                             "output patches, x y z. Default: a quarter of "
                                             "the output patch.")
    blend: Literal["crop", "overlap"] = Field(
        "overlap", description="overlap: one patch lattice over the whole bbox, each patch "
        "computed once; where chunks meet, partial sums go to temporary storage and the "
        "blend stage adds them, so the output equals one pass over the whole volume. crop: "
        "each chunk reads context and crops it (chunkflow's way; no blend stage).")
    temporary: Optional[str] = Field(None, description="Overlap mode: where partial sums "
                                     "wait for the blend stage (file://, gs:// or a local "
                                     "path), one folder per run; the segmentation's passes "
                                     "keep their objects there too. Default: the output's "
                                     "path + '.voxflow-tmp', beside the output layer.")
    keep_temporary: bool = Field(False, description="Keep the partial sums (overlap mode) "
                                 "and the segmentation's objects after the run succeeds (for "
                                 "debugging); by default they are deleted.")
    weighting: Literal["bump", "gaussian"] = Field("bump", description="Patch weights used "
                                                   "to blend overlapping patches.")
    batch_size: Union[PositiveInt, Literal["auto"]] = Field(4, description="Patches per "
                                                            "forward pass (with augment, "
                                                            "each orientation of a patch "
                                                            "counts as one). auto: on CUDA "
                                                            "the largest power of two whose "
                                                            "activations fit 60% of the "
                                                            "device's memory (one probe "
                                                            "forward; the same on every "
                                                            "worker of one GPU type), on "
                                                            "the CPU 4.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when "
                                                   "available.")
    pad: Literal["zeros", "mirror"] = Field("zeros", description="What is read outside the "
                                            "input volume.")

    @field_validator("temporary")
    @classmethod
    def _temporary_url(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        return None if value is None else _as_layer_url(value, info)


class DownsampleConfig(_Section):
    """The mip pyramid built over the output."""

    mips: Annotated[int, Field(ge=0, le=16)] = Field(2, description="Mips to add; 0: none.")
    factor: Size3 = Field([2, 2, 1], description="Per-mip factor, x y z: [2, 2, 1] or "
                          "[2, 2, 2].")
    memory_target: PositiveInt = Field(1 << 30, description="Bytes a downsample task may "
                                       "hold; sizes the tasks.")

    @field_validator("factor")
    @classmethod
    def _factor(cls, value: list[int]) -> list[int]:
        if value not in ([2, 2, 1], [2, 2, 2]):
            raise ValueError(f"{value} is not one of [2, 2, 1], [2, 2, 2]")
        return value


def voxflow_home() -> Path:
    """Where embedded defaults live (the queue file, worker logs): $VOXFLOW_HOME or ~/.voxflow."""
    return Path(os.environ.get("VOXFLOW_HOME") or Path.home() / ".voxflow").resolve()


def _string_means(key: str):
    """A section that may be written as one string: `queue: sqlite:///q.db` means
    `queue: {url: sqlite:///q.db}`."""
    def shorthand(cls, value: Any) -> Any:
        return {key: value} if isinstance(value, str) else value
    return model_validator(mode="before")(classmethod(shorthand))


class QueueConfig(_Section):
    """The task queue every stage's messages go through."""

    url: str = Field(default_factory=lambda: f"sqlite://{voxflow_home() / 'queue.db'}",
                     description="sqlite:///abs/path/queue.db, or sqlite://rel/queue.db "
                     "relative to the config's folder (embedded default: "
                     "$VOXFLOW_HOME/queue.db, shared by runs); or "
                     "pubsub://PROJECT/PREFIX?ledger=gs://bucket/path: Google Cloud Pub/Sub "
                     "topics PREFIX-… plus a run ledger (parameters, done markers, dead "
                     "letters) under the ledger URL.")
    lease_seconds: float = Field(60.0, gt=0, description="Visibility timeout of a pulled "
                                 "task; workers extend it while they work.")
    max_attempts: PositiveInt = Field(3, description="Deliveries before a task goes to dead "
                                      "letters with its last error.")
    retention_seconds: Annotated[int, Field(ge=600, le=604_800)] = Field(
        604_800, description="Pub/Sub: how long a subscription keeps an unacknowledged "
        "message (10 minutes to Pub/Sub's maximum, 7 days). A stage open longer is "
        "republished (tasks neither done nor dead) before its messages may expire.")
    driver_timeout_seconds: Annotated[float, Field(gt=0)] = Field(
        300.0, description="Workers give a run up (drop its tasks; local and gce groups "
        "shrink to zero by themselves) once its driver — `voxflow run`, or the Airflow "
        "DAG's tasks and triggers — has not heart-beaten for this long, or at once when "
        "the run is cancelled or failed.")

    _shorthand = _string_means("url")

    @field_validator("url")
    @classmethod
    def _queue_url(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("sqlite://") and len(value) > len("sqlite://"):
            return "sqlite://" + _resolve_path(value[len("sqlite://"):], info)
        if value.startswith("pubsub://"):
            from .queues.pubsub import PubSubURL            # no client import: parsing only
            where = PubSubURL.parse(value)
            ledger = _as_layer_url(where.ledger, info)      # a local path: relative to config
            return f"pubsub://{where.project}/{where.prefix}?ledger={ledger}"
        raise ValueError(f"{value!r} is not a known queue URL (sqlite:///path/queue.db or "
                         "pubsub://PROJECT/PREFIX?ledger=gs://bucket/path)")


_GCE_PROJECT = re.compile(r"(?:[a-z][-a-z0-9.]*\.[a-z]{2,}:)?[a-z][-a-z0-9]{4,28}[a-z0-9]")
_GCE_ZONE = re.compile(r"[a-z]+(?:-[a-z]+)*[0-9]+-[a-z]")
_GCE_GROUP = re.compile(r"[a-z](?:[-a-z0-9]{0,52}[a-z0-9])?")
_GCE_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
# The zone of the gce:// URL whose `gce` section is being validated (zones are checked
# against its region; a nested model cannot see its parent's fields otherwise).
_GCE_GROUP_ZONE: ContextVar[Optional[str]] = ContextVar("voxflow_gce_group_zone", default=None)


def parse_gce_url(url: str) -> tuple[str, str, str]:
    """(project, zone, group) of `gce://PROJECT/ZONE/GROUP`; ValueError naming the bad part."""
    parts = url[len("gce://"):].split("/") if url.startswith("gce://") else []
    if len(parts) != 3:
        raise ValueError(f"{url!r} is not gce://PROJECT/ZONE/GROUP")
    project, zone, group = parts
    if not _GCE_PROJECT.fullmatch(project):
        raise ValueError(f"{url!r}: {project!r} is not a project id (6 to 30 lowercase "
                         "letters, digits and hyphens, starting with a letter)")
    if not _GCE_ZONE.fullmatch(zone):
        raise ValueError(f"{url!r}: {zone!r} is not a zone like us-central1-a")
    if not _GCE_GROUP.fullmatch(group):
        raise ValueError(f"{url!r}: {group!r} is not a group name (RFC 1035: lowercase "
                         "letters, digits and hyphens, starting with a letter, at most 54 "
                         "characters: instance template names add 9)")
    return project, zone, group


def gce_region(zone: str) -> str:
    """The region of a zone: us-central1-a -> us-central1."""
    return zone.rsplit("-", 1)[0]


class GceConfig(_Section):
    """Compute Engine settings of a gce://PROJECT/ZONE/GROUP group: a managed instance group
    of (Spot) VMs, each running the worker container (voxflow/groups/gce.py)."""

    image: str = Field(description="Worker container image each VM runs `voxflow worker` "
                       "in, e.g. us-docker.pkg.dev/PROJECT/REPO/voxflow-gpu:TAG; required "
                       "for a gce:// group.")
    machine_type: str = Field("n1-standard-8", description="Machine type of each VM.")
    accelerator_type: Optional[str] = Field(None, description="GPU attached to each VM, e.g. "
                                            "nvidia-tesla-t4 (N1 machine types) or nvidia-l4 "
                                            "(g2-standard-*); unset: a CPU group.")
    accelerator_count: PositiveInt = Field(1, description="GPUs per VM; used only with "
                                           "accelerator_type.")
    boot_image: Optional[str] = Field(None, description="Boot disk image or image family "
                                      "URL. Default: GPU groups a Deep Learning VM image "
                                      "(NVIDIA driver, Docker, NVIDIA container toolkit); "
                                      "CPU groups Container-Optimized OS (cos-stable).")
    disk_gb: Annotated[int, Field(ge=10)] = Field(100, description="Boot disk size, GB (it "
                                                  "holds the container image).")
    spot: bool = Field(True, description="Spot VMs, deleted on preemption and recreated by "
                       "the group when capacity returns; false: standard VMs.")
    zones: list[str] = Field([], description="Fallback zones, in order, in the region of "
                             "the URL's zone: while a zone is out of stock (machine type or "
                             "GPU), the VMs it cannot start go to a group of the same name "
                             "in the next zone.")
    service_account: Optional[str] = Field(None, description="Service account (email) the "
                                           "VMs run as, with the cloud-platform scope; it "
                                           "needs access to the queue and the volumes. "
                                           "Default: the project's default compute service "
                                           "account.")
    network: str = Field("global/networks/default", description="VPC network of the VMs.")
    subnetwork: Optional[str] = Field(None, description="Subnetwork, e.g. "
                                      "regions/us-central1/subnetworks/NAME (custom-mode "
                                      "networks need one).")
    external_ip: bool = Field(True, description="An ephemeral external IP per VM (to pull "
                              "the image and reach Google APIs); false needs Cloud NAT or "
                              "Private Google Access on the subnetwork.")

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not a container image reference")
        return value

    @field_validator("machine_type", "accelerator_type")
    @classmethod
    def _resource_name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _GCE_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a Compute Engine type name")
        return value

    @field_validator("service_account")
    @classmethod
    def _email(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[a-z]+", value):
            raise ValueError(f"{value!r} is not a service account email")
        return value

    @field_validator("zones")
    @classmethod
    def _zones(cls, value: list[str]) -> list[str]:
        for zone in value:
            if not _GCE_ZONE.fullmatch(zone):
                raise ValueError(f"{zone!r} is not a zone like us-central1-b")
        if len(set(value)) < len(value):
            raise ValueError(f"{value} names a zone twice")
        primary = _GCE_GROUP_ZONE.get()
        for zone in value if primary else ():
            if zone == primary:
                raise ValueError(f"{zone!r} is the group's own zone")
            if gce_region(zone) != gce_region(primary):
                raise ValueError(f"{zone!r} is not in region {gce_region(primary)} of the "
                                 f"group's zone {primary} (subnetworks and GPU quotas are "
                                 "regional)")
        return value


class GroupConfig(_Section):
    """A worker group and how the autoscaler sizes it."""

    group: Union[str, list[str]] = Field(
        "local://1",
        description=("local://N: up to N worker processes on this machine; local://auto: one per"
                     " GPU here (each its own CUDA_VISIBLE_DEVICES), or one with every core on a"
                     " machine without GPUs; local://0: the driver works the queue itself; "
                     "gce://PROJECT/ZONE/GROUP: a Compute Engine managed instance group named "
                     "GROUP (needs max and the gce section); external://: workers started "
                     "elsewhere (compose services, Kubernetes, a cluster's jobs) serve the "
                     "queue, voxflow only waits. A list of local:// and one gce:// group, e.g. "
                     "[local://auto, gce://P/Z/G], is one hybrid group: the autoscaler fills its"
                     " members in order and empties them from the end (the lab's own GPUs first,"
                     " Spot VMs for the rest of the backlog); it needs a queue every member "
                     "reaches (Pub/Sub)."))
    min: Annotated[int, Field(ge=0)] = Field(0, description="Fewest workers while the stage "
                                             "has work.")
    max: Optional[Annotated[int, Field(ge=0)]] = Field(None, validate_default=True,
                                                       description="Most workers. "
                                                       "Default: N of local://N, the "
                                                       "GPUs here for local://auto; "
                                                       "required for gce:// groups.")
    tasks_per_worker: PositiveInt = Field(4, description="Backlog per worker the autoscaler "
                                          "aims for.")
    threads: Optional[PositiveInt] = Field(None, description="Torch threads per worker. "
                                           "Default: a local group splits this machine's "
                                           "cores between its most workers; a VM's worker "
                                           "uses all of its cores.")
    gce: Optional[GceConfig] = Field(None, validate_default=True, description="Compute "
                                     "Engine settings of a gce:// group (required there; "
                                     "local:// groups ignore it).")

    _shorthand = _string_means("group")

    @property
    def urls(self) -> list[str]:
        """The group's URLs: one, or a hybrid group's members in the order they fill."""
        return [self.group] if isinstance(self.group, str) else list(self.group)

    @field_validator("group")
    @classmethod
    def _group_url(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(value, str):
            return _group_member(value)
        if len(value) < 2:
            raise ValueError("a list names two or more groups (a hybrid group)")
        for url in value:
            if _group_member(url) in ("local://0", "external://"):
                raise ValueError(f"{url!r} cannot be part of a hybrid group")
        if sum(u.startswith("gce://") for u in value) > 1 or len(set(value)) < len(value):
            raise ValueError("a hybrid group has distinct members, at most one gce://")
        return list(value)

    @field_validator("max")
    @classmethod
    def _max_for_gce(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        if value is None and _gce_member(info.data.get("group")):
            raise ValueError("is required for a gce:// group (the most VMs it may start)")
        return value

    @field_validator("gce", mode="wrap")
    @classmethod
    def _gce_section(cls, value: Any, handler, info: ValidationInfo) -> Optional[GceConfig]:
        group = _gce_member(info.data.get("group"))
        if not group:
            return handler(value)
        if value is None:
            raise ValueError("is required for a gce:// group (at least gce.image, the worker "
                             "container image)")
        if isinstance(value, GceConfig):
            value = value.model_dump()                 # re-check zones against this URL
        token = _GCE_GROUP_ZONE.set(parse_gce_url(group)[1])
        try:
            return handler(value)
        finally:
            _GCE_GROUP_ZONE.reset(token)

    @model_validator(mode="after")
    def _bounds(self) -> "GroupConfig":
        if not isinstance(self.group, str):          # hybrid: max is required with gce
            if self.max is None:
                self.max = sum(local_capacity(u) for u in self.group)
        elif self.group == "local://auto":
            if self.max is None:              # this machine's GPUs; not checked elsewhere:
                self.max = local_capacity(self.group)  # a worker re-reads it on its own
        elif self.group.startswith("local://"):
            capacity = local_capacity(self.group)
            if self.max is None:
                self.max = capacity
            if self.max > capacity and capacity:
                raise ValueError(f"max {self.max} exceeds the group's {capacity} workers")
        if self.group == "external://" and self.max is None:
            self.max = 0                               # nothing for voxflow to start
        if self.min > self.max:
            raise ValueError(f"min {self.min} exceeds max {self.max}")
        return self


def _group_member(value: str) -> str:
    if value.startswith("local://") and (value[len("local://"):].isdigit()
                                         or value == "local://auto"):
        return value
    if value.startswith("gce://"):
        parse_gce_url(value)
        return value
    if value == "external://":
        return value
    raise ValueError(f"{value!r} is not a known worker group URL (local://N, local://auto, "
                     "gce://PROJECT/ZONE/GROUP or external://)")


def _gce_member(group: Any) -> Optional[str]:
    """The gce:// URL of a group or hybrid group, if it has one."""
    urls = [group] if isinstance(group, str) else list(group or [])
    return next((u for u in urls if isinstance(u, str) and u.startswith("gce://")), None)


class WorkersConfig(_Section):
    """One worker group per kind of stage."""

    inference: GroupConfig = Field(default_factory=lambda: GroupConfig(group="local://auto"),
                                   description="GPU group in the cloud; one process per "
                                   "device here.")
    blend: GroupConfig = Field(default_factory=lambda: GroupConfig(group="local://2"),
                               description="CPU group (overlap mode's blend stage).")
    downsample: GroupConfig = Field(default_factory=lambda: GroupConfig(group="local://2"),
                                    description="CPU group.")
    segmentation: GroupConfig = Field(default_factory=lambda: GroupConfig(group="local://2"),
                                      description="CPU group (the segmentation stage's "
                                      "passes).")
    levels: GroupConfig = Field(default_factory=lambda: GroupConfig(group="local://2"),
                                description="CPU group (`normalize`'s levels stages).")


PRICES_DATE = "2026-12-01"      # when the default prices below were read


def _money() -> Any:
    """A price: finite, not negative (0: free, e.g. a committed or local resource)."""
    return Field(ge=0, allow_inf_nan=False)


class ThroughputConfig(_Section):
    """Voxels per second of one worker of each group (docs/architecture.md, the bill)."""

    inference: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        77e6, description="Output voxels per second of one inference worker on one whole "
        "chunk (inference.chunk plus its margin) of this config, as `voxflow bench-model "
        "CONFIG` measures it on this machine's device; plan converts it to patches per "
        "second, so overlap mode is priced by the patches it runs (without augment: its "
        "orientations multiply the forwards priced). Default: 77 Mvox/s, an "
        "L4-class GPU with a 1.6 M-parameter RSUNet (issue 11); the same RSUNet in bf16 on "
        "an H100 ran 149 Mvox/s.")
    blend: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        8e6, description="Band voxels per second one blend worker reads, adds up and "
        "writes. Default: 3-channel uint8 output on file:// layers, one worker on a 2-core "
        "VM (bench/cost.py, 2026-12-01).")
    downsample: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        16e6, description="Source-mip voxels per second one downsample worker reads, "
        "averages and writes. Default: 3-channel uint8, 3 mips, file:// layers, one worker "
        "on a 2-core VM (bench/cost.py, 2026-12-01).")
    segmentation: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        14e6, description="Bbox voxels per second one segmentation worker takes through "
        "all four passes (label and relabel read the output and run cc3d, relabel writes; "
        "pairs and merge touch only face planes). Default: 1-channel float32 output, "
        "6-connectivity, task boxes of 128x128x64, file:// layers, one worker on a 2-core "
        "VM (bench/segmentation.py, busy seconds).")
    levels: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        60e6, description="Voxels per second (at normalize.mip) one levels "
        "worker reads and counts into per-section histograms. Default: uint8, file:// "
        "layers, one worker on a 2-core VM (bench/normalize.py; uint16: 17 Mvox/s).")


class PricesConfig(_Section):
    """Dollars per unit, as the bill uses them (defaults: Google Cloud, `PRICES_DATE`)."""

    date: str = Field(PRICES_DATE, description="When these prices were read; printed with "
                      "the bill.")
    gpu_hour: Annotated[float, _money()] = Field(
        0.34, description="One inference worker VM per hour, Spot. Default: g2-standard-8 "
        "with one NVIDIA L4, an estimate (L4 about $0.22 per GPU-hour plus 8 vCPUs and 32 "
        "GB; check cloud.google.com/spot-vms/pricing). An H100 worker, a3-highgpu-1g Spot: "
        "about $2.72 (H100 about $2.25 per GPU-hour, a 2026-03 survey, plus 26 vCPUs at "
        "$0.0102 and 234 GiB at $0.000888 per hour).")
    cpu_hour: Annotated[float, _money()] = Field(
        0.08, description="One blend or downsample worker VM per hour, Spot. Default: "
        "n1-standard-8 (the gce default machine type), about $0.01 per vCPU-hour with its "
        "memory.")
    class_a_per_1000: Annotated[float, _money()] = Field(
        0.005, description="Cloud Storage class A operations (object writes, listings) per "
        "1000, Standard storage.")
    class_b_per_1000: Annotated[float, _money()] = Field(
        0.0004, description="Cloud Storage class B operations (object reads, also of "
        "missing objects) per 1000, Standard storage.")
    storage_gb_month: Annotated[float, _money()] = Field(
        0.020, description="Cloud Storage Standard, regional, per GiB-month.")
    pubsub_tib: Annotated[float, _money()] = Field(
        40.0, description="Pub/Sub message throughput per TiB (publish and delivery each "
        "count; at least 1000 bytes per request).")


class CostConfig(_Section):
    """What `voxflow plan` prices a run with; changes no output byte (operational)."""

    throughput: ThroughputConfig = Field(
        default_factory=ThroughputConfig, description="Voxels per second of one worker of "
        "each group: what turns the plan's voxels into worker-hours.")
    prices: PricesConfig = Field(
        default_factory=PricesConfig, description="Dollars the bill uses: Google Cloud list "
        "prices in us-central1 as read on `date`; Spot prices move (up to once a day), so "
        "put your region's and your discounts here.")


class MaskConfig(_Section):
    """A tissue mask: which parts of the bbox are worth running (voxflow/mask.py)."""

    layer: str = Field(description="Precomputed layer (file://, gs:// or a local path) whose "
                       "nonzero voxels (any channel) are tissue; read once at plan, "
                       "nearest-neighbour onto the run's mip. Inference tasks whose box "
                       "holds no tissue are not published (counted as skipped), and the "
                       "output outside the mask is 0.")
    mip: Annotated[int, Field(ge=0)] = Field(0, description="Mip of the mask layer to read: "
                                             "a coarse one keeps the read small.")

    @field_validator("layer")
    @classmethod
    def _layer(cls, value: str, info: ValidationInfo) -> str:
        return _as_layer_url(value, info, READ_SCHEMES)


class LevelsConfig(_Section):
    """Per-section contrast: each z section's percentile window, from one histogram of the
    whole section over the bbox (voxflow/levels.py), so chunks show no seams."""

    per_section: Literal[True] = Field(True, description="Levels per z section (the only "
                                       "mode; omit `normalize` for none).")
    clip_percent: Annotated[list[Annotated[float, Field(ge=0, le=100)]],
                            Field(min_length=2, max_length=2)] = Field(
        [1.0, 99.0], description="Percentiles [low, high] of a section's voxels (exact data "
        "values at those ranks) that map to 0 and to the input dtype's maximum; values "
        "outside are clipped, then the model's own normalize applies. skip_empty tests the "
        "values after this.")
    mip: Optional[Annotated[int, Field(ge=0)]] = Field(None, description="Input mip the "
                                                       "histograms are taken at (coarser: "
                                                       "fewer voxels read); it must keep "
                                                       "the run's z sections. Default: the "
                                                       "run's mip.")

    @field_validator("clip_percent")
    @classmethod
    def _ordered(cls, value: list[float]) -> list[float]:
        if value[0] >= value[1]:
            raise ValueError(f"{value}: low must be below high")
        return value


class SegmentationConfig(_Section):
    """Connected components of the thresholded output, one id per object of the whole
    volume (voxflow/segmentation.py: label, pairs, merge, relabel passes)."""

    output: str = Field(description="Segmentation layer (file://, gs://, s3:// or a local "
                        "path), created if missing: one channel of `dtype`, the output's "
                        "bounds, resolution and storage_chunk, with the pyramid of "
                        "`downsample` made by mode (tinybrain).")
    channel: Annotated[int, Field(ge=0)] = Field(0, description="Output channel to "
                                                 "threshold.")
    threshold: Annotated[float, Field(allow_inf_nan=False)] = Field(
        0.5, description="Foreground: values above it (uint8 outputs: value / 255).")
    invert: bool = Field(False, description="Foreground below the threshold instead (a "
                         "boundary map's objects are its low values).")
    connectivity: Literal[6, 18, 26] = Field(6, description="Voxel neighbours that join an "
                                             "object: faces (6), and edges (18), and "
                                             "corners (26).")
    min_size: Annotated[int, Field(ge=0)] = Field(0, description="Objects of fewer voxels "
                                                  "(whole objects, after joining across "
                                                  "tasks) become background.")
    dtype: Literal["uint32", "uint64"] = Field("uint32", description="Id type of the layer; "
                                               "a run with more objects than it holds fails "
                                               "at the merge pass, naming this field.")
    chunk: Optional[Size3] = Field(None, description="Box per label and relabel task, x y z; "
                                   "a multiple of storage_chunk, under 2^32 voxels. Default: "
                                   "inference.chunk.")

    @field_validator("output")
    @classmethod
    def _layer(cls, value: str, info: ValidationInfo) -> str:
        return _as_layer_url(value, info)


Transform = Literal[TRANSFORMS]
# a `postprocess:` entry: one of the registered ops (voxflow/postprocess.py), chosen by `op`
PostprocessOp = Annotated[Union[tuple(OPS.values())], Field(discriminator="op")]


class RunConfig(_Section):
    """One voxflow run: an input layer, a model, an output layer and its pyramid."""

    input: str = Field(description="Input precomputed layer: file://, gs:// or a local path.")
    output: str = Field(description="Output precomputed layer; created if missing.")
    mip: Annotated[int, Field(ge=0)] = Field(0, description="Input mip to run at; the "
                                             "output's mip 0 has its resolution.")
    bbox: Optional[BBox] = Field(None, description="Region to process, voxels at mip. "
                                 "Default: the input's bounds.")
    model: ModelConfig
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    augment: list[Transform] = Field(
        [], description="Test-time augmentation: the model runs on every orientation of "
        "each patch that these transforms generate (all their combinations, the identity "
        "included: 2^k, except that transpose_xy with one of flip_x, flip_y makes all 8 of "
        "the xy square), each prediction turned back, and their mean is what is blended. "
        "Costs that many forward passes; transpose_xy needs model.input_patch and "
        "output_patch square in x and y. Default: none.")
    input_missing: Literal["error", "zeros"] = Field(
        "error", description="A missing chunk of the input layer inside what a task reads: "
        "error (the task fails naming the chunk file) or zeros (read as 0, for layers that "
        "are sparse on purpose).")
    mask: Optional[MaskConfig] = Field(None, description="Tissue mask: tasks outside it "
                                       "are not run, the output outside it is 0. Default: "
                                       "none (every task runs).")
    skip_empty: bool = Field(False, description="An inference task whose input box is all "
                             "one value (resin, padding, an unimaged slab) skips the model, "
                             "writes zeros for its output and is counted as skipped.")
    postprocess: list[PostprocessOp] = Field(
        [], description="Operations on each task's final values, in order: after blending "
        "(and the mask), before output_dtype; the output layer has the channels the last "
        "one makes. Ops: channels {select: [i, ...], reduce: mean, max or min} "
        "(voxflow/postprocess.py). Default: none.")
    output_dtype: Literal["float32", "float16", "uint8"] = Field(
        "float32", description="uint8 stores round(255 * p), p clipped to [0, 1].")
    storage_chunk: Size3 = Field([64, 64, 8], description="Storage chunk of the output "
                                 "layer, x y z. Overlap mode blends storage-chunk-wide bands "
                                 "where chunks meet, so thin chunks cost fewer temporary "
                                 "bytes.")
    sharding: Literal["auto", "on", "off"] = Field(
        "auto", description="Write the output (every mip) as sharded precomputed: one object "
        "per shard of many storage chunks instead of one per chunk, which is what keeps "
        "object operations affordable at petavoxel scale. auto: on for gs:// outputs, off "
        "for file:// ones.")
    shard_bytes: PositiveInt = Field(
        64 << 20, description="Sharded output: uncompressed bytes a shard aims for (a "
        "power-of-two number of storage chunks, the same at every mip). 64 MiB keeps a "
        "teravoxel of 3-channel uint8 near 6*10^4 objects and a downsample task (a shard "
        "times the factor) within memory_target.")
    normalize: Optional[LevelsConfig] = Field(
        None, description="Per-section contrast normalisation of integer inputs (uint8, "
        "uint16), a `levels` stage before inference. Default: none.")
    segmentation: Optional[SegmentationConfig] = Field(
        None, description="A segmentation stage after inference and blending: threshold, "
        "connected components consistent across tasks, its own layer and pyramid. Default: "
        "none.")
    downsample: DownsampleConfig = Field(default_factory=DownsampleConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    cost: CostConfig = Field(default_factory=CostConfig)

    @field_validator("input", "output")
    @classmethod
    def _layer_url(cls, value: str, info: ValidationInfo) -> str:
        return _as_layer_url(value, info, READ_SCHEMES if info.field_name == "input"
                             else WRITE_SCHEMES)

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        inf, model = self.inference, self.model
        if inf.patch_overlap is None:
            inf.patch_overlap = [p // 4 for p in model.output_patch]
        for axis, ov, op in zip("xyz", inf.patch_overlap, model.output_patch):
            if ov >= op:
                raise ConfigError("inference.patch_overlap",
                                  f"{inf.patch_overlap} must be smaller than output_patch "
                                  f"{model.output_patch} along {axis}")
        for axis, c, s in zip("xyz", inf.chunk, self.storage_chunk):
            if c % s:
                raise ConfigError("inference.chunk", f"{inf.chunk} must be a multiple of "
                                  f"storage_chunk {self.storage_chunk} along {axis}")
        for axis, p, c, m in zip("xyz", model.input_patch, inf.chunk, self.margin):
            if p > c + 2 * m:
                raise ConfigError("model.input_patch",
                                  f"{model.input_patch} is larger than chunk {inf.chunk} plus "
                                  f"twice the margin {self.margin} along {axis}")
        if self.input == self.output:
            raise ConfigError("output", "must differ from input")
        self._augment_fits()
        _ = self.output_channels                  # refuses postprocess ops that do not fit
        if self.segmentation:
            self._segmentation_fits()
        self._reachable_from_vms()
        return self

    @field_validator("augment")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        twice = sorted({t for t in value if value.count(t) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed more than once")
        return value

    def _augment_fits(self) -> None:
        """A transposed patch must have the model's patch shape: square in x and y."""
        if "transpose_xy" not in self.augment:
            return
        for name in ("input_patch", "output_patch"):
            patch = getattr(self.model, name)
            if patch[0] != patch[1]:
                raise ConfigError("augment", f"transpose_xy needs model.{name} square in x "
                                  f"and y, it is {patch}")

    @property
    def output_channels(self) -> int:
        """Channels of the output layer: the model's, through the `postprocess` ops (a
        `ConfigError` naming the op's parameter if one does not fit)."""
        channels = self.model.output_channels
        for i, op in enumerate(self.postprocess):
            try:
                channels = op.out_channels(channels)
            except OpError as exc:
                source = "model.output_channels" if i == 0 else f"postprocess[{i - 1}]'s output"
                raise ConfigError(f"postprocess[{i}].{exc.param}",
                                  f"{exc.message} ({source})") from None
        return channels

    def _segmentation_fits(self) -> None:
        seg = self.segmentation
        if seg.output in (self.input, self.output):
            raise ConfigError("segmentation.output", f"{seg.output} must differ from input "
                              "and output")
        if seg.chunk is None:
            seg.chunk = list(self.inference.chunk)
        for axis, c, s in zip("xyz", seg.chunk, self.storage_chunk):
            if c % s:
                raise ConfigError("segmentation.chunk", f"{seg.chunk} must be a multiple of "
                                  f"storage_chunk {self.storage_chunk} along {axis}")
        if seg.chunk[0] * seg.chunk[1] * seg.chunk[2] >= 1 << 32:
            raise ConfigError("segmentation.chunk", f"{seg.chunk} holds 2^32 voxels or more "
                              "(a task's labels are uint32)")

    def _reachable_from_vms(self) -> None:
        """Workers on Compute Engine VMs see only what is in the cloud: refuse local paths."""
        cloud = [k for k in ("inference", "blend", "downsample", "segmentation", "levels")
                 if _gce_member(getattr(self.workers, k).group)]
        if not cloud:
            return
        why = f"workers.{cloud[0]}.group runs workers on Compute Engine VMs, which cannot reach"
        if not self.queue.url.startswith("pubsub://") or "?ledger=gs://" not in self.queue.url:
            raise ConfigError("queue.url", f"{why} {self.queue.url}: use "
                              "pubsub://PROJECT/PREFIX?ledger=gs://bucket/path")
        for name in ("input", "output"):
            if not getattr(self, name).startswith("gs://"):
                raise ConfigError(name, f"{why} {getattr(self, name)}: use a gs:// layer")
        if self.mask and not self.mask.layer.startswith("gs://"):
            raise ConfigError("mask.layer", f"{why} {self.mask.layer}: use a gs:// layer")
        if self.segmentation and not self.segmentation.output.startswith("gs://"):
            raise ConfigError("segmentation.output", f"{why} {self.segmentation.output}: use "
                              "a gs:// layer")
        if self.inference.temporary and not self.inference.temporary.startswith("gs://"):
            raise ConfigError("inference.temporary", f"{why} {self.inference.temporary}: "
                              "use gs://")

    @property
    def margin(self) -> list[int]:
        """Context read around each chunk (crop mode)."""
        if self.inference.margin is not None:
            return list(self.inference.margin)
        return [o + m for o, m in zip(self.inference.patch_overlap, self.model.patch_margin)]


TAGGED = {"postprocess"}     # lists of a tagged union: pydantic puts the tag after the index


def _field_name(loc: tuple) -> str:
    """A pydantic error location as the field a user typed: an index into a list of sections
    shows (`postprocess[0].select`), one into a vector does not (`bbox.start`), nor does a
    tagged union's tag or a union alternative's name (`list[str]`)."""
    name = ""
    for k, part in enumerate(loc):
        if isinstance(part, int):
            section = k + 1 < len(loc) and isinstance(loc[k + 1], str)
            if name and (loc[k - 1] in TAGGED or section):
                name += f"[{part}]"
        elif part.isidentifier() and not (k > 1 and loc[k - 2] in TAGGED
                                          and isinstance(loc[k - 1], int)):
            name += f".{part}" if name else part
    return name or "config"


def _error_from_pydantic(exc: ValidationError) -> ConfigError:
    """One line naming the first bad field. A union's alternatives (pydantic tags them
    `constrained-int`, `literal['auto']`, ...) are one field: its messages joined by "or"."""
    found: dict[str, list[str]] = {}
    for err in exc.errors():
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, ConfigError):
            return ctx_err
        loc = _field_name(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"].startswith("union_tag_"):       # a tagged union's tag: its key
            ctx = err.get("ctx") or {}
            loc += "." + ctx.get("discriminator", "'op'").strip("'")
            msg = (f"unknown {ctx.get('tag')!r} (known: {ctx.get('expected_tags')})"
                   if err["type"] == "union_tag_invalid" else "is required")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "is required"
        if msg not in found.setdefault(loc, []):
            found[loc].append(msg)
    field = next(iter(found))
    parts = [", or ".join(msgs) if loc == field else f"{loc}: {', or '.join(msgs)}"
             for loc, msgs in found.items()]
    return ConfigError(field, "; ".join(parts))


def parse_config(data: Any, base_dir: str | os.PathLike | None = None) -> RunConfig:
    """Validate a mapping into a `RunConfig`; relative paths resolve against `base_dir`."""
    if not isinstance(data, dict):
        raise ConfigError("config", f"expected a mapping of keys, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise _error_from_pydantic(exc) from None


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read a YAML run config; relative paths resolve against the file's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError("config", f"file {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path} is not valid YAML: "
                          f"{' '.join(str(exc).split())}") from None
    return parse_config(data, base_dir=path.resolve().parent)
