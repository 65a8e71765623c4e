"""Fixtures of the deployment tests: a lab of booted hosts (lab.py), skipped where one cannot run.

The lab needs root, network namespaces, systemd-nspawn, debootstrap and ssh
(apt-get install systemd-container debootstrap openssh-client); its first use
on a machine builds the host image (about two minutes, cached afterwards).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.lab import Lab, unavailable_reason


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """Three booted hosts (fleet-m1, fleet-n1, fleet-n2) and a controller namespace, for the session.

    Torn down at the end however the tests went; a teardown that leaves
    anything behind is an error.
    """
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Lab(hosts=3) as booted:
        yield booted
