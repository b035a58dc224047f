"""The `dalle` command: run stages or the pipeline as Prefect flows, inspect the store, open MLflow."""

from __future__ import annotations

import argparse
import os
import sys

from dalle_core.config import ConfigError, load_config



def _user_errors() -> tuple[type[Exception], ...]:
    from dalle_core.data import DataError
    from storage.store import StoreError
    from storage.tracking import TrackingError

    return (ConfigError, DataError, StoreError, TrackingError, FileNotFoundError)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML run config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set dvae.codebook_size=1024 (repeatable)")


def _stage_flows() -> dict:
    from flows.ingest import ingest_flow
    from flows.pretokenize import pretokenize_flow
    from flows.train_bpe import train_bpe_flow
    from flows.train_dvae import train_dvae_flow
    from flows.train_transformer import train_transformer_flow

    return {"ingest": ingest_flow, "train-dvae": train_dvae_flow, "train-bpe": train_bpe_flow,
            "pretokenize": pretokenize_flow, "train-transformer": train_transformer_flow}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"


def cmd_status(args) -> int:
    from tasks.common import open_store, stage_keys

    cfg = load_config(args.config, args.overrides)
    store = open_store(cfg)
    current = stage_keys(cfg)
    rows = store.artifacts()
    print(f"store: {store.url}")
    if not rows:
        print("(empty)")
    for a in rows:
        state = "complete" if a.complete else "INCOMPLETE"
        mark = "*" if current.get(a.stage) == a.key else " "
        print(f"{mark} {a.stage:<12} {a.key:<14} {_human(a.size):>9}  {a.created or '-':<20}  {state}")
    print("(* = the artifact the given config uses)")
    return 0


def cmd_gc(args) -> int:
    from tasks.common import open_store, stage_keys

    cfg = load_config(args.config, args.overrides)
    store = open_store(cfg)
    keep = set(stage_keys(cfg).items())
    removed = 0
    for a in store.artifacts():
        if not a.complete or (args.unreferenced and (a.stage, a.key) not in keep):
            print(f"removing {a.stage}/{a.key} ({'incomplete' if not a.complete else 'unreferenced'})")
            store.remove(a.stage, a.key)
            removed += 1
    print(f"removed {removed} artifact(s)")
    return 0


def cmd_ui(args) -> int:
    import subprocess

    from storage.tracking import tracking_uri
    from tasks.common import open_store

    cfg = load_config(args.config, args.overrides)
    uri = tracking_uri(cfg.tracking.uri, open_store(cfg))
    print(f"MLflow UI on http://{args.host}:{args.port}  (tracking store: {uri})", flush=True)
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    return subprocess.call([exe, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)])


def cmd_stage(args) -> int:
    if getattr(args, "nproc", None):
        args.overrides.append(f"transformer.nproc={args.nproc}")
    load_config(args.config, args.overrides)  # fail on a bad config before Prefect starts
    flow = _stage_flows()[args.command]
    result = flow(config=args.config, overrides=args.overrides)
    print(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _stage_flows():
        p = sub.add_parser(name, help=f"run the {name} stage (and any missing upstream stage)")
        _common(p)
        p.set_defaults(func=cmd_stage)
    for name, func, help_ in (("status", cmd_status, "list the artifacts in the store"),
                              ("ls", cmd_status, "alias of status"),
                              ("gc", cmd_gc, "remove incomplete artifacts")):
        p = sub.add_parser(name, help=help_)
        _common(p)
        p.set_defaults(func=func)
        if name == "gc":
            p.add_argument("--unreferenced", action="store_true",
                           help="also remove complete artifacts the given config does not use")
    p = sub.add_parser("ui", help="start the MLflow UI on the run's tracking store")
    _common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    sub.choices["train-transformer"].add_argument("--nproc", type=int, default=None,
                                                  help="DDP processes (torchrun); same as --set transformer.nproc=N")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
