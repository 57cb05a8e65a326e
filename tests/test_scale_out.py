"""train.py under torchrun beyond one node: two torchrun agents on this machine acting as two nodes
(one process each, gloo, c10d rendezvous on 127.0.0.1) train exactly as one process with the same
global batch."""
import os
import socket
import subprocess
import sys

import pytest

from test_train import FAST, ROOT, data, losses, max_diff, run, weights  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args, timeout=300):
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                str(rank), "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                                f"127.0.0.1:{port}", "--rdzv_id", "two-nodes", str(ROOT / "train.py"),
                                *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
              for rank in (0, 1)]
    try:
        outs = [a.communicate(timeout=timeout) for a in agents]
    finally:
        for a in agents:
            a.kill()
    for a, (_, err) in zip(agents, outs):
        assert a.returncode == 0, err[-3000:]


def test_two_nodes_equal_one_process(data, tmp_path):
    """2 nodes x 1 process x batch 2 x 2 accumulation == 1 process x batch 4 x 2 (Adam's eps raised as
    in test_train's DDP test)."""
    common = ["--grad-accum", 2, "--max-steps", 3, "--save-every", 3, "--adam-eps", "1e-3"]
    assert run(data, tmp_path / "one", *common, "--batch-size", 4) == 0
    two_nodes("--data", data, "--out", tmp_path / "nodes", *FAST, *common, "--batch-size", 2)
    assert losses(tmp_path / "nodes") == pytest.approx(losses(tmp_path / "one"), abs=1e-6)
    assert max_diff(weights(tmp_path / "nodes", 3), weights(tmp_path / "one", 3)) < 1e-6
