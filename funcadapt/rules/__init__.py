"""Adapter rules, one module per family. Importing this package registers them all;
:data:`~funcadapt.rules.base.RULES` is the registry that extraction, the transforms,
the tests and the support table all read. Adding an adapter means adding one module
here and importing it below. Registration order is the support table's order; for
one layer class, the rule registered first wins (AdaLoRA before LoRA)."""

# isort: skip_file
from . import lora  # noqa: F401
from . import ia3  # noqa: F401
from . import vera  # noqa: F401
from . import randlora  # noqa: F401
from . import hira  # noqa: F401
from . import pvera  # noqa: F401
from . import lycoris  # noqa: F401
from . import fourierft  # noqa: F401
from . import delora  # noqa: F401
from . import oft  # noqa: F401
from . import road  # noqa: F401
from . import hra  # noqa: F401
from . import auxiliary  # noqa: F401
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
