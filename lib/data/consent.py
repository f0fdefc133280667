"""The consent rule for student data, enforced wherever such data enters slurmtune.

A row may train only if its ``consent`` object exists and BOTH flags are the
JSON literal ``true`` (not "true", not 1), and its account tier is not "demo".
Whatever the exporting application did, the rule is applied again here::

    reason = exclusion_reason(row)   # None, "consent" or "demo"
"""

from __future__ import annotations

from typing import Any

CONSENT_FLAGS = ("student_data_collection", "instructor_llm_training")


def exclusion_reason(row: Any, required: bool = True) -> str | None:
    """Why ``row`` may not train, or None. With ``required=False`` a row without any
    ``consent`` object passes (synthetic data), but one that carries it must satisfy it."""
    if not isinstance(row, dict):
        return "consent"
    consent = row.get("consent")
    if consent is None and not required:
        pass
    elif not isinstance(consent, dict) or any(consent.get(flag) is not True for flag in CONSENT_FLAGS):
        return "consent"
    tier = row.get("account_tier")
    if isinstance(tier, str) and tier.strip().lower() == "demo":
        return "demo"
    return None
