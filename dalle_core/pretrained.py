"""Image tokenizers that others trained, loaded from local files into this project's modules.

Two formats (`dvae.pretrained`):

- **OpenAI's DALL-E dVAE**: a folder with `encoder.pkl` and `decoder.pkl` as released with the `DALL-E`
  package (whole pickled modules; 8,192 codes, 256 px -> 32x32 with 3 max-pools). Pixels are mapped into
  [0.1, 0.9], the encoder's logits are argmaxed, the decoder takes one-hot codes and emits logit-Laplace
  statistics whose image is the unmapped sigmoid of the location.
- **A taming-transformers VQGAN**: a Lightning `.ckpt` plus its OmegaConf `.yaml` (`VQModel` or
  `GumbelVQ`). Pixels in [-1, 1]; `quant_conv` -> nearest code (VQ) or argmax of `quantize.proj` (gumbel);
  `post_quant_conv` -> decoder.

Either is used as it is (`dvae.pretrained`) or fine-tuned on the run's images (`dvae.init_from`): the training
forward follows each upstream's own objective (`PretrainedDVAE.forward`).

The pickles are read with a restricted unpickler that builds tensors and plain containers only: every other
class becomes an inert record, so loading a checkpoint runs no code from it and needs neither upstream
package. The weights are then copied into the modules below, whose parameter names follow the upstream
ones, so `load_state_dict` checks every tensor's name and shape. `PretrainedDVAE` has `DiscreteVAE`'s
interface (`c`, `encode`, `decode`), and `spec()` + the state dict rebuild it from a stage artifact.
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from dalle_core.dvae import LOGIT_LAPLACE_EPS, DVAEConfig, GumbelQuantizer, logit_laplace_image
from dalle_core.errors import UserError
from dalle_core.images import size_hw, size_text
from dalle_core.taming import TamingDecoder, TamingEncoder


class PretrainedError(UserError):
    """A pretrained tokenizer that cannot be found, read or used; the message is one line."""


# ----------------------------------------------------------------- reading pickles without running them

_TORCH_REBUILD = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "device"), ("torch", "Size"), ("torch", "dtype"), ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"), ("collections", "OrderedDict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
}


class InertObject:
    """What the restricted unpickler makes of any class it does not allow: the pickled state, inert."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _TORCH_REBUILD or (module.startswith("torch") and name.endswith("Storage")):
            return super().find_class(module, name)
        if module == "torch" and name in ("float32", "float16", "bfloat16", "float64", "int64", "uint8"):
            return getattr(torch, name)
        return type(name, (InertObject,), {})  # a class or a function alike: calling it only records its arguments


class _RestrictedPickle:
    """The `pickle_module` handed to `torch.load`: only its `Unpickler` is used."""

    Unpickler = _RestrictedUnpickler
    load = pickle.load  # torch checks for it; the zip-format path goes through Unpickler


def read_pickle(path: Path, key: str = "dvae.pretrained") -> Any:
    """`torch.load` a file whose pickle may hold modules or training objects, building tensors only;
    PretrainedError (one line starting with the config `key` that named it) when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)
    except Exception as e:  # a damaged or foreign file fails in any of pickle's and torch's own ways
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PretrainedError(f"{key}: cannot read {path} as a checkpoint: {first}") from None


def module_state(node: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a pickled `nn.Module` read as `InertObject`s: its parameters and buffers by dotted name."""
    out: dict[str, torch.Tensor] = {}
    for kind in ("_parameters", "_buffers"):
        for name, t in (getattr(node, kind, None) or {}).items():
            if t is not None:
                out[prefix + name] = t.detach()
    for name, child in (getattr(node, "_modules", None) or {}).items():
        if child is not None:
            out.update(module_state(child, f"{prefix}{name}."))
    return out


# ----------------------------------------------------------------- OpenAI's dVAE


class _Conv(nn.Module):
    """DALL-E's convolution: parameters `w`, `b`, 'same' padding for an odd kernel."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.w, std=1 / math.sqrt(n_in * kw * kw))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class _OpenAIBlock(nn.Module):
    """Residual block: identity (or 1x1) path + post_gain x four ReLU-convs through n_out / 4 channels.
    The encoder's kernels are 3,3,3,1 and the decoder's 1,3,3,3."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = _Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        chans = [n_in, hid, hid, hid, n_out]
        layers: list[tuple[str, nn.Module]] = []
        for i, kw in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", _Conv(chans[i], chans[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _openai_groups(widths: list[tuple[int, int]], blocks: int, kernels, resample: nn.Module | None):
    """Four groups of `blocks` residual blocks, width (first in, out) per group, resampling between them."""
    n_layers = 4 * blocks
    groups = []
    for g, (w_in, w_out) in enumerate(widths):
        layers = [(f"block_{i + 1}", _OpenAIBlock(w_in if i == 0 else w_out, w_out, n_layers, kernels))
                  for i in range(blocks)]
        if g < 3:
            layers.append(("pool" if isinstance(resample, nn.MaxPool2d) else "upsample", resample))
        groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
    return groups


class OpenAIEncoder(nn.Module):
    def __init__(self, n_hid: int, blocks: int, vocab: int):
        super().__init__()
        h = n_hid
        groups = _openai_groups([(h, h), (h, 2 * h), (2 * h, 4 * h), (4 * h, 8 * h)], blocks, (3, 3, 3, 1),
                                nn.MaxPool2d(2))
        self.blocks = nn.Sequential(OrderedDict([
            ("input", _Conv(3, h, 7)), *groups,
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _Conv(8 * h, vocab, 1))])))]))

    def forward(self, x):  # (B, 3, H, W) mapped pixels -> (B, vocab, H/8, W/8) logits
        return self.blocks(x)


class OpenAIDecoder(nn.Module):
    def __init__(self, n_init: int, n_hid: int, blocks: int, vocab: int):
        super().__init__()
        h = n_hid
        groups = _openai_groups([(n_init, 8 * h), (8 * h, 4 * h), (4 * h, 2 * h), (2 * h, h)], blocks,
                                (1, 3, 3, 3), nn.Upsample(scale_factor=2, mode="nearest"))
        self.blocks = nn.Sequential(OrderedDict([
            ("input", _Conv(vocab, n_init, 1)), *groups,
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _Conv(h, 6, 1))])))]))

    def table(self) -> torch.Tensor:
        """(vocab, n_init): a 1x1 conv of a one-hot is a lookup of its weight's column (plus the bias)."""
        return self.blocks.input.w[:, :, 0, 0].t()

    def from_embeddings(self, x):  # (B, n_init, h, w) rows of `table` (or mixtures) -> (B, 6, 8h, 8w)
        return self.blocks[1:](x + self.blocks.input.b.view(1, -1, 1, 1))

    def forward(self, tokens):  # (B, h, w) codes -> (B, 6, 8h, 8w) logit-Laplace statistics
        return self.from_embeddings(F.embedding(tokens, self.table()).permute(0, 3, 1, 2))


# ----------------------------------------------------------------- taming-transformers' VQGAN


# ----------------------------------------------------------------- one interface for both


@dataclass
class Spec:
    """Everything needed to rebuild a pretrained tokenizer's modules (saved with the stage artifact)."""

    kind: str  # "openai" | "taming-vq" | "taming-gumbel"
    arch: dict  # openai: n_hid, n_init, blocks, vocab; taming: the yaml's ddconfig, n_embed, embed_dim


class PretrainedDVAE(nn.Module):
    """A loaded tokenizer with `DiscreteVAE`'s interface: normalised images <-> (B, h, w) code grids, and the
    training forward of a fine-tune (`dvae.init_from`), in its upstream's own training objective."""

    def __init__(self, spec: Spec, image_size: int | tuple[int, int], norm_mean, norm_std):
        super().__init__()
        self.spec = spec
        a = spec.arch
        if spec.kind == "openai":
            self.encoder = OpenAIEncoder(a["n_hid"], a["blocks"], a["vocab"])
            self.decoder = OpenAIDecoder(a["n_init"], a["n_hid"], a["blocks"], a["vocab"])
            codes, dim, factor = a["vocab"], a["n_init"], 8
        else:
            dd = a["ddconfig"]
            self.encoder, self.decoder = TamingEncoder(dd), TamingDecoder(dd)
            self.quant_conv = nn.Conv2d(dd["z_channels"], a["embed_dim"], 1)
            self.post_quant_conv = nn.Conv2d(a["embed_dim"], dd["z_channels"], 1)
            self.quantize = nn.Module()
            if spec.kind == "taming-gumbel":
                self.quantize.proj = nn.Conv2d(a["embed_dim"], a["n_embed"], 1)  # upstream: embed_dim == z_channels
                self.quantize.embed = nn.Embedding(a["n_embed"], a["embed_dim"])
            else:
                self.quantize.embedding = nn.Embedding(a["n_embed"], a["embed_dim"])
            codes, dim, factor = a["n_embed"], a["embed_dim"], 2 ** (len(dd["ch_mult"]) - 1)
        if any(side % factor for side in size_hw(image_size)):
            raise PretrainedError(f"data.image_size: {size_text(image_size)} is not a multiple of the pretrained "
                                  f"tokenizer's downsampling factor {factor}")
        self.c = DVAEConfig(image_size=image_size, codebook_size=codes, codebook_dim=dim,
                            num_downsamples=int(math.log2(factor)),
                            quantizer="vq" if spec.kind == "taming-vq" else "gumbel",
                            logit_laplace=spec.kind == "openai", norm_mean=tuple(norm_mean), norm_std=tuple(norm_std),
                            straight_through=spec.kind == "taming-gumbel")  # GumbelQuantize's default; DALL-E's is soft
        self.register_buffer("mean", torch.tensor(norm_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm_std).view(1, 3, 1, 1), persistent=False)
        # a fine-tune's relaxation (no weights of its own: it mixes this tokenizer's code table), and its PatchGAN
        self.quantizer = GumbelQuantizer(self.c, own_table=False) if self.c.quantizer == "gumbel" else None
        self.discriminator: nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Normalised (B, 3, H, W) -> LongTensor (B, H/f, W/f) of codes."""
        unit = images.float() * self.std + self.mean
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if self.spec.kind == "openai":
                return self.encoder(LOGIT_LAPLACE_EPS + (1 - 2 * LOGIT_LAPLACE_EPS) * unit).argmax(1)
            z = self.quant_conv(self.encoder(2 * unit - 1))
            if self.spec.kind == "taming-gumbel":
                return self.quantize.proj(z).argmax(1)
        return self._nearest(z)

    def _nearest(self, z: torch.Tensor) -> torch.Tensor:
        B, D, h, w = z.shape
        flat, e = z.float().permute(0, 2, 3, 1).reshape(-1, D), self.quantize.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()  # as upstream, ties included
        return dist.argmin(1).view(B, h, w)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """LongTensor (B, h, w) -> normalised (B, 3, H, W) images."""
        if self.spec.kind == "openai":
            return logit_laplace_image(self.decoder(tokens), self.c)
        table = self.quantize.embed if self.spec.kind == "taming-gumbel" else self.quantize.embedding
        z = self.post_quant_conv(table(tokens).permute(0, 3, 1, 2))
        return ((self.decoder(z).clamp(-1, 1) + 1) / 2 - self.mean) / self.std

    def forward(self, images: torch.Tensor):
        """A fine-tune's step (`dalle_core.dvae.dvae_step`): normalised (B, 3, H, W) -> (decoder output, codes
        (B, h, w), quantizer loss), as `DiscreteVAE.forward`.

        - OpenAI: DALL-E's relaxation, a gumbel-softmax over the encoder's logits mixing the decoder's input rows,
          and the KL to the uniform prior (`GumbelQuantizer`); the output is logit-Laplace statistics (B, 6, H, W).
        - taming VQ: the nearest code, straight-through, with taming's `VectorQuantizer` loss
          |sg(z_q) - z|^2 + beta |z_q - sg(z)|^2 (beta = `c.commitment`, 0.25 as upstream), so the codebook
          learns by gradient as it did upstream; taming gumbel: its `GumbelQuantize`, as OpenAI's.
          The output is the normalised image, unclamped."""
        unit = images.float() * self.std + self.mean
        if self.spec.kind == "openai":
            logits = self.encoder(LOGIT_LAPLACE_EPS + (1 - 2 * LOGIT_LAPLACE_EPS) * unit)
            z, idx, q_loss = self.quantizer(logits, self.decoder.table())
            return self.decoder.from_embeddings(z), idx, q_loss
        z = self.quant_conv(self.encoder(2 * unit - 1))
        if self.spec.kind == "taming-gumbel":
            z_q, idx, q_loss = self.quantizer(self.quantize.proj(z), self.quantize.embed.weight)
        else:
            idx = self._nearest(z)
            z_q = self.quantize.embedding(idx).permute(0, 3, 1, 2)
            q_loss = F.mse_loss(z_q.detach(), z) + self.c.commitment * F.mse_loss(z_q, z.detach())
            z_q = z + (z_q - z).detach()
        return ((self.decoder(self.post_quant_conv(z_q)) + 1) / 2 - self.mean) / self.std, idx, q_loss

    def to_image(self, out: torch.Tensor) -> torch.Tensor:
        """`forward`'s decoder output -> normalised (B, 3, H, W) image."""
        return logit_laplace_image(out, self.c) if self.spec.kind == "openai" else out

    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight, where VQGAN balances its loss terms (taming's `get_last_layer`)."""
        return self.decoder.blocks.output.conv.w if self.spec.kind == "openai" else self.decoder.conv_out.weight

    def restart_dead_codes(self) -> int:
        """None: a loaded codebook keeps its codes (a restart would move codes its users' tokens mean)."""
        return 0

    def drop_discriminator(self) -> None:
        """After a fine-tune: the tokenizer alone."""
        self.discriminator = None


# ----------------------------------------------------------------- finding and loading the files


def source_files(path: str | Path, config_path: str | Path | None = None, key: str = "dvae.pretrained"
                 ) -> tuple[str, dict[str, Path]]:
    """The kind of tokenizer at `path` and its files by role: ("openai", {encoder, decoder}) for a folder with
    encoder.pkl and decoder.pkl; ("taming", {checkpoint, config}) for a .ckpt (or a folder holding exactly
    one, as taming's downloads: checkpoints/last.ckpt + configs/*.yaml) and its .yaml."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PretrainedError(f"{key}: {p} does not exist; give a folder with encoder.pkl and "
                              f"decoder.pkl (OpenAI's dVAE) or a taming-transformers .ckpt")
    if p.is_dir() and (p / "encoder.pkl").is_file() and (p / "decoder.pkl").is_file():
        return "openai", {"encoder": p / "encoder.pkl", "decoder": p / "decoder.pkl"}
    if p.is_dir() and ((p / "encoder.pkl").is_file() or (p / "decoder.pkl").is_file()):
        missing = "decoder.pkl" if (p / "encoder.pkl").is_file() else "encoder.pkl"
        raise PretrainedError(f"{key}: {p} holds OpenAI's dVAE without its {missing}; put both files there")
    ckpt = p
    if p.is_dir():
        found = sorted(p.rglob("*.ckpt"))
        if len(found) != 1:
            raise PretrainedError(f"{key}: {p} holds {len(found)} .ckpt files and no encoder.pkl + "
                                  f"decoder.pkl; point it at one checkpoint")
        ckpt = found[0]
    if ckpt.suffix != ".ckpt":
        raise PretrainedError(f"{key}: {ckpt} is neither a folder with encoder.pkl and decoder.pkl "
                              f"nor a .ckpt")
    if config_path:
        yml = Path(config_path).expanduser()
        if not yml.is_file():
            raise PretrainedError(f"dvae.pretrained_config: {yml} does not exist")
    else:  # next to the checkpoint, or taming's layout: <run>/checkpoints/last.ckpt + <run>/configs/*.yaml
        cands = [ckpt.with_suffix(".yaml")] if ckpt.with_suffix(".yaml").is_file() else []
        cands = cands or sorted(ckpt.parent.glob("*.yaml")) or sorted((ckpt.parent.parent / "configs").glob("*.yaml"))
        if len(cands) != 1:
            raise PretrainedError(f"{key}: found {len(cands)} candidate .yaml configs for {ckpt}; "
                                  f"set dvae.pretrained_config to the model's yaml")
        yml = cands[0]
    return "taming", {"checkpoint": ckpt, "config": yml}


def upstream_format(path: str | Path) -> bool:
    """Whether `path` holds a tokenizer in an upstream format (what `source_files` reads: OpenAI's encoder.pkl,
    a taming .ckpt file, or a taming run folder with checkpoints/), without reading it: this project's model
    folders and store artifacts hold none of these."""
    p = Path(path).expanduser()
    if p.suffix == ".ckpt" or p.is_file():  # a missing .ckpt too: `source_files` then says it does not exist
        return p.suffix == ".ckpt"
    return p.is_dir() and ((p / "encoder.pkl").is_file() or (p / "checkpoints").is_dir() or any(p.glob("*.ckpt")))


def load(path: str | Path, config_path: str | Path | None, image_size: int | tuple[int, int], norm_mean,
         norm_std, key: str = "dvae.pretrained") -> PretrainedDVAE:
    """Load the tokenizer at `path` (see `source_files`) into a `PretrainedDVAE` in eval mode. PretrainedError
    (one line starting with `key`, the config key that named it) when it cannot be found, read or used."""
    kind, files = source_files(path, config_path, key)
    if kind == "openai":
        enc, dec = (module_state(read_pickle(files[role], key)) for role in ("encoder", "decoder"))
        if "blocks.input.w" not in enc or "blocks.input.w" not in dec:
            raise PretrainedError(f"{key}: {files['encoder'].parent} does not hold DALL-E's "
                                  f"Encoder and Decoder modules (no blocks.input.w)")
        arch = {"n_hid": enc["blocks.input.w"].shape[0], "vocab": enc["blocks.output.conv.w"].shape[0],
                "n_init": dec["blocks.input.w"].shape[0],
                "blocks": sum(1 for k in enc if k.startswith("blocks.group_1.") and k.endswith("conv_1.w"))}
        state = {**{f"encoder.{k}": v for k, v in enc.items()}, **{f"decoder.{k}": v for k, v in dec.items()}}
        spec = Spec("openai", arch)
    else:
        spec, state = _taming(files["checkpoint"], files["config"], key)
    model = PretrainedDVAE(spec, image_size, norm_mean, norm_std)
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    misshapen = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or misshapen:
        raise PretrainedError(f"{key}: {path} does not match its {spec.kind} architecture: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {misshapen[:3]}")
    model.load_state_dict(state)
    return model.eval()


def _taming(ckpt: Path, yml: Path, key: str) -> tuple[Spec, dict]:
    try:
        conf = yaml.safe_load(yml.read_text())
        target, params = conf["model"]["target"], conf["model"]["params"]
        dd = dict(params["ddconfig"])
        arch = {"ddconfig": dd, "n_embed": int(params["n_embed"]), "embed_dim": int(params["embed_dim"])}
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise PretrainedError(f"dvae.pretrained_config: {yml} is not a taming-transformers model config "
                              f"(model.target, model.params.ddconfig/n_embed/embed_dim): {e!r}") from None
    kind = {"VQModel": "taming-vq", "GumbelVQ": "taming-gumbel"}.get(target.rsplit(".", 1)[-1])
    if kind is None:
        raise PretrainedError(f"dvae.pretrained_config: model.target {target} is not supported; "
                              f"allowed: taming.models.vqgan.VQModel, taming.models.vqgan.GumbelVQ")
    if params.get("remap"):
        raise PretrainedError(f"dvae.pretrained_config: {yml} remaps codes (remap: {params['remap']}); "
                              f"remapped codebooks are not supported")
    blob = read_pickle(ckpt, key)
    sd = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(sd, dict):
        raise PretrainedError(f"{key}: {ckpt} holds no state_dict")
    keep = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
    state = {k: v for k, v in sd.items() if k.startswith(keep) and isinstance(v, torch.Tensor)}
    return Spec(kind, arch), state
