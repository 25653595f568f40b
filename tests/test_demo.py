"""`voxflow demo` predicts boundaries a person would recognise, with its pyramid and PNG."""
import numpy as np
from PIL import Image

from voxflow.cli import main
from voxflow.demo.run import SHAPE
from voxflow.demo.synthetic import make_em_volume
from voxflow.volume import Volume


def test_demo_boundary_map(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"file://{tmp_path}/boundary" in printed and "section.png" in printed
    truth = make_em_volume(SHAPE, seed=0).boundary > 0.5             # (z, y, x)
    pred = Volume(f"file://{tmp_path}/boundary")
    prob = pred.read(pred.bounds)[0]
    assert prob.dtype == np.uint8 and prob.shape == truth.shape
    called = prob > 127
    tp = np.sum(called & truth)
    f1 = 2 * tp / (called.sum() + truth.sum())
    assert f1 > 0.8, f1                                  # a trained model, not noise
    for mip, shape in ((1, (32, 128, 128)), (2, (32, 64, 64))):
        level = pred.at_mip(mip)
        assert level.read(level.bounds)[0].shape == shape
    png = Image.open(tmp_path / "section.png")
    assert png.size == (2 * SHAPE[0] + 8, SHAPE[1])
