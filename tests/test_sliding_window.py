"""SlidingWindow against a plain float64 patch loop written here, independently."""
import numpy as np
import pytest
import torch

from voxflow.config import ModelConfig
from voxflow.inference import SlidingWindow
from voxflow.lattice import bump_profile
from voxflow.models import Model

from conftest import SmallConv


def reference(net, image, input_patch, output_patch, overlap, weighting):
    """float64 patch loop: every lattice patch, weighted, summed, normalised."""
    net = net.double()
    ip, op, ov = (np.array(v[::-1]) for v in (input_patch, output_patch, overlap))  # z, y, x
    margin = (ip - op) // 2
    out_shape = np.array(image.shape[1:]) - 2 * margin
    starts = []
    for n, p, s in zip(out_shape, op, op - ov):
        axis = list(range(0, n - p, s)) + [n - p]
        starts.append(axis)

    def profile(n):
        if weighting == "bump":
            t = (np.arange(n) + 1.0) / (n + 1.0) * 2 - 1
            return np.exp(-1 / (1 - t * t))
        x = np.arange(n) - (n - 1) / 2
        return np.exp(-0.5 * (x / (n / 8)) ** 2)

    w = np.einsum("i,j,k->ijk", *[profile(n) for n in op])
    acc = np.zeros((2, *out_shape))
    wsum = np.zeros(out_shape)
    x = torch.from_numpy(image.astype(np.float64))
    for z in starts[0]:
        for y in starts[1]:
            for xx in starts[2]:
                patch = x[None, :, z:z + ip[0], y:y + ip[1], xx:xx + ip[2]]
                with torch.no_grad():
                    pred = net(patch)[0].numpy()
                if pred.shape[1:] != tuple(op):
                    m = margin
                    pred = pred[:, m[0]:m[0] + op[0], m[1]:m[1] + op[1], m[2]:m[2] + op[2]]
                acc[:, z:z + op[0], y:y + op[1], xx:xx + op[2]] += pred * w
                wsum[z:z + op[0], y:y + op[1], xx:xx + op[2]] += w
    return acc / wsum


@pytest.mark.parametrize("weighting", ["bump", "gaussian"])
@pytest.mark.parametrize("input_patch,output_patch,overlap,batch", [
    ((12, 10, 6), (12, 10, 6), (4, 3, 2), 4),
    ((12, 10, 6), (8, 6, 4), (2, 2, 1), 3),      # model output cropped to its centre
    ((9, 7, 5), (9, 7, 5), (0, 0, 0), 1),        # no overlap: plain tiling
])
def test_matches_float64_patch_loop(tmp_path, weighting, input_patch, output_patch, overlap,
                                    batch):
    net = SmallConv().eval()
    path = tmp_path / "m.pt"
    torch.jit.script(net).save(str(path))
    cfg = ModelConfig(path=str(path), input_patch=list(input_patch),
                      output_patch=list(output_patch), output_channels=2)
    window = SlidingWindow(Model(cfg), input_patch, output_patch, overlap, batch, weighting)
    image = np.random.default_rng(1).random((1, 15, 23, 31)).astype(np.float32)
    got = window(image).numpy()
    want = reference(SmallConv().eval(), image, input_patch, output_patch, overlap, weighting)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5


def test_bump_is_chunkflows_formula():
    t = (np.arange(20) + 1.0) / 21.0 * 2 - 1
    want = np.exp(-1 / (1 - t * t))
    np.testing.assert_allclose(bump_profile(20), want / want.max(), rtol=1e-12)
    assert bump_profile(256).min() > 0       # floored: no zero weight even for large patches


def test_input_smaller_than_patch_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.script(SmallConv().eval()).save(str(path))
    cfg = ModelConfig(path=str(path), input_patch=[8, 8, 8], output_channels=2)
    window = SlidingWindow(Model(cfg), [8, 8, 8])
    with pytest.raises(ValueError, match="smaller than the input patch"):
        window(np.zeros((1, 4, 8, 8), np.float32))


def test_batches_are_balanced_never_a_lone_last_patch():
    from voxflow.inference import balanced_batches
    batches = balanced_batches(list(range(125)), 4)
    assert [len(b) for b in batches] == [4] * 29 + [3] * 3
    assert [p for b in batches for p in b] == list(range(125))      # all, in order, once
    assert [len(b) for b in balanced_batches(list(range(8)), 4)] == [4, 4]
    assert [len(b) for b in balanced_batches(list(range(5)), 4)] == [3, 2]
    assert balanced_batches([], 4) == []
