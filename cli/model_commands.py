"""The `dalle` commands that use a trained model rather than train one: `export` (a model folder, optionally
registered in MLflow), `generate --model` (no store, no Prefect) and `serve` (the web page and JSON API).
cli/main.py parses their arguments; none of them starts a Prefect server."""

from __future__ import annotations

import errno
import math
import os
import shlex
import socket
import tempfile

from dalle_core.errors import ConfigError
from pipeline.config import load_config

# The commands import their machinery (Prefect, MLflow, the stages, the server) inside themselves, so that
# `dalle --help` and a bad flag answer in one line without loading it.


def cmd_export(args) -> int:
    """Export the run's models as a folder (--out) and/or register them as an MLflow model (--register)."""
    from release.export import export_model, register_export

    if not args.out and args.register is None:
        raise ConfigError("give --out DIR (a model folder) and/or --register NAME (an MLflow registered model)")
    check_registration(args)
    if args.out:
        args.out = check_out_folder(args.out)
    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory(prefix="dalle-export-") as tmp:
        export = export_model(cfg, args.out or os.path.join(tmp, "model"))
        if args.out:
            print(f"exported {args.out} ({len(export.files)} files; samples from {export.samples_from})")
            print(f"model card: {os.path.join(args.out, 'README.md')}")
        if args.register:
            _registered(register_export(cfg, export, args.register, args.alias))
    return 0


def check_registration(args) -> None:
    """`--register NAME [--alias ALIAS]` checked before any work (one line each)."""
    from release.registry import check_alias, check_model_name

    if args.alias is not None and args.register is None:
        raise ConfigError(f"--alias {args.alias!r} names a registered version: give --register NAME too")
    if args.register is not None:
        check_model_name(args.register)
    if args.alias is not None:
        check_alias(args.alias)


def _registered(registered) -> None:
    uri = f"models:/{registered.name}@{registered.alias}" if registered.alias else registered.uri
    print(f"registered {registered.uri} (MLflow run {registered.run_id})"
          + (f"; alias {registered.alias}: {uri}" if registered.alias else ""))
    print(f"serve it: mlflow models serve -m {shlex.quote(uri)} --env-manager local")


def register_after_run(cfg, name: str, alias: str | None = None) -> None:
    """`dalle run --register NAME [--alias ALIAS]`: the finished pipeline's models, registered as the next version
    of NAME."""
    from release.export import export_model, register_export

    with tempfile.TemporaryDirectory(prefix="dalle-export-") as tmp:
        _registered(register_export(cfg, export_model(cfg, os.path.join(tmp, "model")), name, alias))


def check_out_folder(out: str) -> str:
    """`--out` as an absolute path (so `.` has a name), or ConfigError (one line) when it names a file."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out!r} is a file; give a folder")
    return os.path.abspath(out)


def check_listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (for uvicorn to listen on), or ConfigError (one line) for a port out of range,
    a host that does not resolve or is not this machine's, or a port another program holds."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port is {port}; allowed: 0 to 65535 (0: any free port)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"--host {host!r} does not resolve ({err}); give an address such as 127.0.0.1 or "
                          "0.0.0.0 (all interfaces)") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse the port
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port} on {host} is taken by another program; stop it or pick another "
                              "--port") from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"--host {host!r} is not an address of this machine; give 127.0.0.1 (this machine "
                              "only) or 0.0.0.0 (all interfaces)") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def sampling_settings(overrides: list[str]) -> tuple[dict, str, str]:
    """(sampling keyword arguments, device, precision) from `--set generate.<key>=...` and `runner.device=...`,
    checked as the run config checks them; any other key is a one-line ConfigError."""
    from dalle_core.sampling import (
        SAMPLING_DEFAULTS,  # `--set` keys that apply: the model carries the rest
    )

    allowed = {f"generate.{k}" for k in (*SAMPLING_DEFAULTS, "precision")} | {"runner.device"}
    given = [item.split("=", 1)[0].strip() for item in overrides]
    for key in given:
        if key not in allowed:
            raise ConfigError(f"--set {key}: with --model only {', '.join(sorted(allowed))} apply (the model "
                              "folder holds the rest)")
    cfg = load_config(None, overrides)
    kwargs = {k: getattr(cfg.generate, k) for k in SAMPLING_DEFAULTS if f"generate.{k}" in given}
    return kwargs, cfg.runner.device, cfg.generate.precision


def _model_source(args) -> tuple[str, list[str], str | None, list[str]]:
    """(what to load, overrides of the run config, MLflow tracking URI, sampling overrides) from --model / -c and
    --set: with a run config, its `generate.*` and `runner.*` keys set the sampling and the rest the run (its
    store, its tracking URI, where a models:/ URI is looked up); with --model alone, only sampling keys apply."""
    if not args.config:
        if not args.model:
            raise ConfigError("give --model (an exported folder or models:/NAME/VERSION) or -c CONFIG (a run's store)")
        return args.model, [], None, list(args.overrides)
    sampling = [o for o in args.overrides if o.startswith(("generate.", "runner."))]
    run = [o for o in args.overrides if o not in sampling]
    if not args.model:
        return args.config, run, None, sampling
    from storage.tracking import tracking_uri

    cfg = load_config(args.config, run)
    return args.model, [], tracking_uri(cfg.tracking.uri, cfg.store.open()), sampling


def cmd_generate_model(args, prompts: list[str]) -> int:
    """`dalle generate --model SRC PROMPT ... --out DIR`: CLIP-ranked candidates with no store and no Prefect;
    writes generations.parquet, one grid per prompt and a contact sheet to --out, as the generate stage does."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cli.edit_flags import edit_arguments, folder_shape
    from dalle_core.images import png_bytes
    from pipeline.models import load_model
    from storage.parquet import GENERATIONS_SCHEMA
    from tasks.generate import best_grids, candidate_rows, edit_lead

    if not prompts:
        raise ConfigError("give at least one prompt (or --prompts-file) to draw with --model")
    if not args.out:
        raise ConfigError("--model needs --out DIR: the folder for the grids and generations.parquet")
    check_out_folder(args.out)
    source, overrides, uri, sampling = _model_source(args)
    edit = edit_arguments(args, *folder_shape(source))
    kwargs, device, precision = sampling_settings(sampling)
    pipe = load_model(source, device=device, precision=precision, overrides=overrides, tracking_uri=uri,
                      fuse_lora=args.fuse_lora)
    out = pipe(prompts, edit=edit, **kwargs)
    prime = f"{args.prime} (top {edit.prime_rows} rows)" if args.prime else None
    rows = []
    for j, (p, seed, images, scores, codes) in enumerate(zip(out.prompts, out.seeds, out.pixels, out.scores,
                                                              out.image_tokens)):
        drawn = np.argsort(out.candidates[j])  # back to sampling order, as the generate stage writes its rows
        masks = out.masks[j][drawn] if out.edit is not None else None
        rows += candidate_rows(p, seed, images[drawn], scores[drawn], codes[drawn], prime, out.edit, masks)
    table = pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA)
    names, grids, sheet = best_grids(table, 4, *edit_lead(out.edit))
    os.makedirs(os.path.join(args.out, "grids"), exist_ok=True)
    pq.write_table(table, os.path.join(args.out, "generations.parquet"))
    files = {"contact_sheet.png": sheet, **{f"grids/prompt-{i:04d}.png": grids[p] for i, p in enumerate(names)}}
    for rel, image in files.items():
        with open(os.path.join(args.out, rel), "wb") as f:
            f.write(png_bytes(image))
    for p, scores, truncated in zip(out.prompts, out.scores, out.truncated):
        cut = " (truncated to the model's text length)" if truncated else ""
        print(f"{p!r}{cut}: {len(scores)} candidates, top-1 CLIP score {scores[0]:.3f}")
    print(f"seed {out.seed}; wrote {os.path.join(args.out, 'generations.parquet')} and {len(files)} PNGs")
    return 0


def cmd_serve(args) -> int:
    """`dalle serve`: load the model once, warm it up, then serve the page and the JSON API with uvicorn."""
    import uvicorn

    from pipeline.models import load_model
    from serve import create_app, uvicorn_config

    if args.max_candidates < 1:
        raise ConfigError(f"--max-candidates is {args.max_candidates}; it must be at least 1")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch is {args.max_batch}; it must be at least 1 (1: each request alone)")
    if not 0 < args.client_timeout < math.inf:
        raise ConfigError(f"--client-timeout is {args.client_timeout:g}; it must be a number of seconds above 0")
    source, overrides, uri, sampling = _model_source(args)
    kwargs, device, precision = sampling_settings(sampling)
    sock = check_listen(args.host, args.port)  # held from here on, so nothing takes the port while the model loads
    try:
        pipe = load_model(source, device=device, precision=precision, overrides=overrides, tracking_uri=uri,
                          fuse_lora=args.fuse_lora)
    except BaseException:
        sock.close()
        raise
    pipe.sampling.update(kwargs)
    name = os.path.basename(os.path.normpath(source)) if "://" not in source and ":/" not in source else source
    print(f"loaded {source} on {pipe.device} ({pipe.precision}); warming up ...", flush=True)
    pipe("warm-up", num_candidates=min(16, pipe.sampling.get("num_candidates", 16), args.max_candidates))  # first-call kernels
    app = create_app(pipe, name=name, max_candidates=args.max_candidates, max_batch=args.max_batch,
                     client_timeout_s=args.client_timeout)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"dalle serve: http://{shown}:{port}  (JSON API: docs/serving.md; OpenAPI schema at /openapi.json)", flush=True)
    uvicorn.Server(uvicorn_config(app)).run(sockets=[sock])
    return 0


def add_commands(sub, common) -> None:
    """The `export` and `serve` sub-commands and `generate`'s --model, on cli/main.py's parser."""
    p = sub.add_parser("export", help="write the run's models as a self-contained folder with a model card "
                                      "(--out), and/or register them in MLflow (--register)")
    common(p)
    p.add_argument("--out", help="the folder to write (new, empty, or an earlier export to replace)")
    p.add_argument("--register", metavar="NAME", help="also log the model to MLflow and register it as NAME")
    p.add_argument("--alias", help="with --register: point this alias (e.g. champion) at the new version")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("serve", help="a web page and JSON API for trying prompts on a trained model")
    common(p)
    p.add_argument("--model", help="an exported folder, models:/NAME/VERSION or models:/NAME@ALIAS (default: the -c "
                                   "run's store)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-candidates", type=int, default=64,  # dalle_core.generate.MAX_CANDIDATES, not imported here:
                   help="the most candidates one request may ask for")  # the parser loads no torch
    p.add_argument("--max-batch", type=int, default=8, metavar="REQUESTS",
                   help="waiting requests with the same settings that share one sampling batch (default 8)")
    p.add_argument("--client-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request's headers, then its body, must each arrive within this (default 30)")
    p.set_defaults(func=cmd_serve)
    gen = sub.choices["generate"]
    for parser in (p, gen):
        parser.add_argument("--fuse-lora", action="store_true",
                            help="merge the model's LoRA adapter into its weights once at load (docs/finetuning.md)")
    gen.add_argument("--model", help="draw with an exported folder, models:/NAME/VERSION or models:/NAME@ALIAS instead "
                                     "of a run's store "
                                     "(no Prefect); needs --out")
    gen.add_argument("--edit", metavar="IMAGE", help="inpainting: regenerate --region or --mask of IMAGE, keep the "
                                                     "rest of its tokens (docs/editing.md)")
    gen.add_argument("--outpaint", metavar="IMAGE", help="outpainting: IMAGE resized into --region of an empty "
                                                         "canvas and kept; everything around it is drawn")
    gen.add_argument("--variations", metavar="IMAGE", help="variations: keep a random share --keep of IMAGE's "
                                                           "token cells (drawn per candidate), redraw the rest")
    gen.add_argument("--region", metavar="X0,Y0,X1,Y1",
                     help="with --edit or --outpaint: a box in pixels of IMAGE as resized to the model's image size "
                          "(resized to cover the dVAE's input, e.g. 32x32 for the tiny config, then a centre crop), "
                          "snapped outward to whole token cells")
    gen.add_argument("--mask", metavar="MASK.png", help="with --edit: white = regenerate, black = keep (diffusers' "
                                                        "convention); the same size as IMAGE")
    gen.add_argument("--keep", metavar="SHARE",
                     help="with --variations: the share of token cells kept, more than 0 and less than 1 (default 0.5)")

