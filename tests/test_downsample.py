"""Pyramids built task by task equal tinybrain over the whole mip-0 array."""
import numpy as np
import pytest
import tinybrain
from tinybrain.downsample import downsample_with_averaging_numpy

from voxflow.cli import main
from voxflow.downsample import downsample, mip_bounds, plan_downsample
from voxflow.geometry import Box
from voxflow.volume import Volume

from conftest import Pointwise, make_layer, write_config


def _xyzc(a):
    return np.asfortranarray(a.transpose(3, 2, 1, 0))


def _czyx(a):
    return np.ascontiguousarray(a.transpose(3, 2, 1, 0))


@pytest.mark.parametrize("factor", [[2, 2, 1], [2, 2, 2]])
@pytest.mark.parametrize("memory_target", [1 << 30, 40_000])     # one pass / one pass per mip
def test_run_pyramid_equals_tinybrain_on_whole_array(tmp_path, torchscript_model, factor,
                                                     memory_target):
    img = (np.random.default_rng(3).random((1, 16, 128, 128)) * 255).astype(np.uint8)
    make_layer(tmp_path / "img", img, offset=(64, 32, 8), chunk=(16, 16, 4))
    model = torchscript_model(Pointwise().eval())
    cfg = write_config(tmp_path / "run.yaml", input="img", output="out",
                       model={"path": model.name, "input_patch": [16, 16, 4],
                              "output_channels": 2},
                       inference={"chunk": [64, 64, 8]}, storage_chunk=[16, 16, 4],
                       downsample={"mips": 3, "factor": factor,
                                   "memory_target": memory_target})
    assert main(["run", str(cfg), "--quiet"]) == 0
    out = Volume(f"file://{tmp_path}/out")
    mip0 = out.read(out.bounds)
    want = tinybrain.downsample_with_averaging(_xyzc(mip0), factor, num_mips=3)
    for m in (1, 2, 3):
        level = out.at_mip(m)
        assert level.bounds == mip_bounds(out.bounds, factor, m)
        got = level.read(level.bounds)
        assert got.shape == _czyx(want[m - 1]).shape
        assert np.abs(got - _czyx(want[m - 1])).max() <= 1e-6


def test_odd_extents_average_existing_voxels():
    """tinybrain 1.7's 2x2 kernel mishandles odd x/y; ours averages what exists."""
    a = np.random.default_rng(4).random((2, 5, 9, 7)).astype(np.float32)
    for factor in ([2, 2, 1], [2, 2, 2]):
        got = downsample(a, factor, 1)[0]
        want = downsample_with_averaging_numpy(_xyzc(a).astype(np.float64), factor)
        assert np.abs(got - _czyx(want)).max() < 1e-6


def test_task_boundaries_do_not_change_the_result():
    """Tasks aligned to chunk * factor^m, the last one short, stitch into the whole result."""
    a = np.random.default_rng(5).random((1, 4, 37, 53)).astype(np.float32)
    whole = downsample(a, [2, 2, 1], 2)
    parts = [downsample(a[..., x:x + 16], [2, 2, 1], 2) for x in range(0, 53, 16)]
    for m in (0, 1):
        np.testing.assert_array_equal(np.concatenate([p[m] for p in parts], axis=3), whole[m])


def test_segmentation_uses_mode():
    labels = np.random.default_rng(6).integers(0, 4, (1, 4, 32, 32)).astype(np.uint64)
    got = downsample(labels, [2, 2, 1], 2, segmentation=True)
    want = tinybrain.downsample_segmentation(_xyzc(labels), (2, 2, 1), num_mips=1)[0]
    np.testing.assert_array_equal(got[0], _czyx(want))
    want2 = tinybrain.downsample_segmentation(want, (2, 2, 1), num_mips=1)[0]
    np.testing.assert_array_equal(got[1], _czyx(want2))
    assert got[0].dtype == np.uint64


def test_tasks_sized_by_memory_target_and_aligned():
    bounds = Box([10, 6, 0], [1000, 700, 64])
    region = Box([100, 50, 3], [900, 600, 60])
    big = plan_downsample(bounds, region, (64, 64, 16), (2, 2, 1), 4, 4, 1 << 30)
    assert [(p.source_mip, p.mips) for p in big] == [(0, 4)]
    small = plan_downsample(bounds, region, (64, 64, 16), (2, 2, 1), 4, 4, 16 << 20)
    assert [p.mips for p in small] == [2, 2] and small[1].source_mip == 2
    for p in big + small:
        src = mip_bounds(bounds, (2, 2, 1), p.source_mip)
        assert p.grid.chunk == tuple(c * f ** p.mips for c, f in zip((64, 64, 16), (2, 2, 1)))
        for i in range(len(p.grid)):
            box = p.grid.box(i)
            assert src.contains(box)
            for k in range(1, p.mips + 1):
                dst = p.target_box(box, (2, 2, 1), k)
                level = mip_bounds(bounds, (2, 2, 1), p.source_mip + k)
                assert level.contains(dst)
                for a, b, o, hi, c in zip(dst.start, dst.stop, level.start, level.stop,
                                          (64, 64, 16)):
                    assert (a - o) % c == 0 and ((b - o) % c == 0 or b == hi)
