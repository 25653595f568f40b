"""Test-time augmentation (`augment:`) and output operations (`postprocess:`), through real
runs (voxflow.runner, the SQLite queue, inline workers) on real layers with a real conv model
whose random 3x3x3 kernels have no symmetry.

Augment's reference is built without voxflow's augmentation code: the input layer is flipped
or transposed here, run plainly, the output turned back and averaged. The volume and lattice
are chosen mirror-symmetric (64 = 16 + 4 x 12 along x and y, 32 = 8 + 4 x 6 along z; crop
chunks of 32 x 32 x 16), so the run on a flipped volume sees the flipped patches of the
original lattice — exactly what augmentation averages over."""
from __future__ import annotations

import numpy as np
import pytest

from voxflow.cli import main
from voxflow.config import ConfigError, load_config
from voxflow.cost import bill
from voxflow.identity import run_identity
from voxflow.inference import SlidingWindow
from voxflow.models import Model
from voxflow.pipeline import plan
from voxflow.runner import run
from voxflow.volume import Volume

from conftest import SmallConv, make_layer, write_config

SHAPE = (1, 32, 64, 64)                      # c, z, y, x


@pytest.fixture
def image(tmp_path, torchscript_model):
    img = np.random.default_rng(3).integers(0, 256, SHAPE, dtype=np.uint8)
    make_layer(tmp_path / "img", img, chunk=(16, 16, 8))
    torchscript_model(SmallConv(1, 3))
    return img


def _config(tmp_path, name: str, blend: str = "crop", input: str = "img", **extra):
    cfg = dict(input=input, output=name,
               model={"path": "model.pt", "input_patch": [16, 16, 8], "output_channels": 3},
               inference={"chunk": [32, 32, 16], "patch_overlap": [4, 4, 2], "blend": blend},
               storage_chunk=[16, 16, 8], downsample={"mips": 0},
               queue={"url": f"sqlite://{tmp_path}/queue.db"})
    cfg.update(extra)
    return load_config(write_config(tmp_path / f"{name}.yaml", **cfg))


def _read(tmp_path, name: str, mip: int = 0) -> np.ndarray:
    vol = Volume(f"file://{tmp_path}/{name}", mip)
    return vol.read(vol.bounds)


# each orientation as the ops it applies to a (c, z, y, x) array, in order; undone in reverse
FLIP = {"x": lambda a: np.flip(a, -1), "y": lambda a: np.flip(a, -2),
        "z": lambda a: np.flip(a, -3), "t": lambda a: np.swapaxes(a, -1, -2)}
CASES = {"crop": (["flip_x", "flip_z"], ["", "x", "z", "xz"]),
         "overlap": (["transpose_xy", "flip_z"], ["", "t", "z", "zt"])}


def _apply(ops: str, a: np.ndarray, undo: bool = False) -> np.ndarray:
    for op in reversed(ops) if undo else ops:
        a = FLIP[op](a)
    return np.ascontiguousarray(a)


@pytest.mark.parametrize("blend", ["crop", "overlap"])
def test_augment_is_the_mean_of_separately_oriented_runs(tmp_path, image, blend):
    augment, orientations = CASES[blend]
    refs = []
    for ops in orientations:
        name = f"ref-{ops or 'id'}"
        make_layer(tmp_path / f"img-{name}", _apply(ops, image), chunk=(16, 16, 8))
        run(_config(tmp_path, name, blend, input=f"img-{name}"))
        refs.append(_apply(ops, _read(tmp_path, name), undo=True))
    config = _config(tmp_path, "augmented", blend, augment=augment)
    run(config)
    got, want = _read(tmp_path, "augmented"), np.mean(refs, axis=0)
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(got - refs[0]).max() > 1e-3               # it did something
    plain, augmented = bill(plan(_config(tmp_path, "ref-id", blend))), bill(plan(config))
    assert augmented["patches"] == plain["patches"] == plain["forwards"]
    assert augmented["forwards"] == 4 * plain["patches"]
    hours = augmented["worker_hours"]["inference"] / plain["worker_hours"]["inference"]
    assert hours == pytest.approx(4)


def test_augmented_copies_share_forward_passes_of_batch_size(tmp_path, image, monkeypatch):
    """batch_size counts each orientation as a patch: 8 orientations of 9 patches at batch 4
    are 18 forwards of 4 (a patch's copies in a row); without augment 9 patches are 3."""
    cfg = _config(tmp_path, "unused", augment=["flip_x", "flip_y", "transpose_xy"])
    model = Model(cfg.model)
    sizes = []
    forward = Model.__call__
    monkeypatch.setattr(Model, "__call__", lambda self, b: sizes.append(len(b))
                        or forward(self, b))
    x = image[:, :8, :40, :40]                                # 3 x 3 patches of 16 x 16 x 8
    for augment, want in (((), [3, 3, 3]), (cfg.augment, [4] * 18)):
        sizes.clear()
        SlidingWindow(model, [16, 16, 8], None, [4, 4, 2], 4, augment=augment)(x)
        assert sizes == want


def test_transpose_needs_a_square_patch_and_nothing_is_written(tmp_path, image, capsys):
    path = write_config(tmp_path / "t.yaml", input="img", output="out",
                        model={"path": "model.pt", "input_patch": [16, 8, 8],
                               "output_channels": 3},
                        inference={"chunk": [32, 32, 16], "blend": "crop"},
                        storage_chunk=[16, 16, 8], augment=["flip_z", "transpose_xy"],
                        queue={"url": f"sqlite://{tmp_path}/queue.db"})
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "voxflow: error: augment: transpose_xy needs model.input_patch square" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "queue.db").exists()


@pytest.mark.parametrize("augment, field", [(["flip_x", "flip_x"], "flip_x listed more"),
                                            (["rotate_90"], "Input should be 'flip_x'")])
def test_augment_names_are_refused_naming_the_field(tmp_path, image, augment, field):
    with pytest.raises(ConfigError) as exc:
        _config(tmp_path, "out", augment=augment)
    assert exc.value.field == "augment" and field in str(exc.value)


POSTPROCESS = [  # (blend, sharding, ops, numpy of the plain output (c, z, y, x))
    ("crop", "off", [{"op": "channels", "select": [0, 2], "reduce": "mean"}],
     lambda a: a[[0, 2]].mean(0, keepdims=True)),
    ("overlap", "off", [{"op": "channels", "reduce": "max"}], lambda a: a.max(0, keepdims=True)),
    ("overlap", "on", [{"op": "channels", "select": [1, 2], "reduce": "min"}],
     lambda a: a[[1, 2]].min(0, keepdims=True)),
    ("overlap", "off", [{"op": "channels", "select": [2, 0]}], lambda a: a[[2, 0]]),
]


@pytest.mark.parametrize("blend, sharding, ops, expect", POSTPROCESS)
def test_postprocess_channels_equals_numpy_on_the_plain_output(tmp_path, image, blend,
                                                               sharding, ops, expect):
    extra = dict(sharding=sharding, downsample={"mips": 1})
    run(_config(tmp_path, "plain", blend, **extra))
    config = _config(tmp_path, "post", blend, postprocess=ops, **extra)
    p = plan(config)
    run(config)
    want = expect(_read(tmp_path, "plain"))
    got = _read(tmp_path, "post")
    assert got.shape == want.shape and np.allclose(got, want, rtol=0, atol=1e-6)
    assert config.output_channels == want.shape[0] == Volume(config.output).num_channels
    assert bill(p)["bytes_stored"]["output"][0] == want.nbytes      # the channels it has
    mip1 = _read(tmp_path, "post", 1)                               # the pyramid, 2 x 2 x 1
    c, z, y, x = got.shape
    blocks = got.reshape(c, z, y // 2, 2, x // 2, 2).mean(axis=(3, 5))
    assert mip1.shape == blocks.shape and np.allclose(mip1, blocks, atol=1e-6)
    with pytest.raises(ConfigError) as exc:                 # the layer has the new channels
        plan(_config(tmp_path, "post", blend, **extra))
    assert exc.value.field == "output" and "num_channels" in str(exc.value)


@pytest.mark.parametrize("ops, field, message", [
    ([{"op": "threshold"}], "postprocess[0].op", "unknown 'threshold' (known: 'channels')"),
    ([{"select": [0]}], "postprocess[0].op", "is required"),
    ([{"op": "channels", "select": [5]}], "postprocess[0].select",
     "index 5 out of range for 3 channel(s) (model.output_channels)"),
    ([{"op": "channels", "reduce": "mean"}, {"op": "channels", "select": [1]}],
     "postprocess[1].select", "index 1 out of range for 1 channel(s)"),
    ([{"op": "channels", "reduce": "sum"}], "postprocess[0].reduce", "'mean', 'max' or 'min'"),
    ([{"op": "channels", "chanels": [0]}], "postprocess[0].chanels", "unknown key"),
])
def test_bad_postprocess_ops_are_refused_naming_the_field(tmp_path, image, ops, field,
                                                          message, capsys):
    with pytest.raises(ConfigError) as exc:
        _config(tmp_path, "out", postprocess=ops)
    assert exc.value.field == field and message in str(exc.value)
    assert main(["plan", str(tmp_path / "out.yaml")]) == 2
    assert f"voxflow: error: {field}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_identity_follows_augment_and_postprocess(tmp_path, image):
    ids = [run_identity(_config(tmp_path, "out", **extra)).digest for extra in (
        {}, {"augment": ["flip_x"]}, {"augment": ["flip_x", "flip_z"]},
        {"postprocess": [{"op": "channels", "reduce": "mean"}]},
        {"postprocess": [{"op": "channels", "reduce": "max"}]})]
    assert len(set(ids)) == len(ids)
    assert run_identity(_config(tmp_path, "out", augment=["flip_x"])).digest == ids[1]
