"""The reference trains: gradients reach every parameter and a few AdamW steps lower the §4.4 loss; the STARFlow-V
recipe trainer (``tests.reference.train``) regresses the denoiser on the flow's own score, lowers both losses,
steps the same in two processes as in one, resumes exactly, and drops captions at its rate."""

import copy
import math
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from starflow_mlx.config import GAUSSIAN_LOG_NORM, FlowConfig, load_official_yaml
from tests.conftest import randomize_
from tests.helpers import REPO

torch = pytest.importorskip("torch")

from tests.reference import StarFlow  # noqa: E402
from tests.reference import train  # noqa: E402
from tests.reference.flow import DENOISER_STEP  # noqa: E402

# A T2V-shaped flow small enough for a training step in milliseconds: frame-causal deep block, frame-local shallow
# blocks, a text-conditioned learnable denoiser, and a loss weight σ/0.3 ≠ 1 (cond_noise_level) that the
# denoiser's target must divide out.
TRAINER_YAML = """arguments:
- img_size: 4
- channel_size: 4
- patch_size: 1
- channels: 32
- top_block_channels: 32
- blocks: 3
- layers_per_block: 1 1 1
- head_dim: 16
- rope: 1
- pt_seq_len: 4
- sos: 1
- txt_size: 3
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- soft_clip: 4
- temporal_causal: 2
- shallow_block_local: 1
- learnable_self_denoiser: 1
- conditional_denoiser: 1
- denoiser_window: 10
- noise_std: 0.5
- cond_noise_level: 1
- vid_size: '9:16'
- vae: none
- text: tiny-8
- nvp: 1
- adaln: 0
"""
FRAMES = 3  # latent frames per clip
LATENT_SIZE = 4
PROCESS_TIMEOUT_S = 180


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trainer_yaml(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(TRAINER_YAML)
    return path


def tiny_shapes_data(config: FlowConfig, clips: int = 16, captions: int = 3, seed: int = 0) -> dict:
    """What ``tests.reference.shapes_data`` writes, at the tiny model's sizes: correlated latents (a flow can learn
    them), a small posterior scale, caption rows and their embeddings, the empty caption's embedding."""
    rng = np.random.default_rng(seed)
    shape = (clips, FRAMES, config.in_channels, LATENT_SIZE, LATENT_SIZE)
    return {
        "mean": (0.5 * rng.standard_normal(shape).cumsum(-1)).astype(np.float32),
        "scale": np.full(shape, 0.05, np.float32),
        "caption": rng.integers(0, captions, clips),
        "text": rng.standard_normal((captions, config.txt_size, config.txt_dim)).astype(np.float32),
        "text_null": np.zeros((config.txt_size, config.txt_dim), np.float32),
        "captions": np.array([f"caption {i}" for i in range(captions)]),
    }


def trained_in_process(argv: list[str], monkeypatch) -> dict:
    """``train.main`` as one process (no torchrun environment), without touching the caller's torch RNG; returns
    the checkpoint it left."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with torch.random.fork_rng():
        train.main(argv)
    return torch.load(argv[argv.index("--out") + 1] + "/state.pth", weights_only=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_own_session(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run ``command``; on timeout kill its whole process group (torchrun's workers included) and fail."""
    with subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kwargs) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail(f"{command[:4]} ran past {timeout}s")
    return subprocess.CompletedProcess(command, process.returncode, output)


def logged_losses(log: str) -> tuple[float, ...]:
    """(flow loss, bits/dim, denoiser loss) of the first step's log line."""
    match = re.search(r"^step 1 \w+ loss (\S+) \((\S+) bits/dim\) denoiser (\S+) ", log, re.MULTILINE)
    assert match, log[-3000:]
    return tuple(map(float, match.groups()))


def flow_and_denoiser(state: dict) -> tuple[dict, dict]:
    denoiser = {k: v for k, v in state.items() if k.startswith(train.DENOISER_PREFIX)}
    return {k: v for k, v in state.items() if k not in denoiser}, denoiser


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------------------------------------------


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    config = FlowConfig(in_channels=4, img_size=4, channels=32, layers_per_block=[1, 1, 1], txt_size=4, txt_dim=8,
                        head_dim=16, soft_clip=4.0, seq_order="L2R")
    model = StarFlow(config)
    x = torch.randn(8, 4, 4, 4).cumsum(-1) * 0.5  # correlated data a flow can learn
    text = torch.randn(8, 4, 8)
    loss = train.flow_loss(model, x, text, 0.3)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    opt = train.make_optimizer(model, lr=3e-3)
    torch.manual_seed(1)
    losses = [train.train_step(model, opt, x, text, 0.3) for _ in range(30)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1


def test_two_processes_step_like_one_process_on_the_global_batch(trainer_yaml, tmp_path, monkeypatch, capsys):
    config = load_official_yaml(trainer_yaml)
    np.savez(tmp_path / "data.npz", **tiny_shapes_data(config))
    argv = ["--data", str(tmp_path / "data.npz"), "--config", str(trainer_yaml), "--steps", "2", "--batch", "4",
            "--lr", "1e-3", "--warmup", "1", "--save-every", "1"]
    one = trained_in_process([*argv, "--out", str(tmp_path / "one")], monkeypatch)
    one_log = capsys.readouterr().out
    assert "1 process(es) on cpu, 4 clips each" in one_log

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port()), "-m", "tests.reference.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = run_in_own_session([*torchrun, *argv, "--out", str(tmp_path / "two")], PROCESS_TIMEOUT_S, cwd=REPO,
                                env=env)
    assert result.returncode == 0, result.stdout[-3000:]
    # rank 0 prints the process group's size, which only a gloo group of two processes reports as 2
    assert "2 process(es) on cpu, 2 clips each" in result.stdout, result.stdout[-3000:]
    two = torch.load(tmp_path / "two" / "state.pth", weights_only=True)
    # the logged losses are the global batch's: the processes' losses averaged
    flow_loss, bits_per_dim, denoiser_loss = logged_losses(result.stdout)
    assert logged_losses(one_log) == pytest.approx((flow_loss, bits_per_dim, denoiser_loss), abs=2e-3)
    nll = flow_loss / train.loss_weight(config, config.noise_std)
    assert bits_per_dim == pytest.approx((nll + GAUSSIAN_LOG_NORM) / math.log(2), abs=2e-3)

    assert one["step"] == two["step"] == 2
    with torch.random.fork_rng():
        torch.manual_seed(0)  # main's --seed: the weights both runs started from
        initial = StarFlow(config).state_dict()
    split = [flow_and_denoiser(state) for state in (one["model"], two["model"], initial)]
    for index, part in enumerate(("flow", "denoiser")):
        ours, theirs, start = (halves[index] for halves in split)
        # two AdamW steps move weights by up to ~2·lr; the runs differ by float summation order, which Adam's g/√v
        # scales up for tiny gradients (measured 3e-7 at this lr, 3e-6 at lr 3e-3)
        assert largest_difference(ours, start) > 1e-3, part
        assert largest_difference(ours, theirs) < 1.5e-6, part
    assert largest_difference(one["ema"], two["ema"]) < 1.5e-6


def tiny_flow(trainer_yaml, seed: int = 0) -> StarFlow:
    torch.manual_seed(seed)
    model = StarFlow(load_official_yaml(trainer_yaml))
    randomize_(model, seed)  # an untrained flow is the identity, whose score is just its input
    return model


def per_sample_score_target(model: StarFlow, noisy, text, noise_std: float):
    """σ²/0.3 · ∇_x of each sample's total NLL, one sample at a time (no batch mean or loss weight to undo)."""
    targets = []
    for sample, caption in zip(noisy, text):
        x = sample[None].detach().clone().requires_grad_(True)
        total_nll = model(x, caption[None]).nll().sum() * x.numel()
        (score,) = torch.autograd.grad(total_nll, [x])
        targets.append(noise_std**2 / DENOISER_STEP * score[0])
    return torch.stack(targets)


def relative_error(ours, expected) -> float:
    return ((ours - expected).abs().max() / expected.abs().max()).item()


def test_denoiser_target_is_each_samples_flow_score(trainer_yaml, monkeypatch):
    model = tiny_flow(trainer_yaml)
    config, sigma = model.config, model.config.noise_std
    assert train.loss_weight(config, sigma) == pytest.approx(sigma / 0.3)  # a weight the target must divide out
    data = tiny_shapes_data(config)
    x, text, noise = train.global_batch(data, step=0, seed=0, batch=4, drop=0.25)
    noisy = x + sigma * noise
    expected = per_sample_score_target(model, noisy, text, sigma)
    # the target is what makes sampling's one step x - 0.3·pred the gradient (Tweedie) denoiser of spec §5.7
    assert relative_error(noisy - DENOISER_STEP * expected, model.gradient_denoise(noisy, text, sigma)) < 2e-6

    seen = {}

    def prediction_as_a_leaf(inputs, caption, video):
        seen.update(inputs=inputs, caption=caption, video=video)
        seen["prediction"] = torch.zeros_like(inputs, requires_grad=True)
        return seen["prediction"]

    monkeypatch.setattr(model, "predict_noise", prediction_as_a_leaf)
    train.losses_and_gradients(model, noisy, text, sigma)
    # the loss is mean((pred - target)²), so at pred = 0 its gradient is -2·target/numel
    used = -seen["prediction"].grad * seen["prediction"].numel() / 2
    assert relative_error(used, expected) < 1e-5  # float rounding: measured 5e-7
    assert torch.equal(seen["inputs"], noisy) and torch.equal(seen["caption"], text) and seen["video"] is True


def gradients(model: torch.nn.Module) -> dict:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_flow_and_denoiser_gradients_are_those_of_their_own_losses(trainer_yaml):
    model = tiny_flow(trainer_yaml)
    config, sigma = model.config, model.config.noise_std
    x, text, noise = train.global_batch(tiny_shapes_data(config), step=0, seed=0, batch=4, drop=0.25)
    noisy = x + sigma * noise
    plain_flow, plain_denoiser = copy.deepcopy(model), copy.deepcopy(model)
    target = per_sample_score_target(model, noisy, text, sigma)

    loss, denoiser_loss = train.losses_and_gradients(model, noisy, text, sigma)

    # noise_std 0: flow_loss's own noise is off, so it sees the same noisy input
    flow_loss = train.flow_loss(plain_flow, noisy, text, 0.0, loss_weight=train.loss_weight(config, sigma))
    flow_loss.backward()
    plain_denoiser_loss = (plain_denoiser.predict_noise(noisy, text, True) - target).square().mean()
    plain_denoiser_loss.backward()
    assert loss.item() == pytest.approx(flow_loss.item(), rel=1e-6)
    assert denoiser_loss.item() == pytest.approx(plain_denoiser_loss.item(), rel=1e-5)

    trained = gradients(model)
    flow_grads, denoiser_grads = gradients(plain_flow), gradients(plain_denoiser)
    assert not any(name.startswith(train.DENOISER_PREFIX) for name in flow_grads)
    assert len(flow_grads) + len(denoiser_grads) == len(trained) == len(list(model.parameters()))
    for name, grad in trained.items():
        expected = flow_grads.get(name, denoiser_grads.get(name))
        assert relative_error(grad, expected) < (1e-6 if name in flow_grads else 1e-5), name


def test_recipe_steps_lower_the_flow_loss_and_teach_the_denoiser_the_score(trainer_yaml):
    torch.manual_seed(0)
    model = StarFlow(load_official_yaml(trainer_yaml))
    config, sigma = model.config, model.config.noise_std
    data = tiny_shapes_data(config)
    untrained_denoiser = copy.deepcopy(model.learnable_self_denoiser.state_dict())
    held_out = train.global_batch(data, step=10**6, seed=0, batch=16, drop=0.0)

    def losses(flow: StarFlow) -> tuple[float, float]:
        x, text, noise = held_out
        loss, denoiser_loss = train.losses_and_gradients(flow, x + sigma * noise, text, sigma)
        flow.zero_grad(set_to_none=True)
        return loss.item(), denoiser_loss.item()

    before = losses(model)
    optimizer = train.make_optimizer(model, lr=3e-3)
    for step in range(30):
        x, text, noise = train.global_batch(data, step, seed=0, batch=8, drop=0.1)
        train.training_step(model, optimizer, x, text, noise, sigma)
    after = losses(model)
    # the denoiser chases a moving target (the score sharpens as the flow learns), so it is judged against the
    # trained flow's score: the untrained denoiser (prediction 0) against the trained one
    model_with_untrained_denoiser = copy.deepcopy(model)
    model_with_untrained_denoiser.learnable_self_denoiser.load_state_dict(untrained_denoiser)
    untrained = losses(model_with_untrained_denoiser)

    assert after[0] < before[0] - 0.15  # measured 0.78 -> 0.51 (seeds 0-2: -0.24 to -0.27)
    assert after[1] < 0.6 * untrained[1]  # measured 0.49 vs 1.20 (seeds 0-2: ratio 0.41 to 0.49)


class Interrupted(Exception):
    """Stands for the run being killed."""


def test_resumed_run_equals_a_straight_run(trainer_yaml, tmp_path, monkeypatch, capsys):
    config = load_official_yaml(trainer_yaml)
    np.savez(tmp_path / "data.npz", **tiny_shapes_data(config))
    argv = ["--data", str(tmp_path / "data.npz"), "--config", str(trainer_yaml), "--steps", "4", "--batch", "4",
            "--lr", "3e-3", "--warmup", "1", "--save-every", "2"]
    straight = trained_in_process([*argv, "--out", str(tmp_path / "straight")], monkeypatch)

    resumed_out = tmp_path / "resumed"
    steps_taken = []

    def killed_after_two_steps(*args, **kwargs):
        if len(steps_taken) == 2:
            raise Interrupted
        steps_taken.append(1)
        return real_step(*args, **kwargs)

    real_step = train.training_step
    with monkeypatch.context() as patch:
        patch.setattr(train, "training_step", killed_after_two_steps)
        with pytest.raises(Interrupted):
            trained_in_process([*argv, "--out", str(resumed_out)], monkeypatch)
    halfway = torch.load(resumed_out / "state.pth", weights_only=True)
    assert halfway["step"] == 2 and not (resumed_out / "model.pth").exists()
    capsys.readouterr()
    resumed = trained_in_process([*argv, "--out", str(resumed_out)], monkeypatch)
    assert "resumed at step 2" in capsys.readouterr().out

    assert straight["step"] == resumed["step"] == 4
    assert largest_difference(halfway["model"], resumed["model"]) > 1e-3  # the resumed run did train
    for part in ("model", "ema"):
        assert straight[part].keys() == resumed[part].keys()
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part]), part
    for ours, theirs in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert ours.keys() == theirs.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert straight["optimizer"]["param_groups"] == resumed["optimizer"]["param_groups"]
    assert (tmp_path / "straight" / "model.pth").read_bytes() == (resumed_out / "model.pth").read_bytes()


def dropout_data(clips: int = 50, captions: int = 7) -> dict:
    """Clip i's latent is the constant i (scale 0), so a batch row tells which clip it drew."""
    rng = np.random.default_rng(3)
    shape = (clips, 2, 1, 2, 2)
    return {
        "mean": np.broadcast_to(np.arange(clips, dtype=np.float32)[:, None, None, None, None], shape).copy(),
        "scale": np.zeros(shape, np.float32),
        "caption": rng.integers(0, captions, clips),
        "text": rng.standard_normal((captions, 3, 4)).astype(np.float32),
        "text_null": np.zeros((3, 4), np.float32),
    }


@pytest.mark.parametrize("drop", [0.0, 0.1, 0.5, 1.0])
def test_caption_dropout_replaces_rows_by_the_empty_caption_at_its_rate(drop):
    data = dropout_data()
    pristine = copy.deepcopy(data)
    batch = 2000
    x, text, noise = train.global_batch(data, step=7, seed=5, batch=batch, drop=drop)

    clips = x[:, 0, 0, 0, 0].long().numpy()
    captioned = torch.from_numpy(data["text"][data["caption"][clips]])
    dropped = (text == torch.from_numpy(data["text_null"])).flatten(1).all(1)
    assert torch.equal(text[~dropped], captioned[~dropped])
    # binomial(batch, drop): 5 standard deviations either side (exact at 0 and 1)
    assert abs(dropped.sum().item() - drop * batch) <= 5 * (batch * drop * (1 - drop)) ** 0.5
    assert len(set(clips)) == len(data["mean"])  # rows are drawn from every clip
    assert noise.shape == x.shape and 0.9 < noise.std().item() < 1.1
    assert all(np.array_equal(data[k], pristine[k]) for k in data)  # dropping never writes into the dataset

    again = train.global_batch(data, step=7, seed=5, batch=batch, drop=drop)
    assert all(torch.equal(a, b) for a, b in zip((x, text, noise), again))
    for step, seed in ((8, 5), (7, 6)):
        other = train.global_batch(data, step=step, seed=seed, batch=batch, drop=drop)
        assert not torch.equal(other[0], x) and not torch.equal(other[2], noise)


def task_data(clips: int = 6, captions: int = 3) -> dict:
    """``dropout_data``-style rows whose values say where they came from: base clip i is the constant i, edit target
    j the constant 100 + j, last-frame clip k the constant 200 + k; each task's text table is offset by its own
    constant so a row's caption embedding tells which table it came from."""
    data = dropout_data(clips, captions)
    frames = data["mean"].shape[1:]
    rows = np.arange(4, dtype=np.float32)[:, None, None, None, None]
    data.update({
        "edit_source": np.array([5, 0, 3, 1]), "edit_caption": np.array([2, 1, 0, 2]),
        "edit_mean": np.broadcast_to(100 + rows, (4, *frames)).copy(), "edit_scale": np.zeros((4, *frames), np.float32),
        "last_mean": np.broadcast_to(200 + rows, (4, frames[0] + 1, *frames[1:])).copy(),
        "last_scale": np.zeros((4, frames[0] + 1, *frames[1:]), np.float32), "last_caption": np.array([0, 1, 2, 0]),
        **{f"text_{task}": data["text"] + offset for task, offset in (("v2v", 10), ("last", 20), ("extend", 30))},
    })
    return data


@pytest.mark.parametrize("task", ["t2v", "v2v", "last", "extend"])
def test_task_batches_are_the_official_sequences_with_their_caption_prefix(task):
    data = task_data()
    x, text, _ = train.global_batch(data, step=3, seed=1, batch=8, drop=0.0, task=task)
    x, text = x.numpy(), text.numpy()
    frames = data["mean"].shape[1]
    assert x.shape[1] == {"t2v": frames, "v2v": 2 * frames, "last": frames + 1, "extend": frames - 1}[task]
    offset = {"t2v": 0, "v2v": 10, "last": 20, "extend": 30}[task]
    for row, embedding in zip(x, text):
        if task == "v2v":  # the source clip's frames, then its edit target's
            target = int(row[-1].flat[0]) - 100
            assert np.all(row[:frames] == data["edit_source"][target]) and np.all(row[frames:] == 100 + target)
            caption = data["edit_caption"][target]
        elif task == "last":  # the image latent first, then the clip, one stored sequence
            caption = data["last_caption"][int(row[0].flat[0]) - 200]
        else:
            clip = int(row[0].flat[0])
            assert np.all(row == clip)
            caption = data["caption"][clip]
        np.testing.assert_array_equal(embedding, data["text"][caption] + offset)


def test_the_task_of_each_step_follows_the_mix_and_is_seeded():
    mix = train.parse_task_mix("t2v=2,v2v=1,extend=1")
    assert mix == {"t2v": 0.5, "v2v": 0.25, "extend": 0.25}
    tasks = [train.step_task(mix, 0, step) for step in range(2000)]
    assert tasks == [train.step_task(mix, 0, step) for step in range(2000)]
    assert tasks != [train.step_task(mix, 1, step) for step in range(2000)]
    shares = {t: tasks.count(t) / len(tasks) for t in mix}
    assert all(abs(shares[t] - mix[t]) < 0.04 for t in mix), shares
    assert {train.step_task({"t2v": 1.0}, 0, s) for s in range(50)} == {"t2v"}


@pytest.mark.parametrize("text", ["t2v", "t2v=1,i2v=1", "edit=1"])
def test_a_bad_task_mix_is_refused(text):
    with pytest.raises(SystemExit, match="--task-mix"):
        train.parse_task_mix(text)
