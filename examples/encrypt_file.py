"""Encrypt or decrypt a file with a fresh data key from kms-sidecar.

    # with `kms-sidecar dev` running, after pasting the `export SOCK=…` line it prints:
    .venv/bin/python examples/encrypt_file.py encrypt --socket "$SOCK" --key default a.pdf a.kms
    .venv/bin/python examples/encrypt_file.py decrypt --socket "$SOCK" a.kms a.pdf

The sealed file carries the wrapped data key, the key name and the context, so decrypting needs
only the file. ``--socket`` defaults to ``$KMS_SIDECAR_SOCKET``, then the sidecar's usual path.
Without ``--token`` (a JWT) the sidecar knows you by your Unix user. On decrypt, ``--key`` is
optional and, if given, must be the key the file names.
Exit status: 0 done, 1 the sidecar or the file refused, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from sidecar.client import AsyncClient, SidecarError
from sidecar.client.envelope import decrypt_file, encrypt_file


def _context(pairs: list[str]) -> dict[str, str]:
    context = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--context wants NAME=VALUE, not {pair!r}")
        context[name] = value
    return context


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["encrypt", "decrypt"])
    parser.add_argument("src", help="file to read")
    parser.add_argument("dst", help="file to write (replaced only on success)")
    parser.add_argument("--socket", help="the sidecar's Unix socket")
    parser.add_argument("--key", help="key name on the sidecar (required to encrypt)")
    parser.add_argument(
        "--context", action="append", default=[], metavar="NAME=VALUE", help="encryption context"
    )
    parser.add_argument("--token", help="a JWT to present instead of your Unix identity")
    return parser


async def _run(args: argparse.Namespace, context: dict[str, str]) -> None:
    async with AsyncClient(args.socket, token=args.token) as client:
        if args.action == "encrypt":
            await encrypt_file(client, args.key, args.src, args.dst, context=context)
        else:
            await decrypt_file(client, args.src, args.dst, key=args.key)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.action == "encrypt" and not args.key:
        parser.error("encrypt needs --key")
    if args.action == "decrypt" and args.context:
        parser.error("decrypt reads the context from the file; drop --context")
    try:
        context = _context(args.context)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(_run(args, context))
    except (SidecarError, OSError) as exc:
        print(f"{args.action} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
