"""The whole recipe of the model shipped in the package (``starflow_mlx/models/shapes``), stage by stage:

1. text: SentencePiece on the caption language + a small T5 pretrained on the captions (``train_text``);
2. vae: a tiny Wan2.2-architecture VAE on the shapes clips (``train_vae``);
3. the VAE and T5 converted to MLX (``starflow-mlx convert wan-vae|t5``) and the training clips encoded by them
   (``shapes_data``), so the flow trains on the latents and text embeddings the pipeline will produce;
4. flow: the STARFlow-V recipe (``train``; ``--nproc N`` runs it under torchrun) on text to video;
5. tasks: the data of the conditioned tasks (``shapes_tasks``: ``(v2v)`` edit pairs, ``(last)`` clips; ``(extend)``
   is built from the text-to-video data) and the flow's training continued on the mix of all four, then on a mix
   weighted to last frame and extension (``flow-focus``);
6. ``starflow-mlx convert pipeline`` of the three into the package, with the shapes model's task defaults and its
   provenance (training commands, the PyTorch checkpoint's sha256, training time).

    python -m tests.reference.make_shapes_model --work runs/shapes [--nproc 2] [--device cuda]

Every stage runs in its own process and is skipped when its output exists; the training stages resume from their
checkpoints, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from starflow_mlx.convert.pipeline import temporal_scale

from .train import SHAPES_YAML, load_official_yaml_text

PACKAGE_MODEL = Path(__file__).resolve().parents[2] / "starflow_mlx" / "models" / "shapes"
# Task defaults of the shipped model where they differ from STARFlow-V's (chosen on held-out captions, see
# BENCHMARKS.md): its guidance, and Jacobi blocks of one latent frame (16 tokens).
DEFAULTS = {"guidance": 3.0, "jacobi_block_size": 16}
# The tasks stage: the share of steps of each task (text to video stays the largest, so it is not forgotten).
TASK_MIX = "t2v=0.3,v2v=0.35,last=0.15,extend=0.2"
# Then a second run weighted to the two tasks the first left below 80% on held-out captions (last frame, extension),
# from the first run's EMA weights at a lower rate, with another seed (other batches and tasks per step).
FOCUS_MIX = "t2v=0.2,v2v=0.25,last=0.3,extend=0.25"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def run(command: list[str], log: Path, mlx: bool = False) -> float:
    """Run one stage, its output appended to ``log`` and echoed; returns its wall time."""
    env = dict(os.environ)
    if mlx and sys.platform == "linux" and os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS  # MLX's CPU matmul; never for torch (MKL)
    else:
        env.pop("LD_PRELOAD", None)
    print("$", shlex.join(command), flush=True)
    start = time.time()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            if "Warning" not in line:
                sys.stdout.write(line)
            f.write(line)
        if proc.wait():
            raise SystemExit(f"stage failed (exit {proc.returncode}): {shlex.join(command)}; see {log}")
    return time.time() - start


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path, help="folder for the runs (checkpoints, logs)")
    p.add_argument("--out", type=Path, default=PACKAGE_MODEL, help="the pipeline folder to write")
    p.add_argument("--nproc", type=int, default=1, help="flow training processes (torchrun)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--vae-steps", type=int, default=1400)
    p.add_argument("--flow-steps", type=int, default=4000)
    p.add_argument("--clips", type=int, default=6400, help="training clips of the flow")
    p.add_argument("--edits", type=int, default=2400, help="edit pairs of the tasks stage")
    p.add_argument("--last-clips", type=int, default=1200, help="last-frame clips of the tasks stage")
    p.add_argument("--task-steps", type=int, default=3000, help="steps of the flow on the task mix")
    p.add_argument("--task-mix", default=TASK_MIX)
    p.add_argument("--focus-steps", type=int, default=2500, help="steps of the second run, on --focus-mix")
    p.add_argument("--focus-mix", default=FOCUS_MIX)
    p.add_argument("--overwrite", action="store_true", help="replace --out")
    args = p.parse_args(argv)
    work, py = args.work, sys.executable
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    times, commands = {}, {}

    def stage(name: str, done: Path, command: list[str], mlx: bool = False):
        commands[name] = shlex.join(command)
        if done.exists():
            print(f"{name}: done ({done})")
            return
        times[name] = run(command, log, mlx)

    stage("text", work / "text" / "spiece.model", [py, "-m", "tests.reference.train_text", "--out", str(work / "text")])
    stage("vae", work / "vae" / "diffusers" / "config.json",
          [py, "-m", "tests.reference.train_vae", "--steps", str(args.vae_steps), "--out", str(work / "vae")])
    cli = [py, "-m", "starflow_mlx.cli"]
    flow_config = load_official_yaml_text(SHAPES_YAML, work)
    stage("convert-vae", work / "vae-mlx" / "config.json",
          [*cli, "convert", "wan-vae", str(work / "vae" / "diffusers"), str(work / "vae-mlx"),
           "--temporal-scale", str(temporal_scale(flow_config.vae))], mlx=True)
    stage("convert-t5", work / "text-mlx" / "config.json",
          [*cli, "convert", "t5", str(work / "text"), str(work / "text-mlx")], mlx=True)
    data = work / "shapes-data.npz"
    stage("data", data, [py, "-m", "tests.reference.shapes_data", "--vae", str(work / "vae-mlx"), "--t5",
                         str(work / "text-mlx"), "--txt-size", str(flow_config.txt_size), "--clips", str(args.clips),
                         "--out", str(data)], mlx=True)
    def trainer(*options: str) -> list[str]:
        train = ["-m", "tests.reference.train", "--data", str(data), *options, "--device", args.device]
        if args.nproc > 1:
            return [py, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), *train]
        return [py, *train]

    stage("flow", work / "flow" / "model.pth", trainer("--out", str(work / "flow"), "--steps", str(args.flow_steps)))
    tasks = work / "shapes-tasks.npz"
    stage("tasks-data", tasks, [py, "-m", "tests.reference.shapes_tasks", "--base", str(data), "--vae",
                                str(work / "vae-mlx"), "--t5", str(work / "text-mlx"), "--txt-size",
                                str(flow_config.txt_size), "--clips", str(args.clips), "--edits", str(args.edits),
                                "--last", str(args.last_clips), "--out", str(tasks)], mlx=True)
    stage("flow-tasks", work / "flow-tasks" / "model.pth",
          trainer("--tasks", str(tasks), "--task-mix", args.task_mix, "--init", str(work / "flow" / "model.pth"),
                  "--out", str(work / "flow-tasks"), "--steps", str(args.task_steps), "--lr", "3e-4", "--warmup", "50"))

    stage("flow-focus", work / "flow-focus" / "model.pth",
          trainer("--tasks", str(tasks), "--task-mix", args.focus_mix, "--init", str(work / "flow-tasks" / "model.pth"),
                  "--out", str(work / "flow-focus"), "--steps", str(args.focus_steps), "--lr", "2e-4", "--warmup", "50",
                  "--seed", "1"))

    checkpoint = work / "flow-focus" / "model.pth"
    provenance = {
        "name": "starflow-mlx shapes",
        "description": "a small STARFlow-V trained by starflow-mlx on synthetic clips of coloured shapes moving in "
                       "named directions ('a red square moving right'), then on editing, last-frame and extension "
                       "examples of them; see tests/reference/make_shapes_model.py",
        "checkpoint_sha256": sha256(checkpoint),
        "training_commands": commands,
        "recipe": "python -m tests.reference.make_shapes_model " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "training_seconds": json.loads((work / "times.json").read_text()) if (work / "times.json").exists() else {},
    }
    provenance["training_seconds"].update({k: round(v) for k, v in times.items()})
    (work / "times.json").write_text(json.dumps(provenance["training_seconds"]))
    (work / "provenance.json").write_text(json.dumps(provenance, indent=2))
    defaults = [a for k, v in DEFAULTS.items() for a in ("--default", f"{k}={json.dumps(v)}")]
    run([*cli, "convert", "pipeline", "--flow", str(checkpoint), "--config", str(work / "flow-focus" / "model.yaml"),
         "--t5", str(work / "text-mlx"), "--vae", str(work / "vae-mlx"), "--dtype", "float16", *defaults,
         "--provenance", str(work / "provenance.json"), *(["--overwrite"] if args.overwrite else []), str(args.out)],
        log, mlx=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
