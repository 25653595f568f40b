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


@pytest.mark.parametrize("factor", [[2, 2, 1], [2, 2, 2]])
@pytest.mark.parametrize("output_dtype", ["uint8", "float32"])
def test_one_pass_pyramid_is_tinybrains_multi_mip_bit_for_bit(tmp_path, torchscript_model,
                                                             factor, output_dtype):
    """Issue 10 item 10: igneous makes a task's mips in one tinybrain call, which rounds a
    uint8 mip once (the floor of its block's mean); rounding at every level put mips 2 and 3
    up to 2 grey levels off. float32 (summed in float32 across levels) is deterministic, so
    it too is equal bit for bit; one level at a time was up to 2e-7 off, even at mip 1."""
    img = (np.random.default_rng(7).random((1, 16, 256, 256)) * 255).astype(np.uint8)
    make_layer(tmp_path / "img", img, chunk=(32, 32, 4))
    model = torchscript_model(Pointwise().eval())
    cfg = write_config(tmp_path / "run.yaml", input="img", output="out",
                       model={"path": model.name, "input_patch": [16, 16, 4],
                              "output_channels": 2},
                       inference={"chunk": [128, 128, 16]}, storage_chunk=[32, 32, 4],
                       output_dtype=output_dtype,
                       downsample={"mips": 3, "factor": factor, "memory_target": 1 << 30})
    assert main(["run", str(cfg), "--quiet"]) == 0
    out = Volume(f"file://{tmp_path}/out")
    want = tinybrain.downsample_with_averaging(_xyzc(out.read(out.bounds)), factor, num_mips=3)
    for m in (1, 2, 3):
        level = out.at_mip(m)
        np.testing.assert_array_equal(level.read(level.bounds), _czyx(want[m - 1]))


def _replicated_means(a, factor, mips):
    """Mips of (c, z, y, x) `a` by hand: in float64, odd extents edge-replicated at every
    level, then the mean of each block. (Replicating mip 0 once, to whole f^k blocks, is not
    the same: for x = 90, mip 1 is 45 wide and its tail block would weigh x[89] 3:1.)"""
    out = []
    for _ in range(mips):
        f = list(reversed(factor))
        a = np.pad(a.astype(np.float64),
                   [(0, 0)] + [(0, -n % b) for n, b in zip(a.shape[1:], f)], mode="edge")
        c, z, y, x = a.shape
        a = a.reshape(c, z // f[0], f[0], y // f[1], f[1], x // f[2], f[2]).mean(axis=(2, 4, 6))
        out.append(a)
    return out


@pytest.mark.parametrize("factor", [[2, 2, 1], [2, 2, 2]])
@pytest.mark.parametrize("output_dtype", ["uint8", "float32"])
def test_odd_extents_replicate_every_level(tmp_path, torchscript_model, factor, output_dtype):
    """90x70x21 at an offset, tasks 64x64 (the last ones 26 and 6 wide): every mip is edge
    replication at every level with exact means, rounded once as tinybrain rounds multi-mip
    results (uint8: floor, bit for bit; float32: float32 sums, within 1e-6)."""
    img = (np.random.default_rng(8).random((1, 21, 70, 90)) * 255).astype(np.uint8)
    make_layer(tmp_path / "img", img, offset=(5, 7, 3), chunk=(16, 16, 4))
    model = torchscript_model(Pointwise().eval())
    cfg = write_config(tmp_path / "run.yaml", input="img", output="out",
                       model={"path": model.name, "input_patch": [16, 16, 4],
                              "output_channels": 2},
                       inference={"chunk": [64, 64, 24]}, storage_chunk=[8, 8, 4],
                       output_dtype=output_dtype,
                       downsample={"mips": 3, "factor": factor, "memory_target": 1 << 30})
    assert main(["run", str(cfg), "--quiet"]) == 0
    out = Volume(f"file://{tmp_path}/out")
    want = _replicated_means(out.read(out.bounds), factor, 3)
    for m in (1, 2, 3):
        level = out.at_mip(m)
        got = level.read(level.bounds)
        assert got.shape == want[m - 1].shape
        if output_dtype == "uint8":
            np.testing.assert_array_equal(got, np.floor(want[m - 1]).astype(np.uint8))
        else:
            assert np.abs(got - want[m - 1]).max() <= 1e-6


def test_odd_extents_average_existing_voxels():
    """tinybrain 1.7's 2x2 kernel mishandles odd x/y; ours averages what exists."""
    a = np.random.default_rng(4).random((2, 5, 9, 7)).astype(np.float32)
    for factor in ([2, 2, 1], [2, 2, 2]):
        got = downsample(a, factor, 1)[0]
        want = downsample_with_averaging_numpy(_xyzc(a).astype(np.float64), factor)
        assert np.abs(got - _czyx(want)).max() < 1e-6


def test_float16_pyramids_of_one_or_more_mips():
    """tinybrain 1.7 has no float16 1-mip kernel (it raised): float16 is averaged as float32
    and comes back float16, equal to the float32 pyramid rounded once."""
    a = np.random.default_rng(6).random((1, 4, 32, 32)).astype(np.float16)
    for mips in (1, 2):
        got = downsample(a, [2, 2, 1], mips)
        want = downsample(a.astype(np.float32), [2, 2, 1], mips)
        for g, w in zip(got, want):
            assert g.dtype == np.float16
            np.testing.assert_array_equal(g, w.astype(np.float16))


def test_passes_do_not_change_odd_tails():
    """Mips 1..3 in one pass equal mip 1, then 2..3 from it: a tail is the same whether the
    memory target makes one pass or two."""
    a = np.random.default_rng(9).random((1, 21, 70, 90)).astype(np.float32)
    for factor in ([2, 2, 1], [2, 2, 2]):
        one = downsample(a, factor, 3)
        two = downsample(a, factor, 1) + downsample(downsample(a, factor, 1)[0], factor, 2)
        for m in range(3):
            assert np.abs(one[m] - two[m]).max() <= 1e-6


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
