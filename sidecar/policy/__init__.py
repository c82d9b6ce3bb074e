"""Deny-by-default policies: which caller may do which operation on which key (DESIGN §5)."""

from sidecar.policy.engine import (
    OPERATIONS,
    Decision,
    PolicySet,
    Rule,
    RuleError,
    compile_rule,
    explain,
    permission_denied,
)
from sidecar.policy.loader import load_policies, parse_policy_text
from sidecar.policy.ratelimit import Rate, RateLimiter, parse_rate

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
