"""fleet.cluster.policy: a node's limits on what a master may ask of it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fleet.cluster.policy import NodePolicy, PolicyRefused, load_policy
from fleet.config import ConfigError, Endpoint, HandlerConfig

CONFIG = HandlerConfig(endpoints=(Endpoint("tcp://10.0.0.5:9999", "tcp://10.0.0.5:9998"),), app="shop.wsgi:app",
                       processes=4, threads=8, pythonpath=("/srv/shop/src",), mongrel2_chroot="/srv/m2",
                       upload_store="/tmp/mongrel2.upload.XXXXXX")
ALLOWING = NodePolicy(modules=("shop.*",), pythonpath=("/srv/shop",), chroots=("/srv/m2",),
                      upload_stores=("/tmp/mongrel2.upload.XXXXXX",), endpoints=("tcp://10.0.0.5:*",),
                      max_processes=4, max_threads=8)


def test_no_policy_allows_anything_and_a_matching_one_too():
    assert NodePolicy().empty
    NodePolicy().check(CONFIG)
    ALLOWING.check(CONFIG)
    assert not ALLOWING.empty


@pytest.mark.parametrize("change, reason", [
    ({"app": "evil:app"}, "module 'evil:app' is not allowed here (allowed: shop.*)"),
    ({"pythonpath": ("/srv/shop/src", "/tmp/evil")}, "pythonpath '/tmp/evil' is not allowed here"),
    ({"pythonpath": ("/srv/shop/../etc",)}, "pythonpath '/srv/shop/../etc' is not allowed here"),
    ({"pythonpath": ("/srv/shopping",)}, "pythonpath '/srv/shopping' is not allowed here"),
    ({"mongrel2_chroot": "/etc"}, "Mongrel2 chroot '/etc' is not allowed here"),
    ({"upload_store": "/passwd.XXXXXX"}, "upload store '/passwd.XXXXXX' is not allowed here"),
    ({"endpoints": (Endpoint("tcp://10.0.0.6:9999", "tcp://10.0.0.5:9998"),)},
     "Mongrel2 endpoint 'tcp://10.0.0.6:9999' is not allowed here"),
    ({"processes": 5}, "5 processes is over this node's limit of 4"),
    ({"threads": 9}, "9 threads is over this node's limit of 8"),
])
def test_each_limit_refuses_with_its_reason(change, reason):
    with pytest.raises(PolicyRefused) as refused:
        ALLOWING.check(dataclasses.replace(CONFIG, **change))
    assert str(refused.value).startswith("refused: " + reason)


def test_without_uploads_the_chroot_and_store_do_not_matter():
    ALLOWING.check(dataclasses.replace(CONFIG, mongrel2_chroot=None, upload_store="/elsewhere.XXXXXX"))


def test_the_file_and_the_options_add_up(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text('modules = ["shop.*"]\nmax_processes = 2\nmax_threads = 8\n')
    policy = load_policy(str(path), modules=["admin.*"], max_processes=4)
    assert policy.modules == ("shop.*", "admin.*")
    assert policy.max_processes == 4 and policy.max_threads == 8
    assert policy.chroots is None


@pytest.mark.parametrize("text, message", [
    ('modulez = ["x"]\n', "unknown key 'modulez'"),
    ('modules = "x"\n', "modules must be a list of strings"),
    ("max_threads = 0\n", "max_threads must be a whole number of at least 1"),
    ("modules = [\n", "not TOML"),
])
def test_a_bad_file_is_one_line(tmp_path: Path, text: str, message: str):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_policy(str(path))


def test_a_missing_file_is_one_line(tmp_path: Path):
    with pytest.raises(ConfigError, match="No such file"):
        load_policy(str(tmp_path / "absent.toml"))
