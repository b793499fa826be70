"""Prompt templates of STARFlow / STARFlow-V (spec §6); pure Python, no model needed.

The official ``preprocess_text`` rewrites every prompt, the empty unconditional one included, before T5 sees it.
Three optional layers are applied in this order:

1. frame rate (STARFlow-V, ``fps_cond``): ``"A video with {fps} fps:\\n{text}\\n"``, or ``"An image:\\n{text}\\n"``
   when fps is 0;
2. noise level (STARFlow-V, ``cond_noise_level``): ``"Noise Level {int(sigma * 1000)}:\\n{text}"``;
3. aspect ratio (STARFlow-V, ``mix_aspect``): ``"{text}\\n in a {ratio} aspect ratio.\\n"`` -- note the space
   before "in".

STARFlow (text-to-image) uses none of them: the caption goes to T5 as written and the unconditional prompt is "".
With the released STARFlow-V settings (16 fps, sigma 0.5, 16:9) the unconditional prompt is
``"Noise Level 500:\\nA video with 16 fps:\\n\\n\\n in a 16:9 aspect ratio.\\n"``.

Training also prepended task markers to the caption before templating: ``"(last) "`` (the last frame is given as a
condition), ``"(v2v) "`` (video-to-video) and ``"(extend) "`` (the clip continues an earlier one).
"""

from __future__ import annotations

from typing import Sequence

TASK_PREFIXES = {"last": "(last) ", "v2v": "(v2v) ", "extend": "(extend) "}

# Released STARFlow-V sampling settings (configs/starflow-v_7B_t2v_caus_480p.yaml and sample.py's --out_fps 16).
T2V_FPS = 16
T2V_NOISE_STD = 0.5
T2V_ASPECT_RATIO = "16:9"


def noise_level(noise_std: float) -> int:
    """The integer in "Noise Level N": ``int(noise_std * 1000)`` in Python float arithmetic, truncated as the
    reference does (0.5 -> 500, but 1.001 -> 1000 because 1.001 * 1000 is 1000.9999999999999)."""
    return int(float(noise_std) * 1000)


def fps_template(text: str, fps: int) -> str:
    return f"A video with {int(fps)} fps:\n{text}\n" if int(fps) > 0 else f"An image:\n{text}\n"


def noise_template(text: str, noise_std: float) -> str:
    return f"Noise Level {noise_level(noise_std)}:\n{text}"


def aspect_ratio_template(text: str, aspect_ratio: str) -> str:
    return f"{text}\n in a {aspect_ratio} aspect ratio.\n"


def add_task_prefix(caption: str, *tasks: str) -> str:
    """Prepend task markers, innermost first: ``add_task_prefix(c, "last", "extend")`` -> "(extend) (last) c",
    the order in which training applied them (the extend marker is added last)."""
    for task in tasks:
        if task not in TASK_PREFIXES:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASK_PREFIXES)}")
        caption = TASK_PREFIXES[task] + caption
    return caption


def format_prompt(
    text: str,
    fps: int | None = None,
    noise_std: float | None = None,
    aspect_ratio: str | None = None,
) -> str:
    """One prompt through the official template; each argument left as None skips its layer."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a string, got {type(text).__name__}")
    if fps is not None:
        text = fps_template(text, fps)
    if noise_std is not None:
        text = noise_template(text, noise_std)
    if aspect_ratio is not None:
        text = aspect_ratio_template(text, aspect_ratio)
    return text


def preprocess_text(
    texts: Sequence[str],
    fps: int | Sequence[int] | None = None,
    noise_std: float | Sequence[float] | None = None,
    aspect_ratio: str | None = None,
) -> list[str]:
    """Batch form of ``format_prompt``; ``fps`` and ``noise_std`` may be one value or one per prompt."""
    if isinstance(texts, str):
        raise TypeError("preprocess_text takes a list of prompts; use format_prompt for one string")
    texts = list(texts)
    fps_list = _per_prompt(fps, len(texts), "fps")
    noise_list = _per_prompt(noise_std, len(texts), "noise_std")
    return [format_prompt(t, f, n, aspect_ratio) for t, f, n in zip(texts, fps_list, noise_list)]


def _per_prompt(value, n: int, name: str) -> list:
    if value is None or isinstance(value, (int, float)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} prompts")
    return values


def t2v_prompt(
    caption: str,
    fps: int = T2V_FPS,
    noise_std: float = T2V_NOISE_STD,
    aspect_ratio: str | None = T2V_ASPECT_RATIO,
) -> str:
    """STARFlow-V prompt with the released sampling settings (``aspect_ratio=None`` when mix_aspect is off)."""
    return format_prompt(caption, fps=fps, noise_std=noise_std, aspect_ratio=aspect_ratio)


def t2i_prompt(caption: str) -> str:
    """STARFlow (text-to-image) prompt: the caption unchanged."""
    return format_prompt(caption)


def unconditional_prompt(
    fps: int | None = None, noise_std: float | None = None, aspect_ratio: str | None = None
) -> str:
    """The classifier-free-guidance prompt: the empty caption through the same template as the conditional one."""
    return format_prompt("", fps=fps, noise_std=noise_std, aspect_ratio=aspect_ratio)
