"""The fuzz targets of fuzz/ in the suite: the whole corpus replayed, then a short atheris run of each.

The long run (a million inputs per target) is ``python -m fuzz.run``. Here a
crash is any exception but the module's typed error, or a broken invariant
of fuzz/targets.py; the short runs fail on any crash-*/timeout-* artifact or
a non-zero exit of libFuzzer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import targets
from fuzz.run import DICTS

REPO = Path(__file__).resolve().parents[2]

CORPUS = REPO / "fuzz" / "corpus"
# Per target, after the corpus: about 1-4 s each on the shared 2-core machine.
SHORT_RUNS = 20_000


def _corpus(name: str) -> list[Path]:
    return sorted((CORPUS / name).iterdir())


@pytest.mark.parametrize("name", targets.NAMES)
def test_corpus_exists_and_is_small(name: str) -> None:
    files = _corpus(name)
    assert len(files) >= 5
    assert sum(f.stat().st_size for f in files) < 1024 * 1024


@pytest.mark.parametrize("name", targets.NAMES)
def test_corpus_replays_without_crash(name: str, tmp_path: Path) -> None:
    target = targets.build(name, tmp_path)
    for path in _corpus(name):
        target(path.read_bytes())


def test_corpus_reaches_acceptance_and_every_refusal_kind(tmp_path: Path) -> None:
    """The seeds are not all refused at the first check: each target gets deep."""
    from fleet.cluster import protocol as cp
    from fleet.mongrel2 import codec as mongrel2
    from fleet.mongrel2 import uploads

    parsed = set()
    for path in _corpus("mongrel2"):
        try:
            parsed.add(type(mongrel2.parse_message(path.read_bytes())).__name__)
        except mongrel2.ProtocolError:
            parsed.add("ProtocolError")
    assert parsed >= {"Request", "Disconnect", "Credits", "Control", "ProtocolError"}

    policies = targets.make_upload_tree(tmp_path)
    outcomes = set()
    for path in _corpus("uploads"):
        choice, request = targets.upload_request(path.read_bytes())
        try:
            outcomes.add(type(uploads.check_upload(request, policies[choice % len(policies)])).__name__)
        except uploads.UploadRejected:
            outcomes.add("UploadRejected")
    assert outcomes >= {"NoneType", "UploadStarted", "UploadDone", "UploadRejected"}

    kinds = set()
    for path in _corpus("cluster_signed"):
        data = path.read_bytes()
        try:
            message = cp.decode(targets.signed_datagram(data[0], data[1:]), targets.KEYRING,
                                targets.NOW, cluster=targets.CLUSTER)
        except cp.ClusterProtocolError:
            continue
        kinds.add(message.KIND)
    assert kinds == set(cp.Kind)


def test_targets_treat_other_exceptions_as_crashes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The oracle can fail: an untyped exception escapes each target."""
    from fleet.cluster import protocol as cluster_protocol
    from fleet.mongrel2 import codec as mongrel2
    from fleet.mongrel2 import uploads

    def boom(*args, **kwargs):
        raise KeyError("not a typed error")

    monkeypatch.setattr(mongrel2, "parse_message", boom)
    monkeypatch.setattr(uploads, "check_upload", boom)
    monkeypatch.setattr(cluster_protocol, "decode", boom)
    upload_target = targets.build("uploads", tmp_path)
    for target in (targets.mongrel2_request, upload_target, targets.cluster_datagram,
                   targets.cluster_signed):
        with pytest.raises(KeyError):
            target(b"\x01x-mongrel2-upload-start: a\n")


def _short_run(name: str, tmp_path: Path, *extra: str, prelude: str = "") -> subprocess.CompletedProcess:
    new, artifacts, tree = tmp_path / "new", tmp_path / "artifacts", tmp_path / "tree"
    for directory in (new, artifacts, tree):
        directory.mkdir()
    args = [name, f"-runs={SHORT_RUNS}", "-timeout=10", "-rss_limit_mb=2048", "-seed=1",
            f"-dict={REPO / 'fuzz' / 'dict' / DICTS[name]}", f"-artifact_prefix={artifacts}/",
            *extra, str(new), str(CORPUS / name)]
    code = f"import sys; sys.argv[1:] = {args!r}; {prelude}from fuzz import harness; harness.main()"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "FLEET_FUZZ_SCRATCH": str(tree)})


@pytest.mark.parametrize("name", targets.NAMES)
def test_short_fuzz_run(name: str, tmp_path: Path) -> None:
    run = _short_run(name, tmp_path)
    artifacts = sorted(p.name for p in (tmp_path / "artifacts").iterdir())
    assert run.returncode == 0 and not artifacts, (artifacts, run.stderr[-3000:])
    assert f"Done {SHORT_RUNS} runs" in run.stderr
    assert "INFO: Instrumenting fleet.mongrel2" in run.stderr  # really coverage-guided


def test_short_fuzz_run_reports_a_crash(tmp_path: Path) -> None:
    """The subprocess check can fail: a target that raises leaves a crash file."""
    prelude = ("from fuzz import targets; "
               "targets.TARGETS['mongrel2'] = lambda data: 1 / 0 if b'@*' in data else None; ")
    run = _short_run("mongrel2", tmp_path, prelude=prelude)
    assert run.returncode != 0
    assert "ZeroDivisionError" in run.stdout + run.stderr
    assert any(p.name.startswith("crash-") for p in (tmp_path / "artifacts").iterdir())


def test_short_fuzz_run_reports_a_hang(tmp_path: Path) -> None:
    """An input that runs past -timeout is a hang: libFuzzer stops and keeps it."""
    prelude = ("import time; from fuzz import targets; "
               "targets.TARGETS['mongrel2'] = lambda data: time.sleep(5) if b'@*' in data else None; ")
    run = _short_run("mongrel2", tmp_path, "-timeout=1", prelude=prelude)
    assert run.returncode != 0
    assert "timeout" in (run.stdout + run.stderr).lower()
    assert any(p.name.startswith("timeout-") for p in (tmp_path / "artifacts").iterdir())
