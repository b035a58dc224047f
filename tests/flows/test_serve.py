"""`dalle serve`: the JSON API in-process, the queue over real HTTP, and the page in a real headless browser."""

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dalle_core.generate import DALLEPipeline
from serve import create_app
from tests.flows.exported_model import exported_folder
from tests.flows.servers import BIN, app_server, free_port, stop, wait_http

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = ("needs Debian's Chromium (apt-get install -y chromium) and the playwright package (dev extra); "
               ".ci/run installs both")


@pytest.fixture(scope="module")
def pipe(generated):
    tmp, ov, _ = generated
    return DALLEPipeline.from_pretrained(exported_folder(str(tmp), tuple(ov)), device="cpu")


@pytest.fixture(scope="module")
def exported_model(generated) -> str:
    tmp, ov, _ = generated
    return str(exported_folder(str(tmp), tuple(ov)))


@pytest.fixture(scope="module")
def client(pipe):
    return TestClient(create_app(pipe, name="tiny", max_candidates=8))


@pytest.fixture
def live(pipe):
    """The app under uvicorn on 127.0.0.1 (a free port), in a thread: its base URL."""
    with app_server(pipe, name="tiny", max_candidates=8) as url:
        yield url


def _png(size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else 1).save(buf, format="PNG")
    return buf.getvalue()


def test_generate_returns_ranked_candidates_with_scores_and_the_seed(client):
    reply = client.post("/api/generate", json={"prompt": "a red circle", "num_candidates": 5, "seed": 11})
    assert reply.status_code == 200, reply.text
    result = reply.json()["result"]
    scores = [im["clip_score"] for im in result["images"]]
    assert result["seed"] == 11 and len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert Image.open(io.BytesIO(base64.b64decode(result["images"][0]["png_base64"]))).size == (32, 32)
    again = client.post("/api/generate", json={"prompt": "a red circle", "num_candidates": 5, "seed": 11}).json()
    assert [im["png_base64"] for im in again["result"]["images"]] == [im["png_base64"] for im in result["images"]]
    drawn = client.post("/api/generate", json={"prompt": "a red circle", "num_candidates": 2}).json()["result"]
    assert isinstance(drawn["seed"], int)  # no seed given: the server draws one and reports it


def test_a_negative_prompt_and_a_guidance_schedule_reach_the_sampler(client):
    """The same seed and guidance scale, with and without a negative prompt (and with a linear schedule): other
    images, and the settings echoed as sampled."""
    base = {"prompt": "a red circle", "num_candidates": 3, "seed": 5, "cond_scale": 3.0}
    plain, steered, ramped = (client.post("/api/generate", json={**base, **extra}).json()["result"] for extra in (
        {}, {"negative_prompt": "a blue square"}, {"guidance_schedule": "linear", "guidance_start": 0.25}))
    images = [[im["png_base64"] for im in r["images"]] for r in (plain, steered, ramped)]
    assert images[0] != images[1] and images[0] != images[2]
    assert steered["settings"]["negative_prompt"] == "a blue square" and plain["settings"]["negative_prompt"] is None
    assert (ramped["settings"]["guidance_schedule"], ramped["settings"]["guidance_start"]) == ("linear", 0.25)


def test_job_progress_and_image_download(client):
    job = client.post("/api/jobs", json={"prompt": "a blue square", "num_candidates": 3, "seed": 2})
    assert job.status_code == 202 and job.json()["state"] in ("queued", "running", "done")
    while (state := client.get(f"/api/jobs/{job.json()['id']}").json())["state"] in ("queued", "running"):
        time.sleep(0.02)
    assert state["state"] == "done" and state["progress"] == 1.0 and state["steps_done"] == state["steps_total"] > 0
    image = client.get(state["result"]["images"][2]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.headers["content-disposition"] == 'attachment; filename="dalle-seed2-rank3.png"'
    assert client.get(f"/api/jobs/{job.json()['id']}/images/3.png").status_code == 404


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"prompt": "x", "num_candidates": 9}, 400, "num_candidates is 9; allowed: 1 to 8"),
    ({"prompt": "x", "num_candidates": 0}, 400, "num_candidates: Input should be greater than or equal to 1 (got 0)"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p: Input should be less than or equal to 1 (got 1.5)"),
    ({"prompt": "x", "colour": "red"}, 400, "colour is not a field of this API; allowed: prompt, num_candidates"),
    ({"prompt": "x", "guidance_schedule": "cosine"}, 400, "guidance_schedule: Input should be 'constant' or 'linear'"),
    ({"prompt": "x", "guidance_start": 0.8, "guidance_end": 0.2}, 400, "guidance_start is 0.8 and guidance_end 0.2"),
    ({"prompt": "x", "negative_prompt": ""}, 400, "negative_prompt: String should have at least 1 character"),
    ({"prompt": "x", "negative_prompt": "   "}, 400, "negative_prompt is '   '; every prompt needs some text"),
    ({"prompt": "x", "guidance_schedule": "x" * 5000}, 400, "guidance_schedule: Input should be 'constant' or "
                                                            "'linear' (got a string of 5000 characters)"),
    ({"prompt": "x", "cond_scale": 3, "guidance_start": 0.99}, 400, "guidance_start 0.99 to guidance_end 1 holds none"),
    ({"prompt": "x", "prime_image": "%%%"}, 400, "prime_image is not base64"),
    ({"prompt": "x", "prime_image": base64.b64encode(b"GIF89a broken").decode()}, 400, "is not an image file"),
    ({"prompt": "x", "prime_image": base64.b64encode(_png()).decode(), "prime_rows": 8}, 400, "prime_rows is 8; allowed: 1 to 7"),
    ({"prompt": "x", "prime_rows": 2}, 400, "no prime_image was sent"),
    ({}, 400, "prompt: Field required"),
    ({"prompt": "x", "prime_image": "data:image/png"}, 400, "prime_image is a data: URL with no data"),
    ({"prompt": "x", "prime_image": base64.b64encode(_png((4097, 4097), "1")).decode()}, 400,
     "is 4097x4097 pixels; allowed: at most 16777216 pixels"),
    ({"prompt": "x", "num_candidates": "4"}, 400, "num_candidates: Input should be a valid integer"),
    ({"prompt": "x", "num_candidates": True}, 400, "num_candidates: Input should be a valid integer"),
    ({"prompt": "x", "num_candidates": 2.0}, 400, "num_candidates: Input should be a valid integer"),
    ({"prompt": "x", "seed": "7"}, 400, "seed: Input should be a valid integer"),
    ({"prompt": "x", "edit_image": base64.b64encode(_png()).decode()}, 400, "edit_mode inpaint needs region"),
    ({"prompt": "x", "edit_image": base64.b64encode(_png()).decode(), "region": [0, 0, 40, 8]}, 400,
     "region 0,0,40,8 is outside the 32x32 image"),
    ({"prompt": "x", "edit_image": base64.b64encode(_png()).decode(), "region": [0, 0, 32, 32]}, 400,
     "nothing of the image is kept"),
    ({"prompt": "x", "edit_image": base64.b64encode(_png()).decode(), "region": [8, 0, 8, 4]}, 400, "is empty: x0=8"),
    ({"prompt": "x", "edit_image": base64.b64encode(_png()).decode(), "edit_mode": "outpaint", "region": [1, 1, 31, 31]},
     400, "nothing is left to outpaint"),
    ({"prompt": "x", "edit_image": "%%%", "region": [0, 0, 4, 4]}, 400, "edit_image is not base64"),
    ({"prompt": "x", "edit_image": base64.b64encode(b"GIF89a broken").decode(), "region": [0, 0, 4, 4]}, 400,
     "edit image (13 bytes) is not an image file"),
    ({"prompt": "x", "region": [0, 0, 4, 4]}, 400, "region is set but no edit_image was sent"),
    ({"prompt": "x", "edit_mode": "outpaint"}, 400, "edit_mode outpaint is set but no edit_image was sent"),
    ({"prompt": "x", "edit_mode": "inpaint"}, 400, "edit_mode inpaint is set but no edit_image was sent"),
    ({"prompt": "x", "edit_mode": "variations", "keep": 0.5}, 400, "edit_mode variations is set but no edit_image"),
    ({"prompt": "x", "edit_image": base64.b64encode(_png()).decode(), "region": [True, 0, 8, 8]}, 400,
     "region.0: Input should be a valid integer (got true)"),
    ({"prompt": "x", "edit_image": base64.b64encode(_png()).decode(), "region": [0, 0, 8.0, 8]}, 400,
     "region.2: Input should be a valid integer (got 8.0)"),
    ({"prompt": "x", "edit_image": base64.b64encode(_png()).decode(), "edit_mode": "variations", "keep": 1}, 400,
     "keep: Input should be less than 1"),
    ({"prompt": "x", "edit_image": base64.b64encode(_png()).decode(), "edit_mode": "variations",
      "region": [0, 0, 4, 4]}, 400, "region does not apply to edit_mode variations"),
    ({"prompt": "x", "edit_image": base64.b64encode(_png()).decode(), "prime_image": base64.b64encode(_png()).decode(),
      "region": [0, 0, 4, 4]}, 400, "prime_image and edit_image were both sent"),
])
def test_bad_requests_are_4xx_with_one_line(client, body, status, message):
    for route in ("/api/generate", "/api/jobs"):  # refused before it queues: a job never fails for its settings
        reply = client.post(route, json=body)
        assert reply.status_code == status and message in reply.json()["error"], (route, reply.text)
        assert "\n" not in reply.json()["error"]


def test_a_long_value_is_described_not_echoed(client):
    image = base64.b64encode(_png()).decode()
    for body, message in (({"prompt": "x", "image": image}, "image is not a field of this API; allowed: prompt, "),
                          ({"prompt": "x", "prime_rows": image}, f"prime_rows: Input should be a valid integer (got a "
                                                                 f"string of {len(image)} characters)")):
        reply = client.post("/api/generate", json=body)
        error = reply.json()["error"]
        assert reply.status_code == 400 and error.startswith(message) and image[:8] not in error, error


def test_malformed_json_and_unknown_jobs(client):
    reply = client.post("/api/jobs", content=b"{prompt: 1", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"].startswith("the request body is not valid JSON")
    assert client.get("/api/jobs/nope").status_code == 404
    assert client.post("/api/generate", json={"prompt": "still serving", "num_candidates": 1}).status_code == 200


def test_a_body_sent_without_the_json_content_type_is_a_400(client):
    reply = client.post("/api/generate", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert reply.status_code == 400 and reply.json()["error"].startswith("the request body is not JSON"), reply.text
    reply = client.post("/api/jobs", content=b'{"prompt": "x"}', headers={"content-type": ""})
    assert reply.status_code == 400 and "Content-Type: application/json" in reply.json()["error"], reply.text


def test_a_prompt_that_is_no_valid_text_is_a_400(client):
    reply = client.post("/api/jobs", content=b'{"prompt": "a \\ud800 b"}', headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"].startswith("prompt 1 of 1 is not valid text"), reply.text
    assert "\n" not in reply.json()["error"]


def test_a_huge_prime_is_refused_from_its_header_without_decoding(client, monkeypatch):
    from PIL import ImageFile

    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    prime = base64.b64encode(_png((4097, 4097), "1")).decode()
    reply = client.post("/api/jobs", json={"prompt": "x", "prime_image": prime})
    assert reply.status_code == 400 and "4097x4097 pixels" in reply.json()["error"] and decoded == []


def _raw(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict, float]:
    """Send a raw HTTP request; (status, JSON reply, seconds until the reply) from a real server."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    status, _, payload = reply.partition(b"\r\n\r\n")
    return int(status.split()[1]), json.loads(payload), time.perf_counter() - t0


def test_bodies_are_bounded_before_they_are_read(live, client):
    """A body that declares 8 GB is refused at once without waiting for it; a 20 MB one is never parsed; a
    chunked upload (no declared length) is refused; a long prompt in a small body is one line naming the limit."""
    head = (b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 8589934592\r\n\r\n")
    status, reply, seconds = _raw(live, head)  # sends no body at all
    assert status == 413 and reply["error"].startswith("the request body is 8589934592 bytes; allowed: at most ")
    assert seconds < 2
    chunked = b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, reply, _ = _raw(live, chunked, b"5\r\n{\"a\":\r\n0\r\n\r\n")
    assert status == 411 and "Content-Length" in reply["error"]
    big = client.post("/api/jobs", json={"prompt": "x" * (20 * 2**20)})
    assert big.status_code == 413 and "at most" in big.json()["error"] and len(big.content) < 300
    long = client.post("/api/generate", json={"prompt": "a red circle " * 500})
    assert long.status_code == 400 and long.json()["error"] == ("prompt 1 of 1 is 6500 characters; allowed: at most "
                                                                "1000 (the model reads only its first text_len tokens)")
    assert client.post("/api/generate", json={"prompt": "still serving", "num_candidates": 1}).status_code == 200
    for body, field in ((b'{"prompt": "x", "temperature": Infinity}', "temperature"),
                        (b'{"prompt": "x", "cond_scale": NaN}', "cond_scale")):  # JSON that Python's json reads
        reply = client.post("/api/jobs", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 400 and reply.json()["error"].startswith(f"{field}: Input should be a finite number")


def test_slow_clients_are_timed_out_and_the_page_still_answers(exported_model):
    """`dalle serve --client-timeout 2` (the command, in its own process): a connection that sends nothing, one
    that trickles its headers and one whose body stops short are each closed or answered 408 within the timeout
    (plus scheduling slack), and the page still answers at once."""
    port = free_port()
    server = subprocess.Popen([str(BIN / "dalle"), "serve", "--model", exported_model, "--port", str(port),
                               "--client-timeout", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    live, host = f"http://127.0.0.1:{port}", "127.0.0.1"
    try:
        wait_http(f"{live}/api/model", server)
        _slow_clients(live, host, port)
    finally:
        stop(server)


def _slow_clients(live: str, host: str, port: int) -> None:
    def held_for(first: bytes, trickle: bytes = b"") -> tuple[float, bytes]:
        """Seconds until the server closed the connection, and what it sent; `trickle` goes a byte per 0.3 s."""
        with socket.create_connection((host, int(port)), timeout=0.3) as s:
            t0, reply = time.perf_counter(), b""
            s.sendall(first)
            while time.perf_counter() - t0 < 10:
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    if trickle:
                        s.sendall(trickle[:1])
                        trickle = trickle[1:]
                    continue
                if not chunk:
                    break
                reply += chunk
            return time.perf_counter() - t0, reply

    seconds, reply = held_for(b"")
    assert 1.5 < seconds < 6 and reply == b""
    seconds, reply = held_for(b"POST /api/jobs HTTP/1.1\r\n", b"Host: x\r\nContent-Type: application/json\r\n")
    assert 1.5 < seconds < 6 and reply == b""
    seconds, reply = held_for(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    status, _, payload = reply.partition(b"\r\n\r\n")
    assert 1.5 < seconds < 6 and int(status.split()[1]) == 408
    assert json.loads(payload)["error"] == ("the request body did not arrive within 2 s of its headers; send it "
                                            "whole, at once")
    t0 = time.perf_counter()
    assert httpx.get(f"{live}/", timeout=5).status_code == 200 and time.perf_counter() - t0 < 1


def test_model_info_says_the_seed_is_drawn_and_reports_default_prime_rows(client):
    assert client.get("/api/model").json()["defaults"]["seed"] is None  # each request without one draws one
    prime = base64.b64encode(_png()).decode()
    reply = client.post("/api/generate", json={"prompt": "x", "num_candidates": 1, "prime_image": prime})
    assert reply.status_code == 200 and reply.json()["result"]["settings"]["prime_rows"] == 4  # half the 8 rows


@pytest.mark.parametrize("host, port, message", [
    ("127.0.0.1", 70000, "--port is 70000; allowed: 0 to 65535"),
    ("no-such-host.invalid", 8000, "--host 'no-such-host.invalid' does not resolve"),
    ("192.0.2.1", 0, "--host '192.0.2.1' is not an address of this machine"),
])
def test_serve_checks_host_and_port_before_loading_the_model(exported_model, host, port, message, capsys):
    from cli.main import main

    assert main(["serve", "--model", exported_model, "--host", host, "--port", str(port)]) == 2
    err = capsys.readouterr()
    assert message in err.err and "loaded" not in err.out and "http://" not in err.out


def test_serve_refuses_a_port_that_is_taken(exported_model, capsys, monkeypatch):
    import pipeline.models
    from cli.main import main

    monkeypatch.setattr(pipeline.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", exported_model, "--port", str(port)]) == 2
        assert f"--port {port} on 127.0.0.1 is taken" in capsys.readouterr().err
    finally:
        taken.close()


def test_primed_request_keeps_the_prime_rows(client, pipe):
    prime = base64.b64encode(_png()).decode()
    reply = client.post("/api/generate", json={"prompt": "x", "num_candidates": 2, "seed": 1,
                                               "prime_image": f"data:image/png;base64,{prime}", "prime_rows": 2})
    assert reply.status_code == 200 and reply.json()["result"]["primed"]
    assert reply.json()["result"]["settings"]["prime_rows"] == 2


def _kept_codes_hold(result: dict) -> bool:
    """Whether every candidate of an edit's result has the source's code in each cell its mask keeps ('0'),
    and some candidate differs from the source where it samples."""
    edit = result["edit"]
    source = edit["source_tokens"]
    kept = all(codes[i] == source[i] for codes, mask in zip(edit["image_tokens"], edit["masks"])
               for i, m in enumerate(mask) if m == "0")
    redrawn = any(codes[i] != source[i] for codes, mask in zip(edit["image_tokens"], edit["masks"])
                  for i, m in enumerate(mask) if m == "1")
    return kept and redrawn and len(edit["image_tokens"]) == len(result["images"])


def test_an_edit_request_keeps_the_codes_outside_its_region(client):
    image = base64.b64encode(_png((48, 40), "RGB")).decode()
    reply = client.post("/api/generate", json={"prompt": "a red circle", "num_candidates": 3, "seed": 5,
                                               "edit_image": f"data:image/png;base64,{image}", "region": [5, 4, 18, 13]})
    assert reply.status_code == 200, reply.text
    result = reply.json()["result"]
    expect = ["1" if 1 <= y <= 3 and 1 <= x <= 4 else "0" for y in range(8) for x in range(8)]  # snapped outward
    assert result["edited"] and result["edit"]["masks"] == ["".join(expect)] * 3 and _kept_codes_hold(result)
    variations = client.post("/api/generate", json={"prompt": "a red circle", "num_candidates": 3, "seed": 5,
                                                    "edit_image": image, "edit_mode": "variations", "keep": 0.25})
    result = variations.json()["result"]
    assert [m.count("0") for m in result["edit"]["masks"]] == [16] * 3 and _kept_codes_hold(result)
    assert result["edit"]["keep"] == 0.25
    job = client.app.state.jobs.jobs[variations.json()["id"]]  # done: it keeps its result, not the image sent
    assert job.request == {} and image[:40] not in client.get(f"/api/jobs/{job.id}").text
    assert client.get(f"/api/jobs/{job.id}").json()["result"]["settings"]["num_candidates"] == 3


def test_a_failing_model_fails_the_request_not_the_server(pipe, monkeypatch):
    client = TestClient(create_app(pipe, max_candidates=8))
    broken = {"on": True}
    real = pipe.candidates

    def candidates(*args, **kwargs):
        if broken["on"]:
            raise RuntimeError("out of memory\nsecond line")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe, "candidates", candidates)
    reply = client.post("/api/generate", json={"prompt": "x", "num_candidates": 1})
    assert reply.status_code == 500 and reply.json()["error"] == "generation failed: RuntimeError: out of memory"
    broken["on"] = False
    assert client.post("/api/generate", json={"prompt": "x", "num_candidates": 1}).status_code == 200


def test_concurrent_requests_queue_and_never_run_the_model_twice_at_once(live, pipe, monkeypatch):
    running, most, real = [0], [0], pipe.candidates
    lock = threading.Lock()

    def candidates(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.05)  # widen the window two overlapping runs would show in
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(pipe, "candidates", candidates)
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda i: httpx.post(f"{live}/api/generate", timeout=60,
                                                     json={"prompt": f"prompt {i}", "num_candidates": 2, "seed": i}),
                                range(6)))
    assert [r.status_code for r in replies] == [200] * 6 and most[0] == 1
    assert [r.json()["result"]["prompt"] for r in replies] == [f"prompt {i}" for i in range(6)]


def _wait_until(check, seconds: float = 30.0):
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_waiting_requests_share_a_batch_and_each_gets_its_own_images(pipe, monkeypatch):
    """Requests that wait together with the same settings run as one sampling batch, in arrival order, up to
    `max_batch`: each gets the images it gets alone, with its own progress. One with other settings does not join,
    nor does any behind it (no request overtakes another); one cancelled while it waits never runs; one cancelled
    while its batch runs is dropped from it, and the others' images stay theirs."""
    app = create_app(pipe, name="tiny", max_candidates=8, max_batch=3)
    client, jobs = TestClient(app), app.state.jobs
    gate, calls, real = threading.Event(), [], pipe.candidates

    def candidates(prompts, seeds, settings, edit=None, progress=None):
        calls.append(list(prompts))
        if prompts == ["first"]:
            gate.wait(60)
        if "g" in prompts:
            jobs.get(ids["g"]).cancel()  # its client leaves while its batch samples
        return real(prompts, seeds, settings, edit, progress)

    monkeypatch.setattr(pipe, "candidates", candidates)
    ids = {"first": client.post("/api/jobs", json={"prompt": "first", "num_candidates": 2, "seed": 1}).json()["id"]}
    _wait_until(lambda: jobs.get(ids["first"]).state == "running")
    for name, n in (("a red circle", 2), ("a blue square", 2), ("cancelled", 2), ("a green cross", 2),
                    ("other", 3), ("late", 2), ("g", 2), ("h", 2)):
        ids[name] = client.post("/api/jobs", json={"prompt": name, "num_candidates": n, "seed": len(ids)}).json()["id"]
    client.delete(f"/api/jobs/{ids['cancelled']}")
    gate.set()
    _wait_until(lambda: all(jobs.get(i).state not in ("queued", "running") for i in ids.values()))
    assert calls == [["first"], ["a red circle", "a blue square", "a green cross"], ["other"], ["late", "g", "h"]]
    assert {name: jobs.get(i).state for name, i in ids.items() if jobs.get(i).state != "done"} == {
        "cancelled": "cancelled", "g": "cancelled"}
    merged = {name: jobs.get(ids[name]) for name in ("a red circle", "a green cross", "h")}
    monkeypatch.setattr(pipe, "candidates", real)
    for name, job in merged.items():
        assert job.steps_total > 0 and job.steps_done == job.steps_total  # its own progress, to the end
        alone = client.post("/api/generate", json={"prompt": name, "num_candidates": 2, "seed": job.result["seed"]})
        assert [base64.b64decode(im["png_base64"]) for im in alone.json()["result"]["images"]] == job.images, name
        assert alone.json()["result"]["scores"] == job.result["scores"]  # to the bit: decoded and scored apart


def test_a_run_holds_no_more_requests_than_one_sampling_batch_holds(pipe, monkeypatch):
    """Merging stops where the candidates would need a second sampling batch (the first requests would wait for
    it), at `max_batch` requests, and at other settings or an edit."""
    from serve.app import SETTINGS
    from serve.jobs import Job

    monkeypatch.setitem(pipe.sampling, "batch_size", 4)
    joins = create_app(pipe, name="tiny", max_batch=3).state.jobs.joins
    request = {**{k: None for k in SETTINGS}, "num_candidates": 2, "edit": None, "prompt": "x", "seed": 1}
    one, two = [Job(request)], [Job(request), Job(request)]
    assert joins(one, Job({**request, "seed": 2})) and not joins(two, Job(request))  # 2 x 2 fill the batch of 4
    assert not joins(one, Job({**request, "num_candidates": 1})) and not joins(one, Job({**request, "edit": "x"}))
    monkeypatch.setitem(pipe.sampling, "batch_size", 64)
    assert not create_app(pipe, name="tiny", max_batch=2).state.jobs.joins(two, Job(request))


def test_clients_that_hang_up_are_cancelled_and_the_next_visitor_does_not_wait(live, pipe, monkeypatch):
    """Four clients ask for a request that samples for 10 s and hang up after 0.3 s; each is cancelled at its
    next sampling step (the waiting ones never run), so a visitor after them is answered at once."""
    real, slow_steps = pipe.candidates, []

    def candidates(prompts, seeds, settings, edit=None, progress=None):
        if set(prompts) == {"slow"}:
            for i in range(200):  # 10 s of sampling, unless cancelled
                time.sleep(0.05)
                slow_steps.append(i)
                for own in progress:
                    own(i + 1, 200)
        return real(prompts, seeds, settings, edit, progress)

    monkeypatch.setattr(pipe, "candidates", candidates)
    host, port = live.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "slow", "num_candidates": 1}).encode()
    for _ in range(4):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.3)  # then hangs up
    t0 = time.perf_counter()
    reply = httpx.post(f"{live}/api/generate", json={"prompt": "a visitor", "num_candidates": 1}, timeout=60)
    assert reply.status_code == 200 and time.perf_counter() - t0 < 5  # not 4 x 10 s behind the abandoned ones
    assert len(slow_steps) < 60  # each cancelled within a few steps of its client leaving
    job = httpx.post(f"{live}/api/jobs", json={"prompt": "slow", "num_candidates": 1}).json()
    cancelled = httpx.delete(f"{live}/api/jobs/{job['id']}").json()  # a polling client cancels explicitly
    for _ in range(100):
        if cancelled["state"] == "cancelled":
            break
        time.sleep(0.05)
        cancelled = httpx.get(f"{live}/api/jobs/{job['id']}").json()
    assert cancelled["state"] == "cancelled" and "cancelled" in cancelled["error"]


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("DALLE_REQUIRE_BROWSER"), reason=NO_CHROMIUM)
def test_the_page_in_a_headless_browser(live, tmp_path):
    """Type a prompt, wait for the grid, check N images with scores, download one; an empty prompt shows the
    server's error. DALLE_SCREENSHOT=<path> also saves the page (the README's screenshot)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 640}, accept_downloads=True)
        page.goto(live)
        expect(page.locator("#model-info")).to_contain_text("32px images")
        page.fill("#prompt", "a small red circle in the top left")
        page.fill("#num_candidates", "6")
        page.fill("#seed", "42")
        page.click("#go")
        figures = page.locator("#grid figure.candidate")
        expect(figures).to_have_count(6, timeout=30_000)
        for i in range(6):
            expect(figures.nth(i).locator(".score")).to_have_text(re.compile(rf"^#{i + 1} · CLIP -?\d\.\d{{3}}$"))
            expect(figures.nth(i).locator("img")).to_have_js_property("naturalWidth", 32)  # the PNG loaded
        scores = [float(figures.nth(i).locator(".score").inner_text().split("CLIP ")[1]) for i in range(6)]
        assert scores == sorted(scores, reverse=True)
        expect(page.locator("#seed-shown")).to_have_text("42")
        if os.environ.get("DALLE_SCREENSHOT"):
            page.screenshot(path=os.environ["DALLE_SCREENSHOT"])
        with page.expect_download() as download:
            figures.nth(0).locator("a.download").click()
        path = tmp_path / download.value.suggested_filename
        download.value.save_as(path)
        assert path.name == "dalle-seed42-rank1.png" and Image.open(path).size == (32, 32)
        prime = tmp_path / "prime.png"
        prime.write_bytes(_png())
        page.locator("summary", has_text="Image completion").click()
        page.set_input_files("#prime", str(prime))
        expect(page.locator("#prime-preview")).to_be_visible()
        page.click("#go")
        expect(page.locator("#settings-shown")).to_contain_text("primed (4 rows)")
        expect(figures).to_have_count(6)
        page.set_input_files("#prime", [])  # edit instead: draw a rectangle on an uploaded image
        page.locator("summary", has_text="Edit an image").click()
        source = tmp_path / "source.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(source)
        page.set_input_files("#edit", str(source))
        canvas = page.locator("#edit-canvas")
        expect(canvas).to_be_visible()
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()  # 256 px on screen for 32 model pixels: 8 screen px a model pixel
        page.mouse.move(box["x"] + 5 * 8 + 3, box["y"] + 4 * 8 + 3)
        page.mouse.down()
        page.mouse.move(box["x"] + 12 * 8 + 3, box["y"] + 10 * 8 + 3, steps=4)
        page.mouse.up()
        expect(page.locator("#region-shown")).to_contain_text("region 5,4,13,11")  # both corner pixels inside
        jobs = []
        page.on("response", lambda r: jobs.append(r) if "/api/jobs/" in r.url and "/images/" not in r.url else None)
        page.click("#go")
        expect(page.locator("#settings-shown")).to_contain_text("inpaint of region 5,4,13,11")
        expect(figures).to_have_count(6)
        result = jobs[-1].json()["result"]
        assert result["edit"]["region"] == [5, 4, 13, 11] and _kept_codes_hold(result)
        page.fill("#prompt", "")
        page.click("#go")
        expect(page.locator("#error")).to_have_text("prompt is empty; type what the image should show")
        browser.close()
