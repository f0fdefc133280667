"""What a LoRA adapter's weight names say about the modules they adapt (its safetensors header
against the base's modules, built without weights): an adapter whose weights name modules the base model lacks loads as nothing in
peft, without an error, and the model then answers exactly as its base does. Training checks its
own adapter after saving it; serve, predict and merge check the adapter they are given.

::

    adapter_names_problem("runs/r1/final", "models/qwen2.5-vl-7b")   # None, or one line saying which
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_names_problem(adapter_dir, base_dir, modules: set[str] | None = None) -> str | None:
    """An adapter weight whose module the base model does not have. ``modules``: the base's module
    names (e.g. of the model in memory); by default those of the base built from its config on
    PyTorch's meta device (no weights loaded: the login node checks it in a second or two). The
    names in a checkpoint file are not enough: transformers renames some on load (Qwen2.5-VL's
    model.layers are model.language_model.layers in memory, where peft names them)."""
    from safetensors import safe_open

    adapter_file = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not adapter_file.is_file():
        return f"{adapter_dir}: no {ADAPTER_WEIGHTS}; expected the adapter's weights (safetensors)"
    names = modules if modules is not None else module_names(base_dir)
    if not names:
        return None  # a model transformers cannot build here: the node's canary checks it
    with safe_open(str(adapter_file), "pt") as f:
        adapted = sorted({_module_of(k) for k in f.keys()})
    stray = [m for m in adapted if m not in names]
    if not stray:
        return None
    tail = stray[0].rsplit(".", 1)[-1]
    like = next((n for n in sorted(names) if n.endswith(f".{tail}")), None)
    return (f"{adapter_dir}: {len(stray)} of {len(adapted)} adapted modules are not in the base model {base_dir}, "
            f"e.g. {stray[0]}" + (f" (the base has {like})" if like else "")
            + "; the adapter would change nothing; fix: use the adapter trained on this base")


def module_names(base_dir) -> set[str]:
    """The module names of the model in ``base_dir`` as transformers builds it (empty set when it cannot)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
        auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
        with torch.device("meta"):
            model = auto.from_config(config)
    except (OSError, ValueError, KeyError):
        return set()
    return {name for name, _ in model.named_modules()}


def _module_of(key: str) -> str:
    """base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> model.layers.0.self_attn.q_proj"""
    name = key.removeprefix("base_model.model.")
    for marker in (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"):
        if marker in name:
            return name[:name.index(marker)]
    return name.rsplit(".", 1)[0]
