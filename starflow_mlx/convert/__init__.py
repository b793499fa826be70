"""Converters from the released PyTorch checkpoints to MLX model folders (``starflow-mlx convert <kind>``).

One module per kind (``flow``, ``t5``, ``wan_vae``, ``sd_vae``, and ``pipeline``, which runs the others), each with its ``convert_<kind>`` function and the
``add_parser`` that registers its command. A converter locates its source files, reads the state dict
(``checkpoint.read_state_dict``) and the source's config, maps the names with the model's declared ``KeyMap``, checks
every key and shape (``weights.check_state_dict``) and changes the layouts where MLX's differ; ``common`` does the
rest, the same way for all of them.
"""
