"""train.py under torchrun beyond one node and through failures: two torchrun agents on this
machine acting as two nodes (one process each, gloo, c10d rendezvous on 127.0.0.1) train exactly as
one process with the same global batch, and refuse an --out they do not share; under --max-restarts a
killed worker's group is restarted and --resume ends the run as an uninterrupted one."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import FAST, ROOT, losses, max_diff, run, torchrun, weights

pytestmark = pytest.mark.slow  # every test starts torchrun
PROBE = ROOT / "tests" / "ddp_probe.py"  # train.Run's gradients, a restarted group's store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args, per_node=((), ()), script=ROOT / "train.py", launch=(), timeout=300) -> list:
    """Two torchrun agents (with the options `launch`), one process each, meeting at a c10d rendezvous
    on 127.0.0.1, running `script` (train.py) with `args`; `per_node` adds arguments to each node's
    command. Returns each agent's (status, stderr)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                str(rank), "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                                f"127.0.0.1:{port}", "--rdzv_id", "two-nodes", *launch, str(script),
                                *map(str, args), *map(str, per_node[rank])], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for rank in (0, 1)]
    try:
        outs = [a.communicate(timeout=timeout) for a in agents]
    finally:
        for a in agents:
            a.kill()
    return [(a.returncode, err) for a, (_, err) in zip(agents, outs)]


def test_two_nodes_equal_one_process(data, tmp_path):
    """2 nodes x 1 process x batch 2 x 2 accumulation == 1 process x batch 4 x 2 (Adam's eps raised as
    in test_train's DDP test)."""
    common = ["--grad-accum", 2, "--max-steps", 3, "--save-every", 3, "--adam-eps", "1e-3"]
    assert run(data, tmp_path / "one", *common, "--batch-size", 4) == 0
    for status, err in two_nodes("--data", data, "--out", tmp_path / "nodes", *FAST, *common, "--batch-size", 2):
        assert status == 0, err[-3000:]
    assert losses(tmp_path / "nodes") == pytest.approx(losses(tmp_path / "one"), abs=1e-6)
    assert max_diff(weights(tmp_path / "nodes", 3), weights(tmp_path / "one", 3)) < 1e-6


def test_an_out_folder_the_nodes_do_not_share_is_refused_in_one_line(data, tmp_path):
    """Each node given its own --out (as if each mounted its own disk there): refused at start-up."""
    results = two_nodes("--data", data, *FAST, "--max-steps", 2, "--batch-size", 2,
                        per_node=(("--out", tmp_path / "node0"), ("--out", tmp_path / "node1")))
    assert all(status != 0 for status, _ in results)
    lines = [line for _, err in results for line in err.splitlines() if line.startswith("train.py: error:")]
    assert lines == [f"train.py: error: --out {tmp_path / 'node0'} is not shared: process 1 on {os.uname().nodename} "
                     f"cannot see what process 0 wrote there; on several nodes --out must be on a filesystem every "
                     f"node mounts at the same path"]
    assert not (tmp_path / "node0" / "checkpoints").exists() and not (tmp_path / "node0" / ".shared-out-check").exists()


def test_a_killed_worker_is_restarted_and_the_run_ends_as_an_uninterrupted_one(data, tmp_path):
    """torchrun --max-restarts: one worker killed (SIGKILL) after the step-4 checkpoint; the agent
    restarts the group with the same command line, whose --resume continues from the last complete
    checkpoint, and the run ends with the weights and losses of an uninterrupted run."""
    common = ["--data", data, *FAST, "--batch-size", 2, "--max-steps", 12, "--save-every", 4, "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    straight = subprocess.run([*launch, str(ROOT / "train.py"), *map(str, common), "--out", tmp_path / "straight"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "elastic"
    with open(tmp_path / "agent.err", "w") as err:
        agent = subprocess.Popen([*launch, "--max-restarts", "2", str(ROOT / "train.py"), *map(str, common), "--out",
                                  out], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            deadline = time.time() + 240
            while not (out / "log.jsonl").is_file() or len((out / "log.jsonl").read_text().splitlines()) < 6:
                assert agent.poll() is None and time.time() < deadline, "the run ended before step 6"
                time.sleep(0.05)
            workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
            assert len(workers) == 2
            os.kill(int(workers[-1]), signal.SIGKILL)
            assert agent.wait(timeout=240) == 0
        finally:
            agent.kill()
    log = (tmp_path / "agent.err").read_text()
    assert "resumed from" in log and "step-000004" in log  # the restarted group resumed from step 4
    assert losses(out) == losses(tmp_path / "straight") and len(losses(out)) == 12
    assert max_diff(weights(out, 12), weights(tmp_path / "straight", 12)) == 0.0


def test_ddp_gradients_are_its_buckets_with_no_copy_per_step(data, tmp_path):
    """Under DDP every trainable parameter's gradient is a view of DDP's all-reduce buckets, the same
    memory at every step (kept, zeroed, between steps: no gradient is allocated and copied into a
    bucket per step), and the buckets hold the trainable parameters only (the frozen parts of the
    model cost DDP no work per step). That each gradient comes with its parameter's layout, as the
    buckets expect, is tested with each method's gradients (test_retrinet, test_controlnet,
    test_ip_adapter)."""
    out = tmp_path / "probe"
    torchrun("buckets", "--data", data, "--out", out, *FAST, "--resolution", 24, "--batch-size", 2, "--device", "cpu",
             script=PROBE)
    for rank in (0, 1):
        probe = json.loads((out / f"probe-rank{rank}.json").read_text())
        steps = probe["steps"]
        assert all(g is not None for step in steps for g in step.values())
        # DDP rebuilds its buckets once, in the order the gradients became ready in step 1; from then on
        # the gradients are the same memory at every step
        assert steps[1] == steps[2] != steps[0]
        storages = {storage: size for _, storage, size in steps[1].values()}
        assert sum(storages.values()) == probe["trainable_bytes"]  # a few flat buckets, trainable weights only
        assert len(storages) < len(steps[0]) / 10


def test_a_restarted_group_does_not_read_the_store_of_the_group_before(tmp_path):
    """torchrun keeps its store, keys included, across --max-restarts, so a restarted group could read
    the keys its predecessor wrote: gloo then connected to a dead process's address ("connectFullMesh
    failed ... Connection refused"), which ended 1 run in 3 here with a worker killed at a random
    moment, and the next restart hung. Each attempt's process group now has a store prefix of its own
    (training.distributed.store_of_this_attempt): on one node, and on two, where the node whose
    process stayed healthy restarts for the membership change without counting it, so that
    TORCHELASTIC_RESTART_COUNT differs between the nodes."""
    one = tmp_path / "one"
    one.mkdir()
    torchrun("restart", one, script=PROBE, launch=("--max-restarts", "1"), timeout=120)
    assert json.loads((one / "restart.json").read_text()) == {"sees_the_first_attempt": False,
                                                              "restart_counts": [1, 1]}
    two = tmp_path / "two"
    two.mkdir()
    for status, err in two_nodes("restart", two, script=PROBE, launch=("--max-restarts", "1"), timeout=180):
        assert status == 0, err[-3000:]
    assert json.loads((two / "restart.json").read_text()) == {"sees_the_first_attempt": False,
                                                              "restart_counts": [0, 1]}
