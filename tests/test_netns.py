"""bench.netns: a Ray cluster of two nodes in network namespaces, its shaped link, and a full teardown."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.netns import NetnsCluster, available

pytestmark = pytest.mark.slow  # two Ray nodes and a head start in ~30 s on 2 cores

_why_not = available()
if _why_not:
    pytest.skip(f"no namespace cluster here: {_why_not}", allow_module_level=True)


def test_two_nodes_shaped_link_and_nothing_left():
    cluster = NetnsCluster(workers=2, rate_mbit=100)
    with cluster:
        nodes = cluster.nodes
        assert len(nodes) == 2 and all(n.proc.poll() is None for n in nodes)
        assert all(cluster._pids(n) for n in (cluster.head, *nodes))  # Ray's processes live in the namespaces
        before = cluster.counters()
        mbit = cluster.measure_link(megabytes=4)
        after = cluster.counters()
        pids = [p for n in (cluster.head, *nodes) for p in cluster._pids(n)]
    assert 0.8 * 100 <= mbit <= 1.2 * 100, mbit
    a, b = (n.ns for n in nodes)
    assert after[a]["sent"] - before[a]["sent"] >= 4 * 2**20  # the sender's veth counted the stream
    assert after[b]["received"] - before[b]["received"] >= 4 * 2**20
    assert cluster.leftovers() == []
    assert not Path(cluster.temp_dir).exists()
    alive = [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not alive, f"processes left running: {alive}"
    assert not any(n.startswith(cluster.prefix) for n in os.listdir("/var/run/netns"))


def test_teardown_after_a_failure_inside():
    cluster = NetnsCluster(workers=0, rate_mbit=0)  # the head alone
    with pytest.raises(RuntimeError, match="inside"), cluster:
        raise RuntimeError("inside")
    assert cluster.leftovers() == []
