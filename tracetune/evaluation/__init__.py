"""Evaluation: metrics of trajectories, the evaluate harness (baselines), reports and plots.

- `metrics`: TSR with a Wilson interval, steps, tokens, cost, latency, per family, failures.
- `harness`: held-out tasks, model rollouts, the prompt-only cache, the production baseline.
- `report` / `plots`: the markdown report and PNG plots of one evaluation.
"""
