"""Command-line validation: every mistake is one line that says what to fix."""

from __future__ import annotations

import pytest

from fleet.config import ConfigError, Endpoint, HandlerConfig, parse_app_spec


@pytest.mark.parametrize("text, expected", [
    ("tcp://127.0.0.1:9999,tcp://127.0.0.1:9998", Endpoint("tcp://127.0.0.1:9999", "tcp://127.0.0.1:9998")),
    ("tcp://m2.example:1, tcp://[::1]:2", Endpoint("tcp://m2.example:1", "tcp://[::1]:2")),
    ("ipc:///run/m2/send,ipc:///run/m2/recv", Endpoint("ipc:///run/m2/send", "ipc:///run/m2/recv")),
])
def test_endpoint_parses(text: str, expected: Endpoint) -> None:
    assert Endpoint.parse(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("tcp://127.0.0.1:9999", "expected SEND_SPEC,RECV_SPEC"),
    ("tcp://127.0.0.1:9999,", "expected SEND_SPEC,RECV_SPEC"),
    ("http://x:1,tcp://x:2", "not a ZeroMQ endpoint"),
    ("tcp://x,tcp://x:2", "not a ZeroMQ endpoint"),
    ("tcp://x:70000,tcp://x:2", "out of range"),
    ("tcp://x:1,tcp://x:1", "must differ"),
])
def test_endpoint_mistakes(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        Endpoint.parse(text)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_app_spec_defaults_to_application() -> None:
    assert parse_app_spec("pkg.app") == ("pkg.app", "application")
    assert parse_app_spec("pkg.app:make.wsgi") == ("pkg.app", "make.wsgi")
    with pytest.raises(ConfigError):
        parse_app_spec("pkg app")


def test_handler_config_round_trips_and_validates() -> None:
    config = HandlerConfig(endpoints=(Endpoint("tcp://a:1", "tcp://a:2"),), app="app", processes=3, threads=2)
    assert HandlerConfig.from_dict(config.to_dict()) == config
    for bad in ({"processes": 0}, {"threads": -1}, {"dispatch": "fast"}, {"upload_store": "/tmp/x"},
                {"harakiri": 5.0, "dispatch": "direct"}, {"max_requests": -1}):
        with pytest.raises(ConfigError):
            HandlerConfig(endpoints=config.endpoints, app="app", **bad)


@pytest.mark.parametrize("text, host, port", [
    ("127.0.0.1:8080", "127.0.0.1", 8080),
    (":8080", "0.0.0.0", 8080),
    ("*:8080", "0.0.0.0", 8080),
    ("[::1]:81", "::1", 81),
    ("web.example:80", "web.example", 80),
])
def test_http_address_parses(text: str, host: str, port: int) -> None:
    from fleet.config import HttpAddress

    assert HttpAddress.parse(text) == HttpAddress(host, port)
    assert HttpAddress.parse(str(HttpAddress.parse(text))) == HttpAddress(host, port)


@pytest.mark.parametrize("text, fragment", [
    ("8080", "expected HOST:PORT"),
    ("host:", "expected HOST:PORT"),
    ("host:http", "expected HOST:PORT"),
    ("host:0", "out of range"),
    ("::1:80", "brackets"),
])
def test_http_address_mistakes(text: str, fragment: str) -> None:
    from fleet.config import HttpAddress

    with pytest.raises(ConfigError) as error:
        HttpAddress.parse(text)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_http_alone_is_enough_to_serve_and_travels_in_the_config() -> None:
    config = HandlerConfig(endpoints=(), app="app", http=("0.0.0.0:8080",), http_keepalive=2.0)
    assert HandlerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="nothing to serve"):
        HandlerConfig(endpoints=(), app="app")
    with pytest.raises(ConfigError, match="twice"):
        HandlerConfig(endpoints=(), app="app", http=("0.0.0.0:1", "0.0.0.0:1"))


def test_a_node_serves_the_masters_http_ports_on_its_own_address() -> None:
    import argparse

    from fleet.node import local_overrides

    config = HandlerConfig(endpoints=(), app="app", http=("198.18.0.1:8080", "0.0.0.0:8081"))
    inherit = local_overrides(argparse.Namespace(processes=None, threads=None, mongrel2_chroot=None, http=None),
                              "198.18.0.7")
    assert inherit(config).http == ("198.18.0.7:8080", "0.0.0.0:8081")
    own = local_overrides(argparse.Namespace(processes=2, threads=None, mongrel2_chroot=None, http=[":9000"]),
                          "198.18.0.7")
    assert own(config).http == ("0.0.0.0:9000",) and own(config).processes == 2


def test_a_setting_from_a_newer_master_is_left_out_not_refused() -> None:
    data = HandlerConfig(endpoints=(), app="app", http=(":80",)).to_dict()
    data["from_the_future"] = 1
    assert HandlerConfig.from_dict(data) == HandlerConfig(endpoints=(), app="app", http=(":80",))
    assert HandlerConfig.unknown_settings(data) == ["from_the_future"]
