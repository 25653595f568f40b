"""Train the bundled demo RSUNet on synthetic EM and save its weights.

Reproducible end to end: the training volumes come from ``make_em_volume``
with fixed seeds (1..4; seed 0 is the demo volume and is held out), and every
random choice is drawn from seeded generators, so re-running on one CPU thread
gives the same weights.  Usage::

    python -m voxflow.demo.train [--steps N] [--out PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from voxflow.demo.rsunet import RSUNet
from voxflow.demo.synthetic import SyntheticVolume, make_em_volume

DEFAULT_OUT = Path(__file__).parent / "rsunet.safetensors"
TRAIN_SEEDS = (1, 2, 3, 4)
DEMO_SEED = 0
PATCH_ZYX = (16, 64, 64)
DEFAULT_STEPS = 900  # ~6.5 min on one CPU thread (~0.43 s/step at batch 2)


def sample_batch(
    volumes: list[SyntheticVolume],
    rng: np.random.Generator,
    batch_size: int,
    patch_zyx: tuple[int, int, int] = PATCH_ZYX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random augmented patches as ``(image, boundary)`` tensors of shape (n, 1, z, y, x).

    Augmentations are the symmetries of the data (flips in z/y/x, x-y
    transpose) plus mild brightness/contrast jitter, which covers the
    per-section intensity drift of real serial sections.
    """
    pz, py, px = patch_zyx
    images, targets = [], []
    for _ in range(batch_size):
        vol = volumes[rng.integers(len(volumes))]
        nz, ny, nx = vol.image.shape
        z0, y0, x0 = rng.integers(nz - pz + 1), rng.integers(ny - py + 1), rng.integers(nx - px + 1)
        sl = np.s_[z0 : z0 + pz, y0 : y0 + py, x0 : x0 + px]
        img = vol.image[sl].astype(np.float32) / 255.0
        tgt = vol.boundary[sl]
        for axis in range(3):
            if rng.random() < 0.5:
                img, tgt = np.flip(img, axis), np.flip(tgt, axis)
        if py == px and rng.random() < 0.5:
            img, tgt = img.transpose(0, 2, 1), tgt.transpose(0, 2, 1)
        contrast = rng.uniform(0.85, 1.15)
        img = (img - 0.5) * contrast + 0.5 + rng.uniform(-0.08, 0.08)
        images.append(np.clip(img, 0.0, 1.0))
        targets.append(tgt)
    return _stack(images), _stack(targets)


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    """List of (z, y, x) arrays -> contiguous float32 tensor (n, 1, z, y, x)."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)[:, None], dtype=np.float32))


def balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE where membrane and background each carry half the total weight.

    Membranes are ~20% of voxels; unweighted BCE lets the network under-call
    them, which is the costly error for segmentation (merged cells).
    """
    pos = target.mean().clamp(0.05, 0.95)
    weight = torch.where(target > 0.5, 0.5 / pos, 0.5 / (1.0 - pos))
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight)


@torch.no_grad()
def predict_volume(model: RSUNet, image: np.ndarray, patch_zyx: tuple[int, int, int] = PATCH_ZYX) -> np.ndarray:
    """Boundary probabilities for a (z, y, x) uint8 volume, tiled into non-overlapping patches.

    The volume shape must be a multiple of the patch shape; this is a quick
    evaluation helper, not the package's production inference path.
    """
    model.eval()
    pz, py, px = patch_zyx
    out = np.zeros(image.shape, dtype=np.float32)
    for z in range(0, image.shape[0] - pz + 1, pz):
        for y in range(0, image.shape[1] - py + 1, py):
            for x in range(0, image.shape[2] - px + 1, px):
                sl = np.s_[z : z + pz, y : y + py, x : x + px]
                inp = torch.from_numpy(image[sl].astype(np.float32) / 255.0)[None, None]
                out[sl] = model(inp)[0, 0].numpy()
    return out


def boundary_scores(prob: np.ndarray, boundary: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Voxel accuracy, precision, recall and F1 of ``prob > threshold`` against the membrane mask."""
    pred = prob > threshold
    true = boundary > 0.5
    tp = float(np.sum(pred & true))
    fp = float(np.sum(pred & ~true))
    fn = float(np.sum(~pred & true))
    precision = tp / max(tp + fp, 1.0)
    recall = tp / max(tp + fn, 1.0)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {
        "accuracy": float(np.mean(pred == true)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def train(
    steps: int = DEFAULT_STEPS,
    out: Path | str = DEFAULT_OUT,
    batch_size: int = 2,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 50,
) -> RSUNet:
    """Train ``RSUNet()`` on synthetic volumes and write its state dict as safetensors."""
    torch.set_num_threads(1)  # reproducible, and polite on shared machines
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    t0 = time.perf_counter()
    volumes = [make_em_volume((256, 256, 32), seed=s) for s in TRAIN_SEEDS]
    print(f"generated {len(volumes)} training volumes in {time.perf_counter() - t0:.1f}s", flush=True)

    model = RSUNet()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"RSUNet: {n_params} parameters", flush=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # Cosine decay: high rate early for speed, small at the end for a stable final model.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.02)

    model.train()
    t0 = time.perf_counter()
    running = 0.0
    for step in range(1, steps + 1):
        img, tgt = sample_batch(volumes, rng, batch_size)
        loss = balanced_bce(model.logits(img), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            print(
                f"step {step:5d}/{steps}  loss {running / n:.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
            running = 0.0

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    print(f"saved {out} ({out.stat().st_size / 1024:.0f} KiB) after {time.perf_counter() - t0:.0f}s of training")

    demo = make_em_volume((256, 256, 32), seed=DEMO_SEED)
    scores = boundary_scores(predict_volume(model, demo.image), demo.boundary)
    print("held-out demo volume (seed 0): " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimiser steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="safetensors output path")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train(steps=args.steps, out=args.out, batch_size=args.batch_size, lr=args.lr, seed=args.seed)


if __name__ == "__main__":
    main()
