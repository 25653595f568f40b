"""Bad configs fail fast, with one line naming the field, and create no output layer."""
import copy

import numpy as np
import pytest

from voxflow.cli import main
from voxflow.config import ConfigError, load_config, parse_config

from conftest import Pointwise, make_layer, write_config


@pytest.fixture
def setup(tmp_path, torchscript_model):
    img = np.zeros((1, 16, 64, 64), np.uint8)
    make_layer(tmp_path / "img", img, offset=(10, 10, 0), chunk=(16, 16, 4))
    torchscript_model(Pointwise().eval(), "model.pt")
    good = {"input": "img", "output": "out",
            "model": {"path": "model.pt", "input_patch": [16, 16, 4], "output_channels": 2},
            "inference": {"chunk": [32, 32, 8], "patch_overlap": [4, 4, 1]},
            "storage_chunk": [16, 16, 4], "downsample": {"mips": 1}}
    return tmp_path, good


def _set(cfg, dotted, value):
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return cfg


_DELETE = object()

BAD = [  # (change, field named in the error)
    ("input", _DELETE, "input"),
    ("input", "no/such/layer", "input"),
    ("bbox", {"start": [0, 0, 0], "stop": [80, 80, 8]}, "bbox"),          # offset is 10
    ("bbox", {"start": [20, 20, 4], "stop": [20, 40, 8]}, "bbox"),        # empty
    ("model.input_patch", [80, 16, 4], "model.input_patch"),              # > chunk + 2 margin
    ("inference.patch_overlap", [16, 4, 1], "inference.patch_overlap"),   # overlap >= patch
    ("inference.chunk", [0, 32, 8], "inference.chunk"),
    ("model.input_patch", [16, -16, 4], "model.input_patch"),
    ("model.precision", "fp8", "model.precision"),
    ("model.path", "missing.pt", "model.path"),
    ("model.output_channels", 3, "model.output_channels"),
    ("output_dtype", "int7", "output_dtype"),
    ("inference.chunks", [32, 32, 8], "inference.chunks"),                # unknown key
    ("mip", 3, "mip"),
    ("inference.chunk", [24, 32, 8], "inference.chunk"),                  # not storage-aligned
    ("downsample.factor", [3, 3, 1], "downsample.factor"),
    ("inference.device", "tpu", "inference.device"),
    ("model.output_patch", [13, 16, 4], "model.output_patch"),            # margin not even
    ("inference.margin", [1, 1, 0], "inference.margin"),                  # < patch margin
    ("queue", "redis://localhost/0", "queue.url"),
    ("workers.inference", "k8s://cluster", "workers.inference.group"),
    ("workers.downsample", {"group": "local://2", "min": 3}, "workers.downsample"),
]


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("key,value,field", BAD,
                         ids=[f"{k}={'(deleted)' if v is _DELETE else v}" for k, v, _ in BAD])
def test_bad_config_refused_before_writing(setup, capsys, command, key, value, field):
    tmp_path, good = setup
    cfg = _set(copy.deepcopy(good), key, value)
    if key == "inference.margin":
        cfg["model"]["output_patch"] = [12, 12, 4]
    path = write_config(tmp_path / "bad.yaml", **cfg)
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"voxflow: error: {field}:"), err
    assert not (tmp_path / "out").exists()


def test_existing_output_with_other_channels_is_refused(setup, capsys):
    tmp_path, good = setup
    make_layer(tmp_path / "out", np.zeros((3, 16, 64, 64), np.float32), offset=(10, 10, 0))
    before = (tmp_path / "out" / "info").read_bytes()
    path = write_config(tmp_path / "run.yaml", **good)
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err.startswith("voxflow: error: output: existing layer")
    assert (tmp_path / "out" / "info").read_bytes() == before


def test_invalid_yaml_names_the_file(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("input: [unclosed\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("voxflow: error: config:") and len(err.strip().splitlines()) == 1


def test_relative_paths_resolve_against_config_folder(setup, monkeypatch, tmp_path_factory):
    tmp_path, good = setup
    path = write_config(tmp_path / "run.yaml", **good)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    cfg = load_config(path)
    assert cfg.input == f"file://{tmp_path}/img"
    assert cfg.model.path == str(tmp_path / "model.pt")
    assert main(["validate", str(path)]) == 0


def test_remote_urls_are_kept():
    cfg = parse_config({"input": "gs://bucket/img", "output": "gs://bucket/out/",
                        "model": {"path": "/abs/m.pt2", "input_patch": [8, 8, 8],
                                  "output_channels": 1}})
    assert cfg.input == "gs://bucket/img" and cfg.output == "gs://bucket/out"
    assert cfg.inference.patch_overlap == [2, 2, 2]          # default: a quarter of the patch


def test_config_error_is_a_value_error_with_field():
    with pytest.raises(ConfigError) as exc:
        parse_config({"input": "a", "output": "a", "model": {
            "path": "m.pt", "input_patch": [8, 8, 8], "output_channels": 1}})
    assert exc.value.field == "output"


def test_json_schema_describes_every_field():
    from voxflow.config import RunConfig
    schema = RunConfig.model_json_schema()
    props = schema["properties"]
    assert {"input", "output", "mip", "bbox", "model", "inference", "output_dtype",
            "downsample"} <= props.keys()
    inference = schema["$defs"]["InferenceConfig"]["properties"]
    assert inference["blend"]["enum"] == ["crop", "overlap"]
    assert all("description" in v for v in inference.values())


def test_config_reference_is_current():
    """docs/config.md is generated from RunConfig; regenerate with `voxflow config-doc`."""
    from pathlib import Path

    from voxflow.configdoc import config_reference
    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_reference()


def test_queue_and_workers_shorthand_and_paths(tmp_path):
    base = {"input": "a", "output": "b",
            "model": {"path": "m.pt", "input_patch": [8, 8, 8], "output_channels": 1}}
    cfg = parse_config({**base, "queue": "sqlite://queues/q.db",
                        "workers": {"inference": "local://3"}}, base_dir=tmp_path)
    assert cfg.queue.url == f"sqlite://{tmp_path}/queues/q.db"      # relative: config folder
    assert (cfg.workers.inference.group, cfg.workers.inference.max) == ("local://3", 3)
    assert cfg.workers.downsample.group == "local://2"               # default kept
    cfg = parse_config({**base, "queue": {"url": "sqlite:///abs/q.db", "max_attempts": 5}})
    assert (cfg.queue.url, cfg.queue.max_attempts) == ("sqlite:///abs/q.db", 5)
    cfg = parse_config(base)
    assert cfg.queue.url == f"sqlite://{tmp_path}/voxflow-home/queue.db"   # $VOXFLOW_HOME
