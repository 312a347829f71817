"""Sweeps on a local Ray (two workers): the same numbers as in-process, and a dying worker retried once."""

import os
import sys

import pytest

ray = pytest.importorskip("ray")

from circuitlab.reports.cells import Cell, CellOutcome  # noqa: E402
from circuitlab.reports.executors import RayExecutor, SequentialExecutor  # noqa: E402
from circuitlab.reports.grid import SweepSpec, run_sweep  # noqa: E402

GRID = {"kind": "bench", "grid": {"model": ["induction_handwired", "planted_marker", "tracr_reverse"],
                                  "method": ["activation", "eap", "eap-ig"]},
        "options": {"n": 8, "n_boot": 50}, "resources": {"num_cpus": 1}}
NUMBERS = ["edge_auroc", "edge_auroc_visible", "node_auroc", "cpr", "cpr_low", "cpr_high", "cmd", "cmd_low",
           "cmd_high", "n_edges", "n_true_edges", "n_visible_true_edges"]


def _die_once(marker: str) -> int:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker process dies; Ray retries the task once
    return os.getpid()


def _always_die(cell: Cell) -> CellOutcome:
    os._exit(1)


class _DyingRay(RayExecutor):
    cell_function = staticmethod(_always_die)


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    executor = RayExecutor(num_cpus=2, object_store_mb=200)
    with executor:
        yield executor
    assert not ray.is_initialized()


@pytest.mark.slow
def test_ray_sweep_equals_sequential_and_retries_dying_workers(local_ray, tmp_path):
    spec = SweepSpec.from_dict(GRID)
    ray_result = run_sweep(spec, tmp_path / "ray", executor=local_ray)
    assert ray.is_initialized()  # the sweep used the fixture's Ray and left it running
    seq_result = run_sweep(spec, tmp_path / "seq", executor=SequentialExecutor())
    a, b = ray_result.table, seq_result.table
    assert list(a["cell"]) == list(b["cell"]) and set(a["status"]) == {"done"} and len(a) == 9
    assert set(a["executor"]) == {"ray"} and set(b["executor"]) == {"sequential"}
    assert len(set(a["host"].astype(str) + a["cell"])) == 9
    for col in NUMBERS:
        assert a[col].tolist() == b[col].tolist(), col  # identical, not merely close
    # a worker that dies is retried once ...
    marker = tmp_path / "died-once"
    assert local_ray.map(_die_once, [str(marker)])[0] > 0 and marker.exists()  # without a retry: WorkerCrashedError
    # ... and a cell whose worker dies every time is recorded as failed with Ray's error
    dying = _DyingRay(num_cpus=2)
    outcomes = {}
    dying.run_cells([Cell("bench", {"model": "induction_handwired", "method": "eap"})],
                    lambda i, outcome: outcomes.setdefault(i, outcome))
    assert outcomes[0].status == "failed" and "2 attempts" in outcomes[0].error


@pytest.mark.slow
def test_sharded_head_position_sweep_on_smollm2_equals_one_process(local_ray, smollm2):
    import torch

    from circuitlab.patching.activation import PatchingConfig, activation_patching
    from circuitlab.patching.shard import sharded_activation_patching
    from circuitlab.tasks import get_task

    task = get_task("ioi")
    pairs = task.generate(smollm2, 2, seed=0)
    layers = [28, 29]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = activation_patching(smollm2, task, pairs, "z", positions="each", layers=layers, config=PatchingConfig())
    finally:
        torch.set_num_threads(previous)
    sharded = sharded_activation_patching("smollm2-135m", task, pairs, "z", positions="each", layers=layers,
                                          n_shards=2, map_fn=local_ray.map)
    assert len(one) == len(layers) * 9 * pairs.clean_tokens.shape[1] == len(sharded)
    keys = ["layer", "head", "position", "role"]
    assert sharded[keys].values.tolist() == one[keys].values.tolist()
    assert (sharded["metric"] - one["metric"]).abs().max() <= 1e-6
    assert (sharded["effect"] - one["effect"]).abs().max() <= 1e-6
    assert abs(sharded.attrs["clean_metric"] - one.attrs["clean_metric"]) <= 1e-6
    assert one["effect"].abs().max() > 0.01  # the sweep measures something


@pytest.mark.slow
def test_ray_leaderboard_cells_equal_sequential(local_ray, tiny_dir, tmp_path):
    spec = SweepSpec.from_dict({"kind": "leaderboard", "grid": {"model": [tiny_dir], "method": ["eap", "random"],
                                                                "task": ["repeated_tokens"]},
                                "options": {"n": 4, "n_heldout": 4, "n_boot": 20, "resamples": 1},
                                "resources": {"num_cpus": 1}})
    a = run_sweep(spec, tmp_path / "ray", executor=local_ray).table
    b = run_sweep(spec, tmp_path / "seq", executor=SequentialExecutor()).table
    assert set(a["status"]) == {"done"} and set(a["executor"]) == {"ray"} and list(a["cell"]) == list(b["cell"])
    for col in ["cpr", "cpr_low", "cmd", "heads_at_target", "edges_at_target", "stability_boot_edges", "forwards"]:
        assert a[col].tolist() == b[col].tolist(), col  # identical, not merely close
