"""`mowbench cost`: a grid's projected hours from the recorded benches (each run as the bench projects it), its
total, its SLURM array and the figures used; cells without figures named; a bench on the spot with measure=true."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from mowbench.cost import cost, recorded_devices


def recorded_total(agent: str, device: str = "h100", suite: str = "atari100k") -> float:
    path = resources.files("mowbench.data").joinpath("bench").joinpath(device).joinpath(f"{agent}_{suite}_paper.json")
    return json.loads(path.read_text())["projected_hours"]["total"]


@pytest.mark.slow(seconds=30)
def test_main_atari26_is_projected_from_the_recorded_h100_benches():
    out = cost(["grid=main_atari26", "seeds=[0]"])
    assert out["device"] == "h100" and out["runs"] == 26 + 3  # STORM one run per game, the others one for all
    cells = out["cells"]
    assert cells["storm"]["runs"] == 26 and cells["mow"]["runs"] == 1
    for agent in ("storm", "mow", "monolithic"):  # the same projection model and settings as the bench's own
        assert cells[agent]["per_run"] == pytest.approx(recorded_total(agent), rel=1e-9)
        assert cells[agent]["hours"] == pytest.approx(cells[agent]["runs"] * recorded_total(agent), rel=1e-9)
        assert cells[agent]["bottleneck"] == "updates"
    assert cells["scalezero-lite"]["missing"] == 1 and out["runs_without_figures"] == 1  # named, not free
    assert out["total_hours"] == pytest.approx(sum(c["hours"] for c in cells.values()))
    assert out["slurm_array"]["tasks"] == 29
    assert out["figures"]["scalezero-lite on atari100k (paper)"].startswith("none recorded")


@pytest.mark.slow(seconds=20)
def test_main_mt50_on_the_recorded_cpu_benches_names_its_bottlenecks():
    """MT50 from pixels at the paper preset on 2 CPU cores: TD-MPC2 is bound by acting (MPPI for 50 streams), the
    monolithic STORM and MoW by updates; Newt and PWM have no CPU bench and are named, not counted."""
    out = cost(["grid=main_mt50", "seeds=[0]", "device=cpu"])
    cells = out["cells"]
    assert out["device"] == "cpu" and out["runs"] == 5
    for agent in ("mow", "monolithic", "tdmpc2"):
        assert cells[agent]["per_run"] == pytest.approx(recorded_total(agent, "cpu", "metaworld"), rel=1e-9)
    assert cells["tdmpc2"]["bottleneck"] == "acting"
    assert cells["monolithic"]["bottleneck"] == cells["mow"]["bottleneck"] == "updates"
    assert cells["newt"]["missing"] == cells["pwm"]["missing"] == 1 and out["runs_without_figures"] == 2


def test_bad_device_and_measure_values_are_one_line_errors():
    with pytest.raises(ValueError, match=f"device=a100; allowed: {', '.join(recorded_devices())}"):
        cost(["grid=smoke", "device=a100"])
    with pytest.raises(ValueError, match="measure=maybe; allowed: true, false"):
        cost(["grid=smoke", "measure=maybe"])
    with pytest.raises(ValueError, match="unknown grid"):
        cost(["grid=nonesuch"])


@pytest.mark.slow(seconds=60)
def test_measure_benches_each_agent_here_once(capsys):
    out = cost(["grid=smoke", "seeds=[0]", "measure=true"])
    err = capsys.readouterr().err
    assert err.count("benching storm on minatar (micro)") == 1 and err.count("benching mow on minatar (micro)") == 1
    assert out["device"] == "this machine" and out["runs"] == 3 and out["runs_without_figures"] == 0
    assert all(c["hours"] > 0 for c in out["cells"].values())


@pytest.mark.slow(seconds=30)
def test_runs_per_gpu_counts_packed_runs_at_their_measured_speedup(tmp_path, monkeypatch, capsys):
    """slurm.runs_per_gpu=K: a run whose agent has a recorded packing measurement holds the GPU for 1/speedup of its
    time alone (speedup: the K runs' summed steps/s over one run's); the others count a whole GPU each and are
    named; a K that was not measured is named with the K that were."""
    import mowbench.cost as cost_module

    recorded_dir = resources.files("mowbench.data").joinpath("bench").joinpath("h100")
    device = tmp_path / "h100"
    device.mkdir()
    for agent in ("storm", "mow", "monolithic"):
        name = f"{agent}_atari100k_paper.json"
        (device / name).write_text(recorded_dir.joinpath(name).read_text())
    (device / "packing_storm_atari100k_paper.json").write_text(json.dumps(
        {"agent": "storm", "aggregate_steps_per_s": {"1": 10.0, "2": 18.0, "4": 30.0}}))
    monkeypatch.setattr(cost_module, "bench_dir", lambda name: tmp_path / name)
    monkeypatch.setattr(cost_module, "recorded_devices", lambda: ["h100"])

    out = cost(["grid=main_atari26", "seeds=[0]", "slurm.runs_per_gpu=4"])
    cells, storm = out["cells"], recorded_total("storm")
    assert cells["storm"]["hours"] == pytest.approx(26 * storm / 3.0, rel=1e-9)  # 30 / 10 steps/s
    assert cells["storm"]["run_hours"] == pytest.approx(26 * storm, rel=1e-9)
    assert cells["mow"]["hours"] == pytest.approx(recorded_total("mow"), rel=1e-9)  # no packing figures: one a GPU
    assert out["total_hours"] == pytest.approx(sum(c["hours"] for c in cells.values()))
    assert out["run_hours"] == pytest.approx(sum(c["run_hours"] for c in cells.values()))
    assert out["slurm_array"]["tasks"] == 8 and out["slurm_array"]["runs_per_task"] == 4  # 29 runs, 4 a task
    assert out["packing"]["storm on atari100k (paper)"].startswith("3.00x one run's steps/s with 4 a GPU")
    assert out["packing"]["mow on atari100k (paper)"].startswith("none recorded (bench/h100/packing_mow_")
    cost_module.print_cost(out)
    printed = capsys.readouterr().out
    assert f"runs_per_gpu=4: {out['run_hours']:.1f} device-hours as one run per GPU" in printed
    assert "SLURM array: 8 tasks of up to 4 runs at once" in printed

    three = cost(["grid=main_atari26", "seeds=[0]", "slurm.runs_per_gpu=3"])
    assert three["cells"]["storm"]["hours"] == pytest.approx(26 * storm, rel=1e-9)
    assert three["packing"]["storm on atari100k (paper)"].startswith("K=3 not measured (measured: 1, 2, 4;")
    one = cost(["grid=main_atari26", "seeds=[0]"])
    assert one["packing"] == {} and one["total_hours"] == pytest.approx(one["run_hours"])
