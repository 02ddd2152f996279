"""Local network helpers shared by launchers, trainers and tests: ports, listening sockets, and which address a
server of this process binds and advertises (`--bind-address`)."""

from __future__ import annotations

import ipaddress
import os
import socket

LOOPBACK = "127.0.0.1"
ANY = "0.0.0.0"
NODE = "node"  # --bind-address: the address of the node the process runs on (Ray's node IP)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` now (a server started right after can bind it; racing servers
    should bind port 0 themselves instead)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening_socket(host: str, port: int = 0, backlog: int = 128) -> socket.socket:
    """A socket already bound to `host` and listening (port 0: the system picks). Servers that otherwise listen
    on every interface (torch's TCPStore) are handed this one, so they answer only where they were told to."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def is_address(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def is_loopback(address: str) -> bool:
    return is_address(address) and ipaddress.IPv4Address(address).is_loopback


def bind_and_advertise(setting: str, node_address: str) -> tuple[str, str]:
    """(address a server binds, address it tells others) for a resolved --bind-address (`node`, 0.0.0.0 or an
    IP; `auto` is resolved by the driver, which sees the whole cluster: slime.ray.cluster.run_bind_address)."""
    if setting == NODE:
        return node_address, node_address
    if setting == ANY:
        return ANY, node_address
    return setting, setting


def interface_of(address: str) -> str | None:
    """The name of the local network interface holding IPv4 `address` (None: no interface here has it)."""
    import fcntl
    import struct

    siocgifaddr = 0x8915  # Linux ioctl: an interface's IPv4 address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:  # down, or no IPv4 address
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None


def worker_addresses(setting: str) -> tuple[str, str]:
    """(bind, advertise) for a server started by this worker under the run's resolved --bind-address."""
    if setting not in (NODE, ANY):  # an address given as is: no need to ask Ray (nor to have it)
        return setting, setting
    import ray

    return bind_and_advertise(setting, ray.util.get_node_ip_address())


def bind_worker_network(backend, setting: str) -> None:
    """Point the collective libraries of this worker at the interface of the address it advertises. Their own
    default (the address the machine's host name resolves to) may be on no network the other hosts share, and
    then a group across hosts never forms. The user's own *_SOCKET_IFNAME settings win."""
    _, advertised = worker_addresses(setting)
    if is_loopback(advertised):
        return
    interface = interface_of(advertised)
    if interface is not None:
        for key, value in backend.network_env(interface).items():
            os.environ.setdefault(key, value)
