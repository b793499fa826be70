"""Our own PyTorch implementation of STARFlow / STARFlow-V, written from the spec (not copied from the official
code). It loads official state_dicts strictly (official key names), runs on CPU or CUDA, computes forward, loss,
backward and the sequential inverse, and trains small models. Its files mirror ``starflow_mlx``: rope.py,
attention.py, flow.py (+ denoiser), so a diff between the two implementations is easy to read.
"""

from .flow import FlowOutput, StarFlow, load_official_state_dict  # noqa: F401
