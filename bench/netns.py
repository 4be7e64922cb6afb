"""A Ray cluster of CPU nodes on this machine, one network namespace per node, joined by shaped links.

Each node lives in its own namespace with one interface, `eth0`, on a private /24; its veth pair joins a
bridge in the root namespace, and `tc ... tbf` shapes both ends (egress each way), so node-to-node traffic
(Gloo's all-reduce, Ray's object transfers) crosses a link of `rate_mbit`. The head node carries no CPU
(`--num-cpus=0`): the driver runs in its namespace, and each worker node has `cpus` logical CPUs and a
custom resource `<prefix>_<i>`, so a Ray Train worker reserving `cpus` lands one per node.

Needs root and `ip netns`. Everything is named `<prefix>` + pid (two runs never collide) and
`NetnsCluster` removes what it made (processes by the namespaces they run in, namespaces, veths, bridge,
cgroups) when its `with` block ends, on errors and at interpreter exit too.

    with NetnsCluster(workers=2, rate_mbit=100) as c:
        c.run_in_head(["python", "-m", "jobs.train", ...])
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.77.0"  # every namespace has only its own eth0, so runs side by side may share the /24
GCS_PORT = 6379  # inside the head's namespace: its own network stack, no clash with other Ray clusters
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
CLONE_NEWNET = 0x40000000
_SEQ = (chr(c) for c in itertools.cycle(range(ord("a"), ord("z") + 1)))  # clusters of one process: distinct names


def available() -> str | None:
    """Why a namespace cluster cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veths, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"slprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "`ip netns add` fails here"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _sh(*args: str) -> str:
    """Run a command; a failure raises with its stderr in one line."""
    r = subprocess.run(list(args), capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"`{' '.join(args)}` failed: {r.stderr.strip()}")
    return r.stdout


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run this thread (only this thread) in network namespace `ns`; sockets opened inside stay there."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        yield
    finally:
        libc.setns(own, CLONE_NEWNET)
        os.close(own)
        os.close(target)


@dataclass
class Node:
    """One Ray node: its namespace, host-side veth, address and `ray start --block` process."""

    ns: str
    veth: str
    ip: str
    resource: str = ""  # the custom resource only this node has ("" for the head)
    proc: subprocess.Popen | None = None
    cgroup: Path | None = None

    def counters(self) -> dict[str, int]:
        """Bytes the node sent (`sent`: the host veth received them) and received, since the veth was made."""
        stats = Path("/sys/class/net") / self.veth / "statistics"
        return {"sent": int((stats / "rx_bytes").read_text()), "received": int((stats / "tx_bytes").read_text())}


@dataclass
class NetnsCluster:
    """`workers` Ray worker nodes and a CPU-less head, each in a namespace, links shaped to `rate_mbit`."""

    workers: int = 2  # worker nodes (one Ray Train worker each)
    rate_mbit: float = 100.0  # tbf rate of every link, each direction; 0 = unshaped
    cpus: int = 1  # logical CPUs of each worker node (= cluster.cpus_per_worker; Ray wants a whole number)
    object_store_mb: int = 150  # plasma store of each node
    prefix: str = field(default_factory=lambda: f"sl{os.getpid()}{next(_SEQ)}")  # names: namespaces, veths, bridge
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the Ray nodes (and driver)
    head: Node | None = None
    nodes: list[Node] = field(default_factory=list)  # worker nodes, in order of start (killed ones too)
    _made: int = 0

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def temp_dir(self) -> str:
        return f"/tmp/ray-netns-{self.prefix}"

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "NetnsCluster":
        atexit.register(self.close)
        try:
            _sh("ip", "link", "add", self.bridge, "type", "bridge")
            _sh("ip", "link", "set", self.bridge, "up")
            self.head = self._link()
            self.head.proc = self._ray_start(self.head, ["--head", f"--port={GCS_PORT}", "--num-cpus=0",
                                                         "--include-dashboard=false"])
            self._wait_port(self.head, GCS_PORT)
            for _ in range(self.workers):
                self.add_node()
            self.wait_nodes(self.workers)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process in this cluster's namespaces (by pid), then remove namespaces, veths, bridge,
        cgroups and the Ray temp dir. Safe to call twice."""
        for node in [n for n in (self.head, *self.nodes) if n]:
            self.kill(node)
        for node in [n for n in (self.head, *self.nodes) if n]:
            subprocess.run(["ip", "netns", "delete", node.ns], capture_output=True)
            subprocess.run(["ip", "link", "delete", node.veth], capture_output=True)  # gone with its peer, usually
            if node.cgroup and node.cgroup.exists():
                with contextlib.suppress(OSError):
                    node.cgroup.rmdir()
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        atexit.unregister(self.close)

    def leftovers(self) -> list[str]:
        """What of this cluster still exists (namespaces, links, processes): [] after `close`."""
        names = _sh("ip", "netns", "list") + _sh("ip", "-o", "link", "show")
        found = sorted({w.split("@")[0].rstrip(":") for w in names.split() if w.startswith(self.prefix)})
        procs = [str(n.proc.pid) for n in (self.head, *self.nodes) if n and n.proc and n.proc.poll() is None]
        return found + procs

    # ------------------------------------------------------------ nodes
    def _link(self) -> Node:
        """A namespace with `eth0` (address .<k+1>) whose peer joins the bridge; both ends shaped."""
        k = self._made
        self._made += 1
        node = Node(ns=f"{self.prefix}n{k}", veth=f"{self.prefix}v{k}", ip=f"{SUBNET}.{k + 1}")
        _sh("ip", "netns", "add", node.ns)
        _sh("ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.ns)
        _sh("ip", "link", "set", node.veth, "master", self.bridge, "up")
        _sh("ip", "-n", node.ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        _sh("ip", "-n", node.ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", node.ns, "link", "set", "lo", "up")
        if self.rate_mbit:
            # burst: at least one rate/HZ tick of bytes and a 64 KiB GSO segment; latency bounds the queue
            burst = max(128 * 1024, int(self.rate_mbit * 1e6 / 8 / 100))
            shape = ["root", "tbf", "rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", "100ms"]
            _sh("tc", "qdisc", "add", "dev", node.veth, *shape)
            _sh("tc", "-n", node.ns, "qdisc", "add", "dev", "eth0", *shape)
        return node

    def add_node(self, cpu_share: float = 0.0) -> Node:
        """Start one more worker node in a fresh namespace; `cpu_share` > 0 caps its process tree (cgroup
        v1 cpu quota) to that many CPUs."""
        node = self._link()
        node.resource = f"{self.prefix}_{self._made - 1}"
        if cpu_share:
            node.cgroup = CGROUP_CPU / node.ns
            node.cgroup.mkdir()
            period = int((node.cgroup / "cpu.cfs_period_us").read_text())
            (node.cgroup / "cpu.cfs_quota_us").write_text(str(int(period * cpu_share)))
        self.nodes.append(node)
        args = [f"--address={self.address}", f"--num-cpus={self.cpus}", f"--resources={json.dumps({node.resource: 1})}"]
        for attempt in range(3):  # a raylet has 30 s to register: on a busy machine it sometimes misses them
            node.proc = self._ray_start(node, args, node.cgroup)
            if self._started(node):
                return node
            self.kill(node)
        raise RuntimeError(f"`ray start` failed 3 times in {node.ns}: {self._start_log(node)}")

    def _started(self, node: Node, timeout: float = 90.0) -> bool:
        """Whether `ray start` in `node` reports its node up (False when it exits or takes over `timeout`)."""
        deadline = time.time() + timeout
        while time.time() < deadline and node.proc.poll() is None:
            if "Ray runtime started" in self._start_log(node, lines=0):
                return True
            time.sleep(0.3)
        return False

    def kill(self, node: Node, abrupt: bool = False) -> None:
        """Stop every process of `node`: those running in its namespace (SIGTERM, then SIGKILL; only SIGKILL
        when `abrupt`, as a lost spot node)."""
        signalled: set[int] = set()
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0))[abrupt:]:
            pids = self._pids(node)
            signalled |= set(pids)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + wait
            # until gone from /proc: a killed process leaves the namespace first, then is reaped
            while time.time() < deadline and (self._pids(node) or any(Path(f"/proc/{p}").exists() for p in signalled)):
                if node.proc:
                    node.proc.poll()  # reap our own child
                time.sleep(0.1)

    def _pids(self, node: Node) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", node.ns], capture_output=True, text=True)
        own = {node.proc.pid} if node.proc and node.proc.poll() is None else set()
        return sorted(own | {int(p) for p in r.stdout.split()})

    def _ray_start(self, node: Node, args: list[str], cgroup: Path | None = None) -> subprocess.Popen:
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = ["ip", "netns", "exec", node.ns, ray, "start", "--block", f"--node-ip-address={node.ip}",
               f"--temp-dir={self.temp_dir}", f"--object-store-memory={self.object_store_mb * 2**20}",
               "--disable-usage-stats", *args]
        if cgroup:  # join the cgroup first: every process the node starts inherits it
            cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(self.temp_dir) / f"{node.ns}.out", "w") as out:  # `ray start`'s own lines
            return subprocess.Popen(cmd, env=self.node_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def node_env(self) -> dict[str, str]:
        """The environment of Ray nodes and the driver: the project importable, one thread per worker,
        Gloo on the namespace's interface, no token authentication."""
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "GLOO_SOCKET_IFNAME": "eth0", "RAY_USAGE_STATS_ENABLED": "0",
                # explicit: with RAY_AUTH_MODE unset, a token in ~/.ray left by another cluster turns auth on
                "RAY_AUTH_MODE": "disabled", **self.env}

    def _wait_port(self, node: Node, port: int, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start in {node.ns} exited with {node.proc.returncode}")
            with in_netns(node.ns), contextlib.suppress(OSError), socket.create_connection((node.ip, port), 1):
                return
            time.sleep(0.3)
        raise TimeoutError(f"{node.ns}: nothing listens on {node.ip}:{port} after {timeout:.0f} s")

    def wait_nodes(self, count: int, timeout: float = 120.0) -> None:
        """Wait until `count` worker nodes are alive in the cluster (raises TimeoutError)."""
        code = ("import ray,time,sys\nray.init(logging_level='ERROR')\nd=time.time()+%f\n"
                "while time.time()<d:\n n=sum(1 for x in ray.nodes() if x['Alive'] and x['Resources'].get('CPU',0)>0)\n"
                " if n>=%d: sys.exit(0)\n time.sleep(0.3)\nsys.exit(3)\n") % (timeout, count)
        r = self.run_in_head([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode:
            dead = [n for n in self.nodes if n.proc.poll() is not None]
            why = (f"`ray start` exited in {dead[0].ns}: " + self._start_log(dead[0])) if dead else r.stderr[-300:]
            raise TimeoutError(f"{count} worker nodes not up after {timeout:.0f} s: {why}")

    def _start_log(self, node: Node, lines: int = 3) -> str:
        """The last `lines` lines (0 = all) `ray start` wrote for `node` (why it exited)."""
        with contextlib.suppress(OSError):
            return " | ".join((Path(self.temp_dir) / f"{node.ns}.out").read_text().strip().splitlines()[-lines:])
        return "(no output)"

    def run_in_head(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run a command (the driver) in the head's namespace, connected to this cluster (RAY_ADDRESS)."""
        env = {**self.node_env(), "RAY_ADDRESS": self.address, **kwargs.pop("env", {})}
        return subprocess.run(["ip", "netns", "exec", self.head.ns, *cmd], env=env, cwd=ROOT, **kwargs)

    def popen_in_head(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        """As `run_in_head`, without waiting."""
        env = {**self.node_env(), "RAY_ADDRESS": self.address, **kwargs.pop("env", {})}
        return subprocess.Popen(["ip", "netns", "exec", self.head.ns, *cmd], env=env, cwd=ROOT, **kwargs)

    # ------------------------------------------------------------ measurements
    def counters(self) -> dict[str, dict[str, int]]:
        """Per worker node still present: bytes sent and received through its veth."""
        return {n.ns: n.counters() for n in self.nodes if Path(f"/sys/class/net/{n.veth}").exists()}

    def measure_link(self, megabytes: float = 4.0) -> float:
        """Mbit/s of one TCP stream from the first worker node to the second (one shaped hop each way)."""
        a, b = self.nodes[0], self.nodes[1]
        payload, total = b"x" * 65536, int(megabytes * 2**20)
        ready, got, result = threading.Event(), [0], {}

        def receive() -> None:
            with in_netns(b.ns), socket.create_server((b.ip, 0)) as srv:
                result["port"] = srv.getsockname()[1]
                ready.set()
                conn, _ = srv.accept()
                with conn:
                    while chunk := conn.recv(1 << 20):
                        got[0] += len(chunk)
                result["end"] = time.perf_counter()

        t = threading.Thread(target=receive)
        t.start()
        ready.wait(10)
        with in_netns(a.ns), socket.create_connection((b.ip, result["port"]), 10) as s:
            start, sent = time.perf_counter(), 0
            while sent < total:
                s.sendall(payload)
                sent += len(payload)
        t.join(60)
        return got[0] * 8 / (result["end"] - start) / 1e6
