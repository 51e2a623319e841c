"""`mowbench video`: a finished run's policy episode and its world model's open-loop prediction, as MP4 and GIF files
that decode to the expected frames; TensorBoard GIFs during training (train.video_every) leave the run's numbers as
they were."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from mowbench.frames import CAPTION
from mowbench.results import DONE, read_csv_rows
from mowbench.runner import execute
from mowbench.video import video_command
from tests.conftest import REPO
from tests.test_evaluate import micro_run


@pytest.fixture(scope="module")
def storm_run(tmp_path_factory):
    # space_invaders: episodes longer than the open-loop window at the micro preset (max_len 64 > context 2)
    return micro_run(tmp_path_factory.mktemp("video"), "env=minatar", "task=space_invaders")


@pytest.mark.slow(seconds=30)
def test_video_command_writes_decodable_policy_and_open_loop_videos(storm_run, tmp_path):
    exe = Path(sys.executable).parent / "mowbench"
    out = subprocess.run([str(exe), "video", str(storm_run), "steps=30", "scale=4", "fps=10", f"out={tmp_path}",
                          "threads=1"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    policy_gif, policy_mp4 = iio.imread(tmp_path / "space_invaders_policy.gif", index=None), iio.imread(
        tmp_path / "space_invaders_policy.mp4", index=None)
    steps = len(policy_gif) - 1  # the first frame, then one after each action
    assert 1 <= steps <= 30 and len(policy_mp4) == len(policy_gif)
    assert policy_gif.shape[1:] == (64, 64, 3) and policy_mp4.shape[1:] == (64, 64, 3)  # 16 x 16 frames, scale 4
    panel = iio.imread(tmp_path / "space_invaders_open_loop.gif", index=None)
    context = 2  # the micro preset's imag_context
    assert panel.shape[1:] == (64 + CAPTION, 3 * 64, 3) and len(panel) == steps
    real, predicted = panel[:, :64, :64].astype(int), panel[:, :64, 64:128].astype(int)
    after = np.abs(real[context:] - predicted[context:]).mean()
    assert after > 1.0, after  # an untrained model's predictions are not the real frames
    diff = panel[:, :64, 128:].astype(int)
    # the third panel is their difference, up to the GIF's 256-colour palette
    assert np.abs(diff - np.abs(real - predicted)).mean() < 0.1 * np.abs(real - predicted).mean()


def test_bad_keys_are_one_line_errors(storm_run):
    for args, message in ((["steps=0"], "steps=0; allowed: a positive integer"),
                          (["task=pong"], "task=pong; allowed: the run's tasks (space_invaders)"),
                          (["agent.width=3"], "not a video setting"),
                          (["context=64"], "context=64; allowed: 1..63")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            video_command([str(storm_run), *args])


@pytest.mark.slow(seconds=40)
def test_tensorboard_videos_do_not_change_the_runs_numbers(micro_cfg, tmp_path):
    """The same micro run with and without train.video_every: the same evaluations and metrics, and GIFs in the
    TensorBoard events of the one that logged them."""
    base = ["env=minatar", "task=space_invaders", "train.eval_every=30", "train.periodic_eval_episodes=1",
            "train.tensorboard=true"]
    plain = micro_cfg(*base, f"results_dir={tmp_path / 'a'}")
    filmed = micro_cfg(*base, f"results_dir={tmp_path / 'b'}", "train.video_every=1")
    execute(plain)
    execute(filmed)
    runs = [next(Path(c["results_dir"]).rglob(DONE)).parent for c in (plain, filmed)]
    for table in ("eval.csv", "episodes.csv"):
        a, b = (read_csv_rows(r / table)[1] for r in runs)
        assert [row for _, row in a] == [row for _, row in b], table
    metrics = [{(row["step"], row["name"]): row["value"] for _, row in read_csv_rows(r / "metrics.csv")[1]
                if not row["name"].startswith("perf/")} for r in runs]
    assert metrics[0] == metrics[1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs[1] / "tb"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()["images"]
    assert {"policy/space_invaders", "open_loop/space_invaders"} <= set(tags), tags
    image = events.Images("open_loop/space_invaders")[0]
    assert image.encoded_image_string[:6] in (b"GIF89a", b"GIF87a")
    evaluations = {row["step"] for _, row in read_csv_rows(runs[1] / "eval.csv")[1]}
    assert len(events.Images("policy/space_invaders")) == len(evaluations) >= 2  # one per evaluation
