"""Who may connect to the Unix socket, and when that is too many.

A socket whose mode grants "other" write (``0666``, ``0777``) lets every local user connect; that
is how a host whose callers run as many uids (pods with arbitrary uids, one uid per service) is
served, as SPIRE's agent socket is. It is safe because connecting proves nothing: each caller is
told apart by its peer credentials, and the deny-by-default policy decides. It stops being safe
when a rule allows callers without proving who they are: an allow rule with no ``when``
condition, or only ``unix_exe`` (any user can run any executable it can read), would let every
local user in. :func:`check_socket_access` refuses exactly that, at start and on reload.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from sidecar.config import Config
from sidecar.errors import ConfigError
from sidecar.policy import Rule

#: ``when`` conditions every local user can satisfy, so they tell no caller apart.
_FORGEABLE_CONDITIONS = frozenset({"when.unix_exe"})


def world_connectable(mode: int) -> bool:
    """Whether a socket of ``mode`` lets every local user connect (``connect`` needs write)."""
    return bool(mode & 0o002)


def open_to_every_user(rule: Rule) -> bool:
    """Whether an allow rule admits a caller who proved nothing but being on the host."""
    return rule.effect == "allow" and all(c.key in _FORGEABLE_CONDITIONS for c in rule.conditions)


def check_socket_access(
    mode: int, rules: Iterable[Rule], *, setting: str = "server.socket_mode"
) -> None:
    """Refuse a world-connectable ``mode`` with a rule any local user satisfies.

    Raises ``ConfigError`` naming ``setting`` (the mode's config key), the rule and its file.
    """
    if not world_connectable(mode):
        return
    for rule in rules:
        if open_to_every_user(rule):
            where = f" ({rule.source})" if rule.source else ""
            raise ConfigError(
                f"{setting}: {mode:04o} lets every local user connect, and allow rule "
                f"{rule.name!r}{where} has no condition that tells callers apart "
                "(no unix_uid, unix_gid, jwt_* or spiffe_id), so every local user would be "
                "allowed; add such a condition to the rule or use a mode such as '0660'"
            )


def check_config_sockets(config: Config, rules: Collection[Rule]) -> None:
    """:func:`check_socket_access` for every socket ``config`` listens on: the main one and, when
    it is on, the KMS v2 plugin's (the same rules decide there)."""
    check_socket_access(config.server.socket_mode_bits, rules)
    if config.kms_v2.enabled:
        check_socket_access(config.kms_v2.socket_mode_bits, rules, setting="kms_v2.socket_mode")


def describe_socket_access(mode: int, group: str) -> str:
    """One sentence for the start log: who can connect, and what tells them apart."""
    if world_connectable(mode):
        return (
            f"socket mode {mode:04o}: every local user may connect; callers are told apart by "
            "their peer credentials (uid, gid, executable) and the policy decides"
        )
    who = "the owner" + (f" and group {group!r}" if group and mode & 0o020 else "")
    if not group and mode & 0o020:
        who += " and the sidecar's group"
    return f"socket mode {mode:04o}: {who} may connect; the policy decides per caller"
