"""STARFlow-V (text-to-video) and STARFlow (text-to-image) normalizing flows in MLX."""

__version__ = "0.1.0"

# Imported lazily so that pure-Python modules (config, sampling) load without MLX, e.g. in the torch reference.
_EXPORTS = {
    "FlowConfig": "config",
    "StarFlow": "flow",
    "load_flow": "flow",
    "Jacobi": "sampling",
    "SEQUENTIAL": "sampling",
    "SamplerStats": "sampling",
    "Cancelled": "sampling",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'starflow_mlx' has no attribute {name!r}")


__all__ = list(_EXPORTS)
