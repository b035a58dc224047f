"""The `dalle` command: run stages or the pipeline as Prefect flows, inspect the store, open MLflow."""

from __future__ import annotations

import argparse
import json
import os
import sys

from dalle_core.errors import ConfigError, UserError
from pipeline.config import load_config
from storage.store import StoreError
from storage.tracking import TrackingError

# The commands import their machinery (Prefect, MLflow, the stages, the server) inside themselves, so that
# `dalle --help` and a bad flag answer in one line without loading it.

# shown as one line, exit 2; anything else is an internal failure. storage is beside the core, not under it, so its
# errors are a family of their own
USER_ERRORS = (UserError, StoreError, TrackingError, FileNotFoundError)


def check_prefect_server() -> None:
    """Point the flows at their Prefect API: PREFECT_API_URL, which must answer, else this command's own server
    (ended with the command, even under kill -9). One-line ConfigError when neither works."""
    from cli.prefect_server import ensure_prefect_api

    ensure_prefect_api()


def check_store(cfg) -> None:
    """Fail in one line, before Prefect starts, when the store cannot be opened or written (a write and a
    delete of a small file at its root: StoreError naming the URL and the reason), or when an HTTP MLflow
    tracking server does not answer (TrackingError)."""
    import uuid

    from storage.store import ArtifactStore, StoreError
    from storage.tracking import one_line_error

    url, store = cfg.store.root, None
    try:
        store = ArtifactStore(url, cfg.store.storage_options)
        probe = f"{store.root}/.tmp-probe-{uuid.uuid4().hex}"  # a .tmp- name: never taken for an artifact
        store.write_bytes(probe, b"probe")
        store.fs.rm(probe)
    except StoreError:
        raise
    except Exception as err:  # fsspec backends raise their own kinds (botocore's NoCredentialsError, ...)
        reason = one_line_error(err)
        if isinstance(err, NotImplementedError) and store is not None:
            reason = f"fsspec's {type(store.fs).__name__} cannot write files"
        raise StoreError(f"store {url!r} cannot be written: {reason}") from None
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):  # a tracking server must answer before any work, too
        from storage.tracking import _probe

        _probe(uri)
    from storage.tracking import check_experiment, tracking_uri

    check_experiment(tracking_uri(cfg.tracking.uri, store), cfg.tracking.experiment)  # deleted in the UI


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML run config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set dvae.codebook_size=1024 (repeatable)")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"


def cmd_status(args) -> int:
    """List the artifacts with their state; a damaged one says what is wrong and how to redo it."""
    from pipeline.stage_table import NAMES, RETIRED, stage_keys
    from storage.store import redo_hint

    cfg = load_config(args.config, args.overrides)
    store = cfg.store.open()
    current = stage_keys(cfg)
    order = {s: i for i, s in enumerate(NAMES)}
    rows = sorted(store.artifacts((*NAMES, *RETIRED), verify=args.verify), key=lambda a: order.get(a.stage, len(order)))
    print(f"store: {store.url}")
    if not rows:
        print("(empty)")
    for a in rows:
        mark = "*" if current.get(a.stage) == a.key else " "
        why = f": {a.problem}; {redo_hint(a.stage) if mark == '*' else '`dalle gc` removes it'}" if a.problem else ""
        if a.stage in RETIRED and not why:
            why = " (a folder of the store's layout before each stage had one name; `dalle gc --unreferenced` removes it)"
        print(f"{mark} {a.stage:<12} {a.key:<14} {_human(a.size):>9}  {a.created or '-':<20}  {a.state}{why}")
    print("(* = the artifact the given config uses; " + ("checksums verified)" if args.verify else
                                                         "--verify also checks checksums)"))
    return 1 if args.verify and any(a.state == "DAMAGED" for a in rows) else 0


def cmd_gc(args) -> int:
    """Remove incomplete and damaged artifacts (and, with --unreferenced, those the config does not use);
    an artifact another run is working on is kept."""
    from pipeline.stage_table import NAMES, RETIRED, stage_keys

    cfg = load_config(args.config, args.overrides)
    store = cfg.store.open()
    keep = set(stage_keys(cfg).items())
    removed = 0
    for a in store.artifacts((*NAMES, *RETIRED)):
        if a.complete and not (args.unreferenced and (a.stage, a.key) not in keep):
            continue
        if a.state == "INCOMPLETE" and (owner := store.claimed_by(a.stage, a.key)) is not None:
            print(f"keeping {a.stage}/{a.key} (in progress: pid {owner.get('pid', '?')} on {owner.get('host', '?')})")
            continue
        why = "unreferenced" if a.complete else f"damaged: {a.problem}" if a.state == "DAMAGED" else "incomplete"
        print(f"removing {a.stage}/{a.key} ({why})")
        store.remove(a.stage, a.key)
        removed += 1
        folder = f"{store.root}/{a.stage}"
        if not store.listdir(folder):  # an emptied stage folder (a retired one is never written again)
            store.fs.rm(folder, recursive=True)
    print(f"removed {removed} artifact(s)")
    return 0


def cmd_ui(args) -> int:
    import subprocess

    from storage.tracking import has_runs, tracking_uri

    cfg = load_config(args.config, args.overrides)
    uri = tracking_uri(cfg.tracking.uri, cfg.store.open())
    if not has_runs(uri, cfg.tracking.experiment):
        raise ConfigError(f"no runs tracked in {uri!r} (experiment {cfg.tracking.experiment!r}) yet; "
                          f"run a stage first, e.g. dalle run -c {args.config or '<config>'}")
    print(f"MLflow UI on http://{args.host}:{args.port}  (tracking store: {uri})", flush=True)
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    return subprocess.call([exe, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
                            "--workers", str(args.workers)])


def _print_results(cfg, refs: dict) -> None:
    """After generation/evaluation: the evaluation table and where the pictures are."""
    from tasks.evaluate import format_report

    store = cfg.store.open()
    if "evaluate" in refs:
        folder = store.path("evaluate", refs["evaluate"].key)
        print(format_report(store.read_json(f"{folder}/evaluation.json")))
        print(f"evaluation: {store.uri(folder + '/evaluation.json')}")
        print(f"top-1 vs random candidate: {store.uri(folder + '/top1_vs_random.png')}")
    if "generate" in refs:
        folder = store.path("generate", refs["generate"].key)
        print(f"contact sheet: {store.uri(folder + '/contact_sheet.png')}")


def run_pipeline(cfg, only: list[str] | None = None, from_stage: str | None = None, until: str | None = None,
                 force: list[str] | None = None) -> dict:
    """Check what can be checked before Prefect starts (the store, the stages, the upstream artifacts, the
    batch sizes once the images exist, fine-tuning sources), then run the pipeline flow and print its result."""
    from flows.pipeline_flow import pipeline_flow
    from pipeline.plan import PipelinePlan
    from pipeline.source_fit import check_fine_tuning

    check_store(cfg)
    plan = PipelinePlan(cfg, only, from_stage, until)
    plan.check_upstream(force)
    if not force:
        plan.check_batches(plan.stored("ingest"))
    check_fine_tuning(cfg, plan.stages)
    check_prefect_server()
    refs = pipeline_flow(cfg, only=only, from_stage=from_stage, until=until, force=force)
    print("\npipeline")
    for stage, r in refs.items():
        print(f"  {stage:<12} {r}")
    _print_results(cfg, refs)
    return refs


def cmd_stage(args) -> int:
    from pipeline.stage_table import COMMANDS

    stage = COMMANDS[args.command]
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
            try:
                with open(args.prompts_file, encoding="utf-8-sig") as f:  # -sig: Notepad's byte-order mark
                    prompts += [line.strip() for line in f if line.strip()]
            except UnicodeDecodeError as err:
                raise ConfigError(f"--prompts-file {args.prompts_file!r} is not UTF-8 (byte "
                                  f"{err.object[err.start]:#04x} at offset {err.start}); save it as UTF-8") from None
        if args.model:  # an exported or registered model: no store, no Prefect
            from cli.model_commands import cmd_generate_model

            return cmd_generate_model(args, prompts)
        if prompts:
            args.overrides.append(f"generate.prompts={json.dumps(prompts)}")
        from cli.edit_flags import edit_overrides

        args.overrides += edit_overrides(args)  # --prime, --edit, ...: checked as with --model, before Prefect starts
    cfg = load_config(args.config, args.overrides)  # fail on a bad config before Prefect starts
    from pipeline.stage_table import COMMANDS

    refs = run_pipeline(cfg, until=COMMANDS[args.command])
    if args.command == "generate" and args.out:
        from tasks.generate import export_generations

        for path in export_generations(cfg, refs["generate"].key, args.out):
            print(path)
    return 0


def cmd_data_emoji(args) -> int:
    """Build the OpenMoji or Noto Emoji imagefolder (deterministic; an identical build already there is kept)."""
    from data_sources.emoji_set import BuildOptions
    from pipeline.logs import progress

    opts = BuildOptions(size=args.size, skin_tones=not args.no_skin_tones, val_fraction=args.val_fraction,
                        variant_fraction=args.variant_fraction, limit=args.limit)
    meter = progress(args.dataset, None, "images")

    def rendered(done: int, total: int) -> None:
        meter.total = total  # known once the catalogue is read
        meter.update()

    if args.dataset == "noto":
        from data_sources.noto_emoji import build as build_noto

        summary = build_noto(args.out, args.tarball, opts, rendered)
    else:
        from data_sources.openmoji import build

        summary = build(args.out, opts, rendered)
    meter.close()
    state = "already built" if summary["cached"] else "built"
    def counts(d: dict) -> str:
        return ", ".join(f"{n} {name}" for name, n in d.items()) or "none"

    print(f"{args.out}: {state}: {sum(summary['images'].values())} images ({counts(summary['images'])}) of "
          f"{summary['concepts']} concepts; left out: {counts(summary['skipped'])}")
    print(f"{summary['attribution']}; see {os.path.join(args.out, 'ATTRIBUTION.md')}")
    return 0


def cmd_run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from cli.model_commands import check_registration, register_after_run

    check_registration(args)
    run_pipeline(cfg, only=args.only, from_stage=args.from_stage, force=args.force)
    if args.register:
        register_after_run(cfg, args.register, args.alias)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the whole pipeline (finished stages come from the cache)")
    _common(p)
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages (upstream must exist)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="run this stage and everything after it")
    p.add_argument("--force", nargs="+", metavar="STAGE", help="redo these stages and everything downstream")
    p.add_argument("--register", metavar="NAME", help="at the end, export the models and register them in MLflow as NAME")
    p.add_argument("--alias", help="with --register: point this alias (e.g. champion) at the new version")
    p.set_defaults(func=cmd_run)
    from pipeline.stage_table import COMMANDS, STAGES, TRAINED

    for name, stage in COMMANDS.items():
        p = sub.add_parser(name, help=f"run the pipeline up to the {stage} stage (finished stages are reused)")
        _common(p)
        p.set_defaults(func=cmd_stage)
    gen = sub.choices["generate"]
    gen.add_argument("prompts", nargs="*", help="captions to draw (default: the val captions)")
    gen.add_argument("--prompts-file", help="a text file with one prompt per line")
    gen.add_argument("--out", help="also copy the grids and generations.parquet to this folder")
    gen.add_argument("--prime", metavar="IMAGE", help="image completion: this image's top rows of tokens are kept")
    gen.add_argument("--prime-rows", type=int, default=None, metavar="K",
                     help="with --prime: how many token rows of the image to keep (default: half the token grid's)")
    from cli.model_commands import add_commands

    add_commands(sub, _common)  # export, serve, generate --model
    for name, func, help_ in (("status", cmd_status, "list the artifacts in the store"),
                              ("ls", cmd_status, "alias of status"),
                              ("gc", cmd_gc, "remove incomplete and damaged artifacts")):
        p = sub.add_parser(name, help=help_)
        _common(p)
        p.set_defaults(func=func)
        if name == "gc":
            p.add_argument("--unreferenced", action="store_true",
                           help="also remove complete artifacts the given config does not use")
        else:
            p.add_argument("--verify", action="store_true",
                           help="also check every file against the sha256 in its manifest (reads every file); "
                                "exit code 1 when one does not match")
    data = sub.add_parser("data", help="build a public data set as an imagefolder").add_subparsers(
        dest="dataset", required=True)
    openmoji = data.add_parser("openmoji", help="OpenMoji emoji (CC BY-SA 4.0) with CLDR captions; needs the "
                               "openmoji extra")
    noto = data.add_parser("noto", help="Noto Emoji (Apache 2.0) from the npm package emoji-datasource-google, "
                           "CLDR captions, the same split as openmoji; needs the openmoji extra")
    noto.add_argument("--from", dest="tarball", metavar="TARBALL",
                      help="an `npm pack emoji-datasource-google@16.0.0` tarball (default: run that command)")
    for p in (openmoji, noto):
        p.add_argument("--out", required=True,
                       help="the folder to write (then data.source=imagefolder, data.path=it)")
        p.add_argument("--size", type=int, default=64, help="pixels per side (default 64)")
        p.add_argument("--no-skin-tones", action="store_true", help="leave out the skin-tone variants")
        p.add_argument("--val-fraction", type=float, default=0.1, help="concepts held out of training (default 0.1)")
        p.add_argument("--variant-fraction", type=float, default=0.5,
                       help="multi-variant train concepts with one variant moved to val (default 0.5)")
        p.add_argument("--limit", type=int, default=None, help="at most this many concepts (a small subset)")
        p.set_defaults(func=cmd_data_emoji)
    p = sub.add_parser("ui", help="start the MLflow UI on the run's tracking store")
    _common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="MLflow server worker processes (default 1)")
    p.set_defaults(func=cmd_ui)
    for stage in TRAINED:
        name = STAGES[stage].command
        sub.choices[name].add_argument("--nproc", type=int, default=None,
                                       help=f"DDP processes per machine (torchrun); same as --set {stage}.train.nproc=N")
        sub.choices[name].add_argument("--nnodes", type=int, default=None,
                                       help=f"machines taking part (run the same command on each); {stage}.train.nnodes")
        sub.choices[name].add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                                       help="where the machines meet (torchrun c10d rendezvous); runner.rdzv_endpoint")
    return parser


def _local_store_root(args) -> str | None:
    """The store's folder when the command's config names a local store that exists (for the failure log)."""
    if not hasattr(args, "config"):
        return None  # a command without a run config (`dalle data`)
    try:
        root = load_config(args.config, args.overrides).store.root
    except Exception:  # the config itself may be what failed
        return None
    return os.path.abspath(root) if "://" not in root and os.path.isdir(root) else None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dalle")  # our log lines in the Prefect UI too
    from cli.edit_flags import join_signed_values

    args = build_parser().parse_args(join_signed_values(sys.argv[1:] if argv is None else list(argv)))
    from cli.console import FailureLog

    with FailureLog(args.command) as log:
        try:
            code = args.func(args)
        except USER_ERRORS as err:
            log.discard()
            print(f"error: {log.failed_in + ': ' if log.failed_in else ''}{err}", file=sys.stderr)
            return 2
        except Exception as err:  # a bug or an outside failure: one line here, the traceback in the log file
            from storage.tracking import one_line_error

            path = log.keep(err, _local_store_root(args))
            print(f"error: {log.failed_in or args.command} failed: {one_line_error(err)}", file=sys.stderr)
            print(f"full traceback: {path}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C: finished stages and checkpoints are kept; the same command resumes
            log.discard()
            print(f"error: {args.command} interrupted; run the same command again to resume from the last "
                  "checkpoint", file=sys.stderr)
            return 130
    log.discard()
    return code


if __name__ == "__main__":
    sys.exit(main())
