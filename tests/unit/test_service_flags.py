"""A service refuses a bad policy file or flag at start-up, naming what is wrong, and exits 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def run_service(name: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            f"services.{name}",
            "--no-register",
            "--data-dir",
            str(tmp_path),
            *args,
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("service", ["orders", "catalog"])
def test_bad_policy_file_is_refused_naming_the_key(service: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[services.catalog.retry]\nmax_attempts = 9\n")
    ran = run_service(service, "--policy", str(policy), tmp_path=tmp_path)
    assert ran.returncode == 2
    assert "services.catalog.retry.max_attempts" in ran.stderr
    assert "1..5" in ran.stderr


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[services.catalog.retry]\nmax_atempts = 2\n")
    ran = run_service("orders", "--policy", str(policy), tmp_path=tmp_path)
    assert ran.returncode == 2 and "max_atempts" in ran.stderr


def test_bad_fault_flag_is_refused(tmp_path: Path) -> None:
    ran = run_service("catalog", "--fault-abort", "NOPE", tmp_path=tmp_path)
    assert ran.returncode == 2 and "unknown status code 'NOPE'" in ran.stderr
