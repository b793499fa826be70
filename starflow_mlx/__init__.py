"""STARFlow-V (text-to-video) and STARFlow (text-to-image) normalizing flows in MLX.

``Pipeline.from_pretrained()`` with no model loads the small STARFlow-V shipped in the package
(``default_model()``: ``starflow_mlx/models/shapes``).
"""

__version__ = "0.1.0"

# Imported lazily so that `import starflow_mlx.config` (pure Python) does not load MLX.
_EXPORTS = {
    "FlowConfig": "config",
    "StarFlow": "flow",
    "load_flow": "flow",
    "Jacobi": "sampler",
    "SEQUENTIAL": "sampler",
    "SamplerOptions": "sampler",
    "SamplerStats": "sampler",
    "stream_sample": "sampler",
    "sample": "sampler",
    "stream_denoise": "sampler",
    "denoise": "sampler",
    "Pipeline": "pipeline",
    "default_model": "hub",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'starflow_mlx' has no attribute {name!r}")


__all__ = list(_EXPORTS)
