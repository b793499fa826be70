"""Edit a clip as the prompt says (STARFlow-V's trained video-to-video task, "(v2v)"): the clip's first frames are
the context, and the clip sampled after them under the prompt is the edited one. Describe the clip you want.

    starflow-mlx generate "a red square moving right" --out red.mp4
    python examples/edit_video.py "a blue square moving right" --video red.mp4 --out blue.mp4
"""

from pathlib import Path

from common import load, parser, run, save


def main():
    p = parser(__doc__)
    p.add_argument("--video", required=True, type=Path, help="the clip to edit")
    args = p.parse_args()
    pipeline = load(args)
    result = pipeline.edit(args.prompt, args.video, seed=args.seed)
    path = save(result, args.out)
    print(f"{path}: {result.record['frames']} frames, {args.video} edited to {args.prompt!r}")


if __name__ == "__main__":
    run(main)
