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
