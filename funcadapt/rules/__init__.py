"""Adapter rules, one module per family. Importing this package registers them all;
:data:`~funcadapt.rules.base.RULES` is the registry that extraction, the transforms,
the tests and the support table all read. Adding an adapter means adding one module
here and importing it below."""

from . import auxiliary, ia3, lora, oft, randlora, road, vera  # noqa: F401  (registration)
from .base import ADAPTER_LAYERS, RULES, Coeff, Effect, Patch, Rule, RuleDoc, find_rule, register, rule_named

__all__ = [
    "ADAPTER_LAYERS",
    "RULES",
    "Coeff",
    "Effect",
    "Patch",
    "Rule",
    "RuleDoc",
    "find_rule",
    "register",
    "rule_named",
]
