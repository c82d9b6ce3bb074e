"""``kms-sidecar keys``: root keys in the configured backend (transit keys, or HSM objects).

    kms-sidecar keys create  --config FILE NAME [--type aes256|ec-p256|ed25519]
    kms-sidecar keys list    --config FILE
    kms-sidecar keys rotate  --config FILE NAME
    kms-sidecar keys status  --config FILE [NAME]
    kms-sidecar keys destroy --config FILE NAME --yes-destroy-all-data

``NAME`` is a key's name on the API when it is configured under ``[keys]`` (its ``root_key`` is
then used), else the root key's own name in the backend. Output is plain tables on stdout.
Exit status: 0 done, 1 the backend refused or failed (no such key, unreachable, …),
2 a usage or configuration error — including ``destroy`` without ``--yes-destroy-all-data``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

from sidecar.backends import open_backend
from sidecar.backends.base import KEY_TYPES, RootKeyBackend, RootKeyInfo
from sidecar.config import CONFIG_ENV, Config, load_config
from sidecar.errors import ConfigError, PermissionDenied, SidecarError

#: A key the backend listed but would not describe: its name and the error code.
_Unreadable = tuple[str, str]

DESTROY_FLAG = "--yes-destroy-all-data"

_DESTROY_WARNING = """\
kms-sidecar: refusing to destroy root key {root!r} without {flag}.

Destroying deletes every version of the root key in the {backend} backend, for good
(crypto-shredding). Every blob, data key and ciphertext made under it can never be opened
again, and no signature made with it can be checked against it: there is no undo and no
backup to restore from. Rotate the key instead if you only want new data under new material.

If destroying is what you want, run the same command again with {flag}.
"""


def add_keys_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys {create,list,rotate,status,destroy}`` to the ``kms-sidecar`` parser."""
    keys = subparsers.add_parser("keys", help="manage root keys in the configured backend")
    actions = keys.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str, run: Callable[..., Awaitable[int]]) -> Any:
        parser = actions.add_parser(name, help=help_text)
        parser.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
        parser.set_defaults(func=lambda args: _main(args, run))
        return parser

    p = action("create", "create a root key (a no-op if it exists with that type)", _create)
    p.add_argument("name", help="key name ([keys] name or root key name)")
    p.add_argument("--type", choices=KEY_TYPES, default="aes256", help="default: aes256")
    action("list", "list the root keys the backend holds", _list)
    p = action("rotate", "add a new version of a root key (old versions stay)", _rotate)
    p.add_argument("name", help="key name ([keys] name or root key name)")
    p = action("status", "show a root key's versions and public keys", _status)
    p.add_argument("name", nargs="?", help="key name (default: every configured key)")
    p = action("destroy", "delete every version of a root key for good", _destroy)
    p.add_argument("name", help="key name ([keys] name or root key name)")
    p.add_argument(
        DESTROY_FLAG,
        dest="confirmed",
        action="store_true",
        help="confirm that everything made under the key becomes unreadable",
    )


# -- actions -------------------------------------------------------------------------------


async def _create(config: Config, backend: RootKeyBackend, args: argparse.Namespace) -> int:
    root = _root_name(config, args.name)
    try:
        existing = await backend.key_info(root)
    except PermissionDenied:
        info = await backend.create(root, args.type)
        print(f"created {info.key_type} root key {root!r} in the {backend.kind} backend")
        _print_keys(config, [info])
        return 0
    _print_keys(config, [existing])
    if existing.key_type != args.type:
        print(
            f"kms-sidecar: root key {root!r} already exists as {existing.key_type}, "
            f"not {args.type}; nothing was changed.",
            file=sys.stderr,
        )
        return 1
    print(f"root key {root!r} already exists; nothing was changed")
    return 0


async def _list(config: Config, backend: RootKeyBackend, args: argparse.Namespace) -> int:
    names = await backend.list_keys()
    if not names:
        print(f"no root keys in the {backend.kind} backend")
        return 0
    infos: list[RootKeyInfo | _Unreadable] = []
    for name in names:
        try:
            infos.append(await backend.key_info(name))
        except SidecarError as exc:
            infos.append((name, exc.code))
    _print_keys(config, infos)
    return 0


async def _rotate(config: Config, backend: RootKeyBackend, args: argparse.Namespace) -> int:
    root = _root_name(config, args.name)
    info = await backend.rotate(root)
    print(f"rotated root key {root!r} to version {info.latest_version}")
    _print_keys(config, [info])
    return 0


async def _status(config: Config, backend: RootKeyBackend, args: argparse.Namespace) -> int:
    if args.name is None:
        if not config.keys:
            print("no keys are configured under [keys]; name one: keys status NAME")
            return 0
        infos: list[RootKeyInfo | _Unreadable] = []
        for name in config.keys:
            root = config.root_key_name(name)
            try:
                infos.append(await backend.key_info(root))
            except SidecarError as exc:
                infos.append((root, exc.code))
        failed = any(isinstance(info, tuple) for info in infos)
        _print_keys(config, infos)
        return 1 if failed else 0
    root = _root_name(config, args.name)
    info = await backend.key_info(root)
    rows = [
        ["root key", info.name],
        ["configured as", ", ".join(_api_names(config, info.name)) or "-"],
        ["backend", backend.kind],
        ["type", info.key_type],
        ["latest_version", str(info.latest_version)],
        ["min_decryption_version", str(info.min_decryption_version)],
    ]
    rows += [[str(k), _text(v)] for k, v in sorted(info.extra.items())]
    _table(["FIELD", "VALUE"], rows)
    if info.public_keys:
        print()
        _table(
            ["VERSION", "PUBLIC KEY SHA-256 (SPKI PEM)"],
            [
                [str(v), hashlib.sha256(pem.encode()).hexdigest()]
                for v, pem in sorted(info.public_keys.items())
            ],
        )
        latest = info.public_keys.get(info.latest_version)
        if latest:
            print(f"\npublic key of version {info.latest_version}:\n{latest.rstrip()}")
    return 0


async def _destroy(config: Config, backend: RootKeyBackend, args: argparse.Namespace) -> int:
    root = _root_name(config, args.name)
    if not args.confirmed:
        print(
            _DESTROY_WARNING.format(root=root, flag=DESTROY_FLAG, backend=backend.kind),
            file=sys.stderr,
            end="",
        )
        return 2
    info = await backend.key_info(root)
    await backend.destroy(root)
    print(
        f"destroyed root key {root!r} ({info.key_type}, versions "
        f"{info.min_decryption_version}..{info.latest_version}) in the {backend.kind} backend"
    )
    return 0


# -- plumbing ------------------------------------------------------------------------------


def _main(
    args: argparse.Namespace,
    run: Callable[[Config, RootKeyBackend, argparse.Namespace], Awaitable[int]],
) -> int:
    """Load the config, open the backend, run the action; 1 when the backend says no."""
    path = args.config or os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"no configuration: pass --config FILE or set {CONFIG_ENV}")
    config = load_config(path)

    async def with_backend() -> int:
        backend = open_backend(config)
        try:
            return await run(config, backend, args)
        finally:
            await backend.close()

    try:
        return asyncio.run(with_backend())
    except PermissionDenied:
        name = getattr(args, "name", None)
        what = f"root key {_root_name(config, name)!r}" if name else "the key"
        print(
            f"kms-sidecar: {what} does not exist in the {config.backend.type} backend "
            "(or the backend does not let the sidecar see it).",
            file=sys.stderr,
        )
        return 1
    except SidecarError as exc:
        print(f"kms-sidecar: {exc.message}", file=sys.stderr)
        return 1


def _root_name(config: Config, name: str) -> str:
    return config.root_key_name(name) if name in config.keys else name


def _api_names(config: Config, root: str) -> list[str]:
    return [name for name in config.keys if config.root_key_name(name) == root]


def _print_keys(config: Config, infos: Sequence[RootKeyInfo | _Unreadable]) -> None:
    rows = []
    for info in infos:
        if isinstance(info, tuple):
            name, error = info
            rows.append([name, f"? ({error})", "-", "-", "-"])
            continue
        rows.append(
            [
                info.name,
                info.key_type,
                str(info.latest_version),
                str(info.min_decryption_version),
                ", ".join(_api_names(config, info.name)) or "-",
            ]
        )
    _table(["ROOT KEY", "TYPE", "LATEST", "MIN_DECRYPTION", "CONFIGURED AS"], rows)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    """Left-aligned columns separated by two spaces."""
    out = out or sys.stdout
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(line.rstrip(), file=out)


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)
