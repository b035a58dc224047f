"""`dalle generate`'s image-editing flags (--prime, --edit, --outpaint, --variations and their options;
docs/editing.md), checked in one line before a model loads or Prefect starts, then made `DALLEPipeline.__call__`'s
arguments (`--model`) or `generate.*` overrides; and the argv rewrite that lets `--region -4,0,8,8` reach them."""

from __future__ import annotations

import json
import os
import re

from dalle_core.images import compact_size, size_hw
from pipeline.config import load_config

# The commands import their machinery (Prefect, MLflow, the stages, the server) inside themselves, so that
# `dalle --help` and a bad flag answer in one line without loading it.

# generate's flags for `EditRequest.from_arguments`' arguments, in its errors
EDIT_FLAGS = {"prime_image": "--prime", "prime_rows": "--prime-rows", "edit_image": "--edit",
              "outpaint_image": "--outpaint", "variations": "--variations", "region": "--region", "mask": "--mask",
              "keep": "--keep"}
# generate's flags whose value may start with '-' (a negative coordinate or share)
SIGNED_FLAGS = ("--region", "--keep")


def edit_arguments(args, size: int | None, grid: int | None):
    """The `EditRequest` of generate's --prime/--prime-rows, --edit, --outpaint, --variations, --region, --mask and
    --keep (or None), checked (one source image, each flag with the image it applies to, the images readable,
    the region inside the image, the mask's size and colours) before any model loads, at the model's `size`
    pixels and `grid` tokens when known (None: what needs them is checked once the model is loaded).
    GenerationError (one line) naming the flag otherwise."""
    from dalle_core.generate import EditRequest
    from dalle_core.sampling import GenerationError

    arguments = {name: getattr(args, flag.removeprefix("--").replace("-", "_")) for name, flag in EDIT_FLAGS.items()}
    height = None if grid is None else size_hw(grid)[0]
    if args.prime and args.prime_rows is None:  # half the rows, as the page and the API; 4 where the grid is unknown
        arguments["prime_rows"] = 4 if height is None else max(1, height // 2)
    if arguments["keep"] is not None:  # a string, so `--keep abc` is this line rather than argparse's usage
        try:
            keep = float(arguments["keep"])
        except ValueError:
            keep = None
        if keep is None or not 0 < keep < 1:
            shown = arguments["keep"] if keep is not None else repr(arguments["keep"])
            raise GenerationError(f"--keep is {shown}; allowed: a number more than 0 and less than 1 (the share of "
                                  "token cells kept)")
        arguments["keep"] = keep
    rows = arguments["prime_rows"]
    if args.prime and rows is not None and (rows < 1 or height is not None and rows >= height):
        top = f"1 to {height - 1}" if height is not None else "at least 1 (and less than the token grid's rows)"
        raise GenerationError(f"--prime-rows is {rows}; allowed: {top}")
    edit = EditRequest.from_arguments(arguments, EDIT_FLAGS)
    if edit is not None and size is not None and grid is not None:
        edit.resolve(size, grid, EDIT_FLAGS)
    return edit


def edit_overrides(args) -> list[str]:
    """The run config's `generate.*` overrides for generate's --prime/--prime-rows and editing flags (see
    `edit_arguments`), checked before the overrides are built and Prefect starts, against the token grid where
    the config knows it."""
    from dalle_core.editing import EditError, parse_region
    from dalle_core.sampling import GenerationError

    cfg = load_config(args.config, args.overrides)
    grid = None if cfg.dvae.loads_files or getattr(cfg, "tokenizers_from", None) else \
        cfg.dvae.dvae_config(cfg.data.image_size).grid
    edit = edit_arguments(args, cfg.data.image_size, grid)
    if edit is None:
        return []
    image = json.dumps(edit.image)  # the path, as typed
    if edit.mode == "prime":
        return [f"generate.prime_image={image}", f"generate.prime_rows={edit.prime_rows}"]
    out = [f"generate.edit_mode={edit.mode}", f"generate.edit_image={image}"]
    if edit.region is not None:
        try:
            region = parse_region(edit.region, "--region")
        except EditError as err:
            raise GenerationError(str(err)) from None
        out.append(f"generate.edit_region={json.dumps(list(region))}")
    if edit.mask is not None:
        out.append(f"generate.edit_mask={json.dumps(edit.mask)}")
    if edit.keep is not None:
        out.append(f"generate.edit_keep={edit.keep}")
    return out


def join_signed_values(argv: list[str]) -> list[str]:
    """`generate ... --region -4,0,8,8` as `--region=-4,0,8,8`: argparse takes a value starting with '-' (other
    than a plain negative number) for a flag and stops with its usage text, so the value would never reach the
    one-line check that names it. Only numeric-looking values are joined, so `--region --edit x.png` still says
    --region lacks its value."""
    if not argv or argv[0] != "generate":
        return argv
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--":
            return out + argv[i:]
        if argv[i] in SIGNED_FLAGS and i + 1 < len(argv) and re.match(r"-[\d.,]", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def folder_shape(source: str) -> tuple[int | None, int | None]:
    """(image size, token grid) of an exported model folder from its JSON files, no weights loaded; (None, None)
    for a registry URI or a folder that does not read (loading it then says why)."""
    try:
        with open(os.path.join(source, "model_index.json")) as f:
            size = json.load(f)["image_size"]
        with open(os.path.join(source, "transformer", "config.json")) as f:
            grid = json.load(f)["image_grid"]
        return compact_size(*size_hw(size)), compact_size(*size_hw(grid))
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
