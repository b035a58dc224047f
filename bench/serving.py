"""Using a trained model: `dalle serve`'s API request end to end (16 candidates, as the page asks for them), and
a cold Python process that loads an exported model and draws one image.

The model is the shapes demo's: its trained store when `make demo` has run here (configs/shapes.yaml), else a
folder of untrained weights at its shapes (sampling time depends on the shapes; untrained weights give near-
uniform distributions, the slow case for the demo's top_p), so the row says which with `trained`.
DALLE_BENCH_MODEL=<exported folder> measures that model instead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import torch

from bench.common import Settings, median_seconds
from serve import app_server

SHAPES = "configs/shapes.yaml"


def shapes_model(folder: str) -> bool:
    """Write the shapes demo's model to `folder` (or copy $DALLE_BENCH_MODEL's); True if it is a trained one."""
    if os.environ.get("DALLE_BENCH_MODEL"):
        shutil.copytree(os.environ["DALLE_BENCH_MODEL"], folder)
        return True
    from pipeline.config import load_config
    from pipeline.stage_table import stage_keys
    from release.export import export_model

    cfg = load_config(SHAPES)
    store, keys = cfg.store.open(), stage_keys(cfg)
    if all(store.is_complete(s, keys[s]) for s in ("transformer", "dvae", "bpe", "clip")):
        export_model(cfg, folder)
        return True
    _untrained_folder(cfg, folder)
    return False


def _untrained_folder(cfg, folder: str) -> None:
    from dalle_core.bpe import TextTokenizer, train_bpe
    from dalle_core.clip import CLIPReranker, build_clip
    from dalle_core.dvae import DiscreteVAE
    from dalle_core.generate import DALLEPipeline
    from dalle_core.images import ImageNormalization
    from dalle_core.transformer import DALLE
    from data_sources import shapes

    captions = [caption for _, _, caption, _ in shapes.generate(2000, cfg.data.image_size)]
    tokenizer = TextTokenizer(train_bpe(captions, cfg.text.vocab_size), cfg.text.text_len)
    torch.manual_seed(0)
    dvae = DiscreteVAE(cfg.dvae.dvae_config(cfg.data.image_size))
    c = cfg.transformer.dalle_config(tokenizer.vocab_size, cfg.text.text_len, tokenizer.pad_id,
                                     dvae.c.codebook_size, dvae.c.grid)
    clip_cfg = cfg.clip.clip_config(cfg.data.image_size, tokenizer.vocab_size, cfg.text.text_len, tokenizer.pad_id)
    DALLEPipeline(DALLE(c), dvae, ImageNormalization(dvae.c.norm_mean, dvae.c.norm_std), tokenizer,
                  CLIPReranker.ours(build_clip(clip_cfg), clip_cfg, tokenizer),
                  sampling=cfg.generate.sampling_defaults()).save_pretrained(folder)


def _page_request(url: str, candidates: int, prompt: str = "a small red circle in the top left") -> float:
    """What the page does after its button: POST /api/jobs, poll the job, fetch its PNGs. The server's seconds."""
    import httpx

    with httpx.Client(base_url=url, timeout=300) as http:
        job = http.post("/api/jobs", json={"prompt": prompt, "num_candidates": candidates}).json()
        while job["state"] in ("queued", "running"):
            time.sleep(0.02)
            job = http.get(f"/api/jobs/{job['id']}").json()
        assert job["state"] == "done", job
        for image in job["result"]["images"]:
            http.get(image["url"]).raise_for_status()
        return job["seconds"]


def _pipe(s: Settings, warm: int):
    from dalle_core.generate import DALLEPipeline

    with tempfile.TemporaryDirectory() as tmp:
        trained = shapes_model(os.path.join(tmp, "model"))
        pipe = DALLEPipeline.from_pretrained(os.path.join(tmp, "model"), device=str(s.device))
    pipe("warm-up", num_candidates=warm)  # as `dalle serve` warms it
    return pipe, trained


def api_request(s: Settings, candidates: int = 16) -> dict:
    """What the page waits for after the button, browser excluded: POST /api/jobs, poll the job as the page does,
    then fetch its candidates' PNGs, against `dalle serve`'s app under uvicorn on 127.0.0.1 (warmed up as
    `dalle serve` warms it)."""
    pipe, trained = _pipe(s, candidates)
    served = []
    with app_server(pipe) as url:
        sec = median_seconds(lambda: served.append(_page_request(url, candidates)), s.repeats, torch.device("cpu"))
    return {"seconds": sec, "server_seconds": sorted(served)[len(served) // 2], "candidates": candidates,
            "trained": float(trained)}


def concurrent_users(s: Settings, users: int = 8, candidates: int = 4) -> dict:
    """`users` visitors who ask for `candidates` each at the same moment, until the last has its images, against
    one visitor asking for users x candidates, and one asking for `candidates` alone; each with the server merging
    waiting requests into one batch (`max_batch` = users) and, the baseline in the same run, without (1: one
    request at a time, as before merging)."""
    from concurrent.futures import ThreadPoolExecutor

    pipe, trained = _pipe(s, users * candidates)
    cpu, out = torch.device("cpu"), {"users": users, "candidates": candidates, "trained": float(trained)}
    with ThreadPoolExecutor(users) as pool:
        for label, max_batch in (("merged", users), ("one_at_a_time", 1)):
            with app_server(pipe, max_batch=max_batch) as url:
                def together(url=url) -> None:
                    list(pool.map(lambda i: _page_request(url, candidates, f"a small red circle, visitor {i}"),
                                  range(users)))

                out[f"users_s_{label}"] = median_seconds(together, s.repeats, cpu)
                out[f"one_of_all_s_{label}"] = median_seconds(lambda: _page_request(url, users * candidates),
                                                              s.repeats, cpu)
                out[f"alone_s_{label}"] = median_seconds(lambda: _page_request(url, candidates), s.repeats, cpu)
    out["users_over_one_of_all"] = out["users_s_merged"] / out["one_of_all_s_merged"]
    out["alone_merged_over_one_at_a_time"] = out["alone_s_merged"] / out["alone_s_one_at_a_time"]
    return out


def bad_requests(s: Settings, count: int = 100) -> dict:
    """`dalle serve` (its own process, the shapes model) under `count` bad requests in a row, alternately a body
    that declares 100 MB (refused from its header; 64 KB of it sent) and a 1 MB prompt (read, parsed, refused for
    its length): the server's RSS idle, after one of each and after all (MiB), and the slowest load of the page
    meanwhile (s). The serving issue's bound: RSS after all within 10% of idle, the page under 1 s."""
    import httpx
    import psutil

    from cli.prefect_server import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        trained = shapes_model(os.path.join(tmp, "model"))
        server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "dalle"), "serve", "--model",
                                   os.path.join(tmp, "model"), "--port", str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.STDOUT)
        url, rss = f"http://127.0.0.1:{port}", lambda: psutil.Process(server.pid).memory_info().rss / 2**20
        try:
            while True:
                try:
                    httpx.get(f"{url}/api/model", timeout=5).raise_for_status()
                    break
                except httpx.TransportError:
                    if server.poll() is not None:
                        raise RuntimeError(f"dalle serve exited with {server.returncode}") from None
                    time.sleep(0.5)
            idle = rss()

            def bad(i: int) -> None:
                if i % 2:
                    httpx.post(f"{url}/api/jobs", json={"prompt": "x" * 2**20}, timeout=30)
                    return
                with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                    sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 104857600\r\n\r\n" + b"[" * 65536)
                    while sock.recv(65536):
                        pass

            bad(0), bad(1)
            after_one, slowest, done = rss(), 0.0, threading.Event()
            thread = threading.Thread(target=lambda: ([bad(i) for i in range(count)], done.set()), daemon=True)
            thread.start()
            while not done.is_set():
                t0 = time.perf_counter()
                httpx.get(f"{url}/", timeout=30).raise_for_status()
                slowest = max(slowest, time.perf_counter() - t0)
                time.sleep(0.05)
            after = rss()
        finally:
            server.terminate()
            server.wait(timeout=30)
    return {"idle_rss_mb": idle, "rss_after_one_mb": after_one, "rss_after_all_mb": after,
            "growth_vs_idle": after / idle - 1, "page_slowest_s": slowest, "trained": float(trained)}


COLD = """
import sys, time
t0 = time.perf_counter()
from dalle_core.generate import DALLEPipeline
t1 = time.perf_counter()
pipe = DALLEPipeline.from_pretrained(sys.argv[1], device=sys.argv[2])
t2 = time.perf_counter()
out = pipe("a small red circle in the top left", num_candidates=1)
t3 = time.perf_counter()
print(f'{{"import_s": {t1 - t0}, "load_s": {t2 - t1}, "generate_s": {t3 - t2}}}')
"""


def cold_generate(s: Settings, threads: int | None = None) -> dict:
    """A fresh Python process: import, load the exported model, draw and rank one image. `to_image_s` from the
    first import to the ranked image, `seconds` the whole process (interpreter start and exit included), and the
    parts; medians of `--repeats` processes. `threads`: OMP_NUM_THREADS of the process (None: PyTorch's default,
    one per core)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        trained = shapes_model(folder)
        runs = []
        for _ in range(s.repeats + 1):  # the first warms the disk cache and the compiled CPU kernel
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", COLD, folder, str(s.device)], capture_output=True, text=True,
                                 check=True, env=env)
            parts = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append({"seconds": time.perf_counter() - t0, "to_image_s": sum(parts.values()), **parts})
    runs = runs[1:]
    return {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]} | {"trained": float(trained)}
