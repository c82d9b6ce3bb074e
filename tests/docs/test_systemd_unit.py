"""examples/systemd/: a complete unit that systemd itself accepts."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "systemd"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(EXAMPLES / "kms-sidecar.service")
    return parser


def test_the_unit_is_complete() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["ExecStart"].endswith("kms-sidecar run")
    assert service["Environment"] == "KMS_SIDECAR_CONFIG=/etc/kms-sidecar/sidecar.toml"
    assert service["EnvironmentFile"] == "/etc/kms-sidecar/env"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["RestartPreventExitStatus"] == "2", "a configuration error is not retried"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    env = (EXAMPLES / "kms-sidecar.env").read_text()
    assert "KMS_AUDIT_HMAC_KEY=" in env


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/test installs Debian's systemd package"
    installed = str(Path(sys.executable).parent / "kms-sidecar")
    text = (EXAMPLES / "kms-sidecar.service").read_text()
    assert "/usr/local/bin/kms-sidecar" in text
    unit = tmp_path / "kms-sidecar.service"
    unit.write_text(text.replace("/usr/local/bin/kms-sidecar", installed))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
