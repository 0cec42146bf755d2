"""What a run on one machine opens to the network: nothing.  The rendezvous store of a
single-node run listens on the loopback interface only (torch's own store listens on every
interface, and its elastic rendezvous unpickles what it reads from there).  The real
`profile --nproc 2` run of test_signals.py checks every socket of the run; these check the
pieces directly."""
from __future__ import annotations

import datetime

from helpers.faults import listening_addresses


def test_the_store_of_a_loopback_master_listens_on_loopback_only():
    import os

    from kfacperf.runtime.distributed import loopback_store
    from kfacperf.runtime.net import free_port

    port = free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    store = loopback_store(env, rank=0, world=1, timeout=datetime.timedelta(seconds=5))
    assert store is not None
    store.set("key", "value")
    mine = [a for a in listening_addresses([os.getpid()]) if a.endswith(f":{port}")]
    assert mine == [f"127.0.0.1:{port}"]
    del store


def test_torchs_store_elsewhere():
    """Under torchrun's agent store, or with a routable address, torch's store is used."""
    from kfacperf.runtime.distributed import is_loopback, loopback_store

    timeout = datetime.timedelta(seconds=1)
    agent = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
             "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert loopback_store(agent, rank=0, world=2, timeout=timeout) is None
    assert loopback_store({"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "1"}, rank=0, world=2,
                          timeout=timeout) is None
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("node07")


def test_local_ranks_are_told_to_use_loopback():
    from kfacperf.runtime.config import ProfileConfig
    from kfacperf.runtime.runner import rank_environments

    envs = rank_environments(ProfileConfig(workload="mlp", out="t", nproc=2), {})
    for env in envs:
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env.get("GLOO_SOCKET_IFNAME", "lo") == "lo"
    mine = rank_environments(ProfileConfig(workload="mlp", out="t", nproc=2),
                             {"GLOO_SOCKET_IFNAME": "eth1"})
    assert mine[0]["GLOO_SOCKET_IFNAME"] == "eth1"  # the user's choice stands


_TWO_LOCAL_RANKS = """
import os, sys
import torch.distributed as dist
import torch.multiprocessing as tmp
sys.path.insert(0, {tests!r})
from helpers.faults import listening_addresses
from kfacperf.runtime.distributed import init_local_group
from kfacperf.runtime.net import free_port

def rank(r, port, out):
    init_local_group("gloo", rank=r, world=2, port=port, timeout_s=20)
    dist.barrier()
    out.put((r, listening_addresses([os.getpid()])))
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    os.environ.pop("GLOO_SOCKET_IFNAME", None)
    ctx = tmp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for _ in range(2):
        r, addrs = out.get(timeout=60)
        print(r, " ".join(addrs) or "-")
    for p in procs:
        p.join(30)
"""


def test_the_communication_benchmark_listens_on_loopback_only(tmp_path):
    """commbench's ranks (spawned, not torchrun's) bind the store and gloo to loopback."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_LOCAL_RANKS.format(tests=str(Path(__file__).parents[1])))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert set(seen) == {"0", "1"}
    assert seen["0"] != "-"  # rank 0 serves the store at least
    for addrs in seen.values():
        for addr in addrs.split():
            assert addr == "-" or addr.startswith("127.0.0.1:"), (addr, seen)
