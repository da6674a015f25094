"""Two launchers choosing a subnet at once never take the same 10.213.X.0/24 (``netns._subnet_lock``)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from typing import Any

import pytest

from mesatee_notebook.enclave.cluster import netns

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CAP_NET_ADMIN)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's `ip`"),
]


def test_two_concurrent_allocations_get_different_subnets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two tags whose search starts at the same /24, and a slow address listing: without the host-wide lock both
    # threads would list the addresses before either bridge holds one, and both would take the same subnet.
    first = f"{os.getpid() % 0xFFFF:04x}e1"
    second = f"{int(first, 16) + 250:06x}"[-6:]
    assert int(first, 16) % 250 == int(second, 16) % 250
    real_ip = netns._ip

    def slow_ip(*args: str, check: bool = True) -> Any:
        out = real_ip(*args, check=check)
        if args[:3] == ("-o", "-4", "addr"):
            time.sleep(0.5)  # the window between "check" and "use"
        return out

    monkeypatch.setattr(netns, "_ip", slow_ip)
    barrier = threading.Barrier(2)
    plans: dict[str, netns.NetPlan] = {}
    errors: list[BaseException] = []

    def allocate(tag: str) -> None:
        try:
            barrier.wait(5)
            plans[tag] = netns.create(tag, ["n0"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=allocate, args=(t,)) for t in (first, second)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert plans[first].subnet != plans[second].subnet
        addresses = real_ip("-o", "-4", "addr", "show").stdout
        for plan in plans.values():
            assert f"{plan.gateway}/24" in addresses and addresses.count(f"{plan.gateway}/") == 1
    finally:
        for tag in (first, second):
            netns.remove(tag)
    assert not netns.node_names(first) and not netns.node_names(second)
