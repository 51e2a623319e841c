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
