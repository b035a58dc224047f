"""The `dalle` command: run stages or the pipeline as Prefect flows, inspect the store, open MLflow."""

from __future__ import annotations

import argparse
import json
import os
import sys

from dalle_core.config import ConfigError, load_config


def _user_errors() -> tuple[type[Exception], ...]:
    from dalle_core.data import DataError
    from dalle_core.openmoji import OpenMojiError
    from dalle_core.perceptual import PerceptualError
    from dalle_core.pretrained import PretrainedError
    from storage.store import StoreError
    from storage.tracking import TrackingError

    return (ConfigError, DataError, OpenMojiError, PerceptualError, PretrainedError, StoreError, TrackingError,
            FileNotFoundError)


def check_prefect_server() -> None:
    """With PREFECT_API_URL set, fail in one line if that server does not answer."""
    import urllib.error
    import urllib.request

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return  # flows run on an embedded server
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5):
            pass
    except urllib.error.HTTPError:
        pass  # it answered
    except OSError as err:
        raise ConfigError(f"Prefect server at PREFECT_API_URL={url!r} is unreachable: "
                          f"{getattr(err, 'reason', err)}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML run config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set dvae.codebook_size=1024 (repeatable)")


def _stage_flows() -> dict:
    from flows.evaluate import evaluate_flow
    from flows.generate import generate_flow
    from flows.ingest import ingest_flow
    from flows.pretokenize import pretokenize_flow
    from flows.train_bpe import train_bpe_flow
    from flows.train_clip import train_clip_flow
    from flows.train_dvae import train_dvae_flow
    from flows.train_transformer import train_transformer_flow

    return {"ingest": ingest_flow, "train-dvae": train_dvae_flow, "train-bpe": train_bpe_flow,
            "pretokenize": pretokenize_flow, "train-transformer": train_transformer_flow,
            "train-clip": train_clip_flow, "generate": generate_flow, "evaluate": evaluate_flow}


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

    from storage.tracking import has_runs, tracking_uri
    from tasks.common import open_store

    cfg = load_config(args.config, args.overrides)
    uri = tracking_uri(cfg.tracking.uri, open_store(cfg))
    if not has_runs(uri, cfg.tracking.experiment):
        raise ConfigError(f"no runs tracked in {uri!r} (experiment {cfg.tracking.experiment!r}) yet; "
                          f"run a stage first, e.g. dalle run -c {args.config or '<config>'}")
    print(f"MLflow UI on http://{args.host}:{args.port}  (tracking store: {uri})", flush=True)
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    return subprocess.call([exe, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
                            "--workers", str(args.workers)])


def _print_results(cfg, stages_ran: list[str]) -> None:
    """After generation/evaluation: the evaluation table and where the pictures are."""
    from tasks.common import open_store, stage_keys
    from tasks.evaluate import format_report

    store, keys = open_store(cfg), stage_keys(cfg)
    if "evaluate" in stages_ran and store.is_complete("evaluation", keys["evaluation"]):
        print(format_report(store.read_json(store.path("evaluation", keys["evaluation"], "evaluation.json"))))
        print(f"evaluation: {store.uri(store.path('evaluation', keys['evaluation'], 'evaluation.json'))}")
        print(f"top-1 vs random candidate: {store.uri(store.path('evaluation', keys['evaluation'], 'top1_vs_random.png'))}")
    if "generate" in stages_ran and store.is_complete("generations", keys["generations"]):
        print(f"contact sheet: {store.uri(store.path('generations', keys['generations'], 'contact_sheet.png'))}")


def cmd_stage(args) -> int:
    stage = {"train-dvae": "dvae", "train-transformer": "transformer", "train-clip": "clip"}.get(args.command)
    if getattr(args, "nproc", None):
        args.overrides.append(f"{stage}.train.nproc={args.nproc}")
    if getattr(args, "nnodes", None):
        args.overrides.append(f"{stage}.train.nnodes={args.nnodes}")
    if getattr(args, "rdzv_endpoint", None):
        args.overrides.append(f"runner.rdzv_endpoint={args.rdzv_endpoint}")
    if args.command == "generate":
        prompts = list(args.prompts)
        if args.prompts_file:
            if not os.path.isfile(args.prompts_file):
                raise ConfigError(f"--prompts-file {args.prompts_file!r} does not exist")
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        if prompts:
            args.overrides.append(f"generate.prompts={json.dumps(prompts)}")
        if args.prime:
            args.overrides += [f"generate.prime_image={json.dumps(args.prime)}", f"generate.prime_rows={args.prime_rows}"]
    cfg = load_config(args.config, args.overrides)  # fail on a bad config before Prefect starts
    check_prefect_server()
    result = _stage_flows()[args.command](config=args.config, overrides=args.overrides)
    print(result)
    _print_results(cfg, {"generate": ["generate"], "evaluate": ["evaluate"]}.get(args.command, []))
    if args.command == "generate" and args.out:
        from tasks.generate import export_generations

        for path in export_generations(cfg, result.key, args.out):
            print(path)
    return 0


def cmd_data_openmoji(args) -> int:
    """Build the OpenMoji imagefolder (deterministic; an identical build already there is kept)."""
    from dalle_core.openmoji import BuildOptions, build
    from tasks.common import Progress

    opts = BuildOptions(size=args.size, skin_tones=not args.no_skin_tones, val_fraction=args.val_fraction,
                        variant_fraction=args.variant_fraction, limit=args.limit)
    progress = Progress("openmoji", None, "images")

    def rendered(done: int, total: int) -> None:
        progress.total = total  # known once the catalogue is read
        progress.update()

    summary = build(args.out, opts, rendered)
    state = "already built" if summary["cached"] else "built"
    print(f"{args.out}: {state}: {summary['images']} images of {summary['concepts']} concepts "
          f"(left out: {summary['skipped']})")
    print(f"{summary['attribution']}; see {os.path.join(args.out, 'ATTRIBUTION.md')}")
    return 0


def cmd_run(args) -> int:
    from flows.pipeline import pipeline_flow
    from tasks.pipeline import check_upstream, select_stages

    cfg = load_config(args.config, args.overrides)
    stages = select_stages(args.only, args.from_stage)
    for s in args.force or []:
        select_stages([s], None)
    if not args.force:
        check_upstream(cfg, stages)
    check_prefect_server()
    refs = pipeline_flow(config=args.config, overrides=args.overrides, only=args.only, from_stage=args.from_stage,
                         force=args.force)
    print("\npipeline")
    for stage, r in refs.items():
        print(f"  {stage:<12} {r}")
    _print_results(cfg, stages)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the whole pipeline (finished stages come from the cache)")
    _common(p)
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages (upstream must exist)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="run this stage and everything after it")
    p.add_argument("--force", nargs="+", metavar="STAGE", help="redo these stages and everything downstream")
    p.set_defaults(func=cmd_run)
    for name in _stage_flows():
        p = sub.add_parser(name, help=f"run the {name} stage (and any missing upstream stage)")
        _common(p)
        p.set_defaults(func=cmd_stage)
    gen = sub.choices["generate"]
    gen.add_argument("prompts", nargs="*", help="captions to draw (default: the val captions)")
    gen.add_argument("--prompts-file", help="a text file with one prompt per line")
    gen.add_argument("--out", help="also copy the grids and generations.parquet to this folder")
    gen.add_argument("--prime", metavar="IMAGE", help="image completion: this image's top rows of tokens are kept")
    gen.add_argument("--prime-rows", type=int, default=4, metavar="K",
                     help="with --prime: how many token rows of the image to keep (default 4)")
    for name, func, help_ in (("status", cmd_status, "list the artifacts in the store"),
                              ("ls", cmd_status, "alias of status"),
                              ("gc", cmd_gc, "remove incomplete artifacts")):
        p = sub.add_parser(name, help=help_)
        _common(p)
        p.set_defaults(func=func)
        if name == "gc":
            p.add_argument("--unreferenced", action="store_true",
                           help="also remove complete artifacts the given config does not use")
    data = sub.add_parser("data", help="build a public data set as an imagefolder").add_subparsers(
        dest="dataset", required=True)
    p = data.add_parser("openmoji", help="OpenMoji emoji (CC BY-SA 4.0) with CLDR captions; needs the openmoji extra")
    p.add_argument("--out", required=True, help="the folder to write (then data.source=imagefolder, data.path=it)")
    p.add_argument("--size", type=int, default=64, help="pixels per side (default 64)")
    p.add_argument("--no-skin-tones", action="store_true", help="leave out the skin-tone variants")
    p.add_argument("--val-fraction", type=float, default=0.1, help="concepts held out of training (default 0.1)")
    p.add_argument("--variant-fraction", type=float, default=0.5,
                   help="multi-variant train concepts with one variant moved to val (default 0.5)")
    p.add_argument("--limit", type=int, default=None, help="at most this many concepts (a small subset)")
    p.set_defaults(func=cmd_data_openmoji)
    p = sub.add_parser("ui", help="start the MLflow UI on the run's tracking store")
    _common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="MLflow server worker processes (default 1)")
    p.set_defaults(func=cmd_ui)
    for name in ("train-dvae", "train-transformer", "train-clip"):
        stage = name.removeprefix("train-")
        sub.choices[name].add_argument("--nproc", type=int, default=None,
                                       help=f"DDP processes per machine (torchrun); same as --set {stage}.train.nproc=N")
        sub.choices[name].add_argument("--nnodes", type=int, default=None,
                                       help=f"machines taking part (run the same command on each); {stage}.train.nnodes")
        sub.choices[name].add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                                       help="where the machines meet (torchrun c10d rendezvous); runner.rdzv_endpoint")
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
