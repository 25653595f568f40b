"""Per-section contrast (`normalize:`): sections scaled by different integer gains come out as
the un-scaled input does; every chunk uses the sections' global windows (crop and overlap mode
equal a plain run on the input normalised by hand), so overlap mode's many-chunk run equals its
one-chunk run (no seams). Real layers, a real conv model, the real runner, SQLite queue and
inline workers."""
from fractions import Fraction

import numpy as np
import pytest

from voxflow import levels
from voxflow.config import ConfigError, load_config
from voxflow.cost import bill
from voxflow.geometry import Box
from voxflow.pipeline import plan
from voxflow.runner import run
from voxflow.volume import Volume

from conftest import SmallConv, make_layer, write_config

GAINS = [1, 3, 8, 2, 5, 1, 7, 4, 6, 2, 3, 8, 1, 5, 2, 7]      # one per z section


@pytest.fixture
def layers(tmp_path, torchscript_model, monkeypatch):
    """`img`, and `scaled`: each section of img times its gain (uint8, no overflow); small
    levels tasks (16 x 16 x 8) so that the 64 x 64 x 16 bbox has 32 of them in 2 slabs."""
    monkeypatch.setattr(levels, "SLAB_DEPTH", 8)
    monkeypatch.setattr(levels, "TASK_VOXELS", 16 * 16 * 8)
    img = np.random.default_rng(3).integers(1, 32, (1, 16, 64, 64), dtype=np.uint8)
    scaled = (img * np.array(GAINS, np.uint8)[None, :, None, None]).astype(np.uint8)
    make_layer(tmp_path / "img", img, chunk=(16, 16, 8), mips=1)
    make_layer(tmp_path / "scaled", scaled, chunk=(16, 16, 8))
    torchscript_model(SmallConv(1, 2))
    return img


def _config(tmp_path, name: str, source: str, blend: str, chunk=(16, 16, 8), **extra):
    cfg = dict(input=source, output=name,
               model={"path": "model.pt", "input_patch": [16, 16, 8], "output_channels": 2},
               inference={"chunk": list(chunk), "patch_overlap": [4, 4, 2], "blend": blend},
               storage_chunk=[16, 16, 8], downsample={"mips": 0},
               normalize={"per_section": True, "clip_percent": [1, 99]},
               queue={"url": f"sqlite://{tmp_path}/queue.db"})
    cfg.update(extra)
    cfg["workers"] = {k: "local://0" for k in ("levels", "inference", "blend", "downsample")}
    return load_config(write_config(tmp_path / f"{name}.yaml", **cfg))


def _output(tmp_path, name: str) -> np.ndarray:
    vol = Volume(f"file://{tmp_path}/{name}")
    return vol.read(vol.bounds)


def _by_hand(img: np.ndarray, clip=(1, 99)) -> np.ndarray:
    """Each section through its window, computed here over the whole array: sorted values
    at ranks floor(n p / 100) and ceil(n q / 100) - 1, onto 0..255, rounded half up."""
    out = np.empty_like(img)
    for k, section in enumerate(img[0]):
        ranked = np.sort(section.ravel()).astype(np.int64)
        n = ranked.size
        lo, hi = ranked[n * clip[0] // 100], ranked[-(-n * clip[1] // 100) - 1]
        v = section.astype(np.int64)
        out[0, k] = np.clip((2 * (v - lo) * 255 + hi - lo) // (2 * (hi - lo)), 0, 255)
    return out


@pytest.mark.parametrize("blend", ["crop", "overlap"])
def test_gains_per_section_vanish_and_chunks_show_no_seams(tmp_path, layers, blend):
    scaled = run(_config(tmp_path, "scaled-many", "scaled", blend))
    assert [s.name for s in scaled.stages][:3] == ["levels", "levels-merge", "inference"]
    assert scaled.stages[0].tasks == 32 and scaled.stages[1].tasks == 2
    assert not (tmp_path / "scaled-many.voxflow-tmp").exists()      # deleted on success
    run(_config(tmp_path, "img-many", "img", blend))
    many = _output(tmp_path, "scaled-many")
    assert np.abs(many - _output(tmp_path, "img-many")).max() <= 1e-5     # gains gone
    # every chunk used the sections' global windows: the run without normalize on the input
    # normalised by hand, chunk for chunk
    make_layer(tmp_path / "by-hand", _by_hand(layers), chunk=(16, 16, 8))
    plain = run(_config(tmp_path, "by-hand-many", "by-hand", blend, normalize=None))
    assert "levels" not in [s.name for s in plain.stages]
    assert np.abs(many - _output(tmp_path, "by-hand-many")).max() <= 1e-5
    run(_config(tmp_path, "raw-many", "scaled", blend, normalize=None))
    assert np.abs(many - _output(tmp_path, "raw-many")).max() > 0.01      # it did something
    if blend == "overlap":           # one pass over the whole volume: chunks change nothing
        run(_config(tmp_path, "scaled-one", "scaled", blend, chunk=(64, 64, 16)))
        assert np.abs(many - _output(tmp_path, "scaled-one")).max() <= 1e-5


def test_windows_are_the_data_values_at_the_percentile_ranks():
    data = np.random.default_rng(1).integers(0, 256, (1, 3, 40, 50), dtype=np.uint8)
    found = levels.windows(levels.histograms(data, 256).astype(np.int64),
                           (Fraction(2), Fraction(97)))
    for k in range(3):
        ranked = np.sort(data[0, k].ravel())
        n = ranked.size
        assert found[k].tolist() == [ranked[n * 2 // 100], ranked[-(-n * 97 // 100) - 1]]
    table = levels.lookup_table(10, 20, np.dtype("uint8"))
    assert table[:11].tolist() == [0] * 11 and table[20:].tolist() == [255] * 236
    assert table[15] == 128                           # round(5 / 10 * 255), half up


def test_levels_at_a_coarser_mip_and_the_bill_counts_what_they_write(tmp_path, layers):
    config = _config(tmp_path, "coarse", "img", "overlap",
                     normalize={"clip_percent": [0.5, 99.5], "mip": 1},
                     inference={"chunk": [16, 16, 8], "patch_overlap": [4, 4, 2],
                                "blend": "overlap", "keep_temporary": True})
    p = plan(config)
    assert p.levels.mip == 1 and p.levels.box == Box((0, 0, 0), (32, 32, 16))
    planned = bill(p)
    assert planned["tasks"]["levels"] == 8 and planned["tasks"]["levels-merge"] == 2
    assert planned["worker_hours"]["levels"] > 0
    summary = run(config)
    kept = tmp_path / "coarse.voxflow-tmp" / summary.run / "levels"
    files = sum(1 for f in kept.rglob("*") if f.is_file())
    assert files == len(p.levels.grid) + len(p.levels.slabs) == 10
    every = sum(1 for f in kept.parent.rglob("*") if f.is_file())    # partial sums too
    assert every == planned["objects_written"]["temporary"]
    run(_config(tmp_path, "coarse-one", "img", "overlap", chunk=(64, 64, 16),
                normalize={"clip_percent": [0.5, 99.5], "mip": 1}))
    assert np.abs(_output(tmp_path, "coarse") - _output(tmp_path, "coarse-one")).max() <= 1e-5


@pytest.mark.parametrize("normalize, field", [
    ({"clip_percent": [99, 1]}, "normalize.clip_percent"),
    ({"clip_percent": [1, 101]}, "normalize.clip_percent"),
    ({"clip_percent": [1]}, "normalize.clip_percent"),
    ({"per_section": False}, "normalize.per_section"),
    ({"mip": 2}, "normalize.mip"),
])
def test_bad_values_are_refused_naming_the_field(tmp_path, layers, normalize, field):
    with pytest.raises(ConfigError) as exc:
        plan(_config(tmp_path, "bad", "img", "crop", normalize=normalize), check_model=False)
    assert exc.value.field == field, exc.value


def test_inputs_without_exact_histograms_or_z_sections_are_refused(tmp_path, layers):
    make_layer(tmp_path / "float", np.ones((1, 16, 64, 64), np.float32), chunk=(16, 16, 8))
    with pytest.raises(ConfigError, match="^normalize: needs a one-channel uint8 or uint16"):
        plan(_config(tmp_path, "f", "float", "crop"), check_model=False)
    make_layer(tmp_path / "iso", np.ones((1, 16, 64, 64), np.uint8), chunk=(16, 16, 8),
               mips=1, factor=(2, 2, 2))
    with pytest.raises(ConfigError, match="^normalize.mip: 1: its z sections"):
        plan(_config(tmp_path, "i", "iso", "crop", normalize={"mip": 1}), check_model=False)
