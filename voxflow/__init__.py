"""voxflow: ConvNet inference over teravoxel 3D images, chunk by chunk.

The public names load lazily, so that light users (the Airflow DAG parser reading configs)
do not import torch.
"""
from importlib import import_module

_EXPORTS = {
    "Box": "geometry", "ChunkGrid": "geometry", "ConfigError": "config",
    "RunConfig": "config", "load_config": "config", "parse_config": "config",
    "SlidingWindow": "inference", "Model": "models", "Plan": "pipeline", "plan": "pipeline",
    "run": "runner", "Volume": "volume",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'voxflow' has no attribute {name!r}")
