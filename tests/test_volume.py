"""Volume I/O against real precomputed layers on disk."""
import json

import numpy as np
import pytest

from voxflow.geometry import Box
from voxflow.volume import LayerNotFound, Volume

from conftest import make_layer


@pytest.mark.parametrize("dtype,layer_type,channels", [
    ("uint8", "image", 1), ("float16", "image", 3), ("float32", "image", 2),
    ("uint32", "segmentation", 1), ("uint64", "segmentation", 1)])
def test_create_write_read_roundtrip(tmp_path, dtype, layer_type, channels):
    url = f"file://{tmp_path}/layer"
    vol = Volume.create(url, num_channels=channels, dtype=dtype, layer_type=layer_type,
                        resolution=(4, 4, 40), voxel_offset=(100, 200, 7), size=(40, 30, 9),
                        chunk=(16, 16, 4))
    info = json.loads((tmp_path / "layer" / "info").read_text())
    assert info["type"] == layer_type and info["data_type"] == dtype
    assert info["scales"][0]["chunk_sizes"] == [[16, 16, 4]]
    assert info["scales"][0]["resolution"] == [4, 4, 40]
    rng = np.random.default_rng(0)
    data = (rng.random((channels, 9, 30, 40)) * 200).astype(dtype)
    vol.write(vol.bounds, data)
    again = Volume(url)
    assert again.bounds == Box((100, 200, 7), (140, 230, 16))
    assert np.array_equal(again.read(again.bounds), data)
    inner = Box((103, 205, 8), (131, 229, 15))
    assert np.array_equal(again.read(inner), data[(slice(None), *inner.zyx_slices((100, 200, 7)))])


def test_wrong_dtype_for_layer_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="float32 is not one of"):
        Volume.create(f"file://{tmp_path}/seg", num_channels=1, dtype="float32",
                      layer_type="segmentation", resolution=(1, 1, 1), voxel_offset=(0, 0, 0),
                      size=(8, 8, 8), chunk=(8, 8, 8))
    assert not (tmp_path / "seg").exists()


def test_read_outside_pads_with_zeros_or_mirror(tmp_path):
    data = np.arange(1 * 4 * 6 * 8, dtype=np.uint8).reshape(1, 4, 6, 8)
    vol = Volume(make_layer(tmp_path / "img", data, offset=(10, 20, 30), chunk=(4, 4, 2)))
    box = Box((8, 20, 30), (18, 26, 35))            # 2 voxels before x, 1 after z
    zeros = vol.read(box)
    assert zeros.shape == (1, 5, 6, 10)
    assert not zeros[..., :2].any() and not zeros[:, 4].any()
    assert np.array_equal(zeros[:, :4, :, 2:], data)
    mirror = vol.read(box, pad="mirror")
    assert np.array_equal(mirror[:, :4, :, 2:], data)
    assert np.array_equal(mirror[:, :4, :, 0], data[..., 2])     # reflected about the edge
    assert np.array_equal(mirror[:, :4, :, 1], data[..., 1])
    assert np.array_equal(mirror[:, 4, :, 2:], data[:, 2])


def test_write_checks_shape_and_bounds(tmp_path):
    vol = Volume(make_layer(tmp_path / "img", np.zeros((1, 4, 8, 8), np.uint8), chunk=(4, 4, 2)))
    with pytest.raises(ValueError, match="does not fit"):
        vol.write(Box((0, 0, 0), (4, 4, 2)), np.zeros((1, 2, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="outside layer bounds"):
        vol.write(Box((4, 4, 2), (12, 8, 4)), np.zeros((1, 2, 4, 8), np.uint8))


def test_missing_layer(tmp_path):
    with pytest.raises(LayerNotFound):
        Volume(f"file://{tmp_path}/nothing")
    assert not Volume.exists(f"file://{tmp_path}/nothing")
