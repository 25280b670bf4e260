"""scripts/audit.py: what counts as audited, vulnerable, ignored or not audited (no network)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("audit", ROOT / "scripts" / "audit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["audit"] = module
    spec.loader.exec_module(module)
    return module


audit = load_audit()


@pytest.fixture
def lock(tmp_path: Path) -> Path:
    path = tmp_path / "requirements.lock"
    path.write_text("# header\nalpha==1.0\nBeta_Pkg==2.0  # installed from a local wheel\n")
    return path


def fake_pip_audit(
    monkeypatch: pytest.MonkeyPatch, report: dict[str, Any] | None, stderr: str = ""
) -> list[list[str]]:
    commands: list[list[str]] = []

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        if report is not None:
            Path(command[command.index("--output") + 1]).write_text(json.dumps(report))
        return subprocess.CompletedProcess(command, 1 if stderr else 0, "", stderr)

    monkeypatch.setattr(audit.subprocess, "run", run)
    return commands


def test_the_exception_list_needs_a_reason_for_every_id(tmp_path: Path) -> None:
    ignore = tmp_path / "ignore.txt"
    ignore.write_text("# comment\n\nGHSA-aaaa-bbbb-cccc  # only the CLI is affected\n")
    assert audit.read_ignored(ignore) == {"GHSA-aaaa-bbbb-cccc": "only the CLI is affected"}
    ignore.write_text("PYSEC-2024-1\n")
    with pytest.raises(audit.AuditError, match="reason"):
        audit.read_ignored(ignore)


def test_pip_audit_gets_the_lock_and_every_ignored_id(
    monkeypatch: pytest.MonkeyPatch, lock: Path
) -> None:
    report = {
        "dependencies": [
            {"name": "alpha", "version": "1.0", "vulns": []},
            {"name": "beta-pkg", "version": "2.0", "vulns": [{"id": "PYSEC-1", "aliases": []}]},
        ]
    }
    commands = fake_pip_audit(monkeypatch, report)
    found = audit.run_pip_audit(lock, {"GHSA-x": "why", "CVE-y": "why"}, "pypi", 5)
    [command] = commands
    assert command[command.index("--requirement") + 1] == str(lock)
    assert {"--no-deps", "--disable-pip"} <= set(command)
    assert [command[i + 1] for i, a in enumerate(command) if a == "--ignore-vuln"] == [
        "GHSA-x",
        "CVE-y",
    ]
    assert found.vulnerable == {"beta-pkg==2.0": ["PYSEC-1"]}
    assert found.status() == audit.VULNERABLE


def test_packages_pip_audit_skipped_are_not_a_pass(
    monkeypatch: pytest.MonkeyPatch, lock: Path
) -> None:
    skipped = "Dependency not found on PyPI and could not be audited: beta-pkg (2.0)"
    report = {
        "dependencies": [
            {"name": "alpha", "version": "1.0", "vulns": []},
            {"name": "beta-pkg", "skip_reason": skipped},
        ]
    }
    fake_pip_audit(monkeypatch, report)
    found = audit.run_pip_audit(lock, {}, "pypi", 5)
    assert found.not_audited == {"beta-pkg==2.0": skipped}
    assert (found.audited, found.status()) == (1, audit.INCOMPLETE)
    assert "1 not audited" in found.render()


def test_an_unreachable_service_is_its_own_status(
    monkeypatch: pytest.MonkeyPatch, lock: Path
) -> None:
    error = "requests.exceptions.ConnectionError: Failed to resolve 'api.osv.dev'"
    fake_pip_audit(monkeypatch, None, stderr=f"Traceback ...\n{error}\n")
    found = audit.run_pip_audit(lock, {}, "osv", 5)
    assert found.status() == audit.INCOMPLETE
    assert found.audited == 0
    assert "api.osv.dev" in found.render()


def test_pypi_latest_audits_only_latest_releases(
    monkeypatch: pytest.MonkeyPatch, lock: Path
) -> None:
    def project(name: str, timeout_s: int) -> dict[str, Any] | str:
        if name == "alpha":
            return {
                "info": {"version": "1.0"},
                "vulnerabilities": [
                    {"id": "PYSEC-1", "aliases": ["CVE-1"], "withdrawn": None},
                    {"id": "PYSEC-2", "aliases": [], "withdrawn": None},
                    {"id": "PYSEC-3", "aliases": [], "withdrawn": "2024-01-01"},
                ],
            }
        return {"info": {"version": "3.0"}, "vulnerabilities": []}

    monkeypatch.setattr(audit, "_project_json", project)
    found = audit.run_pypi_latest(lock, {"CVE-1": "accepted"}, 5)
    assert found.vulnerable == {"alpha==1.0": ["PYSEC-2"]}
    assert found.ignored == {"alpha==1.0": ["PYSEC-1"]}
    assert list(found.not_audited) == ["Beta_Pkg==2.0"]
    assert "latest release" in found.not_audited["Beta_Pkg==2.0"]
    assert found.status() == audit.VULNERABLE


def test_pypi_latest_partial_is_incomplete_unless_allowed(
    monkeypatch: pytest.MonkeyPatch, lock: Path
) -> None:
    monkeypatch.setattr(
        audit,
        "_project_json",
        lambda name, timeout_s: (
            {"info": {"version": "1.0"}, "vulnerabilities": []}
            if name == "alpha"
            else "the index answered 404"
        ),
    )
    found = audit.run_pypi_latest(lock, {}, 5)
    assert (found.audited, found.status()) == (1, audit.INCOMPLETE)
    assert found.status(allow_partial=True) == audit.CLEAN
