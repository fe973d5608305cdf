"""Suite `server`: HTTP overhead, batch fill under saturation, and `full` against `amskv` under one budget.

Runs real `amskv serve` subprocesses on 127.0.0.1 (1 torch thread each) with the demo model (its bundled
weights, else random weights of its shape written to a temporary checkpoint). Clients are threads that
mostly wait on sockets, so they do not compete with the server for the cores.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from amskv_tools.bench.common import MIB, Report, demo_engine, md_table, median
from amskv.memory import max_batch
from amskv.sampling import SamplingParams

GIB = 2**30
TOP_K = 900  # the VAR demo setting, capped at the model's vocabulary (the server rejects larger values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoints(engine, folder: Path) -> tuple[str, str]:
    var_path, vae_path = folder / "var.pth", folder / "vae.pth"
    torch.save(engine.var.state_dict(), var_path)
    torch.save(engine.vae.state_dict(), vae_path)
    return str(var_path), str(vae_path)


class ServerProcess:
    """`amskv serve` in a subprocess; stopped with SIGTERM (drain) on exit."""

    def __init__(self, port: int, policy: str, budget_bytes: int, checkpoints: tuple[str, str] | None,
                 max_batch: int = 256, queue_delay_ms: float = 20.0, log: Path | None = None):
        env = dict(os.environ, AMSKV_TORCH_THREADS="1", OMP_NUM_THREADS="1", AMSKV_DEVICE="cpu",
                   AMSKV_POLICY=policy, AMSKV_KV_BUDGET_GIB=repr(budget_bytes / GIB),
                   AMSKV_MAX_BATCH=str(max_batch), AMSKV_MAX_QUEUE_DELAY_MS=str(queue_delay_ms),
                   AMSKV_LOG_LEVEL="warning")
        if checkpoints:
            env.update(AMSKV_VAR_CHECKPOINT=checkpoints[0], AMSKV_VAE_CHECKPOINT=checkpoints[1])
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "amskv_tools.cli", "serve", "--host", "127.0.0.1",
                                      "--port", str(port)], env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"amskv serve exited with {self.proc.returncode} before it was ready")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"amskv serve not ready after {timeout_s:.0f} s")

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics", timeout=10).text):
            for sample in family.samples:
                if sample.name.startswith("amskv_batch_") and not sample.labels.get("le"):
                    out[sample.name] = sample.value
        return out

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


def sampling(engine) -> SamplingParams:
    return SamplingParams(cfg=4.0, top_k=min(TOP_K, engine.config.vocab_size), top_p=0.95)


def generate(client: httpx.Client, url: str, images: int, seed: int, engine) -> dict:
    p = sampling(engine)
    body = {"class_labels": [i % engine.num_classes for i in range(images)], "n": 1, "seed": seed,
            "cfg_scale": p.cfg, "top_k": p.top_k, "top_p": p.top_p}
    resp = client.post(f"{url}/generate", json=body, timeout=600)
    if resp.status_code != 200:
        raise httpx.HTTPStatusError(f"{resp.status_code}: {resp.text[:500]}", request=resp.request, response=resp)
    return resp.json()


def overhead(server: ServerProcess, engine, batch: int, rounds: int) -> dict:
    """Images/s through HTTP (one request of ``batch`` images) against the engine called directly."""
    params = sampling(engine)
    labels = [i % engine.num_classes for i in range(batch)]
    direct, http, batches = [], [], []
    with httpx.Client() as client:
        generate(client, server.url, batch, 0, engine)  # warm-up
        engine.generate(labels, list(range(batch)), params)
        for r in range(rounds):  # alternate, never concurrently: the server and the engine share the cores
            t0 = time.perf_counter()
            with torch.inference_mode():
                engine.generate(labels, list(range(batch)), params)
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            body = generate(client, server.url, batch, r, engine)
            http.append(time.perf_counter() - t0)
            batches.append(body["usage"]["batch_images"])
    d, h = batch / median(direct), batch / median(http)
    return {"batch": batch, "direct_images_per_s": d, "http_images_per_s": h, "ratio": h / d,
            "server_batch_images": batches, "direct_s": direct, "http_s": http}


def saturate(server: ServerProcess, clients: int, images_per_request: int, seconds: float, engine) -> dict:
    """Closed-loop clients keep the queue full; mean batch and images/s from the server's own metrics."""
    before = server.metrics()
    done, errors, stop = [0], [0], time.monotonic() + seconds
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        with httpx.Client() as client:
            seed = i * 100_000
            while time.monotonic() < stop:
                try:
                    generate(client, server.url, images_per_request, seed, engine)
                    with lock:
                        done[0] += images_per_request
                except httpx.HTTPError:
                    with lock:
                        errors[0] += 1
                seed += images_per_request

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = server.metrics()
    n = after.get("amskv_batch_size_images_count", 0) - before.get("amskv_batch_size_images_count", 0)
    total = after.get("amskv_batch_size_images_sum", 0) - before.get("amskv_batch_size_images_sum", 0)
    admissible = after.get("amskv_batch_max_images", float("nan"))
    mean_batch = total / n if n else 0.0
    return {"clients": clients, "images_per_request": images_per_request, "seconds": wall,
            "images": done[0], "errors": errors[0], "images_per_s": done[0] / wall, "batches": n,
            "mean_batch": mean_batch, "max_batch_admissible": admissible,
            "fill": mean_batch / admissible if admissible else float("nan")}


def run_suite(tiny: bool = False, rounds: int | None = None, port: int = 0) -> Report:
    torch.set_num_threads(1)
    engine, source = demo_engine("full")
    full_per_image = engine.with_policy("full").kv_bytes_per_image()
    admits = 2 if tiny else 32
    budget = admits * full_per_image + full_per_image // 2  # `full` admits exactly `admits` images
    batch = 2 if tiny else 16  # a size both policies admit
    seconds = 1.0 if tiny else 25.0
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        ckpts = None if source == "bundled demo weights" else write_checkpoints(engine, Path(tmp))
        servers = {}
        for policy in ("full", "amskv"):  # both start together; each is measured while the other idles
            servers[policy] = stack.enter_context(ServerProcess(
                free_port() if not port else port + len(servers), policy, budget, ckpts,
                log=Path(tmp) / f"{policy}.log"))
        for policy, srv in servers.items():
            try:
                srv.wait_ready()
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; log:\n{(Path(tmp) / f'{policy}.log').read_text()[-2000:]}") from exc
        for policy, srv in servers.items():
            # the engine as the server loads it: the bundled demo's amskv policies come with its profile
            eng = demo_engine(policy)[0] if ckpts is None else engine.with_policy(policy)
            row = {"policy": policy, "engine_max_batch": max_batch(budget, eng.kv_bytes_per_image())}
            row["overhead"] = overhead(srv, eng, min(batch, row["engine_max_batch"]), rounds or (1 if tiny else 3))
            in_flight = 2 * row["engine_max_batch"]  # twice what one batch can take: the queue never empties
            per_request = max(1, min(8, in_flight // 8))
            clients = max(2, in_flight // per_request)
            row["saturation"] = saturate(srv, clients, per_request, seconds, eng)
            rows[policy] = row
    f, a = rows["full"]["saturation"], rows["amskv"]["saturation"]
    md = [f"Model: {engine.model_name} ({source}), fp32 CPU, server and engine on 1 torch thread each. "
          f"KV budget {budget / MIB:.2f} MiB for both policies (`full` admits {admits} images).", "",
          md_table(["policy", "batch", "engine images/s", "HTTP images/s", "HTTP / engine"],
                   [[p, r["overhead"]["batch"], r["overhead"]["direct_images_per_s"],
                     r["overhead"]["http_images_per_s"], f"{r['overhead']['ratio']:.3f}"] for p, r in rows.items()]),
          "", md_table(["policy", "clients x images", "admissible batch", "mean batch", "fill", "images/s", "errors"],
                       [[p, f"{r['saturation']['clients']} x {r['saturation']['images_per_request']}",
                         r["saturation"]["max_batch_admissible"], r["saturation"]["mean_batch"],
                         f"{r['saturation']['fill']:.3f}", r["saturation"]["images_per_s"], r["saturation"]["errors"]]
                        for p, r in rows.items()]),
          "", f"amskv against full under the same budget: max batch x{a['max_batch_admissible'] / f['max_batch_admissible']:.2f}, "
          f"images/s x{a['images_per_s'] / f['images_per_s']:.2f}."]
    notes = ["Targets: HTTP / engine >= 0.95; fill (mean executed batch / admissible batch) >= 0.90 under saturation.",
             "The HTTP figure includes PNG and base64 encoding and JSON transfer of every image."]
    return Report("server", {"weights": source, "budget_bytes": budget, "policies": rows}, "\n".join(md), [], notes)
