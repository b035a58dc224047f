"""LoRA adapters for the DALL-E transformer (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"),
through Hugging Face `peft` on the plain torch module: a frozen base weight W gains a trained low-rank update
(alpha / rank) * B @ A, with A (rank, in) and B (out, rank), B starting at zero so training starts from the base.

An adapter is saved alone, in the model format beside its base: `adapter_config.json` (rank, alpha, targets and the
base's content digest, `dalle_core.model_folder.content_digest` of its config.json and model.safetensors) and
`adapter_model.safetensors` (peft's adapter state dict: A and B of each target). Loading checks the base it is put
on against that digest, so an adapter never lands on another model silently. `fuse` merges it into the base
weights (peft's `merge`), which gives a plain `DALLE` again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Annotated

import torch
import torch.nn as nn
from annotated_types import Ge, Gt, Le, Lt

from dalle_core.errors import UserError, load_reason

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_FORMAT = "dalle-lora"
# what an adapter may target: the blocks' four linear layers and the text embedding (a new word's vector)
TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "text_emb")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class AdapterError(UserError):
    """An adapter that does not fit the model it is put on, or an unreadable adapter file; one line."""


@dataclass
class LoraConfig:
    """The `transformer.train.lora` settings: `rank` of each update, `alpha` (the update is scaled by
    alpha / rank), `targets` (module names from TARGETS) and `dropout` on the adapter's input while training."""

    __pydantic_config__ = {"extra": "forbid"}

    rank: Annotated[int, Ge(1), Le(1024)] = 8
    alpha: Annotated[float, Gt(0)] = 16.0
    targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"])
    dropout: Annotated[float, Ge(0), Lt(1)] = 0.0

    def __post_init__(self):
        for name, ok, allowed in (("rank", _whole(self.rank) and 1 <= self.rank <= 1024, "1 to 1024"),
                                  ("alpha", _number(self.alpha) and 0 < self.alpha < math.inf, "more than 0"),
                                  ("dropout", _number(self.dropout) and 0 <= self.dropout < 1, "0 to less than 1")):
            if not ok:
                raise ValueError(f"transformer.train.lora.{name} is {getattr(self, name)!r}; allowed: {allowed}")
        if isinstance(self.targets, str) or not isinstance(self.targets, (list, tuple)):
            raise ValueError(f"transformer.train.lora.targets is {self.targets!r}; allowed: a list of "
                             f"{', '.join(TARGETS)}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            shown = repr(bad[0]) if bad else "an empty list"
            raise ValueError(f"transformer.train.lora.targets: {shown} is not a target; allowed: a non-empty list of "
                             f"{', '.join(TARGETS)}")

    def peft(self):
        """The same settings as peft's `LoraConfig`."""
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets),
                              lora_dropout=self.dropout, bias="none")


def add_lora(model: nn.Module, c: LoraConfig) -> nn.Module:
    """Inject fresh adapters (B = 0: the model's output is unchanged) into `model` in place and leave only them
    trainable (peft's `inject_adapter_in_model`). Returns `model`."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(c.peft(), model)
    for _, _, layer in _adapted(model):  # under autocast the input stays in its dtype (peft would make an fp32 copy)
        layer.cast_input_dtype_enabled = False
    model.lora_config = c
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether `model` carries unfused adapters."""
    return getattr(model, "lora_config", None) is not None


def _adapted(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, peft layer) of every adapted module."""
    from peft.tuners.lora import LoraLayer

    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, LoraLayer)]


def fuse(model: nn.Module) -> nn.Module:
    """Merge the adapters into the base weights (W + (alpha / rank) B A) and put the plain layers back, in place:
    the model is a plain one again, as fast as its base. Returns `model`."""
    for parent, name, layer in _adapted(model):
        layer.merge()
        setattr(parent, name, layer.get_base_layer())
    for attr in ("lora_config", "peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def fused(model: nn.Module) -> nn.Module:
    """`model` itself when it carries no adapter, else a fused copy (the model passed in keeps its adapters)."""
    return fuse(copy.deepcopy(model)) if has_lora(model) else model


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of an adapted model under the plain model's names (the adapters left out)."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


def adapter_config(model: nn.Module, base_digest: str) -> dict:
    """adapter_config.json of `model`'s adapter (adapted by `add_lora`): its settings and `base_digest`, the content
    digest of the base it was trained on."""
    if not has_lora(model):
        raise AdapterError("this model carries no LoRA adapter to save")
    return {"format": ADAPTER_FORMAT, "lora": asdict(model.lora_config), "base": {"digest": base_digest}}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights (peft's `get_peft_model_state_dict`: A and B of each target), what
    adapter_model.safetensors holds."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def file_digests(read: Callable[[str], bytes], names: tuple[str, ...]) -> dict[str, str]:
    """{name: the first 16 hex digits of its sha256} of the files `read` gives."""
    return {name: hashlib.sha256(read(name)).hexdigest()[:16] for name in names}


def load_adapter(model: nn.Module, read: Callable[[str], bytes], base_digest: str) -> nn.Module:
    """Put the adapter that `read` gives (ADAPTER_FILES) on `model`, whose base has content digest `base_digest`:
    AdapterError (one line) when the adapter was trained on another base, or its files do
    not parse or fit. Returns `model`, adapted, in eval mode."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load

    try:
        config = json.loads(read("adapter_config.json").decode("utf-8"))
        if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"its format is not {ADAPTER_FORMAT!r}")
        if not isinstance(config.get("lora"), dict):
            raise ValueError('it has no "lora" settings')
        if not isinstance(config.get("base"), dict) or not isinstance(config["base"].get("digest"), str):
            raise ValueError('it has no "base": {"digest": ...} naming the base it was trained on')
        lora, base = LoraConfig(**config["lora"]), config["base"]["digest"]
    except UserError:
        raise
    except Exception as err:  # JSON's, the dataclass's and a missing key's own kinds
        raise AdapterError(f"the adapter's adapter_config.json cannot be read: {load_reason(err)}") from None
    if base != base_digest:
        raise AdapterError(f"the adapter was trained on the base with content digest {base}, and this base "
                           f"is {base_digest}; load it on its own base")
    add_lora(model, lora)
    try:
        result = set_peft_model_state_dict(model, load(read("adapter_model.safetensors")))
    except Exception as err:  # safetensors' and torch's own kinds: a damaged file, other shapes
        raise AdapterError(f"the adapter's adapter_model.safetensors does not load: {load_reason(err)}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise AdapterError("the adapter's adapter_model.safetensors does not fit its targets: "
                           f"{'missing ' + missing[0] if missing else 'unexpected ' + result.unexpected_keys[0]}")
    return model.eval()
