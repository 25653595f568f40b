"""`voxflow run` in crop mode against the model applied to the whole array at once."""
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from voxflow.cli import main
from voxflow.geometry import Box
from voxflow.volume import Volume

from conftest import Pointwise, make_layer, write_config

OFFSET = (5, 7, 3)
SHAPE_ZYX = (21, 70, 90)


@pytest.fixture
def image_layer(tmp_path):
    img = (np.random.default_rng(0).random((1, *SHAPE_ZYX)) * 255).astype(np.uint8)
    url = make_layer(tmp_path / "img", img, offset=OFFSET, chunk=(16, 16, 4), mips=1)
    return img, url


def whole_array(net, image):
    with torch.no_grad():
        return net(torch.from_numpy(image[None].astype(np.float32) / 255.0))[0].numpy()


@pytest.mark.parametrize("mip", [0, 1])
@pytest.mark.parametrize("output_dtype", ["float32", "uint8"])
def test_pointwise_crop_mode_equals_whole_array(tmp_path, image_layer, torchscript_model, mip,
                                                output_dtype):
    _, url = image_layer
    net = Pointwise().eval()
    model = torchscript_model(net)
    src = Volume(url, mip)
    b = src.bounds
    bbox = Box([b.start[0] + 1, b.start[1] + 2, b.start[2] + 1],
               [b.stop[0] - 3, b.stop[1] - 1, b.stop[2]])     # no multiple of the chunk
    cfg = write_config(tmp_path / "run.yaml", input="img", output="out", mip=mip,
                       bbox={"start": list(bbox.start), "stop": list(bbox.stop)},
                       model={"path": model.name, "input_patch": [16, 16, 4],
                              "output_channels": 2},
                       inference={"chunk": [32, 32, 8], "patch_overlap": [4, 4, 1],
                                  "blend": "crop"},
                       storage_chunk=[16, 16, 4], output_dtype=output_dtype,
                       downsample={"mips": 0})
    assert main(["run", str(cfg), "--quiet"]) == 0
    out = Volume(f"file://{tmp_path}/out")
    assert out.bounds == src.bounds and out.resolution == src.resolution
    want = whole_array(net, src.read(src.bounds))[(slice(None), *bbox.zyx_slices(b.start))]
    got = out.read(bbox)
    if output_dtype == "float32":
        assert np.abs(got - want).max() <= 1e-6
    else:
        assert np.array_equal(got, np.round(255 * want).astype(np.uint8))
    # nothing outside the bbox was written
    outside = out.read(Box(b.start, [b.stop[0], b.stop[1], bbox.start[2]]))
    assert not outside.any()


def test_rerun_is_idempotent(tmp_path, image_layer, torchscript_model):
    model = torchscript_model(Pointwise().eval())
    cfg = write_config(tmp_path / "run.yaml", input="img", output="out",
                       model={"path": model.name, "input_patch": [16, 16, 4],
                              "output_channels": 2},
                       inference={"chunk": [32, 32, 8]}, storage_chunk=[16, 16, 4],
                       downsample={"mips": 1})
    assert main(["run", str(cfg), "--quiet", "--run-id", "first"]) == 0
    files = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    time.sleep(1.1)                                   # a timestamp in the bytes would show
    assert main(["run", str(cfg), "--quiet", "--run-id", "second"]) == 0   # all tasks again
    again = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert files.keys() == again.keys() and all(files[p] == again[p] for p in files)


def test_python_dash_m_entry_point(tmp_path, image_layer, torchscript_model):
    model = torchscript_model(Pointwise().eval())
    cfg = write_config(tmp_path / "run.yaml", input="img", output="out",
                       model={"path": model.name, "input_patch": [16, 16, 4],
                              "output_channels": 2},
                       inference={"chunk": [32, 32, 8], "blend": "crop"},
                       storage_chunk=[16, 16, 4])
    res = subprocess.run([sys.executable, "-m", "voxflow", "plan", str(cfg), "--json"],
                         capture_output=True, text=True, check=True, cwd="/")
    import json
    report = json.loads(res.stdout)
    counts = {s["stage"]: s["tasks"] for s in report["stages"]}
    assert counts["inference"] == 3 * 3 * 3          # 90x70x21 voxels in 32x32x8 chunks
    assert report["stages"][0]["voxels"] == 90 * 70 * 21
    assert not (tmp_path / "out").exists()            # plan writes nothing


def test_rerun_skips_done_tasks_unless_the_output_is_gone(tmp_path, image_layer,
                                                          torchscript_model, capsys):
    import shutil
    model = torchscript_model(Pointwise().eval())
    cfg = write_config(tmp_path / "run.yaml", input="img", output="out",
                       model={"path": model.name, "input_patch": [16, 16, 4],
                              "output_channels": 2},
                       inference={"chunk": [32, 32, 8], "blend": "crop"},
                       storage_chunk=[16, 16, 4],
                       downsample={"mips": 1})
    assert main(["run", str(cfg), "--quiet"]) == 0
    first = capsys.readouterr().out
    assert "inference: 27 tasks (0 already done)" in first
    assert main(["run", str(cfg), "--quiet"]) == 0
    assert "inference: 27 tasks (27 already done)" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "out")
    assert main(["run", str(cfg), "--quiet"]) == 0
    assert "inference: 27 tasks (0 already done)" in capsys.readouterr().out
    assert Volume(f"file://{tmp_path}/out").read(Volume(f"file://{tmp_path}/out").bounds).any()
