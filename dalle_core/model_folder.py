"""The exported model folder, as diffusers lays out a pipeline: one sub-folder per component, each with its
safetensors weights and a JSON config, and an index naming the parts. Loading it needs this package only:
no store, no run config, no Prefect, no MLflow.

    model_index.json   the parts, the format version, the image size and the model's sampling defaults
    transformer/       config.json (DALLEConfig), model.safetensors; a LoRA fine-tune's adapter_config.json and
                       adapter_model.safetensors beside its base (dalle_core/lora.py)
    dvae/              config.json (DVAEConfig, pixel normalisation, a pretrained tokenizer's spec), model.safetensors
    tokenizer/         tokenizer.json (Hugging Face tokenizers, byte-level BPE), config.json (text_len, pad_id)
    clip/              config.json (this project's CLIPConfig, or an open_clip model name), model.safetensors,
                       tokenizer.json (this project's CLIP)
    README.md          the model card (written by release/export.py), with samples.png

`write_folder` writes the bytes a caller assembled (release/export.py, from a run's store), so exporting the
same run twice gives the same bytes; `load_folder` reads them back as a `DALLEPipeline`'s components. A run fine-tunes from
a folder's components (`init_from`, `tokenizers_from`: pipeline/model_source.py), keyed by their `content_digest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from dalle_core import pretrained
from dalle_core.bpe import TextTokenizer
from dalle_core.clip import CLIPConfig, CLIPReranker, build_clip, open_clip_reranker
from dalle_core.device import resolve_device, sampling_precision
from dalle_core.dvae import DiscreteVAE, DVAEConfig
from dalle_core.errors import UserError
from dalle_core.images import ImageNormalization
from dalle_core.lora import (
    ADAPTER_FILES,
    adapter_config,
    adapter_state,
    base_state,
    file_digests,
    has_lora,
    load_adapter,
)
from dalle_core.transformer import DALLE, DALLEConfig

FORMAT = "dalle-pipeline"
FORMAT_VERSION = 1
INDEX = "model_index.json"
# component -> (the module and class that load it), as diffusers' model_index.json names them
COMPONENTS = {"transformer": ("dalle_core.transformer", "DALLE"), "dvae": ("dalle_core.dvae", "DiscreteVAE"),
              "tokenizer": ("dalle_core.bpe", "TextTokenizer"), "clip": ("dalle_core.clip", "CLIPReranker")}


# The files that are a component's content (`init_from` and `tokenizers_from` key it by their digest): weights and
# config; this project's CLIP checkpoint holds its config and tokenizer in its metadata. A store artifact holds the
# same bytes under the same names, so a model and its export have one digest.
CONTENT_FILES = {"transformer": ("config.json", "model.safetensors"), "dvae": ("config.json", "model.safetensors"),
                 "clip": ("model.safetensors",), "tokenizer": ("tokenizer.json",)}


class ModelFolderError(UserError):
    """A folder that is not a complete exported model, or one this version cannot read; one line."""


def json_bytes(obj) -> bytes:
    """Canonical JSON (sorted keys, 2-space indent, newline at the end): the same object, the same bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def index(image_size: int, sampling: dict, **extra) -> dict:
    """The model_index.json of a folder: the parts, the format, the image size, the sampling defaults."""
    return {"_class_name": "DALLEPipeline", "format": FORMAT, "format_version": FORMAT_VERSION,
            **{name: list(where) for name, where in COMPONENTS.items()}, "image_size": image_size,
            "sampling": sampling, **extra}


def state_bytes(model: torch.nn.Module | dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Model weights (a model, or its state dict) as safetensors bytes (tied tensors are stored once each): the one
    weights writer, for the stages' artifacts, their checkpoints and `save_pretrained`."""
    from safetensors.torch import save

    state = model if isinstance(model, dict) else model.state_dict()
    return save({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, metadata=metadata)


def adapter_files(model: torch.nn.Module, base_digest: str) -> dict[str, bytes]:
    """A LoRA-adapted transformer's adapter as its two files (dalle_core/lora.py), for the base whose content
    digest is `base_digest`: adapter_config.json and adapter_model.safetensors."""
    return {ADAPTER_FILES[0]: json_bytes(adapter_config(model, base_digest)),
            ADAPTER_FILES[1]: state_bytes(adapter_state(model))}


def clip_checkpoint(model: torch.nn.Module, c: CLIPConfig, tokenizer: TextTokenizer) -> bytes:
    """This project's self-contained CLIP file (the clip stage's artifact): weights, with the model config and
    the tokenizer in the metadata; `clip_files` splits it into an export's clip/ folder."""
    return state_bytes(model, {"format": "dalle-clip", "config": json.dumps(asdict(c)),
                               "tokenizer": tokenizer.tokenizer.to_str()})


def dvae_config(model: torch.nn.Module, normalization: ImageNormalization) -> dict:
    """A dVAE's config.json: its model config, its input normalisation and a pretrained tokenizer's spec."""
    spec = getattr(model, "spec", None)
    return {"model": asdict(model.c), "norm": {"mean": list(normalization.mean), "std": list(normalization.std)},
            **({"pretrained": asdict(spec)} if spec is not None else {})}


def component_files(component: str, part) -> dict[str, bytes]:
    """The files of a component's folder, as `read_component` reads them back: transformer (DALLE), dvae
    ((DiscreteVAE, ImageNormalization)), tokenizer (TextTokenizer) or clip (CLIPReranker)."""
    if component == "transformer":
        if has_lora(part):  # the base as it was, and the adapter beside it, keyed to the base's digest
            base = {"config.json": json_bytes(asdict(part.c)), "model.safetensors": state_bytes(base_state(part))}
            return {**base, **adapter_files(part, content_digest(file_digests(base.__getitem__, tuple(base))))}
        return {"config.json": json_bytes(asdict(part.c)), "model.safetensors": state_bytes(part)}
    if component == "dvae":
        model, normalization = part
        return {"config.json": json_bytes(dvae_config(model, normalization)), "model.safetensors": state_bytes(model)}
    if component == "tokenizer":
        return {"tokenizer.json": part.tokenizer.to_str().encode(),
                "config.json": json_bytes({"text_len": part.text_len, "pad_id": part.pad_id})}
    assert component == "clip", component
    if part.spec is None:
        raise ModelFolderError("this CLIP reranker was not built by CLIPReranker.ours or open_clip_reranker, so "
                               "there is no config to save it with")
    if part.spec["kind"] == "open_clip":
        return open_clip_files(part.model, part.spec["model_name"])
    return clip_files(clip_checkpoint(part.model, part.spec["config"], part.spec["tokenizer"]))


def pipeline_files(parts: dict, image_size: int, sampling: dict) -> dict[str, bytes]:
    """A model folder's files from its four components ({name: part} as `component_files` takes them), with an
    index recording their checksums and the files the folder owns."""
    files = {f"{name}/{rel}": data for name in COMPONENTS for rel, data in component_files(name, parts[name]).items()}
    sums = {name: hashlib.sha256(data).hexdigest()[:16] for name, data in sorted(files.items())}
    files[INDEX] = json_bytes(index(image_size, sampling, sha256=sums, files=sorted(files)))
    return files


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file's header (8-byte little-endian length, then JSON)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}


def clip_files(checkpoint: bytes) -> dict[str, bytes]:
    """This project's self-contained CLIP checkpoint (weights, its CLIPConfig and tokenizer in the metadata,
    tasks/clip.py) -> the clip/ folder's files."""
    meta = safetensors_metadata(checkpoint)
    if meta.get("format") != "dalle-clip":
        raise ModelFolderError("the CLIP checkpoint is not one written by this project (no dalle-clip metadata)")
    return {"config.json": json_bytes({"kind": "dalle-clip", "model": json.loads(meta["config"])}),
            "tokenizer.json": meta["tokenizer"].encode(), "model.safetensors": checkpoint}


def open_clip_files(model, model_name: str) -> dict[str, bytes]:
    """An open_clip model (`clip.pretrained: <model>:<weights>`) -> the clip/ folder's files."""
    return {"config.json": json_bytes({"kind": "open_clip", "model_name": model_name}),
            "model.safetensors": state_bytes(model)}


def owned_files(folder: str | os.PathLike) -> set[str] | None:
    """The files an earlier export of this project wrote in `folder` (relative paths, model_index.json
    included), or None when the folder holds no export of this project. Exports list their files in the index;
    for older ones the files are their layout's: the checksummed component files, the card, the samples, data/."""
    folder = Path(folder)
    try:
        idx = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(idx, dict) or idx.get("format") != FORMAT:
        return None
    listed = idx.get("files")
    if not isinstance(listed, list):
        data = folder / "data"
        listed = [*idx.get("sha256", {}), "README.md", "samples.png",
                  *(p.relative_to(folder).as_posix() for p in data.rglob("*") if p.is_file())]
    return {INDEX, *(rel for rel in listed if isinstance(rel, str) and _inside(rel) and _ours(rel))}


def _inside(rel: str) -> bool:
    """A relative path that stays inside its folder (an index is data: it must not name ../ or / paths)."""
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def _ours(rel: str) -> bool:
    """A path an export writes: a component's file, data/'s licence files, the card or the samples; an index
    edited to list anything else (the user's notes) gives no right to remove it."""
    top = Path(rel).parts[0]
    return top in (*COMPONENTS, "data") and len(Path(rel).parts) > 1 or rel in ("README.md", "samples.png")


def _in_the_way(folder: Path, rel: str, ours: set[str]) -> str | None:
    """The first path on the way to writing `rel` that is the user's: a symlink, a file where a folder goes, a
    folder where the file goes, or a file the earlier export did not write; None when the way is clear."""
    parts = Path(rel).parts
    for depth in range(1, len(parts) + 1):
        here, is_file = Path(*parts[:depth]), depth == len(parts)
        path = folder / here
        if path.is_symlink():
            return str(here)
        if not path.exists():
            return None
        if path.is_dir() == is_file or (is_file and rel not in ours):
            return str(here)
    return None


def write_folder(folder: str | os.PathLike, files: dict[str, bytes]) -> list[str]:
    """Write {relative path: bytes} into `folder`: a new or empty folder, or an earlier export of this project,
    whose files (`owned_files`) are replaced while everything else in it (.git, the user's notes, extra files)
    is left as it was. A folder holding anything else is refused in one line naming what it holds, and so is
    a file of the user's where the export would write (ModelFolderError). The files are written beside the
    folder first and moved in, model_index.json last. Returns the paths written, sorted."""
    given, folder = str(folder), Path(folder).resolve()  # resolved: `.` and `..` have no name to put tmp beside
    if folder.exists() and not folder.is_dir():
        raise ModelFolderError(f"--out {given!r} is a file; give a folder")
    if not folder.name:
        raise ModelFolderError(f"--out {given!r} is the file system's root; give a folder under it")
    ours: set[str] = set()
    if folder.exists() and any(folder.iterdir()):
        found = owned_files(folder)
        if found is None:
            names = sorted(entry.name for entry in folder.iterdir())
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            raise ModelFolderError(f"--out {given!r} holds {shown} and is not an earlier export of this project "
                                   f"(no {INDEX} of format {FORMAT!r}); give a new or empty folder, or an earlier "
                                   "export to replace")
        ours = found
    for rel in sorted(files):  # before anything moves: what is in the way and not ours is the user's
        blocked = _in_the_way(folder, rel, ours)
        if blocked is not None:
            raise ModelFolderError(f"--out {given!r}: {blocked} is not a file an earlier export wrote, and this export "
                                   f"writes {rel} there; move it away, or export to another folder")
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    moved, placed = [], []  # (old files set aside, new files moved in): undone if anything fails
    try:
        for rel, data in sorted(files.items()):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if not folder.exists():
            tmp.rename(folder)
            return [str(folder / rel) for rel in sorted(files)]
        try:
            for rel in sorted(ours - {INDEX}):
                if (folder / rel).is_file():
                    (old / rel).parent.mkdir(parents=True, exist_ok=True)
                    (folder / rel).rename(old / rel)
                    moved.append(rel)
            for rel in sorted(set(files) - {INDEX}):
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).rename(folder / rel)
                placed.append(rel)
            if INDEX in files:  # last: from here on the folder is this export
                os.replace(tmp / INDEX, folder / INDEX)
        except BaseException:  # put the earlier export back as it was
            for rel in placed:
                (folder / rel).unlink(missing_ok=True)
            for rel in moved:
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (old / rel).rename(folder / rel)
            raise
        for rel in sorted(ours - set(files), key=lambda r: -len(Path(r).parts)):
            for parent in Path(rel).parents:  # folders only the old export's files filled
                if parent.parts and (folder / parent).is_dir() and not any((folder / parent).iterdir()):
                    (folder / parent).rmdir()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return [str(folder / rel) for rel in sorted(files)]


def _json(read: Read, component: str, name: str) -> dict:
    try:
        return json.loads(read(name).decode("utf-8"))
    except ModelFolderError:  # the reader's own line (damaged, missing, an LFS pointer)
        raise
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{component}/{name} is not valid JSON: {err}") from None
    except FileNotFoundError:
        raise ModelFolderError(f"{component}/{name} is missing") from None


def has_adapter(read: Read) -> bool:
    """Whether the component `read` reads carries a LoRA adapter (dalle_core/lora.py's ADAPTER_FILES)."""
    try:
        read(ADAPTER_FILES[0])
    except FileNotFoundError:
        return False
    return True


def _load_weights(model: torch.nn.Module, read: Read, component: str) -> None:
    from safetensors.torch import load

    model.load_state_dict(load(read("model.safetensors")))


def _tokenizer(data: bytes, text_len: int, rel: str) -> TextTokenizer:
    """A tokenizer.json; ModelFolderError naming it and the installed `tokenizers` when that cannot parse it."""
    try:
        return TextTokenizer.from_str(data.decode("utf-8"), text_len)
    except Exception as err:  # tokenizers raises a bare Exception for a format it does not know
        from importlib.metadata import version

        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelFolderError(f"{rel} cannot be read by the installed tokenizers {version('tokenizers')}: "
                               f"{first}") from None


def build_dvae(meta: dict) -> DiscreteVAE:
    """The image tokenizer a dVAE config.json describes (this project's dVAE, or a pretrained one's modules),
    with untrained weights."""
    if meta.get("pretrained"):
        m = meta["model"]
        return pretrained.PretrainedDVAE(pretrained.Spec(**meta["pretrained"]), m["image_size"], m["norm_mean"],
                                         m["norm_std"])
    return DiscreteVAE(DVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()}))


def content_digest(file_digests: dict[str, str]) -> str:
    """One 16-hex-digit digest of a component from its files' sha256 digests ({name: hex}): the same files give
    the same digest wherever they lie (a folder, a store, moved or copied)."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(file_digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def read_index(folder: str | os.PathLike) -> dict:
    """The model_index.json of an exported folder; ModelFolderError (one line) when there is none or its format
    is newer than this code reads."""
    folder = Path(folder)
    if not (folder / INDEX).is_file():
        what = "does not exist" if not folder.exists() else f"has no {INDEX}"
        raise ModelFolderError(f"model folder {str(folder)!r} {what}; make one with `dalle export -c CONFIG --out DIR`")
    try:
        idx = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{str(folder / INDEX)!r} is not valid JSON: {err}") from None
    if idx.get("format") != FORMAT or int(idx.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFolderError(f"{str(folder / INDEX)!r} is format {idx.get('format')!r} version "
                               f"{idx.get('format_version')!r}; this code reads {FORMAT!r} up to {FORMAT_VERSION}")
    return idx


def load_folder(folder: str | os.PathLike, device: str = "auto", precision: str = "auto") -> dict:
    """The components exported to `folder`, as `DALLEPipeline`'s fields (transformer, dvae, normalization,
    tokenizer, reranker, precision, sampling): each file checked against the checksums its index records
    (`folder_reader`), the models in eval mode on `device` (auto | cpu | cuda | cuda:N), sampling in `precision`
    (auto | fp32 | bf16). ModelFolderError (one line) for a missing, damaged or unreadable part, or a newer
    format. `DALLEPipeline.from_pretrained` builds the pipeline from them."""
    folder = Path(folder)
    idx = read_index(folder)
    if precision not in ("auto", "fp32", "bf16"):
        raise ModelFolderError(f"precision is {precision!r}; allowed: auto, fp32, bf16")
    dev = resolve_device(device)
    parts = {}
    for name in COMPONENTS:
        try:
            parts[name] = read_component(name, folder_reader(folder, name, idx))
        except ModelFolderError:
            raise
        except Exception as err:  # safetensors' and torch's own kinds: a truncated file, other shapes
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ModelFolderError(f"{str(folder / name)!r} does not load into its {name}: {first}") from None
    dvae, normalization = parts["dvae"]
    return {"transformer": parts["transformer"].to(dev).eval(),
            "dvae": dvae.to(dev, memory_format=torch.channels_last).eval(), "normalization": normalization,
            "tokenizer": parts["tokenizer"], "reranker": parts["clip"].to(dev),
            "precision": sampling_precision(precision, dev), "sampling": dict(idx.get("sampling", {}))}


Read = Callable[[str], bytes]  # one file of a component's folder, by its name there ("config.json")


def folder_reader(folder: str | os.PathLike, component: str, idx: dict | None = None) -> Read:
    """`read(name)` for `folder/component/name`, each file read once and checked against the sha256 the index
    `idx` records; ModelFolderError (one line) naming the file for a missing one, a git-lfs pointer in place of
    the file, one whose content changed, or one the index records no checksum for."""
    folder, sums = Path(folder), (idx or {}).get("sha256", {})

    def read(name: str) -> bytes:
        rel, path = f"{component}/{name}", Path(folder) / component / name
        if not path.is_file() and rel not in sums:  # not part of this export (an optional file: an adapter)
            raise FileNotFoundError(rel)
        if not path.is_file():
            raise ModelFolderError(f"{str(folder)!r} is not a complete exported model: {rel} is missing")
        data = path.read_bytes()
        if data.startswith(b"version https://git-lfs"):
            raise ModelFolderError(f"model folder {str(folder)!r}: {rel} is a git-lfs pointer ({len(data)} bytes), "
                                   "not the file itself: run `git lfs pull` in the model's repository, then load it "
                                   "again")
        want = sums.get(rel)
        if want is None:  # nothing to check it by: an index edited by hand, or a folder another tool wrote
            raise ModelFolderError(f"model folder {str(folder)!r}: {INDEX} records no checksum for {rel}, so it "
                                   "cannot be checked: export or download the model again")
        if hashlib.sha256(data).hexdigest()[:len(want)] != want:
            raise ModelFolderError(f"model folder {str(folder)!r}: {rel} is damaged ({len(data)} bytes; its sha256 "
                                   f"is not the {want}... that {INDEX} records): export or download the model again")
        return data
    return read


def read_component(component: str, read: Read, text_len: int | None = None):
    """One component built from its folder's files, read through `read` (an exported folder's sub-folder through
    `folder_reader`, or a store artifact: the same files under the same names), on the CPU in eval mode:
    transformer -> DALLE; dvae -> (DiscreteVAE, ImageNormalization); tokenizer -> TextTokenizer (`text_len` from
    its config.json unless given: a store's BPE has none); clip -> CLIPReranker (config.json and tokenizer.json,
    or this project's self-contained checkpoint alone, as the clip stage writes it). A file that does not parse
    raises its parser's own error (SafetensorError, torch's size mismatch), for the caller to name where it lies;
    ModelFolderError for a config or tokenizer this version cannot read."""
    if component == "transformer":
        model = DALLE(DALLEConfig(**_json(read, component, "config.json")))
        _load_weights(model, read, component)
        if has_adapter(read):  # a LoRA fine-tune: its adapter on this base, checked against the base's digest
            load_adapter(model, read, content_digest(file_digests(read, CONTENT_FILES[component])))
        return model.eval()
    if component == "dvae":
        meta = _json(read, component, "config.json")
        model = build_dvae(meta)
        _load_weights(model, read, component)
        return model.eval(), ImageNormalization(tuple(meta["norm"]["mean"]), tuple(meta["norm"]["std"]))
    if component == "tokenizer":
        text_len = text_len or _json(read, component, "config.json")["text_len"]
        return _tokenizer(read("tokenizer.json"), text_len, f"{component}/tokenizer.json")
    assert component == "clip", component
    weights = read("model.safetensors")
    try:
        read("config.json")
        meta, tokenizer = _json(read, component, "config.json"), None
    except FileNotFoundError:  # the clip stage's own file: config and tokenizer in its metadata
        files = clip_files(weights)
        meta, tokenizer = json.loads(files["config.json"]), files["tokenizer.json"]
    if meta.get("kind") == "open_clip":
        import open_clip  # open_clip's builders, for a CLIP others trained

        model = open_clip.create_model(meta["model_name"], pretrained=None)
        _load_weights(model, lambda name: weights, component)
        return open_clip_reranker(model, meta["model_name"])
    if meta.get("kind") != "dalle-clip":
        raise ModelFolderError(f"clip/config.json kind {meta.get('kind')!r} is not dalle-clip or open_clip")
    c = CLIPConfig(**meta["model"])
    model = build_clip(c)
    _load_weights(model, lambda name: weights, component)
    tokenizer = tokenizer if tokenizer is not None else read("tokenizer.json")
    return CLIPReranker.ours(model.eval(), c, _tokenizer(tokenizer, c.text_len, "clip/tokenizer.json"))
