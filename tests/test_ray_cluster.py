"""A real two-node Ray cluster on this machine (loopback only, torn down by the test even on failure).

`circuitlab sweep --address` spreads the cells over both nodes (each cell's record names the node that ran it);
the second node is killed while one of its cells runs; that cell is retried on the head node, no cell is lost,
and every number equals the sequential run's. Which node runs what is set by a test-only seam
(`reports.executors.HOLD_ENV`: a node's n-th cell waits for a release file), not by timing: the head holds its
first cell, so the second node takes cells; its first runs, its second holds until the test kills the node, then
the head is released. Skipped, saying why, only where Ray cannot start a cluster here.
"""

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

import circuitlab  # noqa: E402
from circuitlab.reports.executors import HOLD_ENV, SequentialExecutor  # noqa: E402
from circuitlab.reports.grid import SweepSpec, run_sweep  # noqa: E402

# Ray rewrites 127.0.0.1 to the machine's network address; 127.0.0.2 is loopback too and is kept as given.
NODE_IP = "127.0.0.2"
SPEC = {"kind": "bench", "grid": {"model": ["induction_handwired", "planted_marker"],
                                  "method": ["activation", "eap", "eap-ig"]},
        "options": {"n": 8, "n_boot": 50}, "resources": {"num_cpus": 1}}
NUMBERS = ["edge_auroc", "node_auroc", "cpr", "cpr_low", "cpr_high", "cmd", "cmd_low", "cmd_high", "n_edges"]
RAY_BIN = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((NODE_IP, 0))
        return s.getsockname()[1]


def _processes(marker: str) -> list:
    """Processes whose command line names `marker` (a node's temp dir), with all their descendants."""
    me = psutil.Process()
    skip = {me.pid} | {p.pid for p in me.parents()}
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid not in skip and any(marker in arg for arg in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.Error:
            continue
    return list(found.values())


def _kill_node(temp_dir: str) -> int:
    """SIGKILL every process of the node whose temp dir is `temp_dir` (never another user's Ray); how many."""
    procs = _processes(temp_dir)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=20)
    return len(procs)


def _start(args: list[str], env: dict[str, str], what: str) -> None:
    done = subprocess.run([RAY_BIN, "start", *args, "--disable-usage-stats"], env=env, capture_output=True,
                          text=True, timeout=180)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        pytest.skip(f"Ray cannot start {what} on this machine: {' | '.join(tail)}")


@contextlib.contextmanager
def _cluster():
    """A head node and a second node (own raylet, temp dir and `node2` resource), 1 CPU each."""
    head_dir, node_dir = (tempfile.mkdtemp(prefix=f"clray{i}-", dir="/tmp") for i in (1, 2))
    holds = Path(tempfile.mkdtemp(prefix="clray-hold-", dir="/tmp"))
    (holds / "head").mkdir()
    (holds / "node2").mkdir()
    (holds / "node2" / "release-0").touch()  # the second node's first cell runs; its second one is held
    root = str(Path(circuitlab.__file__).resolve().parent.parent)
    # Ray 2.60 turns token auth on wherever ~/.ray/auth_token exists (any local ray.init() writes one): give this
    # cluster, and every process that joins it, its own token instead of depending on that file.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    port = _free_port()
    common = ["--node-ip-address", NODE_IP, "--num-cpus", "1", "--object-store-memory", str(80 * 2**20)]

    def ports() -> list[str]:
        return ["--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port())]
    try:
        _start(["--head", "--port", str(port), "--temp-dir", head_dir, "--include-dashboard=false",
                "--system-config", json.dumps({"health_check_period_ms": 500, "health_check_failure_threshold": 4}),
                *common, *ports()], {**env, HOLD_ENV: str(holds / "head")}, "a head node")
        _start(["--address", f"{NODE_IP}:{port}", "--temp-dir", node_dir, "--resources", '{"node2": 1}',
                *common, *ports()], {**env, HOLD_ENV: str(holds / "node2")}, "a second node")
        yield f"{NODE_IP}:{port}", node_dir, holds, env
    finally:
        _kill_node(node_dir)
        _kill_node(head_dir)
        for folder in (head_dir, node_dir, holds):
            shutil.rmtree(folder, ignore_errors=True)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _nodes(address: str, env: dict[str, str]) -> list[dict]:
    """`ray.nodes()` as a separate driver sees them (this process may hold another Ray session)."""
    code = ("import json, sys, ray; ray.init(address=sys.argv[1], configure_logging=False, log_to_driver=False); "
            "print(json.dumps([{k: n[k] for k in ('NodeID', 'Alive', 'Resources', 'ObjectStoreSocketName')} "
            "for n in ray.nodes()]))")
    done = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_node_sweep_survives_a_killed_node(tmp_path):
    spec_file = tmp_path / "sweep.json"
    spec_file.write_text(json.dumps(SPEC))
    with _cluster() as (address, node_dir, holds, env):
        alive = [n for n in _nodes(address, env) if n["Alive"]]
        assert len(alive) == 2, f"expected 2 alive nodes, got {len(alive)}"
        (second,) = [n["NodeID"] for n in alive if n["Resources"].get("node2")]
        (head,) = [n["NodeID"] for n in alive if n["NodeID"] != second]
        assert len({n["ObjectStoreSocketName"] for n in alive}) == 2  # two raylets, two object stores
        log = tmp_path / "sweep.log"
        with open(log, "w") as sink:
            sweep = subprocess.Popen([sys.executable, "-c", "import sys; from circuitlab.reports.cli import main; "
                                      "sys.exit(main(sys.argv[1:]))", "sweep", str(spec_file), "--out",
                                      str(tmp_path / "cluster"), "--address", address],
                                     env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            # the second node's first cell ran there; its next one is held running: kill the node under it
            _wait_for(lambda: any((holds / "node2").glob("started-1-*")) or sweep.poll() is not None, 240,
                      "a second cell to start on the second node")
            assert sweep.poll() is None, f"the sweep ended before the kill:\n{log.read_text()}"
            assert _kill_node(node_dir) > 0
            (holds / "head" / "release-all").touch()
            sweep.wait(timeout=300)
        finally:
            if sweep.poll() is None:
                sweep.kill()
        assert sweep.returncode == 0, log.read_text()
        _wait_for(lambda: [n["NodeID"] for n in _nodes(address, env) if n["Alive"]] == [head], 60,
                  "the cluster to see the second node dead")
        assert len(list((holds / "node2").glob("started-*"))) == 2  # two cells started there: one ran, one was killed
        assert len(list((holds / "head").glob("started-*"))) == 5  # the held one among the head's five
    table = pd.read_parquet(tmp_path / "cluster" / "sweep.parquet")
    assert len(table) == 6 and set(table["status"]) == {"done"}, table[["cell", "status", "error"]]
    nodes = table["node"].tolist()
    assert set(nodes) == {head, second} and nodes.count(second) == 1  # spread, and the held cell moved to the head
    sequential = run_sweep(SweepSpec.load(spec_file), tmp_path / "seq", executor=SequentialExecutor()).table
    assert list(table["cell"]) == list(sequential["cell"])
    for col in NUMBERS:
        assert table[col].tolist() == sequential[col].tolist(), col  # identical, not merely close
