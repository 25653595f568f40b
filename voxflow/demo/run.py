"""`voxflow demo`: a synthetic EM volume through the shipped boundary model, end to end.

Everything runs on the embedded defaults (file:// layers, this process). The result is a
boundary map a person recognises, its mip pyramid, and a PNG of one section.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from ..config import load_config
from ..geometry import Box
from ..runner import Reporter, run
from ..volume import Volume

HERE = Path(__file__).resolve().parent
SHAPE = (256, 256, 32)          # x, y, z voxels
RESOLUTION = (8, 8, 40)         # nm: serial-section EM is anisotropic


def demo_config(image_url: str, output_url: str) -> dict:
    """The demo's run config, as a person would write it."""
    return {
        "input": image_url,
        "output": output_url,
        "model": {"path": str(HERE / "rsunet.py"), "weights": str(HERE / "rsunet.safetensors"),
                  "input_patch": [64, 64, 16], "output_channels": 1},
        # overlap mode (the default) in 2 x 2 tasks, so the output shows chunks blended
        "inference": {"chunk": [128, 128, 32], "patch_overlap": [16, 16, 4], "batch_size": 4,
                      "blend": "overlap"},
        "storage_chunk": [64, 64, 16],
        "output_dtype": "uint8",
        "downsample": {"mips": 2, "factor": [2, 2, 1]},
    }


def write_image(url: str, seed: int = 0) -> np.ndarray:
    """Generate the synthetic volume and store it as a precomputed layer; returns (z, y, x)."""
    from .synthetic import make_em_volume
    image = make_em_volume(SHAPE, seed=seed).image
    vol = Volume.create(url, num_channels=1, dtype="uint8", resolution=RESOLUTION,
                        voxel_offset=(0, 0, 0), size=SHAPE, chunk=(64, 64, 16))
    vol.write(vol.bounds, image[None])
    return image


def section_png(image: np.ndarray, boundary: np.ndarray, path: Path) -> None:
    """Input section beside the predicted boundary map, one 8-bit grey PNG."""
    from PIL import Image
    gap = np.full((image.shape[0], 8), 255, np.uint8)
    Image.fromarray(np.hstack([image, gap, boundary])).save(path)


def run_demo(directory: str | Path, reporter: Optional[Reporter] = None) -> Path:
    out = Path(directory).resolve()
    out.mkdir(parents=True, exist_ok=True)
    image_url, pred_url = f"file://{out}/image", f"file://{out}/boundary"
    image = write_image(image_url)
    config_path = out / "demo.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(image_url, pred_url), sort_keys=False))
    summary = run(load_config(config_path), reporter)
    z = SHAPE[2] // 2
    section = Volume(pred_url).read(Box((0, 0, z), (SHAPE[0], SHAPE[1], z + 1)))[0, 0]
    png = out / "section.png"
    section_png(image[z], section, png)
    seconds = sum(s.seconds for s in summary.stages)
    print(f"\nvoxflow demo: {summary.voxels:,} voxels in {seconds:.1f} s")
    print(f"  input image     {image_url}")
    print(f"  boundary map    {pred_url}  (uint8, mips 0..2)")
    print(f"  run config      {config_path}")
    print(f"  section z={z}    {png}  (input | boundary)")
    print(f"  in Neuroglancer: .venv/bin/voxflow view {out}/image {out}/boundary")
    return png
