"""What a default `circuitlab run` costs, in forwards and in units of one plain forward+backward.

Runs `circuitlab run --task ioi --model smollm2-135m` in this process (the CLI's defaults; `--n`, `--out`,
`--method` may be given) and counts, per stage (`reports.run.STAGES`, plus `setup` for loading and pairs):

- forwards: model forwards over the discovery prompts. One forward = the work of running every layer once over
  every discovery prompt (n pairs x seq_len tokens), counted by `patching.work.WorkCounter` (the fast runner's
  `Runner.attend` and the bridge's own `forward`). Clean and corrupt runs count one each.
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
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from circuitlab.patching.work import WorkCounter
from circuitlab.reports import run as run_module
from circuitlab.reports.config import build_configs


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

    counter = WorkCounter().__enter__()  # counts until the run ends (restored then)
    counter.stage = "setup"
    seconds: dict[str, float] = {}
    walls: dict[str, float] = {}
    watched: set[int] = set()
    captured: dict[str, Any] = {}
    stage = run_module.Pipeline.stage

    def counted_stage(self: Any, name: str, compute: Callable[..., Any]) -> None:
        captured["pipeline"] = self
        if id(self.model()) not in watched:
            watched.add(id(self.model()))
            counter.watch(self.model())
        counter.stage = name
        start, wall = time.process_time(), time.perf_counter()
        try:
            stage(self, name, compute)
        finally:
            seconds[name] = time.process_time() - start
            walls[name] = time.perf_counter() - wall
            counter.stage = "finish"

    run_module.Pipeline.stage = counted_stage  # type: ignore[method-assign]
    start, wall = time.process_time(), time.perf_counter()
    record = run_module.execute(cfg, quiet=True)
    run_seconds, run_wall = time.process_time() - start, time.perf_counter() - wall
    counter.__exit__(None, None, None)
    pipeline = captured["pipeline"]
    pairs = pipeline.pairs()
    unit = float(len(pairs) * pairs.seq_len * int(pipeline.model().cfg.n_layers))
    threads = int(record.get("threads", torch.get_num_threads()))
    forward_seconds = _forward_backward_seconds(pipeline, threads)

    print(f"# circuitlab run --task ioi --model smollm2-135m --n {cfg.n} --method {cfg.method} --out {out}")
    print(f"# threads={threads} load_before_timing={os.getloadavg()[0]:.2f}; one forward = every layer once over "
          f"{len(pairs)} discovery prompts of {pairs.seq_len} tokens")
    print(f"{'stage':<14}{'forwards':>10}{'backwards':>11}{'cpu_s':>10}{'wall_s':>10}")
    seconds["setup"] = walls["setup"] = 0.0
    seconds["finish"] = run_seconds - sum(seconds.values())  # loading, pairs, saving, rendering
    walls["finish"] = run_wall - sum(walls.values())
    names = ["setup", *[s for s in run_module.STAGES if s in seconds or s in counter.token_layers], "finish"]
    for name in names:
        forwards = counter.forwards(unit, name)
        cpu, wall = seconds.get(name, 0.0), walls.get(name, 0.0)
        print(f"{name:<14}{forwards:>10.1f}{counter.backward_count(name):>11d}{cpu:>10.1f}{wall:>10.1f}")
    print(f"{'total':<14}{counter.forwards(unit):>10.1f}{counter.backward_count():>11d}{run_seconds:>10.1f}"
          f"{run_wall:>10.1f}")
    print(f"run_seconds={run_seconds:.1f} forward_seconds={forward_seconds:.3f} "
          f"ratio={run_seconds / forward_seconds:.0f}")


if __name__ == "__main__":
    main()
