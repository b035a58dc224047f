"""The routes of `dalle serve`: the page, and the JSON API behind it (documented in docs/serving.md).

    GET  /                            the page (static/index.html)
    GET  /api/model                   the model: image size, token grid, sampling defaults, this server's limits
    POST /api/jobs                    queue a request -> 202 {id, state, ahead}
    GET  /api/jobs/{id}               its state, progress and, when done, the ranked candidates with CLIP scores
    GET  /api/jobs/{id}/images/{rank}.png   one candidate as a PNG download (rank 0 = the best)
    POST /api/generate                the same request, answered when done, images inline (base64 PNG)

Bad requests get HTTP 4xx and {"error": "<one line>"}; nothing a request sends can stop the server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import threading
import time
from importlib import resources

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from dalle_core.editing import pack
from dalle_core.generate import MAX_CANDIDATES, MAX_PRIME_PIXELS, DALLEPipeline
from dalle_core.images import png_bytes, size_hw
from dalle_core.sampling import SAMPLING_DEFAULTS, GenerationError
from serve.jobs import Job, JobQueue, QueueFull, run_progress
from serve.request import (
    CLIENT_TIMEOUT_S,
    MAX_PRIME_BYTES,
    APIError,
    BodyLimit,
    GenerateRequest,
    HeaderDeadline,
    error_line,
    job_settings,
)

SETTINGS = tuple(k for k in SAMPLING_DEFAULTS if k != "batch_size")  # a request's sampling settings (batch: ours)


def create_app(pipe: DALLEPipeline, *, name: str = "model", max_candidates: int = MAX_CANDIDATES,
               max_waiting: int = 16, max_batch: int = 8, client_timeout_s: float = CLIENT_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving `pipe`: requests are checked (request.py) and queue (jobs.py); up to `max_batch`
    waiting requests with the same settings run as one sampling batch (as many as its `batch_size` images hold),
    each from its own seed, so its images and scores are what it would get alone. A request's head and then its
    body must each arrive within `client_timeout_s` seconds (`uvicorn_config`)."""
    defaults = {"num_candidates": 16, **pipe.sampling, "seed": None}  # no seed sent: the server draws one

    def work(run: list[Job]) -> None:
        r = run[0].request  # the run's settings: its jobs share all but their prompt and seed
        out = pipe([job.request["prompt"] for job in run], edit=r["edit"], progress=run_progress(run),
                   **{k: r[k] for k in SETTINGS if k != "seed"}, seed=[job.request["seed"] for job in run])
        edit = r["edit"]
        for i, job in enumerate(run):
            job.images = [png_bytes(image) for image in out.pixels[i]]
            job.result = {"prompt": out.prompts[i], "seed": job.request["seed"], "truncated": out.truncated[i],
                          "scores": [float(s) for s in out.scores[i]],
                          "settings": {k: r[k] for k in (*SETTINGS, "prime_rows") if k != "seed"},
                          "edited": edit is not None and edit.mode != "prime",
                          "primed": edit is not None and edit.mode == "prime"}
        if out.edit is not None and out.edit.mode != "prime":  # the codes, so a client can see what was kept
            run[0].result["edit"] = {"mode": out.edit.mode, "region": r["region"], "keep": out.edit.keep,
                                     "source_tokens": pipe.encode(out.edit.image).tolist(),
                                     "masks": [pack(m) for m in out.masks[0]],
                                     "image_tokens": out.image_tokens[0].tolist()}

    rows = pipe.sampling.get("batch_size") or SAMPLING_DEFAULTS["batch_size"]  # images one sampling batch holds

    def joins(run: list[Job], job: Job) -> bool:
        """A waiting request joins a run with its settings (all but prompt and seed; an edit, with its own image,
        runs alone) while the run holds fewer than `max_batch` requests and its candidates still fit one sampling
        batch: merging more would only make the first requests wait for the last ones' batches."""
        first, r = run[0].request, job.request
        return (len(run) < max_batch and first["edit"] is None and r["edit"] is None
                and all(first[k] == r[k] for k in SETTINGS if k != "seed")
                and (len(run) + 1) * r["num_candidates"] <= rows)

    jobs = JobQueue(work, max_waiting=max_waiting, joins=joins)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        jobs.close()  # the running request finishes; the waiting ones are dropped with the process

    app = FastAPI(title=f"dalle serve: {name}", version="1", lifespan=lifespan,
                  description="Text to image with CLIP reranking; see docs/serving.md")
    app.add_middleware(BodyLimit, timeout_s=client_timeout_s)  # outermost: before anything reads the body
    app.state.jobs, app.state.pipeline, app.state.client_timeout_s = jobs, pipe, client_timeout_s

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": error_line(err)}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(GenerationError)
    async def bad_generation(_: Request, err: GenerationError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/api/model")
    def model() -> dict:
        return {"name": name, "image_size": pipe.image_size, "token_grid": pipe.transformer.c.image_grid,
                "image_hw": size_hw(pipe.image_size), "grid_hw": pipe.transformer.c.grid_hw,
                "text_len": pipe.tokenizer.text_len, "device": str(pipe.device), "precision": pipe.precision,
                "defaults": defaults, "limits": {"max_candidates": max_candidates, "max_waiting": max_waiting,
                                                 "max_prime_mb": MAX_PRIME_BYTES // 2**20,
                                                 "max_prime_pixels": MAX_PRIME_PIXELS}}

    def submit(req: GenerateRequest) -> Job:
        try:
            return jobs.submit(job_settings(req, pipe, defaults, max_candidates))
        except QueueFull as err:
            raise APIError(429, str(err)) from None

    def described(job: Job, inline: bool = False) -> dict:
        out = {"id": job.id, "state": job.state, "ahead": jobs.ahead_of(job) if job.state == "queued" else 0,
               "progress": job.steps_done / job.steps_total if job.steps_total else 0.0,
               "steps_done": job.steps_done, "steps_total": job.steps_total, "seconds": job.seconds}
        if job.error:
            out["error"] = job.error
        if job.result:
            out["result"] = {**job.result, "images": [
                {"rank": i, "clip_score": s, "url": f"/api/jobs/{job.id}/images/{i}.png",
                 **({"png_base64": base64.b64encode(job.images[i]).decode()} if inline else {})}
                for i, s in enumerate(job.result["scores"])]}
        return out

    @app.post("/api/jobs", status_code=202)
    def create_job(req: GenerateRequest) -> dict:
        return described(submit(req))

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return described(_job(job_id))

    @app.get("/api/jobs/{job_id}/images/{rank}.png", response_class=Response)
    def image(job_id: str, rank: int) -> Response:
        job = _job(job_id)
        if job.state != "done":
            raise APIError(409, f"job {job_id} is {job.state}; its images come when it is done")
        if not 0 <= rank < len(job.images):
            raise APIError(404, f"rank {rank} does not exist; job {job_id} has ranks 0 to {len(job.images) - 1}")
        filename = f"dalle-seed{job.result['seed']}-rank{rank + 1}.png"
        return Response(job.images[rank], media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @app.post("/api/generate")
    async def generate(req: GenerateRequest, request: Request) -> JSONResponse:
        job = submit(req)
        waiting = asyncio.wrap_future(job.future)
        while not waiting.done():  # a client that hangs up cancels its job: it holds the one worker no longer
            await asyncio.wait([waiting], timeout=0.25)
            if not waiting.done() and await request.is_disconnected():
                job.cancel()
                return JSONResponse({"error": "cancelled"}, status_code=499)
        body = described(job, inline=True)
        status = 200 if job.state == "done" else 400 if job.bad_request else 500
        return JSONResponse(body if status == 200 else {"error": job.error}, status_code=status)

    @app.delete("/api/jobs/{job_id}")
    def cancel_job(job_id: str) -> dict:
        """Cancel a job: a waiting one never runs, a running one stops at its next sampling step."""
        job = _job(job_id)
        job.cancel()
        return described(job)

    def _job(job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no job {job_id!r} (unknown, or forgotten: the server keeps the last "
                                f"{jobs.keep} finished jobs)")
        return job

    return app


def uvicorn_config(app: FastAPI) -> uvicorn.Config:
    """How `dalle serve` runs `app` (from `create_app`) under uvicorn: HTTP/1.1 with its client timeout."""
    head = type("HeaderDeadline", (HeaderDeadline,), {"timeout_s": app.state.client_timeout_s})
    return uvicorn.Config(app, http=head, log_level="warning")


@contextlib.contextmanager
def app_server(pipe, **kwargs):
    """`dalle serve`'s app (`create_app(pipe, **kwargs)`) under uvicorn on 127.0.0.1 (a free port), in a thread:
    its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(create_app(pipe, **kwargs)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
