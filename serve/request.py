"""A request to the JSON API (docs/serving.md): its body (`GenerateRequest`, checked by pydantic), then the checks
that need the model (the image's header, the prime rows and edit region against the token grid) that make it a
job's settings (`job_settings`), before it queues. A bad one is an `APIError` (HTTP status, one line)."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from typing import Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from dalle_core.editing import EditError, region_edit_mask
from dalle_core.generate import DALLEPipeline, check_prompts, open_image

MAX_PRIME_BYTES = 10 * 2**20


class GenerateRequest(BaseModel):
    """One prompt and its sampling settings; a setting left out takes the model's default."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    num_candidates: int | None = Field(None, ge=1, strict=True)  # strict: "4", true and 2.0 are refused
    cond_scale: float | None = Field(None, ge=0)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=0, strict=True)  # 0 = off
    top_p: float | None = Field(None, gt=0, le=1)  # 1 = off
    seed: int | None = Field(None, ge=0, lt=2**63, strict=True)  # none: the server draws one and reports it
    prime_image: str | None = None  # image file bytes, base64 or a data: URL
    prime_rows: int | None = Field(None, ge=1, strict=True)
    # editing (docs/editing.md): the image (as prime_image) and the cells to sample: inpaint (inside `region`, x0,
    # y0, x1, y1 pixels of the image resized to the model's image size), outpaint (the image resized into
    # `region`, all around it sampled), variations (a share 1 - `keep` of the cells)
    edit_image: str | None = None
    edit_mode: Literal["inpaint", "outpaint", "variations"] | None = None  # None: inpaint, when edit_image is sent
    region: list[StrictInt] | None = None  # strict: true and 8.0 are refused
    keep: float | None = Field(None, gt=0, lt=1)


class APIError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def error_line(err: RequestValidationError) -> str:
    """The first validation error as `field: what is wrong (got value)`."""
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'JSON decode error')}"
    got = first.get("input")
    if isinstance(got, (bytes, bytearray, str)) and tuple(first.get("loc", ())) == ("body",):
        # FastAPI parses the body as JSON only when the request says Content-Type: application/json
        return "the request body is not JSON (send a JSON object with the header Content-Type: application/json)"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request body"
    if first.get("type") == "extra_forbidden":  # its value may be a whole base64 image: name the field only
        return f"{where} is not a field of this API; allowed: {', '.join(GenerateRequest.model_fields)}"
    shown = json.dumps(got, default=repr, ensure_ascii=True)
    if first.get("type") == "missing" or isinstance(got, dict):
        shown = ""
    elif len(shown) > 40:  # a long value (an image's base64) is described, not echoed
        shown = f" (got a string of {len(got)} characters)" if isinstance(got, str) else \
            f" (got a list of {len(got)} items)" if isinstance(got, list) else ""
    else:
        shown = f" (got {shown})"
    return f"{where}: {first.get('msg', 'invalid')}{shown}"


def _image_bytes(text: str, field: str) -> bytes:
    """An image file sent as base64 or a data: URL -> its bytes. Its header is checked now (format, pixel count),
    so a bad one is a 400 before it queues; its pixels are decoded by the generation queue, not on the server's
    request threads."""
    if text.startswith("data:"):
        if "," not in text:
            raise APIError(400, f"{field} is a data: URL with no data ({text[:40]!r}); expected "
                                "data:image/png;base64,<the file's bytes, base64>")
        text = text.split(",", 1)[1]
    if len(text) > MAX_PRIME_BYTES * 4 // 3 + 4:
        raise APIError(413, f"{field} is over {MAX_PRIME_BYTES // 2**20} MB")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{field} is not base64 (send the image file's bytes base64-encoded, or a data: URL)") from None
    with open_image(data, field.replace("_", " ")):  # GenerationError (400) for bytes that are no image or too many pixels
        pass
    return data


def _prime(req: GenerateRequest, pipe: DALLEPipeline) -> tuple[bytes | None, int | None]:
    """The prime image file's bytes and the token rows it keeps (default: the pipeline's, half the grid)."""
    if req.prime_image is None:
        if req.prime_rows is not None:
            raise APIError(400, "prime_rows is set but no prime_image was sent")
        return None, None
    data = _image_bytes(req.prime_image, "prime_image")
    rows = pipe.transformer.c.image_grid
    if req.prime_rows is not None and req.prime_rows >= rows:
        raise APIError(400, f"prime_rows is {req.prime_rows}; allowed: 1 to {rows - 1} (the token grid has {rows} rows)")
    return data, rows // 2 if req.prime_rows is None else req.prime_rows  # as DALLEPipeline's default


def _edit(req: GenerateRequest, pipe: DALLEPipeline) -> dict:
    """`DALLEPipeline.__call__`'s editing arguments of a request, checked before it queues (the image's header, the
    region against the model's image size and token grid); {} when it edits nothing."""
    edit_mode = req.edit_mode or "inpaint"
    mode = {"inpaint": "edit_image", "outpaint": "outpaint_image", "variations": "variations"}[edit_mode]
    for key, value, modes in (("edit_mode", req.edit_mode, ()), ("region", req.region, ("inpaint", "outpaint")),
                              ("keep", req.keep, ("variations",))):
        if value is not None and req.edit_image is None:
            shown = f" {value}" if key == "edit_mode" else ""
            raise APIError(400, f"{key}{shown} is set but no edit_image was sent (the image to edit, as prime_image)")
        if value is not None and modes and edit_mode not in modes:
            raise APIError(400, f"{key} does not apply to edit_mode {edit_mode} (only to {' and '.join(modes)})")
    if req.edit_image is None:
        return {}
    if req.prime_image is not None:
        raise APIError(400, "prime_image and edit_image were both sent; send one (priming keeps the top rows, "
                            "an edit the cells outside its region)")
    kwargs = {k: v for k, v in (("region", None if req.region is None else tuple(req.region)), ("keep", req.keep))
              if v is not None}
    if edit_mode != "variations":
        if req.region is None:
            raise APIError(400, f"edit_mode {edit_mode} needs region [x0, y0, x1, y1]: pixels of the image resized "
                                f"to the model's {pipe.image_size} px")
        try:
            region_edit_mask(edit_mode, tuple(req.region), pipe.image_size, pipe.transformer.c.image_grid)
        except EditError as err:
            raise APIError(400, str(err)) from None
    return {mode: _image_bytes(req.edit_image, "edit_image"), **kwargs}


def job_settings(req: GenerateRequest, pipe: DALLEPipeline, defaults: dict, max_candidates: int) -> dict:
    """The settings a job samples with: the request's, checked, with the model's `defaults` for those it leaves
    out, a drawn seed when it sends none, and its images as `DALLEPipeline.__call__` takes them."""
    if not req.prompt.strip():
        raise APIError(400, "prompt is empty; type what the image should show")
    check_prompts(req.prompt)  # GenerationError (400): text that is no valid Unicode
    n = req.num_candidates or defaults["num_candidates"]
    if n > max_candidates:
        raise APIError(400, f"num_candidates is {n}; allowed: 1 to {max_candidates} (this server's limit, "
                            "dalle serve --max-candidates)")
    edit = _edit(req, pipe)
    prime, rows = _prime(req, pipe)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    request = {k: defaults.get(k) if v is None else v for k, v in req.model_dump().items()}  # as sampled
    request.update(num_candidates=n, seed=seed, prime_image=prime, prime_rows=rows, edit=edit, edit_image=None)
    return request
