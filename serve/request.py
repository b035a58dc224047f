"""A request to the JSON API (docs/serving.md): its body (`GenerateRequest`, checked by pydantic), then the checks
that need the model (the image's header, the prime rows and edit region against the token grid) that make it a
job's settings (`job_settings`), before it queues. A bad one is an `APIError` (HTTP status, one line)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
from dataclasses import fields
from typing import Annotated, Literal, get_type_hints

from fastapi.exceptions import RequestValidationError
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, StrictInt, create_model
from uvicorn.protocols.http.h11_impl import H11Protocol

from dalle_core.editing import EditError, region_edit_mask
from dalle_core.generate import DALLEPipeline, EditRequest, check_prompts, open_image
from dalle_core.images import size_text
from dalle_core.sampling import SAMPLING_DEFAULTS, SamplingSettings, described, typing_args

MAX_PRIME_BYTES = 10 * 2**20
HTTP_NAMES = {"outpaint_image": "edit_image", "variations": "edit_image"}  # one image field for every mode


class _Prompt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str


def _sampling_fields() -> dict:
    """`SamplingSettings`' fields as this API takes them: each optional (left out: the model's default), whole
    numbers strict ("4", true and 2.0 are refused); `batch_size` is the server's own."""
    hints, out = get_type_hints(SamplingSettings, include_extras=True), {}
    for f in fields(SamplingSettings):
        if f.name != "batch_size":
            kind, bounds, _ = typing_args(hints[f.name])
            # whole numbers strict; JSON's Infinity and NaN a 400 at once; text and words as they are
            strict = (Strict(),) if kind is int else (AllowInfNan(False),) if kind is float else ()
            out[f.name] = ((Annotated[kind, *bounds, *strict] if bounds or strict else kind) | None, None)
    return out


class GenerateRequest(create_model("SamplingRequest", __base__=_Prompt, **_sampling_fields())):
    """One prompt and its sampling settings (`SamplingSettings`' fields; seed left out: the server draws one and
    reports it); a setting left out takes the model's default."""

    prime_image: str | None = None  # image file bytes, base64 or a data: URL
    prime_rows: int | None = Field(None, ge=1, strict=True)
    # editing (docs/editing.md): the image (as prime_image) and the cells to sample: inpaint (inside `region`, x0,
    # y0, x1, y1 pixels of the image resized to the model's image size), outpaint (the image resized into
    # `region`, all around it sampled), variations (a share 1 - `keep` of the cells)
    edit_image: str | None = None
    edit_mode: Literal["inpaint", "outpaint", "variations"] | None = None  # None: inpaint, when edit_image is sent
    region: list[StrictInt] | None = None  # strict: true and 8.0 are refused
    keep: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)


MAX_BODY_BYTES = MAX_PRIME_BYTES * 4 // 3 + 2**16  # one base64 image and the rest of a request


CLIENT_TIMEOUT_S = 30.0  # a request's headers, and then its body, must each arrive within this


class BodyLimit:
    """ASGI middleware: a request body is refused before any of it is read when it declares more than `max_bytes`
    (413) or declares no length (411, as chunked uploads do), with the API's one-line error; so a 100 MB body is
    never parsed and a body that claims 8 GB does not hold a connection. A body that has not arrived whole
    `timeout_s` after its headers is a 408: a slow client does not hold a connection for ever."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, timeout_s: float = CLIENT_TIMEOUT_S):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            declared = headers.get(b"content-length", b"").decode("latin-1").strip()
            if not declared.isdigit():
                return await _refuse(send, 411, "send the request body with a Content-Length header")
            if int(declared) > self.max_bytes:
                return await _refuse(send, 413, f"the request body is {int(declared)} bytes; allowed: at most "
                                                f"{self.max_bytes} (one image of {MAX_PRIME_BYTES // 2**20} MB, base64)")
            try:
                body = await asyncio.wait_for(_read_body(receive), self.timeout_s)
            except TimeoutError:
                return await _refuse(send, 408, f"the request body did not arrive within {self.timeout_s:g} s of its "
                                                "headers; send it whole, at once")
            if body is None:  # the client hung up
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)


async def _read_body(receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """`receive` for the app: the body read already, then the connection's own messages (a hang-up)."""
    given = False

    async def replay() -> dict:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers: a connection that has not sent a
    whole request head `timeout_s` after it opened, or after its last response, is closed (uvicorn alone closes
    idle keep-alive connections, but a client that trickles its headers would hold one for ever)."""

    timeout_s = CLIENT_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_head()

    def _await_head(self) -> None:
        cycle = self.cycle  # a new request's head makes a new cycle

        def check() -> None:
            if self.cycle is cycle and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        self.loop.call_later(self.timeout_s, check)


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


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
    shown = "" if first.get("type") == "missing" or isinstance(got, dict) else \
        f" (got {described(got, lambda v: json.dumps(v, default=repr, ensure_ascii=True))})"  # base64: described
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
    rows = pipe.transformer.c.grid_hw[0]
    if req.prime_rows is not None and req.prime_rows >= rows:
        raise APIError(400, f"prime_rows is {req.prime_rows}; allowed: 1 to {rows - 1} (the token grid has {rows} rows)")
    return data, rows // 2 if req.prime_rows is None else req.prime_rows  # as DALLEPipeline's default


def _edit(req: GenerateRequest, pipe: DALLEPipeline) -> EditRequest | None:
    """The request's edit, checked before it queues (the image's header, the options against its mode, the
    region against the model's image size and token grid); None when it edits nothing."""
    for key, value in (("edit_mode", req.edit_mode), ("region", req.region), ("keep", req.keep)):
        if value is not None and req.edit_image is None:
            shown = f" {value}" if key == "edit_mode" else ""
            raise APIError(400, f"{key}{shown} is set but no edit_image was sent (the image to edit, as prime_image)")
    if req.edit_image is None:
        return None
    if req.prime_image is not None:
        raise APIError(400, "prime_image and edit_image were both sent; send one (priming keeps the top rows, "
                            "an edit the cells outside its region)")
    edit_mode = req.edit_mode or "inpaint"
    if edit_mode != "variations" and req.region is None:  # this API takes no mask: a region is the one way
        raise APIError(400, f"edit_mode {edit_mode} needs region [x0, y0, x1, y1]: pixels of the image resized "
                            f"to the model's {size_text(pipe.image_size)} px")
    region = None if req.region is None else tuple(req.region)
    edit = EditRequest(edit_mode, _image_bytes(req.edit_image, "edit_image"), region, keep=req.keep).check(HTTP_NAMES)
    if region is not None:
        try:
            region_edit_mask(edit_mode, region, pipe.image_size, pipe.transformer.c.image_grid)
        except EditError as err:
            raise APIError(400, str(err)) from None
    return edit


def job_settings(req: GenerateRequest, pipe: DALLEPipeline, defaults: dict, max_candidates: int) -> dict:
    """The settings a job samples with: the request's, checked, with the model's `defaults` for those it leaves
    out, a drawn seed when it sends none, and its image as an `EditRequest` (`edit`, or None)."""
    if not req.prompt.strip():
        raise APIError(400, "prompt is empty; type what the image should show")
    check_prompts(req.prompt)  # GenerationError (400): text that is no valid Unicode
    n = req.num_candidates or defaults["num_candidates"]
    if n > max_candidates:
        raise APIError(400, f"num_candidates is {n}; allowed: 1 to {max_candidates} (this server's limit, "
                            "dalle serve --max-candidates)")
    edit = _edit(req, pipe)
    prime, rows = _prime(req, pipe)
    if prime is not None:
        edit = EditRequest("prime", prime, prime_rows=rows)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    request = {k: defaults.get(k) if v is None else v for k, v in req.model_dump().items()}  # as sampled
    request.update(num_candidates=n, seed=seed, prime_rows=rows, edit=edit, prime_image=None, edit_image=None)
    pipe.check_settings(SamplingSettings(**{k: request[k] if request.get(k) is not None else SAMPLING_DEFAULTS[k]
                                            for k in SAMPLING_DEFAULTS if k != "batch_size"}))  # 400 before it queues
    return request
