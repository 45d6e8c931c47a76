"""Adapter rules, one module per family. Importing this package registers them all;
:data:`~funcadapt.rules.base.RULES` is the registry that extraction, the transforms,
the tests and the support table all read.

Adding an adapter means adding one module to this package: every module here is
imported (the established families first, in the order below, which is the support
table's order; any other module after them, alphabetically). Which rule handles a
layer does not depend on that order: :func:`~funcadapt.rules.base.find_rule` takes
the rule for the most specific layer class (AdaLoRA's layer before LoRA's), and only
among rules for the same class the one registered first (DoRA before plain LoRA)."""

import importlib
import pkgutil

from .base import ADAPTER_LAYERS, RULES, Coeff, Effect, Patch, Rule, RuleDoc, find_rule, register, rule_named

_FIRST = ("lora", "ia3", "vera", "randlora", "hira", "pvera", "lycoris", "fourierft", "delora", "oft", "road", "hra")
_LAST = ("auxiliary",)


def _modules() -> list[str]:
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_"))
    rest = [m for m in found if m not in _FIRST and m not in _LAST]
    return [m for m in _FIRST if m in found] + rest + [m for m in _LAST if m in found]


for _name in _modules():
    importlib.import_module(f"{__name__}.{_name}")

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
