"""Separate network hosts on one machine, for multi-node tests.

Inside the test's own private network namespace (the suite runner gives every file one), `TestHosts(n)` makes n
more namespaces, each a "host" with one interface (eth0) and its own address from 198.18.0.0/15, the range set
aside for benchmarking networks, so nothing is routed beyond the private namespace. The hosts hang off a bridge
in the test's namespace, which holds 198.18.0.1 itself: the test can reach every host, and every host every
other. A host's namespace lives as long as its holder process (`sleep infinity` under `unshare -n`); commands run
in it through `nsenter`. `start_ray` makes a Ray cluster of the hosts (head on host 0, `ray start --address` on
the others) with the accelerators each should report.

Each host has its own scratch folder (its Ray node's temp dir): nodes on one machine would otherwise share
/tmp/ray, and each node's log monitor would forward every node's worker logs under its own address.

Everything the helper starts is ended by it, on failure too (and should the test process itself be killed, the
suite runner, a subreaper, kills what Ray daemonized): `close()` kills every process whose network
namespace is a host's (daemons Ray started included: they are found by namespace, not by parentage), which
destroys the namespace and its interfaces, then removes the bridge; `leftovers()` says what is still there.
Losing a host is `host.kill()`: all its processes at once, as when a machine goes down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "198.18.0"  # of 198.18.0.0/15 (RFC 2544): never routed outside the test's private namespace
BRIDGE = "slime-br0"
TEST_ADDRESS = f"{SUBNET}.1"  # the bridge's own address, in the test's namespace
FIRST_HOST = 10  # host i is SUBNET.(FIRST_HOST + i)
RAY_PORT = 6379
START_TIMEOUT_S = 120.0


class HostsUnavailable(RuntimeError):
    """Test hosts cannot be made here (not root, no iproute2, or not inside a private network namespace)."""


def _namespace_of(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:  # gone, or not ours to read
        return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class NodeResources:
    """What a host's Ray node reports: CPUs, GPUs and other resources (e.g. an accelerator's chips, by the name Ray
    counts them under) it is told it has."""

    num_cpus: int = 1
    num_gpus: int = 0
    resources: dict[str, float] = field(default_factory=dict)

    def flags(self) -> list[str]:
        flags = ["--num-cpus", str(self.num_cpus), "--num-gpus", str(self.num_gpus)]
        return flags + (["--resources", json.dumps(self.resources)] if self.resources else [])


@dataclass
class Host:
    index: int
    address: str
    holder: subprocess.Popen  # the process that keeps the namespace; its pid names it for nsenter
    namespace: str  # /proc/<pid>/ns/net of the holder, e.g. "net:[4026532240]"
    temp_dir: str = ""  # the host's own scratch folder (its Ray node's --temp-dir: sockets, logs)

    def command(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-n", "--", *argv]

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), **kwargs)

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kwargs)

    def processes(self) -> list[int]:
        """Every process whose network namespace is this host's."""
        return processes_in(self.namespace)

    def kill(self, timeout_s: float = 10.0) -> None:
        """SIGKILL every process of the host, as when the machine goes down."""
        kill_namespace(self.namespace, timeout_s)
        if self.holder.poll() is None:
            self.holder.wait(timeout=5)


def processes_in(namespace: str) -> list[int]:
    """The pids of every process in network namespace `namespace` ("net:[inode]")."""
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _namespace_of(e.name) == namespace]


def kill_namespace(namespace: str, timeout_s: float = 10.0) -> int:
    """SIGKILL every process of the namespace, again until none is left (a dying daemon may have just forked);
    returns how many were killed. The namespace and its interfaces go with its last process."""
    killed, deadline = set(), time.monotonic() + timeout_s
    while (pids := processes_in(namespace)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return len(killed)


class TestHosts:
    """`with TestHosts(3) as hosts:` hosts[0..2], each a network host of its own (see the module docstring)."""

    __test__ = False  # not a pytest test class

    def __init__(self, count: int):
        self.count = count
        self.hosts: list[Host] = []
        self._bridge = False
        self.root = ""  # the hosts' scratch folders live under it

    def __enter__(self) -> TestHosts:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __len__(self) -> int:
        return len(self.hosts)

    def open(self) -> None:
        check_can_make_hosts()
        self.root = tempfile.mkdtemp(prefix="slime-hosts-", dir="/tmp")  # short: Ray's socket paths must fit
        try:
            _ip("link", "add", BRIDGE, "type", "bridge")
            self._bridge = True
            _ip("addr", "add", f"{TEST_ADDRESS}/24", "dev", BRIDGE)
            _ip("link", "set", BRIDGE, "up")
            for i in range(self.count):
                self.hosts.append(self._add_host(i))
        except BaseException:
            self.close()
            raise

    def _add_host(self, index: int) -> Host:
        holder = subprocess.Popen(["unshare", "-n", "sleep", "infinity"])
        ours = _namespace_of(os.getpid())
        deadline = time.monotonic() + 10
        while (namespace := _namespace_of(holder.pid)) in (None, ours) and time.monotonic() < deadline:
            time.sleep(0.01)  # unshare has not switched namespaces yet
        temp_dir = os.path.join(self.root, f"h{index}")
        shutil.rmtree(temp_dir, ignore_errors=True)  # a replaced host starts with a clean disk
        host = Host(index, f"{SUBNET}.{FIRST_HOST + index}", holder, namespace or "", temp_dir)
        outer = f"slime-h{index}"
        try:
            _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", str(holder.pid))
            _ip("link", "set", outer, "master", BRIDGE)
            _ip("link", "set", outer, "up")
            for args in (["link", "set", "lo", "up"], ["addr", "add", f"{host.address}/24", "dev", "eth0"]):
                host.run(["ip", *args], check=True, capture_output=True)
            host.run(["ip", "link", "set", "eth0", "up"], check=True, capture_output=True)
        except BaseException:
            host.kill()
            raise
        return host

    def replace(self, index: int) -> Host:
        """Host `index` again, as a new machine at the same address (the old one killed if still up)."""
        self.hosts[index].kill()
        subprocess.run(["ip", "link", "del", f"slime-h{index}"], capture_output=True)  # gone with the namespace
        self.hosts[index] = self._add_host(index)
        return self.hosts[index]

    def close(self) -> None:
        for host in self.hosts:
            host.kill()
        if self._bridge:
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
            self._bridge = False
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What the helper made that is still there: processes in a host's namespace, interfaces, the bridge."""
        left = [f"host {h.index}: process {pid}" for h in self.hosts for pid in h.processes()]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        return left + [
            f"interface {name}"
            for name in (BRIDGE, *(f"slime-h{h.index}" for h in self.hosts))
            if name + "@" in links or f" {name}:" in links
        ]


def check_can_make_hosts() -> None:
    """Raise HostsUnavailable unless this process may make hosts: root, the tools, and a private namespace (the
    helper never touches the machine's own network)."""
    if os.geteuid() != 0:
        raise HostsUnavailable("test hosts need root (network namespaces)")
    for tool in ("ip", "unshare", "nsenter"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            raise HostsUnavailable(f"test hosts need `{tool}` (iproute2 / util-linux)")
    if _namespace_of(os.getpid()) == _namespace_of(1):
        raise HostsUnavailable("test hosts are made only inside a private network namespace (unshare -n)")


def ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


def ray_env(env: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **(env or {})}


def start_ray(hosts: TestHosts, nodes: list[NodeResources], env: dict[str, str] | None = None) -> str:
    """A Ray cluster with a node on each of the first len(nodes) hosts (the head on host 0); returns the head's
    address for `ray.init(address=...)` / `--ray-address`. `env`: extra environment of the nodes (their workers
    inherit it)."""
    address = f"{hosts[0].address}:{RAY_PORT}"
    for host, node in zip(hosts.hosts, nodes):
        start_ray_node(host, node, address, env)
    return address


def start_ray_node(host: Host, node: NodeResources, head_address: str, env: dict[str, str] | None = None) -> None:
    """`ray start` on `host`: the head when the head address is the host's own, else a node joining it."""
    head = head_address.split(":")[0] == host.address
    role = ["--head", "--port", str(RAY_PORT)] if head else ["--address", head_address]
    argv = [ray_executable(), "start", *role, "--node-ip-address", host.address, *node.flags()]
    argv += ["--temp-dir", host.temp_dir] if host.temp_dir else []
    argv += ["--include-dashboard=false", "--disable-usage-stats"] if head else []
    done = host.run(argv, env=ray_env(env), capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if done.returncode:
        raise RuntimeError(f"ray start on host {host.index} ({host.address}) failed:\n{done.stdout}\n{done.stderr}")


def kill_host_of(pid: int) -> int:
    """Kill every process on the test host of process `pid` (the host going down), from anywhere in the machine's
    process tree; returns how many were killed. Refuses the caller's own namespace."""
    namespace = _namespace_of(pid)
    if namespace is None or namespace == _namespace_of(os.getpid()):
        raise ValueError(f"process {pid} is not on another test host")
    return kill_namespace(namespace)
