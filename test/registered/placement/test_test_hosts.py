"""The multi-host test helper (slime.testing.hosts) and the address rules under it (slime.net, --bind-address):
hosts reach each other only at their own addresses, Ray's nodes report the accelerators they are told of, a
killed host takes every process with it, and nothing is left behind; a store bound to one address is not
reachable at another."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from slime.net import ANY, LOOPBACK, NODE, bind_and_advertise, interface_of, is_loopback, listening_socket
from slime.ray.cluster import ClusterError, run_bind_address
from slime.testing.ci_register import register_cpu_ci
from slime.testing.hosts import HostsUnavailable, NodeResources, TestHosts, check_can_make_hosts, start_ray

register_cpu_ci(est_time=40, suite="base-b-test-cpu")

SERVE = "import http.server, sys; http.server.HTTPServer((sys.argv[1], 8000), http.server.SimpleHTTPRequestHandler).serve_forever()"
FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).status)"
RESOURCES = (
    "import json, ray; ray.init(address=__import__('sys').argv[1], log_to_driver=False); "
    "print(json.dumps({n['NodeManagerAddress']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
)


@pytest.fixture
def can_make_hosts():
    try:
        check_can_make_hosts()
    except HostsUnavailable as e:
        pytest.skip(str(e))


def _fetch(host, url: str) -> subprocess.CompletedProcess:
    return host.run([sys.executable, "-c", FETCH, url], capture_output=True, text=True, timeout=30)


def test_hosts_reach_each_other_at_their_addresses_only(can_make_hosts):
    with TestHosts(2) as hosts:
        servers = [hosts[1].popen([sys.executable, "-c", SERVE, address]) for address in (hosts[1].address, LOOPBACK)]
        try:
            for _ in range(50):
                if _fetch(hosts[1], f"http://{hosts[1].address}:8000/").returncode == 0:
                    break
            assert _fetch(hosts[0], f"http://{hosts[1].address}:8000/").stdout.strip() == "200"
            assert _fetch(hosts[1], f"http://{LOOPBACK}:8000/").stdout.strip() == "200"  # host 1's own loopback
            assert _fetch(hosts[0], f"http://{LOOPBACK}:8000/").returncode != 0  # host 0's loopback is its own
            assert interface_of(hosts[0].address) is None  # the test's namespace holds only the bridge address
            assert len(hosts[1].processes()) == 3  # the holder and both servers
            hosts[1].kill()
            assert hosts[1].processes() == [] and all(s.wait(timeout=5) is not None for s in servers)
        finally:
            for server in servers:
                server.kill()
    assert hosts.leftovers() == []


def test_ray_nodes_report_the_accelerators_they_are_told_of(can_make_hosts):
    with TestHosts(2) as hosts:
        address = start_ray(hosts, [NodeResources(1), NodeResources(2, 3, {"TPU": 4})])
        done = hosts[0].run([sys.executable, "-c", RESOURCES, address], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        import json

        nodes = json.loads(done.stdout.strip().splitlines()[-1])
        assert set(nodes) == {hosts[0].address, hosts[1].address}
        assert nodes[hosts[1].address]["GPU"] == 3 and nodes[hosts[1].address]["TPU"] == 4
        assert nodes[hosts[1].address]["CPU"] == 2 and "GPU" not in nodes[hosts[0].address]
    assert hosts.leftovers() == []


def test_bind_address_rules():
    assert run_bind_address("auto", ["127.0.0.1"]) == LOOPBACK
    assert run_bind_address("auto", ["198.18.0.10", "198.18.0.11"]) == NODE
    assert run_bind_address(ANY, ["198.18.0.10", "198.18.0.11"]) == ANY
    assert run_bind_address("10.1.2.3", ["10.1.2.3"]) == "10.1.2.3"
    with pytest.raises(
        ClusterError, match=r"^--bind-address 10.1.2.3: the cluster spans hosts .*; use node or 0.0.0.0$"
    ):
        run_bind_address("10.1.2.3", ["198.18.0.10", "198.18.0.11"])
    assert bind_and_advertise(NODE, "198.18.0.11") == ("198.18.0.11", "198.18.0.11")
    assert bind_and_advertise(ANY, "198.18.0.11") == (ANY, "198.18.0.11")
    assert bind_and_advertise("127.0.0.1", "198.18.0.11") == ("127.0.0.1", "127.0.0.1")
    assert is_loopback("127.0.0.2") and not is_loopback("198.18.0.1") and not is_loopback("node")


def test_a_store_bound_to_one_address_is_not_reached_at_another():
    from slime.backends.process_groups import host_store

    try:
        listening_socket("127.0.0.2").close()
    except OSError:
        pytest.skip("127.0.0.2 is not a local address here (the suite runner's private namespace has it)")
    store, port = host_store(2, 5.0, "127.0.0.2")
    with socket.create_connection(("127.0.0.2", port), timeout=2):
        pass
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    del store
