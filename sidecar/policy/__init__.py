"""Deny-by-default policies: which caller may do which operation on which key.

The modules, bottom up: ``vocabulary`` (operations, ``RuleError``), ``facts`` (what a caller
proved), ``globs``, ``conditions`` (``when.*``, each one test that also says why it fails),
``templates`` (``context.*`` values), ``rules`` (one compiled rule), ``decision`` (the answer),
``policy_set`` (deciding), ``explanation`` (``policy check``), ``loader`` (policy files) and
``ratelimit``.
"""

from sidecar.policy.decision import Decision, permission_denied
from sidecar.policy.explanation import explain
from sidecar.policy.loader import load_policies, parse_policy_text
from sidecar.policy.policy_set import PolicySet
from sidecar.policy.ratelimit import Rate, RateLimiter, parse_rate
from sidecar.policy.rules import Rule, compile_rule
from sidecar.policy.vocabulary import OPERATIONS, RuleError

__all__ = [
    "OPERATIONS",
    "Decision",
    "PolicySet",
    "Rate",
    "RateLimiter",
    "Rule",
    "RuleError",
    "compile_rule",
    "explain",
    "load_policies",
    "parse_policy_text",
    "parse_rate",
    "permission_denied",
]
