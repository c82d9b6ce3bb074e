"""The policy check as the server calls it: one :class:`AccessRequest` in, the allowing rule out.

:class:`PolicyAuthorizer` holds the loaded :class:`~sidecar.policy.PolicySet` and swaps it on
``reload`` (a bad file keeps the old set). It satisfies the server's ``Authorizer`` Protocol and
is the only adapter between the two; anything else that decides access (the KMS v2 provider,
``policy check``) builds the same :class:`AccessRequest`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import NamedTuple

from sidecar.errors import ConfigError
from sidecar.identity import Identity
from sidecar.policy.loader import load_policies
from sidecar.policy.policy_set import PolicySet

log = logging.getLogger(__name__)


class AccessRequest(NamedTuple):
    """What one decision is about: who asks to do which operation on which key, how. Immutable.

    ``key`` is ``None`` for operations on no single key (``status``, a ``flush`` of every key).
    ``context`` is the encryption context; ``ttl`` the requested lifetime in seconds (``None``: the
    caller asked for a key that never expires). Built once per request, or per batch item, so it
    is a typed NamedTuple: as immutable as a frozen dataclass, and several times cheaper to make.
    """

    identity: Identity
    key: str | None
    operation: str
    context: Mapping[str, str] | None = None
    ttl: float | None = None


class PolicyAuthorizer:
    """The policy set loaded from ``directory``; deny by default.

    Raises ``ConfigError`` at construction for a bad policy file (naming file, line and reason).
    """

    def __init__(
        self, directory: str, *, check: Callable[[PolicySet], None] = lambda _: None
    ) -> None:
        self.directory = directory
        #: Refuses a set the deployment makes unsafe (``ConfigError``), at start and on reload.
        self._check = check
        self.policies: PolicySet = load_policies(directory)
        check(self.policies)
        if not len(self.policies):
            log.warning("no policy rules in %s: every request will be denied", directory)

    def authorize(self, access: AccessRequest) -> str:
        """The name of the rule that allows ``access``.

        Raises ``PermissionDenied`` (the same message whether or not the key exists) or
        ``RateLimited``; either carries the refusing rule's name in ``rule`` for the audit log.
        """
        decision = self.policies.authorize(
            access.identity,
            key=access.key,
            operation=access.operation,
            context=access.context,
            ttl=access.ttl,
        )
        return decision.rule or ""

    async def reload(self) -> None:
        """Load the policy files again; on error keep the current set and log why."""
        try:
            policies = load_policies(self.directory)
            self._check(policies)
        except ConfigError as exc:
            log.error(
                "policy reload failed, keeping the previous %d rules: %s", len(self.policies), exc
            )
            return
        self.policies = policies
        log.info("policies reloaded: %d rules from %s", len(policies), self.directory)

    async def close(self) -> None:
        """Nothing to release: the policy set lives in memory."""
