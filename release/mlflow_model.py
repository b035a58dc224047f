"""The exported model as an MLflow `pyfunc` model: prompts and sampling parameters in, PNG images and CLIP
scores out, so `mlflow models serve` and `mlflow.pyfunc.load_model(...).predict` work on a registered model.

Request (MLflow's scoring protocol): a DataFrame with a `prompt` column (and an optional `prime_image` or
`edit_image` column of image file bytes, base64 in JSON, the same in every row) and the sampling settings as
`params`; an edit (docs/editing.md) takes `edit_mode` (inpaint, outpaint, variations), `region` ("x0,y0,x1,y1",
pixels of the image resized to the model's size) and `keep` as params. Response: one
row per candidate, best first within each prompt: `prompt`, `rank` (0 = best), `clip_score`, `seed` (the
prompt's sampling seed), `image` (PNG bytes, base64 in JSON). Imports neither Prefect nor the store.
"""

from __future__ import annotations

import ast
import logging
import os
import re

import mlflow.pyfunc
import numpy as np
import pandas as pd

from dalle_core.generate import MAX_CANDIDATES, DALLEPipeline, EditRequest
from dalle_core.images import png_bytes
from dalle_core.sampling import SAMPLING_DEFAULTS, GenerationError

ARTIFACT = "model_dir"  # the exported folder's name among the pyfunc model's artifacts
DEVICE_ENV = "DALLE_DEVICE"  # where a served model runs: auto (default) | cpu | cuda | cuda:N


def signature(sampling: dict):
    """The model's MLflow signature; the params' defaults are the model's own sampling defaults (top_k 0 and
    top_p 1 mean off, as MLflow params cannot be None)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    s = {**SAMPLING_DEFAULTS, **sampling}
    inputs = Schema([ColSpec("string", "prompt"), ColSpec("binary", "prime_image", required=False),
                     ColSpec("binary", "edit_image", required=False)])
    outputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "rank"), ColSpec("double", "clip_score"),
                      ColSpec("long", "seed"), ColSpec("binary", "image")])
    params = ParamSchema([ParamSpec("num_candidates", "long", int(s["num_candidates"])),
                          ParamSpec("cond_scale", "double", float(s["cond_scale"])),
                          ParamSpec("temperature", "double", float(s["temperature"])),
                          ParamSpec("top_k", "long", int(s["top_k"] or 0)),
                          ParamSpec("top_p", "double", float(s["top_p"] or 1.0)),
                          ParamSpec("seed", "long", int(s["seed"])),
                          ParamSpec("prime_rows", "long", 0),
                          ParamSpec("edit_mode", "string", "inpaint"),
                          ParamSpec("region", "string", ""),  # "x0,y0,x1,y1"; empty: none
                          ParamSpec("keep", "double", 0.5),
                          ParamSpec("negative_prompt", "string", s["negative_prompt"] or ""),  # "": none
                          ParamSpec("guidance_schedule", "string", s["guidance_schedule"]),
                          ParamSpec("guidance_start", "double", float(s["guidance_start"])),
                          ParamSpec("guidance_end", "double", float(s["guidance_end"]))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # the scoring server answers 400


class DALLEPyfunc(mlflow.pyfunc.PythonModel):
    """A `DALLEPipeline` behind MLflow's pyfunc interface; the model folder is the `model_dir` artifact."""

    def load_context(self, context) -> None:
        self.pipeline = DALLEPipeline.from_pretrained(context.artifacts[ARTIFACT], os.environ.get(DEVICE_ENV, "auto"))
        if (context.model_config or {}).get("fuse_lora"):  # mlflow.pyfunc.load_model(uri, model_config={...})
            self.pipeline.fuse_lora()
        names = {p.name for p in signature({}).params.params}
        enforcer = logging.getLogger("mlflow.models.utils")
        if not enforcer.isEnabledFor(logging.WARNING):  # a logger that drops warnings never reaches the filter
            enforcer.setLevel(logging.WARNING)
        if not any(isinstance(f, RefuseUnknownParams) and f.allowed == names for f in enforcer.filters):
            enforcer.addFilter(RefuseUnknownParams(names))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """One row per candidate of every prompt, ranked; MlflowException (HTTP 400) for a bad request."""
        if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input:
            raise _bad_request("the input needs a `prompt` column (one prompt per row)")
        p = {k: v for k, v in (params or {}).items() if v is not None and not (k == "negative_prompt" and v == "")}
        n = p.get("num_candidates")
        if isinstance(n, int) and not 1 <= n <= MAX_CANDIDATES:  # as dalle serve: one request cannot hold the worker
            raise _bad_request(f"num_candidates is {n}; allowed: 1 to {MAX_CANDIDATES} (this model's limit, as "
                               "dalle serve's default --max-candidates)")
        prime, image = _image_column(model_input, "prime_image"), _image_column(model_input, "edit_image")
        mode = p.get("edit_mode") or "inpaint"
        if mode not in ("inpaint", "outpaint", "variations"):
            raise _bad_request(f"edit_mode is {mode!r}; allowed: inpaint, outpaint, variations")
        try:
            edit = None if image is None else EditRequest(
                mode, image, p.get("region") or None, keep=p.get("keep") if mode == "variations" else None)
            if prime is not None:
                if edit is not None:
                    raise GenerationError("prime_image and edit_image were both given; give one source image")
                edit = EditRequest("prime", prime, prime_rows=p.get("prime_rows") or None)
            out = self.pipeline(model_input["prompt"].tolist(), edit=edit,
                                **{k: p.get(k) for k in SAMPLING_DEFAULTS if k != "batch_size"})
        except GenerationError as err:
            raise _bad_request(str(err)) from None
        rows = [{"prompt": prompt, "rank": rank, "clip_score": float(score), "seed": seed, "image": png_bytes(image)}
                for prompt, seed, images, scores in zip(out.prompts, out.seeds, out.pixels, out.scores)
                for rank, (image, score) in enumerate(zip(images, scores))]
        return pd.DataFrame(rows, columns=["prompt", "rank", "clip_score", "seed", "image"])


class RefuseUnknownParams(logging.Filter):
    """MLflow drops a param that a model's signature does not declare before `predict` sees the request, with
    only a warning in the server's log (`mlflow.models.utils._enforce_params_schema`, which has no strict mode),
    so a misspelt `num_candidats` would silently take its default. This filter on that logger turns the warning
    about a model whose params are `allowed` into MLflow's 400 naming the param and the allowed ones."""

    WARNING = re.compile(r"Unrecognized params (\[.*?\]) are ignored for inference\. Supported params are: (\{.*?\})")

    def __init__(self, allowed: set[str]):
        super().__init__()
        self.allowed = allowed

    def filter(self, record: logging.LogRecord) -> bool:
        found = self.WARNING.match(record.getMessage())
        if found and set(ast.literal_eval(found[2])) == self.allowed:
            unknown = sorted(ast.literal_eval(found[1]))
            raise _bad_request(f"{', '.join(unknown)} {'is not a param' if len(unknown) == 1 else 'are not params'} "
                               f"of this model; allowed: {', '.join(sorted(self.allowed))}")
        return True


def _image_column(model_input: pd.DataFrame, column: str) -> bytes | None:
    """The image file bytes of an optional column, the same in every row (one image per request), or None."""
    if column not in model_input:
        return None
    images = {bytes(v) for v in model_input[column] if v is not None and not _missing(v)}
    if len(images) > 1:
        raise _bad_request(f"{column} must be the same in every row of a request (one image per request)")
    return images.pop() if images else None


def _missing(value) -> bool:
    return isinstance(value, float) and np.isnan(value)


def requirements() -> list[str]:
    """The packages the model needs at load time, pinned to this environment's versions (the project itself
    must be installed too: serve with `--env-manager local`)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("torch", "safetensors", "tokenizers", "open_clip_torch", "pillow", "numpy", "pandas", "mlflow"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            out.append(dist)
    return out
