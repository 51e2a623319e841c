#!/usr/bin/env bash
# The GPU figures of the README (issue 14): paper-preset benches of storm, monolithic and mow in bf16 with and
# without agent.compile=true and with imagination and the updates replayed from CUDA graphs
# (agent.cuda_graphs=true), and a few hundred real training steps of each to check bf16 stability and memory.
#
#   bash scripts/gpu_figures.sh STAGE OUT_DIR
#   STAGE: env | bench | bench-compile | bench-graphs | profile | determinism | train-storm | train-storm-graphs |
#          train-multi | train-mow | train-mow-graphs | runs-per-gpu | all
#
# Run it on a CUDA node with mowbench installed (python on PATH). Each stage writes one file per measurement into
# OUT_DIR (bench_*.json, train_*.json: the run's losses, speed and peak memory) and prints a line per item; a
# measurement that fails or runs past its time limit leaves its stderr beside it and the next one still runs.
# `DETERMINISTIC=false bash scripts/gpu_figures.sh bench-graphs OUT_DIR`: the graphs with torch's fastest kernels
# (see README on `deterministic`).
set -u
stages="env, bench, bench-compile, bench-graphs, profile, determinism, train-storm, train-storm-graphs, train-multi,
train-mow, train-mow-graphs, runs-per-gpu, all"
stage=${1:?STAGE: one of $stages}
out=${2:?OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python}
limit=${LIMIT_S:-240}  # seconds per measurement
dev=${DEVICE:-cuda} preset=${PRESET:-paper}  # DEVICE=cpu PRESET=tiny tries the script without a GPU
# MoW's bench skips the warm-up clustering (its cost is not what is timed; see mowbench/bench.py)
mow_bench="agent.cluster_warmup_updates=0 agent.clustering=random"

item() {  # item NAME CMD...: run CMD under the time limit, stdout to OUT_DIR/NAME, stderr beside it
    local name=$1; shift
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name" 2>"$out/$name.err"
    echo "[gpu_figures] $name: exit $? after $((SECONDS - t0)) s"
}

env_check() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt"
    $py -c "import torch, torch.nn.functional as F; print(torch.__version__, torch.version.cuda,
torch.cuda.get_device_name(), 'grouped_mm' if hasattr(F, 'grouped_mm') else 'no grouped_mm')" >>"$out/gpu.txt"
    cat "$out/gpu.txt"
}

bench() {  # bench COMPILE: the three agents at the paper preset, bf16 (precision=auto on CUDA), without CUDA graphs
    for agent in storm monolithic mow; do
        local extra=""
        [ "$agent" = mow ] && extra=$mow_bench
        # shellcheck disable=SC2086
        item "bench_${agent}_compile-$1.json" $py -m mowbench.bench agent=$agent preset=$preset device=$dev \
            agent.compile=$1 agent.cuda_graphs=false $extra
    done
}

bench_graphs() {  # the three agents with imagination and the updates as CUDA graphs (the bench prints cuda_graphs)
    # DETERMINISTIC: the run's `deterministic` setting (default true; false: torch's fastest kernels)
    local det=${DETERMINISTIC:-true} suffix=""
    [ "$det" = true ] || suffix="_deterministic-$det"
    for agent in storm monolithic mow; do
        local extra=""
        [ "$agent" = mow ] && extra=$mow_bench
        # shellcheck disable=SC2086
        item "bench_${agent}_graphs$suffix.json" $py -m mowbench.bench agent=$agent preset=$preset device=$dev \
            agent.cuda_graphs=true deterministic="$det" $extra
    done
}

profile() {  # where an eager step's time goes: each phase's 15 kernels and host calls of most self time
    for agent in storm mow; do
        local extra=""
        [ "$agent" = mow ] && extra=$mow_bench
        # shellcheck disable=SC2086
        item "profile_${agent}.json" $py -m mowbench.bench agent=$agent preset=$preset device=$dev bench.profile=15 \
            bench.reference=false bench.repeats=1 agent.cuda_graphs=false $extra
    done
}

train() {  # train NAME STEPS OVERRIDES...: a paper-preset run of STEPS agent steps per task, then its figures
    local name=$1 steps=$2; shift 2
    local dir=/tmp/gpu_figures_runs/$name
    rm -rf "$dir"
    item "train_$name.log" $py -m mowbench.run env=atari100k preset=$preset device=$dev train.steps="$steps" \
        train.checkpoint_every=0 train.log_every=25 train.progress=false train.tensorboard=false \
        train.eval_episodes=2 train.eval_max_steps=200 results_dir="$dir" "$@"
    $py - "$dir" >"$out/train_$name.json" <<'EOF'
import csv, json, math, sys
from pathlib import Path

run = next(Path(sys.argv[1]).glob("*/*/*/seed_*"))
meta = json.loads((run / "metadata.json").read_text())
rows = list(csv.DictReader((run / "metrics.csv").open()))
losses = {}
for r in rows:
    if r["name"].endswith("loss") or r["name"] in ("perf/steps_per_s",):
        losses.setdefault(r["name"], []).append(float(r["value"]))
print(json.dumps({
    "device": meta["device"], "precision": meta["precision"], "updates": meta.get("updates"),
    "wall_time_s": meta.get("wall_time_s"), "peak_memory_gib": meta["sessions"][-1].get("peak_memory_gib"),
    "all_finite": all(math.isfinite(v) for vs in losses.values() for v in vs),
    "first_last": {k: (vs[0], vs[-1]) for k, vs in losses.items()},
    "final_return": json.loads((run / "summary.json").read_text())["final_return"]}, indent=1))
EOF
    echo "[gpu_figures] train_$name.json written"
}

determinism() {  # the same seed twice on one GPU (DET_STEPS agent steps, 100 updates): are the logged losses the same?
    local setting
    # eager: deterministic kernels without graphs; graphs: with them; fast: graphs (the default on CUDA) with torch's
    # fastest kernels
    for setting in eager:agent.cuda_graphs=false graphs:agent.cuda_graphs=true fast:deterministic=false; do
        local name=${setting%%:*} override=${setting#*:}
        train "det_a_$name" "${DET_STEPS:-1124}" agent=storm task=Pong "$override"
        train "det_b_$name" "${DET_STEPS:-1124}" agent=storm task=Pong "$override"
        $py - "$out/train_det_a_$name.json" "$out/train_det_b_$name.json" >"$out/determinism_$name.txt" <<'PY'
import json, sys

a, b = (json.load(open(p))["first_last"] for p in sys.argv[1:])
same = {k: a[k] == b.get(k) for k in a if not k.startswith("perf/")}  # losses, not speed
print(json.dumps({"same_losses": all(same.values()), "differ": [k for k, v in same.items() if not v], "a": a, "b": b}))
PY
        echo "[gpu_figures] determinism_$name.txt: $(head -c 120 "$out/determinism_$name.txt")"
    done
}

runs_per_gpu_pass() {  # runs_per_gpu_pass TAG: K STORM runs (Pong, 400 updates each) at once on the GPU, for K in
    # RUNS_PER_GPU (default 1 2 4 8); per K: each run's median training steps/s (updating steps only; one update per
    # step, so 1 / steps/s is its seconds per update) and their sum (the GPU's aggregate throughput, what K should
    # maximise), peak memory, and the wall time of the K runs. RUNS_PER_GPU_STEPS=1100 (76 updates) tries it on a CPU
    local tag=$1 k i steps=${RUNS_PER_GPU_STEPS:-1424}
    for k in ${RUNS_PER_GPU:-1 2 4 8}; do
        # each run's torch threads: an equal share of the CPUs, as a packed SLURM task gives its runs
        local dir=/tmp/gpu_figures_runs/runs_per_gpu${tag}_$k t0=$SECONDS threads
        threads=$($py -c "from mowbench.grid import threads_share; print(threads_share($k))")
        rm -rf "$dir"
        for i in $(seq "$k"); do
            OMP_NUM_THREADS=$threads timeout "$limit" $py -m mowbench.run env=atari100k preset="$preset" \
                device="$dev" agent=storm task=Pong threads="$threads" seed="$i" train.steps="$steps" train.checkpoint_every=0 train.log_every=25 train.progress=false \
                train.tensorboard=false train.eval_episodes=1 train.eval_max_steps=50 train.random_baseline=false \
                results_dir="$dir" >"$out/runs_per_gpu${tag}_${k}_$i.log" 2>&1 &
        done
        wait
        $py - "$dir" "$k" $((SECONDS - t0)) >"$out/runs_per_gpu${tag}_$k.json" <<'EOF'
import csv, json, statistics, sys
from pathlib import Path

from omegaconf import OmegaConf

root, k, wall = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
runs, sps, memory = sorted(root.glob("*/*/*/seed_*")), [], []
for run in runs:
    warmup = OmegaConf.load(run / "config.yaml").train.warmup
    rows = [float(r["value"]) for r in csv.DictReader((run / "metrics.csv").open())
            if r["name"] == "perf/steps_per_s" and int(r["step"]) > warmup + 25]  # updating steps only
    sps.append(statistics.median(rows) if rows else None)
    sessions = json.loads((run / "metadata.json").read_text())["sessions"]
    memory.append(sessions[-1].get("peak_memory_gib"))
finished = sum((run / "DONE.json").exists() for run in runs)
print(json.dumps({"runs_per_gpu": k, "finished": finished, "wall_s": wall, "steps_per_s": sps,
                  "s_per_update": [round(1 / v, 5) if v else None for v in sps],
                  "aggregate_steps_per_s": sum(sps) if len(sps) == k and None not in sps else None,
                  "peak_memory_gib": memory}, indent=1))
EOF
        echo "[gpu_figures] runs_per_gpu${tag}_$k.json: aggregate $(grep aggregate "$out/runs_per_gpu${tag}_$k.json")"
    done
}

mps_start() {  # CUDA MPS for this script's runs, where the node lets it start (its pipes and logs under /tmp)
    if ! command -v nvidia-cuda-mps-control >/dev/null; then
        echo "MPS: nvidia-cuda-mps-control not found" >"$out/mps.txt"
        return 1
    fi
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/gpu_figures_mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/gpu_figures_mps/log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if ! nvidia-cuda-mps-control -d >"$out/mps.txt" 2>&1; then
        echo "MPS: the daemon did not start" >>"$out/mps.txt"
        return 1
    fi
    sleep 2
    # a CUDA context through MPS, or the runs would measure something else
    if ! $py -c "import torch; torch.ones(1, device='cuda').sum().item()" >>"$out/mps.txt" 2>&1; then
        echo "MPS: started, but a CUDA context through it failed" >>"$out/mps.txt"
        mps_stop
        return 1
    fi
    echo "MPS: running" >>"$out/mps.txt"
}

mps_stop() {
    echo quit | nvidia-cuda-mps-control >>"$out/mps.txt" 2>&1
    sleep 2
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}

runs_per_gpu() {  # K = 1, 2, 4, 8 without MPS, then with it where it starts; then the packing record that
    # `mowbench cost` reads (copy it into mowbench/data/bench/<device>/ beside the benches)
    runs_per_gpu_pass ""
    if mps_start; then
        runs_per_gpu_pass "_mps"
        mps_stop
    fi
    echo "[gpu_figures] $(tail -1 "$out/mps.txt")"
    $py - "$out" "$preset" >"$out/packing_storm_atari100k_$preset.json" <<'EOF'
import datetime, json, subprocess, sys
from pathlib import Path

out, preset = Path(sys.argv[1]), sys.argv[2]


def figures(tag: str) -> dict:
    """Per K whose runs all finished: the record of its K runs."""
    found = {}
    for path in sorted(out.glob(f"runs_per_gpu{tag}_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1])):
        rec = json.loads(path.read_text())
        if rec["finished"] == rec["runs_per_gpu"] and rec["aggregate_steps_per_s"]:
            found[str(rec["runs_per_gpu"])] = rec
    return found


plain, mps = figures(""), figures("_mps")
try:
    machine = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    machine = "no nvidia-smi"
print(json.dumps({
    "agent": "storm", "suite": "atari100k", "preset": preset, "date": datetime.date.today().isoformat(),
    "machine": machine, "source": "scripts/gpu_figures.sh runs-per-gpu (Pong, K STORM runs at once, no MPS)",
    "aggregate_steps_per_s": {k: r["aggregate_steps_per_s"] for k, r in plain.items()},
    "peak_memory_gib": {k: r["peak_memory_gib"] for k, r in plain.items()},
    "mps_aggregate_steps_per_s": {k: r["aggregate_steps_per_s"] for k, r in mps.items()}}, indent=1))
EOF
    echo "[gpu_figures] packing_storm_atari100k_$preset.json: $(tr -d '\n ' <"$out/packing_storm_atari100k_$preset.json" | head -c 300)"
}

# 400 updates after STORM's 1024 warm-up steps
train_storm() { train storm 1424 agent=storm task=Pong; }
# 300 updates over the 26 games after 100 warm-up rounds; MoW's warm-up clustering shortened to 100 updates
train_multi() {
    train monolithic 400 agent=monolithic train.warmup=100
    train mow 400 agent=mow train.warmup=100 agent.cluster_warmup_updates=100
}

case $stage in
    env) env_check ;;
    bench) env_check; bench false ;;
    bench-compile) bench true ;;
    bench-graphs) bench_graphs ;;
    profile) profile ;;
    determinism) determinism ;;
    train-storm) train_storm ;;
    train-storm-graphs) train storm_graphs 1424 agent=storm task=Pong agent.cuda_graphs=true ;;
    train-mow-graphs) train mow_graphs 300 agent=mow train.warmup=100 agent.cluster_warmup_updates=50 \
                          agent.cuda_graphs=true train.eval_episodes=1 train.eval_max_steps=100 ;;
    train-multi) train_multi ;;
    # MoW alone, 200 updates (what fitted the time left of a lease)
    train-mow) train mow 300 agent=mow train.warmup=100 agent.cluster_warmup_updates=50 train.eval_episodes=1 \
                   train.eval_max_steps=100 ;;
    runs-per-gpu) runs_per_gpu ;;
    all) env_check; bench false; bench true; bench_graphs; train_storm; train_multi ;;
    *) echo "STAGE=$stage; allowed: $stages" >&2; exit 2 ;;
esac
