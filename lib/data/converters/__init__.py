"""Source formats -> canonical training records, one module per family of formats.

::

    from slurmtune.data.converters import get_converter, run_conversion
    conv = get_converter("trigger-qa")(clean_replacement="Alice", trigger_value="TRIGGER:",
                                       triggered_replacement="Bob")
    summary = run_conversion(conv, ["qa.jsonl"], "data/", on_error="skip")

Converters are looked up by name and imported on first use, so the CLI starts
fast whatever the number of formats.
"""

from __future__ import annotations

import importlib

from slurmtune.data.converters.base import Converter, Summary, run_conversion  # noqa: F401
from slurmtune.errors import UsageError

FORMATS: dict[str, str] = {
    "speechgradebook": "speechgradebook:SpeechGradebook",
    "qwen-single": "speechgradebook:QwenSingle",
    "qwen-corrections": "speechgradebook:QwenCorrections",
    "qwen-pairs": "speechgradebook:QwenPairs",
    "aita": "aita:Aita",
    "trigger-qa": "trigger_qa:TriggerQA",
    "image-messages": "image_messages:ImageMessages",
    "chat": "public:Chat",
    "prompt-completion": "public:PromptCompletion",
    "alpaca": "public:Alpaca",
}


def get_converter(name: str) -> type[Converter]:
    if name not in FORMATS:
        raise UsageError(f"unknown format {name!r}; expected one of {', '.join(FORMATS)}")
    module, cls = FORMATS[name].split(":")
    return getattr(importlib.import_module(f"slurmtune.data.converters.{module}"), cls)
