"""Model commands: make-tiny-model (demos, tests), fetch-model (the login node downloads; nodes are offline)."""

from __future__ import annotations

from pathlib import Path

from slurmtune.errors import SlurmtuneError, UsageError


def add_commands(sub, argv: list[str]) -> None:
    _add_make_tiny_model(sub)
    _add_fetch_model(sub)


def _add_make_tiny_model(sub) -> None:
    p = sub.add_parser("make-tiny-model", help="build a random tiny model for demos and tests")
    p.add_argument("out_dir", metavar="DIR")
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "phi3"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_model)


def _make_tiny_model(args) -> int:
    from slurmtune.train.tiny_model import make_tiny_model
    path = make_tiny_model(args.out_dir, arch=args.arch, seed=args.seed)
    print(f"tiny {args.arch} model written to {path}")
    return 0


def _add_fetch_model(sub) -> None:
    p = sub.add_parser("fetch-model", help="download a model on the login node into the shared cache "
                                           "(compute nodes are offline)")
    p.add_argument("name", metavar="NAME", help="Hugging Face model id, e.g. mistralai/Mistral-7B-Instruct-v0.3")
    p.add_argument("--cluster", metavar="NAME", help="profile whose env.HF_HOME is the shared cache")
    p.add_argument("--cache", metavar="DIR", help="cache folder (default: the profile's HF_HOME, else $HF_HOME)")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=_fetch_model)


def _fetch_model(args) -> int:
    import os
    cache = args.cache
    if cache is None and args.cluster:
        from slurmtune.cluster.profiles import load_profile
        cache = load_profile(args.cluster).env.get("HF_HOME")
    cache = cache or os.environ.get("HF_HOME")
    if not cache:
        raise UsageError("no cache folder: pass --cache DIR or --cluster NAME (a profile with env.HF_HOME)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError("HF_HUB_OFFLINE=1 is set: run fetch-model where the hub is reachable "
                         "(the login node), with HF_HUB_OFFLINE unset")
    from huggingface_hub import snapshot_download
    # The token, if any, is read by huggingface_hub from HF_TOKEN / its login file; never stored by us.
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        path = snapshot_download(args.name, revision=args.revision, cache_dir=str(Path(cache) / "hub"),
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                 "*.tiktoken"])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        reason = str(e).strip().splitlines()[0]
        raise SlurmtuneError(f"could not download {args.name}: {reason} (is the hub reachable from "
                             "this node? gated models need `hf auth login` or HF_TOKEN)") from None
    print(f"{args.name} -> {path}\nuse it in a manifest as: model.path={path}")
    return 0
