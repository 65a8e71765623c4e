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
