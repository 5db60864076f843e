"""Callback targets: checked on the resolved address, public only unless the operator's allow-list says otherwise."""

from __future__ import annotations

import pytest

from inferq.protocol.callbacks import AllowList, TargetRefused, resolve_target

NOTHING = AllowList.parse("")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",  # loopback
        "http://localhost/hook",  # a name that resolves to loopback
        "http://[::1]/hook",
        "http://10.1.2.3/hook",  # private
        "http://192.168.0.10/hook",
        "http://172.16.5.4/hook",
        "http://169.254.169.254/latest/meta-data",  # link-local: cloud metadata
        "http://0.0.0.0/hook",
        "ftp://example.org/hook",  # not http(s)
        "http:///nohost",
    ],
)
def test_non_public_targets_are_refused_without_an_allow_list(url: str) -> None:
    with pytest.raises(TargetRefused):
        resolve_target(url, NOTHING)


def test_the_allow_list_takes_hosts_host_ports_and_cidrs() -> None:
    assert resolve_target("http://127.0.0.1:9000/h", AllowList.parse("127.0.0.1")) == ("127.0.0.1", 9000, "127.0.0.1")
    by_port = AllowList.parse("127.0.0.1:9000")
    assert resolve_target("http://127.0.0.1:9000/h", by_port)[2] == "127.0.0.1"
    with pytest.raises(TargetRefused):
        resolve_target("http://127.0.0.1:9001/h", by_port)  # another port of the same host
    assert resolve_target("https://10.0.3.7/h", AllowList.parse("10.0.0.0/16"))[1:] == (443, "10.0.3.7")
    with pytest.raises(TargetRefused):
        resolve_target("http://10.1.0.1/h", AllowList.parse("10.0.0.0/16"))
    # A name is checked by what it resolves to: localhost is loopback, allowed only when the list says so.
    assert resolve_target("http://localhost:7000/h", AllowList.parse("127.0.0.0/8"))[2].startswith("127.")
