"""Facts about the machine a run or a bench ran on, recorded so that its numbers can be trusted and compared: the code's
git state, package versions, the device, memory available and used. No torch at import (the analysis records the
git commit without it)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

PACKAGES = ["torch", "numpy", "gymnasium", "ale-py", "metaworld", "mujoco", "minatar", "hydra-core",
            "submitit", "opencv-python-headless", "rliable", "pandas"]



def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: SLURM's --cpus-per-task, taskset, a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_warning(threads: int, torch_threads: int) -> str | None:
    """A warning when torch's CPU threads (`threads`, or torch's default `torch_threads` when it is 0) outnumber the
    CPUs this process may use: oversubscribed threads wait for each other and run slower than fewer would."""
    usable = usable_cpus()
    used = threads or torch_threads
    if used <= usable:
        return None
    how = f"threads={threads}" if threads else f"torch's default of {torch_threads} threads"
    return (f"[mowbench] warning: {how} on {usable} usable CPU(s) (the process's affinity: SLURM's --cpus-per-task, "
            f"taskset, a container's cpuset); set threads={usable} or fewer")


def git_state(cwd: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the code that runs (None outside a git checkout)."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_description(device: Any) -> dict[str, Any]:
    """What a run trained on (device, host, CPU, torch threads; GPU name and CUDA version on CUDA)."""
    import torch

    info: dict[str, Any] = {"device": str(device), "host": platform.node(), "cpu": platform.processor(),
                            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["deterministic_kernels"] = torch.are_deterministic_algorithms_enabled()  # config `deterministic`
    return info


def peak_memory_gib(device: Any) -> dict[str, float]:
    """Peak resident memory of this process so far, and peak CUDA memory allocated on a CUDA device (GiB)."""
    import resource

    import torch

    out = {"host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if device.type == "cuda":
        out["cuda_allocated"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712), v2 as "max"


def host_memory_available(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")
                          ) -> tuple[int, str] | None:
    """(bytes this process can still take, where that figure came from), or None where nothing can be read.

    The kernel's MemAvailable, and, where this process's memory cgroup (SLURM's --mem, a container's limit) or one
    above it has a limit, that limit less its usage: the smallest. cgroup v2 (memory.max, memory.current) and v1
    (memory.limit_in_bytes, memory.usage_in_bytes); a cgroup whose folder is not mounted here (a container sees its
    own cgroup as the root) is read at the mount's root."""
    found: list[tuple[int, str]] = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except OSError:
        pass
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2's unified hierarchy
            root, files = cgroups, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            root, files = cgroups / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        folder = root / path.lstrip("/")
        for f in [folder, *folder.parents] if folder.is_dir() else [root]:
            if not f.is_relative_to(root):  # above the mount
                break
            try:
                limit, usage = ((f / name).read_text().strip() for name in files)
            except OSError:
                continue
            if limit != "max" and int(limit) < NO_LIMIT:
                found.append((max(0, int(limit) - int(usage)), f"the memory limit of cgroup {f}"))
    return min(found) if found else None
