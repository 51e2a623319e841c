"""Launcher settings (YAML) for grids and the single-node SLURM script; installed as mowbench.slurm."""
