"""The ``kms-sidecar`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from sidecar import __version__
from sidecar.config import CONFIG_ENV, Config, load_config
from sidecar.devmode import dev_policy

__all__ = ["build_parser", "dev_policy", "main"]
from sidecar.errors import ConfigError, SidecarError

log = logging.getLogger("sidecar")


def _config_from(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"no configuration: pass --config FILE or set {CONFIG_ENV}")
    return load_config(path)


def cmd_run(args: argparse.Namespace) -> int:
    from sidecar.server.run import run
    from sidecar.telemetry import setup_logging

    config = _config_from(args)
    setup_logging(config.telemetry)
    run(config)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the file; check the policy files when the directory is here; connect nowhere.

    Files, directories and variables the configuration names are listed when missing on this
    host (the file may be meant for another one); ``--strict`` makes a missing one an error.
    """
    from sidecar.audit.record import load_hmac_key
    from sidecar.config_report import references
    from sidecar.policy import load_policies
    from sidecar.server.socket_access import check_config_sockets

    config = _config_from(args)
    found = references(config)
    policies_dir = config.resolve_path(config.policies.dir)
    if os.path.isdir(policies_dir):
        policy_set = load_policies(policies_dir)  # a bad file is an error: file, line, reason
        check_config_sockets(config, policy_set.rules)
        rules = len(policy_set)
        policies = f"{rules} policy rule{'' if rules == 1 else 's'} in {policies_dir}"
    else:
        policies = f"policies not checked ({policies_dir} is not on this host)"
    if config.audit.path:
        load_hmac_key(config.audit.hmac_key_env)  # set but too short: an error anywhere
    missing = [ref for ref in found if not ref.present]
    for ref in missing:
        needed = "start-up needs it" if ref.required else "optional"
        print(
            f"not on this host: {ref.key} = {ref.value} ({ref.kind}, {ref.missing}; {needed})",
            file=sys.stderr,
        )
    required = [ref.key for ref in missing if ref.required]
    if args.strict and required:
        raise ConfigError(f"missing on this host (--strict): {', '.join(required)}")
    print(
        f"configuration OK: backend {config.backend.type}, "
        f"keys: {', '.join(config.keys) or 'none'}; {policies}"
    )
    if not config.keys:
        print("warning: no keys are configured; health will answer 503", file=sys.stderr)
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Explain the decision for one identity, key and operation; exit 0 allow, 1 deny."""
    import asyncio

    from sidecar.auth import JwtVerifier
    from sidecar.identity import Identity, JwtClaims, PeerCredentials, TlsPeer
    from sidecar.policy import explain, load_policies

    config = _config_from(args)
    policies = load_policies(config.resolve_path(config.policies.dir))
    peer = None
    if args.uid is not None:
        gid = args.gid if args.gid is not None else args.uid
        peer = PeerCredentials(uid=args.uid, gid=gid, pid=0, exe=args.exe)
    jwt: JwtClaims | None = None
    if args.jwt:
        verifier = JwtVerifier(config.auth, base_dir=config.base_dir)

        async def verify() -> JwtClaims:
            try:
                return await verifier.verify(args.jwt)
            finally:
                await verifier.aclose()

        jwt = asyncio.run(verify())
    tls = TlsPeer(spiffe_id=args.spiffe_id, subject="") if args.spiffe_id else None
    context = {}
    for pair in args.context or []:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--context expects NAME=VALUE, got {pair!r}")
        context[name] = value
    identity = Identity(peer=peer, jwt=jwt, tls=tls)
    decision, text = explain(policies, identity, args.key, args.op, context or None, args.ttl)
    print(text)
    return 0 if decision.allowed else 1


def cmd_rewrap(args: argparse.Namespace) -> int:
    """Rewrap blobs from stdin to stdout under the newest root version; progress on stderr."""
    import asyncio

    from sidecar.backends import open_backend
    from sidecar.keys.keyring import Keyring
    from sidecar.keys.migrate import rewrap_stream

    config = _config_from(args)
    if args.key not in config.keys:
        raise ConfigError(f"--key {args.key!r} is not configured under [keys]")

    async def rewrap() -> int:
        backend = open_backend(config)
        try:
            keyring = Keyring(
                backend, {args.key: (config.keys[args.key], config.root_key_name(args.key))}
            )
            await keyring.key_info(args.key)  # fail fast when the upstream is unreachable
            report = await rewrap_stream(keyring, args.key, sys.stdin, sys.stdout, sys.stderr)
        finally:
            await backend.close()
        return 1 if report.failed else 0

    return asyncio.run(rewrap())


def cmd_cache_flush(args: argparse.Namespace) -> int:
    """Revoke: ask a running sidecar to drop its cached KEKs (one key's, or all)."""
    from sidecar.client import Client

    socket_path = args.socket
    if socket_path is None and (args.config or os.environ.get(CONFIG_ENV)):
        config = _config_from(args)
        socket_path = config.resolve_path(config.server.socket)
    with Client(socket_path) as client:
        client.flush(args.key)
    print(f"cached KEKs dropped for {args.key or 'every key'}; the next use fetches afresh")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from sidecar.audit import verify_command

    return verify_command(args.files, args.head)


def cmd_audit_hash(args: argparse.Namespace) -> int:
    from sidecar.audit import hash_command

    return hash_command(args.values, key_env=args.key_env)


def cmd_dev(args: argparse.Namespace) -> int:
    """OpenBao dev server + sidecar, with a config, token file and audit log others can use."""
    from sidecar.config import TelemetryConfig
    from sidecar.devmode import DEV_KEY, DEV_SIGNING_KEY, DevDirectory
    from sidecar.devserver import DevOpenBao
    from sidecar.server.run import run
    from sidecar.telemetry import setup_logging

    setup_logging(TelemetryConfig())
    with DevOpenBao() as bao:
        bao.create_key(DEV_KEY)
        bao.create_key(DEV_SIGNING_KEY, key_type="ecdsa-p256")
        workdir = DevDirectory.create(
            bao_address=bao.address, bao_token=bao.root_token, socket=args.socket
        )
        try:
            config = load_config(workdir.config)  # what runs is what the banner points at
            run(config, on_ready=lambda _: print(workdir.banner(bao.address), flush=True))
        finally:
            workdir.remove()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kms-sidecar", description="Per-host key-management sidecar (envelope data keys)."
    )
    parser.add_argument("--version", action="version", version=f"kms-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the sidecar daemon")
    p.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("dev", help="run on an embedded OpenBao dev server, for trying it out")
    p.add_argument(
        "--socket", help="socket path (default: in the private directory dev makes and prints)"
    )
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser(
        "check-config",
        help="validate a configuration file (and its policy files), connecting nowhere",
    )
    p.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    p.add_argument(
        "--strict",
        action="store_true",
        help="also fail when a file, directory or variable it names is missing on this host",
    )
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "rewrap", help="rewrap blobs (one a line, stdin → stdout) under the newest root version"
    )
    p.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    p.add_argument("--key", required=True, help="the key the blobs belong to")
    p.set_defaults(func=cmd_rewrap)

    cache = sub.add_parser("cache", help="a running sidecar's KEK cache")
    p = cache.add_subparsers(dest="action", required=True).add_parser(
        "flush", help="drop cached KEKs at once (revocation)"
    )
    p.add_argument("--key", help="only this key (default: every key)")
    p.add_argument("--socket", help="the sidecar's socket (default: from --config)")
    p.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    p.set_defaults(func=cmd_cache_flush)

    audit = sub.add_parser("audit", help="audit log tools").add_subparsers(
        dest="action", required=True
    )
    p = audit.add_parser("verify", help="check the hash chain; exit 1 at the first broken record")
    p.add_argument("files", nargs="+", metavar="FILE", help="audit files (any order)")
    p.add_argument("--head", help="the last hash the sidecar reports (detects a cut tail)")
    p.set_defaults(func=cmd_audit_verify)
    p = audit.add_parser("hash", help="the audit HMAC of known values, to grep the log for")
    p.add_argument("values", nargs="+", metavar="VALUE", help="values to hash, e.g. a tenant id")
    p.add_argument("--key-env", default="KMS_AUDIT_HMAC_KEY", help="variable holding the key")
    p.set_defaults(func=cmd_audit_hash)

    policy = sub.add_parser("policy", help="policy tools").add_subparsers(
        dest="action", required=True
    )
    p = policy.add_parser("check", help="explain the decision for an identity, key and operation")
    p.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    p.add_argument("--uid", type=int, help="caller's Unix uid")
    p.add_argument("--gid", type=int, help="caller's Unix gid (default: the uid)")
    p.add_argument("--exe", help="caller's executable path")
    p.add_argument("--jwt", help="a JWT the caller presents (verified as the sidecar would)")
    p.add_argument("--spiffe-id", help="the SPIFFE ID of the caller's client certificate")
    p.add_argument("--key", required=True, help="key name")
    p.add_argument("--op", required=True, help="operation, e.g. datakey, decrypt, rotate")
    p.add_argument("--context", action="append", metavar="NAME=VALUE", help="encryption context")
    p.add_argument("--ttl", type=float, help="requested ttl in seconds (datakey)")
    p.set_defaults(func=cmd_policy_check)

    from sidecar.keys_cli import add_keys_parser

    add_keys_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"kms-sidecar: configuration error: {exc}", file=sys.stderr)
        return 2
    except SidecarError as exc:
        print(f"kms-sidecar: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
