"""Per-request policy decisions: authorization, retries and their budget, rate limits, fault
injection, mirroring (pure: no I/O, no trio; the clock and random rolls are arguments)."""

from .authz import DecisionCounts, Policy
from .fault import NO_FAULT, FaultAction, fault_action
from .ratelimit import TokenBucket
from .retry import RetryBudget, RetryPolicy, may_replay
from .sampling import mirror_cluster, sampled

__all__ = [
    "NO_FAULT",
    "DecisionCounts",
    "FaultAction",
    "Policy",
    "RetryBudget",
    "RetryPolicy",
    "TokenBucket",
    "fault_action",
    "may_replay",
    "mirror_cluster",
    "sampled",
]
