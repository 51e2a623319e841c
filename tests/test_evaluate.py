"""`mowbench evaluate`: a finished run's weights evaluated again, beside the run's files and never in them. With the
run's own protocol and seed it replays the run's final evaluation exactly (every agent); overrides show in the new
eval.csv; bad input is one line before any work; the analysis can take these evaluations instead of the runs'."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from mowbench.agents.base import registered_agents
from mowbench.evaluate import evaluate_command
from mowbench.results import DONE, read_csv_rows, read_json
from mowbench.runner import execute
from tests.conftest import MICRO, REPO, continuous_only


def mowbench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The installed console command, as a user types it."""
    exe = Path(sys.executable).parent / "mowbench"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def micro_run(results: Path, *extra: str) -> Path:
    args = ["python", "-m", "mowbench.run", *MICRO, f"results_dir={results}", "train.warmup=20", "train.steps=60",
            "train.eval_episodes=3", "train.eval_max_steps=60", "train.replay_capacity=500", "threads=1", *extra]
    out = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return next(p.parent for p in results.rglob(DONE) if "evaluations" not in p.parts)


def hashes(folder: Path) -> dict[str, str]:
    """Every file of the run but its evaluations, by content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "evaluations" not in p.relative_to(folder).parts}


def eval_rows(path: Path) -> list[tuple[str, str, float, int]]:
    return [(r["step"], r["task"], float(r["return"]), int(r["length"])) for _, r in read_csv_rows(path)[1]]


def final_rows(run: Path) -> list[tuple[str, str, float, int]]:
    step = str(read_json(run / DONE)["step"])
    return [r for r in eval_rows(run / "eval.csv") if r[0] == step]


@pytest.fixture(scope="module")
def minatar_run(tmp_path_factory):
    return micro_run(tmp_path_factory.mktemp("evaluate"), "env=minatar", "task=space_invaders")


@pytest.mark.slow(seconds=40)
def test_evaluate_replays_the_final_evaluation_and_leaves_the_run_byte_identical(minatar_run):
    before = hashes(minatar_run)
    out = mowbench("evaluate", str(minatar_run), "threads=1")
    assert out.returncode == 0, out.stderr
    folder = minatar_run / "evaluations" / "default"
    assert (folder / DONE).exists() and (folder / "config.yaml").exists()
    assert eval_rows(folder / "eval.csv") == final_rows(minatar_run)  # same envs, same acting seeds
    assert len({r[3] for r in final_rows(minatar_run)}) > 1 or len({r[2] for r in final_rows(minatar_run)}) > 1, \
        "episodes too alike to show a replay"
    meta = read_json(folder / "metadata.json")
    assert meta["weights"].endswith("model.pt") and len(meta["weights_sha256"]) == 64
    assert hashes(minatar_run) == before
    written = (folder / "eval.csv").read_bytes()
    again = mowbench("evaluate", str(minatar_run), "threads=1")  # done: nothing is redone or rewritten
    assert again.returncode == 0 and "already done" in again.stdout
    assert (folder / "eval.csv").read_bytes() == written and hashes(minatar_run) == before


@pytest.mark.slow(seconds=30)
def test_overrides_show_in_the_new_evaluation_and_its_name(minatar_run):
    folder = evaluate_command([str(minatar_run), "train.eval_episodes=5", "seed=4", "threads=1"])
    assert folder == minatar_run / "evaluations" / "seed=4,eval_episodes=5"
    rows = eval_rows(folder / "eval.csv")
    assert len(rows) == 5 and {r[0] for r in rows} == {str(read_json(minatar_run / DONE)["step"])}
    assert read_json(folder / "metadata.json")["eval_seed"] == 4
    assert "eval_episodes: 5" in (folder / "config.yaml").read_text()
    assert rows[:3] != final_rows(minatar_run)  # other seeds, other episodes
    # env workers are how, not what: the evaluation keeps the default name and replays the run's final one
    workers = evaluate_command([str(minatar_run), "train.env_workers=2", "threads=1", "name=in_workers"])
    assert eval_rows(workers / "eval.csv") == final_rows(minatar_run)


@pytest.mark.slow(seconds=40)
def test_a_protocol_override_changes_the_evaluation_mode(tmp_path):
    run = micro_run(tmp_path, "env=atari100k", "task=Pong", "train.eval_max_steps=30")
    assert {r["mode"] for _, r in read_csv_rows(run / "eval.csv")[1]} == {"reference"}  # STORM's protocol
    out = mowbench("evaluate", str(run), "env.protocol=standard", "train.eval_episodes=2", "threads=1")
    assert out.returncode == 0, out.stderr
    folder = run / "evaluations" / "env.protocol=standard,eval_episodes=2"
    assert {r["mode"] for _, r in read_csv_rows(folder / "eval.csv")[1]} == {"full"}
    assert read_json(folder / "metadata.json")["evaluation"]["mode"] == "full"


@pytest.mark.parametrize("args, message", [
    (["agent.width=8"], "not an evaluation setting"),
    (["env.image_size=32"], "changes what the weights were trained on"),
    (["env.no_such_key=1"], "the run's config has no such key"),
    (["seed=-1"], "seed=-1; allowed: a non-negative integer"),
    (["name=../x"], "name='../x'; allowed"),
    (["train.eval_episodes"], "expected key=value"),
])
def test_bad_keys_are_one_line_errors(minatar_run, args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        evaluate_command([str(minatar_run), *args])


def test_corrupt_weights_and_unfinished_runs_are_refused_in_one_line(minatar_run, tmp_path):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"not a checkpoint")
    out = mowbench("evaluate", str(minatar_run), f"checkpoint={garbage}", "name=garbage")
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "is corrupt" in out.stderr
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((minatar_run / "config.yaml").read_text())
    out = mowbench("evaluate", str(unfinished))
    assert out.returncode != 0 and "is not finished" in out.stderr and out.stderr.strip().count("\n") == 0


def test_the_analysis_takes_the_evaluations_instead_of_the_runs_own(minatar_run):
    from mowbench.analysis.scores import read_results

    evaluate_command([str(minatar_run), "train.eval_episodes=4", "name=four", "threads=1"])
    root = minatar_run.parents[3]
    own, _ = read_results(root, "minatar")
    other, notes = read_results(root, "minatar", evaluation="four")
    step = read_json(minatar_run / DONE)["step"]
    rows = eval_rows(minatar_run / "evaluations" / "four" / "eval.csv")
    assert other[other["step"] == step]["score"].item() == pytest.approx(sum(r[2] for r in rows) / 4)
    assert other[other["step"] == step]["episodes"].item() == 4
    assert own[own["step"] == step]["episodes"].item() == 3
    assert any("re-evaluation 'four'" in n for n in notes)
    missing, notes = read_results(root, "minatar", evaluation="nothing")
    assert missing.empty and any("has no finished evaluation 'nothing'" in n for n in notes)


@pytest.mark.slow(seconds=150)
@pytest.mark.parametrize("agent", sorted(registered_agents()))
def test_every_agent_replays_its_final_evaluation(agent, micro_cfg):
    """In process: a micro run of the agent, then its default evaluation equals the run's final one. MoW needs two
    tasks (two clusters); the others take one, with fast frames (Meta-World's full renders would be most of a
    continuous agent's time; the replay path is the same at any render quality)."""
    discrete = not continuous_only(agent)
    tasks = "space_invaders,asterix" if agent == "mow" else "space_invaders" if discrete else "reach-v3"
    fast = [] if discrete else ["env.fast_render=true", "env.multisample=false"]
    cfg = micro_cfg(f"agent={agent}", f"env={'minatar' if discrete else 'metaworld'}", f"task=[{tasks}]", *fast,
                    "train.eval_episodes=2", "train.eval_max_steps=40", "train.random_baseline=false")
    execute(cfg)
    root = Path(cfg["results_dir"])
    run = next(p.parent for p in root.rglob(DONE))
    before = hashes(run)
    folder = evaluate_command([str(run)])
    assert eval_rows(folder / "eval.csv") == final_rows(run)
    assert hashes(run) == before
