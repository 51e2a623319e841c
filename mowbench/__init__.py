"""mowbench: benchmark suite and ablation harness for Mixture-of-World Models and STORM-style baselines."""

__version__ = "0.1.0"
