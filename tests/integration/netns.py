"""Hosts on this machine: Linux network namespaces joined by point-to-point veth links.

    root (the test) ──link 0── core (Redis, API) ──link 1── worker-1
                                                 └─link 2── worker-2

Every link is a /30 of one 10.N.0.0/16 block that no interface of the machine uses. Deleting a namespace deletes
its ends of the links, and so the links; `NetworkLab.remove` deletes them all and is safe to call twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


class NamespacesRefused(Exception):
    """The kernel (or the missing privilege) does not let this process create network namespaces."""


@dataclass(frozen=True)
class Link:
    """A veth pair: `near` end in the core namespace (or the root one), `far` end in a host namespace."""

    near_device: str
    near_address: str
    far_device: str
    far_address: str


@dataclass
class NetworkLab:
    """The core namespace and the worker hosts around it; `tag` keeps names apart from other runs."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 0xFFFF:04x}")
    block: int = 0
    namespaces: list[str] = field(default_factory=list)
    links: dict[str, Link] = field(default_factory=dict)

    @property
    def core(self) -> str:
        return f"iq{self.tag}-core"

    def host(self, index: int) -> str:
        return f"iq{self.tag}-w{index}"

    def build(self, worker_hosts: int) -> None:
        """Create core and `worker_hosts` worker namespaces, each linked to core; the root reaches core on link 0."""
        if shutil.which("ip") is None:
            raise NamespacesRefused("no `ip` command (iproute2)")
        self.block = _free_block()
        self._add_namespace(self.core)
        self.links["root"] = self._link(0, near_ns=None, far_ns=self.core)
        for index in range(1, worker_hosts + 1):
            self._add_namespace(self.host(index))
            self.links[self.host(index)] = self._link(index, near_ns=self.core, far_ns=self.host(index))

    def core_address_for(self, host: str) -> str:
        """Where `host` (or "root") reaches the core namespace."""
        link = self.links[host]
        return link.far_address if host == "root" else link.near_address

    def exec_argv(self, namespace: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", namespace, *argv]

    def cut(self, host: str) -> None:
        """Pull the host's cable: both ends down, so no packet leaves or arrives and no RST is sent."""
        link = self.links[host]
        _ip("-n", self.core, "link", "set", link.near_device, "down")
        _ip("-n", host, "link", "set", link.far_device, "down")

    def remove(self) -> None:
        for namespace in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        self.namespaces.clear()
        self.links.clear()

    def _add_namespace(self, name: str) -> None:
        done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NamespacesRefused(f"`ip netns add` failed: {done.stderr.strip()}")
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _link(self, index: int, *, near_ns: str | None, far_ns: str) -> Link:
        near = "r0" if near_ns is None else f"c{index}"
        link = Link(
            near_device=f"iq{self.tag}{near}",
            near_address=f"10.{self.block}.{index}.1",
            far_device=f"iq{self.tag}h{index}",
            far_address=f"10.{self.block}.{index}.2",
        )
        near_netns = [] if near_ns is None else ["netns", near_ns]
        _ip(
            "link",
            "add",
            link.near_device,
            *near_netns,
            "type",
            "veth",
            "peer",
            "name",
            link.far_device,
            "netns",
            far_ns,
        )
        for namespace, device, address in (
            (near_ns, link.near_device, link.near_address),
            (far_ns, link.far_device, link.far_address),
        ):
            in_ns = [] if namespace is None else ["-n", namespace]
            _ip(*in_ns, "addr", "add", f"{address}/30", "dev", device)
            _ip(*in_ns, "link", "set", device, "up")
        return link


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NamespacesRefused(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _free_block() -> int:
    """The second octet of a 10.N.0.0/16 that no address or route of the machine touches."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=False).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=False).stdout
    for block in range(200, 250):
        if f"10.{block}." not in used:
            return block
    raise NamespacesRefused("no free 10.N.0.0/16 block for the test links")
