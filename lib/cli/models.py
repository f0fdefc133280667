"""Model commands: make-tiny-model (demos, tests), fetch-model (the login node downloads; nodes are
offline), publish (an adapter and its model card to the hub)."""

from __future__ import annotations

from pathlib import Path

from slurmtune.errors import SlurmtuneError, UsageError


def add_commands(sub, argv: list[str]) -> None:
    _add_make_tiny_model(sub)
    _add_fetch_model(sub)
    _add_publish(sub)


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


def _add_publish(sub) -> None:
    p = sub.add_parser("publish", help="push an adapter and a model card made from its lineage to the model hub")
    p.add_argument("adapter", metavar="ADAPTER", help="a trained adapter folder (a run's final/)")
    p.add_argument("--repo", required=True, metavar="ORG/NAME")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", action="store_true", help="push nothing; with --out, write what would be pushed")
    p.add_argument("--out", metavar="DIR", help="with --dry-run: a new folder for the exact files that would be pushed")
    p.add_argument("--data-use-approved", action="store_true",
                   help="the adapter saw student data and publishing it is approved (consent, institutional rules)")
    p.set_defaults(func=_publish)


def _publish(args) -> int:
    import re
    import tempfile

    from slurmtune.serve.publish import push, stage
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", args.repo):
        raise UsageError(f"--repo {args.repo!r}: expected ORG/NAME (letters, digits, - _ .)")
    if args.out and not args.dry_run:
        raise UsageError("--out applies only with --dry-run (a push stages its files in a temporary folder)")
    if args.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            folder = stage(args.adapter, args.out or Path(tmp) / "publish", args.repo, args.data_use_approved)
            files = sorted(p.name for p in folder.iterdir())
        where = f" (written to {args.out})" if args.out else ""
        print(f"dry run: would push {len(files)} files to {args.repo}{where}: {', '.join(files)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = stage(args.adapter, Path(tmp) / "publish", args.repo, args.data_use_approved)
        url = push(folder, args.repo, args.private)
    print(f"published {args.adapter} to {args.repo}{' (private)' if args.private else ''}: {url}")
    return 0
