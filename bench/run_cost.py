"""What a default `circuitlab run` costs, in forwards and in units of one plain forward+backward.

Runs `circuitlab run --task ioi --model smollm2-135m` in this process (the CLI's defaults; `--n`, `--out`,
`--method` may be given) and counts, per stage (`reports.run.STAGES`, plus `setup` for loading and pairs):

- forwards: model forwards over the discovery prompts. One forward = the work of running every layer once over
  every discovery prompt (n pairs x seq_len tokens). It is counted where every forward passes: the fast runner's
  `Runner.attend` (each call adds batch x query positions for one layer; partial runs that start late or at few
  positions count the fraction they run, and C stacked circuits count C) and, for the hook backend and direct
  model calls, the bridge's `forward` (batch x positions x all layers). Clean and corrupt runs count one each.
- backwards: calls of `torch.autograd.backward` / `torch.autograd.grad` (any batch size).
- cpu_s: the stage's CPU seconds in this process (`time.process_time`, every thread), and wall_s its wall time
  (`finish` also holds loading the model, drawing pairs, saving and rendering; `setup` counts forwards before
  the first stage). The ratio uses CPU seconds: this machine is shared (load 5-17 while this was written), so
  wall time measures the other processes as much as this one, while CPU time measures this run's own work.

Then, in the same process and after the run, it times one clean forward and backward over the same discovery
prompts (fast runner, gradient w.r.t. the embedding, the task metric at the read positions; median of 3 CPU
times) with the thread count the run used. Its last line is `run_seconds=.. forward_seconds=.. ratio=..` (CPU
seconds), ratio = run_seconds / forward_seconds: the run's cost in plain forward+backward units. The unit is fixed:
patched forwards now start at the first position they change, run the last block's MLP only at the read positions
and compute only the logits the metric reads (`Runner.run(read=...)`, `Runner.unembed(columns=...)`), but this
timing calls `Runner.run` and `Runner.unembed` without those arguments, so it computes what it computed before
(every position of every layer, the full vocabulary at the read positions). `--threads` fixes the torch threads
(default: the CLI's choice, the cores free at the start).

Run: `HF_HUB_OFFLINE=1 PYTHONPATH=<parent of circuitlab> nice -n 19 python bench/run_cost.py --out /tmp/rc`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from circuitlab.patching.runner import Runner
from circuitlab.reports import run as run_module
from circuitlab.reports.config import build_configs


class Counter:
    """Token-layer and backward counts per stage; `unit` token-layers make one forward."""

    def __init__(self) -> None:
        self.stage = "setup"
        self.token_layers: dict[str, float] = defaultdict(float)
        self.backwards: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.active = True
        self.unit = 1.0

    def add(self, rows: int) -> None:
        if self.active:
            self.token_layers[self.stage] += rows

    def add_backward(self) -> None:
        if self.active:
            self.backwards[self.stage] += 1


def _instrument(counter: Counter) -> Callable[[Any], None]:
    """Patch the counting points; returns a function that also counts the bridge's own forward for a model."""
    attend = Runner.attend

    def counted_attend(self: Runner, layer: int, q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        counter.add(int(q.shape[0]) * int(q.shape[1]))
        return attend(self, layer, q, *args, **kwargs)

    Runner.attend = counted_attend  # type: ignore[method-assign]
    backward, grad = torch.autograd.backward, torch.autograd.grad

    def counted_backward(*args: Any, **kwargs: Any) -> Any:
        counter.add_backward()
        return backward(*args, **kwargs)

    def counted_grad(*args: Any, **kwargs: Any) -> Any:
        counter.add_backward()
        return grad(*args, **kwargs)

    torch.autograd.backward = counted_backward  # type: ignore[assignment]
    torch.autograd.grad = counted_grad  # type: ignore[assignment]

    def watch_model(model: Any) -> None:
        if getattr(model, "_run_cost_counted", False):
            return
        forward = model.forward
        n_layers = int(model.cfg.n_layers)

        def counted_forward(tokens: Any, *args: Any, **kwargs: Any) -> Any:
            if torch.is_tensor(tokens) and tokens.dim() == 2:
                counter.add(int(tokens.shape[0]) * int(tokens.shape[1]) * n_layers)
            return forward(tokens, *args, **kwargs)

        model.forward = counted_forward
        model._run_cost_counted = True

    return watch_model


def _forward_backward_seconds(pipeline: Any, threads: int, repeats: int = 3) -> float:
    """Median seconds of one clean forward + backward over the discovery prompts (fast runner)."""
    runner, task, pairs = pipeline.runner(), pipeline.task, pipeline.pairs()
    read = task.read_positions(pairs).to(pairs.clean_tokens.device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = []
    try:
        for _ in range(repeats):
            start = time.process_time()
            with torch.enable_grad():
                resid = runner.embed(pairs.clean_tokens).detach().requires_grad_(True)
                final = runner.run(resid)
                picked = torch.gather(final, 1, read[..., None].expand(-1, -1, final.shape[-1]))
                task.metric_at(runner.unembed(picked), pairs).sum().backward()
            times.append(time.process_time() - start)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=None, help="prompt pairs (the CLI's default 16)")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--method", default=None, help="discovery method (the CLI's default eap-ig)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (the CLI's default: cores free now)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="run_cost_")
    cfg = build_configs({}, {"task": "ioi", "model": "smollm2-135m", "out": out, "n": args.n,
                             "method": args.method, "threads": args.threads})[0]

    counter = Counter()
    watch_model = _instrument(counter)
    captured: dict[str, Any] = {}
    stage = run_module.Pipeline.stage

    def counted_stage(self: Any, name: str, compute: Callable[..., Any]) -> None:
        captured["pipeline"] = self
        watch_model(self.model())
        counter.stage = name
        start, wall = time.process_time(), time.perf_counter()
        try:
            stage(self, name, compute)
        finally:
            counter.seconds[name] = time.process_time() - start
            counter.wall[name] = time.perf_counter() - wall
            counter.stage = "finish"

    run_module.Pipeline.stage = counted_stage  # type: ignore[method-assign]
    start, wall = time.process_time(), time.perf_counter()
    record = run_module.execute(cfg, quiet=True)
    run_seconds, run_wall = time.process_time() - start, time.perf_counter() - wall
    counter.active = False
    pipeline = captured["pipeline"]
    pairs = pipeline.pairs()
    counter.unit = float(len(pairs) * pairs.seq_len * int(pipeline.model().cfg.n_layers))
    threads = int(record.get("threads", torch.get_num_threads()))
    forward_seconds = _forward_backward_seconds(pipeline, threads)

    print(f"# circuitlab run --task ioi --model smollm2-135m --n {cfg.n} --method {cfg.method} --out {out}")
    print(f"# threads={threads} load_before_timing={os.getloadavg()[0]:.2f}; one forward = every layer once over "
          f"{len(pairs)} discovery prompts of {pairs.seq_len} tokens")
    print(f"{'stage':<14}{'forwards':>10}{'backwards':>11}{'cpu_s':>10}{'wall_s':>10}")
    counter.seconds["setup"] = counter.wall["setup"] = 0.0
    counter.seconds["finish"] = run_seconds - sum(counter.seconds.values())  # loading, pairs, saving, rendering
    counter.wall["finish"] = run_wall - sum(counter.wall.values())
    names = ["setup", *[s for s in run_module.STAGES if s in counter.seconds or s in counter.token_layers], "finish"]
    for name in names:
        forwards = counter.token_layers.get(name, 0.0) / counter.unit
        seconds, wall = counter.seconds.get(name, 0.0), counter.wall.get(name, 0.0)
        print(f"{name:<14}{forwards:>10.1f}{counter.backwards.get(name, 0):>11d}{seconds:>10.1f}{wall:>10.1f}")
    total_forwards = sum(counter.token_layers.values()) / counter.unit
    print(f"{'total':<14}{total_forwards:>10.1f}{sum(counter.backwards.values()):>11d}{run_seconds:>10.1f}"
          f"{run_wall:>10.1f}")
    print(f"run_seconds={run_seconds:.1f} forward_seconds={forward_seconds:.3f} "
          f"ratio={run_seconds / forward_seconds:.0f}")


if __name__ == "__main__":
    main()
