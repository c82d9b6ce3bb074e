"""A private SoftHSM2 for tests: its own config file, token directory and tokens in a tmp dir.

SoftHSM reads ``SOFTHSM2_CONF`` and scans its token directory at ``C_Initialize``, which
python-pkcs11 calls once when it loads the module; tokens made later, or a changed
``SOFTHSM2_CONF``, are only seen after ``C_Finalize`` + ``C_Initialize``. ``Pkcs11Backend``
finalizes the module when its last instance closes, so: make every token first, set
``SOFTHSM2_CONF`` (see :meth:`SoftHsm.env`), and close every backend before switching to another
SoftHSM in the same process.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Where Debian's ``softhsm2`` package installs the module.
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def softhsm_missing() -> str | None:
    """Why SoftHSM2 cannot be used here, or None when it can."""
    if shutil.which("softhsm2-util") is None:
        return "softhsm2-util is not installed (Debian/Ubuntu: apt-get install softhsm2)"
    if not os.path.exists(SOFTHSM_MODULE):
        return f"the SoftHSM2 module {SOFTHSM_MODULE} is missing"
    return None


@dataclass(frozen=True)
class SoftHsm:
    """A SoftHSM2 whose tokens live under ``directory``. Every token has ``pin``/``so_pin``."""

    directory: Path
    pin: str = field(repr=False)
    so_pin: str = field(repr=False)

    @classmethod
    def create(cls, directory: Path, labels: tuple[str, ...] = ("kms",)) -> SoftHsm:
        """Write the config, make the token directory and initialise a token per label."""
        hsm = cls(directory=directory, pin=secrets.token_hex(8), so_pin=secrets.token_hex(8))
        hsm.token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        hsm.conf.write_text(
            f"directories.tokendir = {hsm.token_dir}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
        )
        for label in labels:
            hsm.init_token(label)
        return hsm

    @property
    def conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def token_dir(self) -> Path:
        return self.directory / "tokens"

    def env(self) -> dict[str, str]:
        """The environment variables that point SoftHSM at this directory."""
        return {"SOFTHSM2_CONF": str(self.conf)}

    def init_token(self, label: str) -> None:
        """Initialise a new token ``label`` in the first free slot."""
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                self.pin,
                "--so-pin",
                self.so_pin,
            ],
            env={**os.environ, **self.env()},
            check=True,
            capture_output=True,
        )

    def inspect(self, token_label: str, object_label: str) -> list[dict[str, Any]]:
        """The objects labelled ``object_label``, as a separate process sees them.

        Runs in a child process with its own PKCS#11 session (like an auditor with
        ``pkcs11-tool``), so it never calls the module from this process's threads. Each object
        is a dict: ``class``, ``id``, the boolean attributes that exist on it, and
        ``value_readable`` (whether ``CKA_VALUE`` could be read at all).
        """
        result = subprocess.run(
            [sys.executable, "-c", _INSPECT, SOFTHSM_MODULE, token_label, object_label],
            env={**os.environ, **self.env(), "INSPECT_PIN": self.pin},
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        objects: list[dict[str, Any]] = json.loads(result.stdout)
        return objects


_INSPECT = r"""
import json, os, sys
import pkcs11
from pkcs11 import Attribute
from pkcs11.exceptions import PKCS11Error

module, token_label, label = sys.argv[1:4]
lib = pkcs11.lib(module)
session = lib.get_token(token_label=token_label).open(user_pin=os.environ["INSPECT_PIN"])
flags = [Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.NEVER_EXTRACTABLE,
         Attribute.ALWAYS_SENSITIVE, Attribute.PRIVATE, Attribute.TOKEN, Attribute.SIGN,
         Attribute.VERIFY, Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.WRAP, Attribute.UNWRAP]
out = []
for obj in list(session.get_objects({Attribute.LABEL: label})):
    entry = {"class": obj[Attribute.CLASS].name, "id": obj[Attribute.ID].decode()}
    for flag in flags:
        try:
            entry[flag.name.lower()] = bool(obj[flag])
        except PKCS11Error:
            pass
    try:
        obj[Attribute.VALUE]
        entry["value_readable"] = True
    except PKCS11Error:
        entry["value_readable"] = False
    out.append(entry)
session.close()
print(json.dumps(out))
"""
