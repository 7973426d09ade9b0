"""Bounded HTTP load on the local Serve application against the in-process Colorizer, measured side by side.

    python bench/serve_load.py --checkpoint polycolor/pretrained [--requests 300] [--seconds 20] [--rounds 2]
                               [--model-cpus 1] [--profile] [--eager] [--haproxy]

First the in-process Colorizer on one torch thread (a 1-CPU model replica's share): its batched speed (images/s
and CPU per image), one outline alone (decode, a batch-of-one forward pass, encode), and a batch beside a thread
running Python, the model run eagerly and traced (as the Colorizer runs it). Then each deployment shape in turn,
the default two deployments and the model inside the ingress (``colocate``); with ``--eager``, the default again
with the model run eagerly, as before the Colorizer traced it (the same run's "before"); each through
``polycolor.client.AsyncClient`` on loopback, for each round: single outlines at concurrency 1, 8 and 32, and
16-outline requests at 32 (a fixed number of requests, capped in time): images/s, p50/p95/p99 latency, errors,
and the CPU each request cost the client, Serve's HTTP proxy (with ``--haproxy``: Ray's HAProxy, and the idle
proxy actor), the ingress replica and the model replica (each found through Ray's state API; a figure that is not
a measurement stops the bench), and the replicas' memory. Then, on the default shape, the largest request the
defaults accept (16 outlines of 4096x4096 at their own size): its answer time and the ingress replica's peak memory
over idle. ``--profile`` records a flame graph of each process of the default shape under the concurrency-32 load
with py-spy into bench/results/profiles/, and prints where each one's time goes.

The goals (#29), each a ratio measured in this run; the bench exits 1 when the default shape misses one:
  one outline alone (c=1):       p50 >= 0.6 of the in-process time of one outline alone
  single outlines at c=32:       images/s >= 0.8 of the in-process batched images/s
  16-outline requests at c=32:   images/s >= 0.9 of it
  ingress CPU per single-outline request at c=32 <= 3 ms; model-replica CPU per outline <= 1.15x in-process.
(Colocated, the replica's CPU beyond the in-process model's stands for the ingress's.)
Writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw

from polycolor import images, synth
from polycolor.client import AsyncClient, Retry, ServiceError
from polycolor.predict import Colorizer
from polycolor.serve import TRANSPORT, Model, ServeConfig, application

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
LEVELS = ((1, 1), (8, 1), (32, 1), (32, 16))  # (concurrency, outlines per request)
GOALS = {"alone": 0.6, "single_c32": 0.8, "many_c32": 0.9, "ingress_cpu_ms": 3.0, "model_cpu_ratio": 1.15}


def outline_png() -> bytes:
    ink = synth.draw_outline(synth.shape_points("star", np.random.default_rng(0)) * 40 + 64, 2, 128)
    buffer = io.BytesIO()
    Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def in_process(colorizer: Colorizer, body: bytes, images_n: int = 128, repeats: int = 3) -> dict:
    """Return the Colorizer's batched images/s and CPU ms per image on one thread, and one outline alone in ms."""
    torch.set_num_threads(1)
    outlines = np.repeat(synth.generate(1, seed=0).outlines, images_n, axis=0)
    cond = colorizer.condition(["red"] * images_n)
    colorizer.colorize_arrays(outlines[:32], cond[:32])
    rates, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        colorizer.colorize_arrays(outlines, cond)
        rates.append(images_n / (time.perf_counter() - start))
        cpu.append((time.thread_time() - start_cpu) * 1000 / images_n)

    def one_alone() -> None:
        outline, _ = images.read_ink(images.decode(body), colorizer.image_size, False)
        images.encode_png(colorizer.colorize_arrays(outline[None], colorizer.condition(["red"]))[0])

    one_alone()
    alone = []
    for _ in range(50):
        start = time.perf_counter()
        one_alone()
        alone.append(time.perf_counter() - start)
    return {
        "images_per_s": max(rates),
        "cpu_ms_per_image": min(cpu),
        "alone_ms": float(np.median(alone) * 1000),
        "beside_busy_thread_ms_per_image": beside_busy_thread(colorizer, outlines[:8], cond[:8]),
    }


def beside_busy_thread(colorizer: Colorizer, outlines: np.ndarray, cond: torch.Tensor) -> dict:
    """Return ms per image of a batch of 8, alone and beside a thread running Python (as a replica's event loop
    does), for the model run eagerly and as the Colorizer runs it (traced)."""
    ink = torch.from_numpy(outlines).float()[:, None]
    passes = {"eager": lambda: colorizer.model(ink, cond, hard=True), "traced": lambda: colorizer.forward(ink, cond)}

    def timed(run) -> float:
        with torch.inference_mode():
            run()
            start = time.perf_counter()
            for _ in range(20):
                run()
        return (time.perf_counter() - start) * 1000 / 20 / len(ink)

    def busy(stop: threading.Event) -> None:
        while not stop.is_set():
            sum(i * i for i in range(200))

    figures = {}
    for name, run in passes.items():
        figures[f"{name}_alone"] = timed(run)
        stop = threading.Event()
        thread = threading.Thread(target=busy, args=(stop,))
        thread.start()
        figures[f"{name}_beside_busy"] = timed(run)
        stop.set()
        thread.join()
    return figures


async def load(url: str, body: bytes, concurrency: int, requests: int, seconds: float, outlines: int = 1) -> dict:
    """Send ``requests`` requests of ``outlines`` outlines each from ``concurrency`` clients at once, for at most
    ``seconds``; return their images/s, latencies and errors."""
    latencies, errors, left = [], 0, requests
    deadline = time.perf_counter() + seconds
    async with AsyncClient(url, retry=Retry(tries=1), connections=concurrency) as client:

        async def user() -> None:
            nonlocal errors, left
            while left > 0 and time.perf_counter() < deadline:
                left -= 1
                start = time.perf_counter()
                try:
                    answers = await client.colorize_many([body] * outlines, "red")
                    errors += sum(isinstance(a, ServiceError) for a in answers)
                except ServiceError:
                    errors += outlines
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    p = np.percentile(latencies, [50, 95, 99]) * 1000
    return {
        "concurrency": concurrency,
        "outlines_per_request": outlines,
        "requests": len(latencies),
        "images_per_s": outlines * len(latencies) / wall,
        "p50_ms": p[0],
        "p95_ms": p[1],
        "p99_ms": p[2],
        "errors": errors,
    }


def square_outline(side: int) -> bytes:
    image = Image.new("1", (side, side), 1)
    ImageDraw.Draw(image).rectangle(
        (side // 8, side // 8, side * 7 // 8, side * 7 // 8), outline=0, width=max(1, side // 256)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def largest(url: str, ingress: psutil.Process, cfg: ServeConfig) -> dict:
    """Return the time and the ingress's peak memory over idle for the largest request the limits accept:
    ``max_images_per_request`` outlines of ``max_side`` squared, answered at their own size."""
    side = min(cfg.max_side, int(cfg.max_pixels**0.5))
    body, done = square_outline(side), asyncio.Event()
    idle = peak = ingress.memory_info().rss

    async def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, ingress.memory_info().rss)
            await asyncio.sleep(0.01)

    async with AsyncClient(url, timeout=600) as client:
        watcher = asyncio.create_task(watch())
        start = time.perf_counter()
        answers = await client.colorize_many([body] * cfg.max_images_per_request, "red", original_size=True)
        seconds = time.perf_counter() - start
        done.set()
        await watcher
    ok = sum(isinstance(a, Image.Image) and a.size == (side, side) for a in answers)
    return {
        "image": f"{side}x{side}",
        "outlines": len(answers),
        "ok": ok,
        "png_bytes_each": len(body),
        "seconds": seconds,
        "ingress_idle_mb": idle / 2**20,
        "ingress_growth_mb": (peak - idle) / 2**20,
    }


def serve_floor(url: str, body: bytes, args) -> dict:
    """Return what Serve itself costs here: a deployment that reads the request and answers a fixed PNG at once, under
    the same client at concurrency 1 and 32 (p50, requests/s and CPU per request of the proxy and the replica)."""
    from ray import serve
    from starlette.responses import Response

    @serve.deployment(
        name="Noop", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": TRANSPORT}}
    )
    class Noop:
        async def __call__(self, request) -> Response:
            await request.body()
            return Response(body, media_type="image/png")

    serve.run(Noop.bind(), name="noop", route_prefix="/noop")
    processes = {"proxy": proxy_processes(), "replica": [actor_process("ServeReplica:noop:Noop")]}
    floor = {}
    for concurrency in (1, 32):
        cpu = {name: cpu_seconds(p) for name, p in processes.items()}
        row = asyncio.run(
            load(f"{url}/noop", body, concurrency, args.requests, args.seconds)
        )  # colorize at /noop/colorize
        row["cpu_ms_per_request"] = {
            n: (cpu_seconds(p) - cpu[n]) * 1000 / row["requests"] for n, p in processes.items()
        }
        floor[f"c{concurrency}"] = row
    serve.delete("noop")
    return floor


def actor_process(class_name: str) -> psutil.Process:
    """Return the live Ray actor process of ``class_name`` (e.g. ServeReplica:load:Ingress, ProxyActor), found
    through Ray's state API; exit when there is not exactly one, rather than measure some other process."""
    import ray
    from ray.util.state import list_actors

    found = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("state", "=", "ALIVE"), ("class_name", "=", class_name)],
    )
    if len(found) != 1:
        raise SystemExit(f"error: found {len(found)} live {class_name} actors, expected one; no figure printed")
    return psutil.Process(found[0].pid)


def proxy_processes() -> list[psutil.Process]:
    """Return Serve's proxy actor and, where Ray runs one in its place (``--haproxy``), its HAProxy."""
    return [actor_process("ProxyActor"), *(p for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy")]


def measured(name: str, value: float) -> float:
    """Return ``value``, or exit: a zero CPU time or a tiny memory means the wrong process was watched."""
    if value <= 0 or (name.endswith("rss_mb") and value < 50):
        raise SystemExit(f"error: {name} = {value}, which is not a measurement of a working process; no figure printed")
    return value


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """Return the CPU seconds (user and system) ``processes`` have spent."""
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


STAGES = {  # where a sample of each process goes, by the frames in its stack (first match wins)
    "model forward (torch)": r"torch/nn/|ConditionalUNet|colorize_arrays",
    "colours -> conditions": r"Model\.condition|rgb_of|parse_color",
    "image decode": r"images\.py.*(decode|read_ink|ink_mask|outline_of)|Ingress\.decode",
    "PNG encode": r"encode_png|_encode_tile",
    "request parse (FastAPI, multipart)": r"parse_colorize|parse_form|multipart|fastapi/|starlette/",
    "call to the model (handle)": r"handle\.py|router\.py|request_router|ActorMethod|grpc",
    "metrics": r"metrics\.py|Metric\._record",
    "HTTP (uvicorn, proxy)": r"uvicorn|proxy\.py|proxy_request",
}


def profile(pids: dict[str, int], seconds: float) -> list[subprocess.Popen]:
    """Start py-spy on each process: a flame graph (SVG) and raw stacks into bench/results/profiles/."""
    (OUT / "profiles").mkdir(parents=True, exist_ok=True)
    spies = []
    for name, pid in pids.items():
        for kind, suffix in (("flamegraph", "svg"), ("raw", "txt")):
            command = [
                "py-spy",
                "record",
                "-p",
                str(pid),
                "-d",
                str(int(seconds)),
                "-r",
                "100",
                "-f",
                kind,
                "-o",
                str(OUT / "profiles" / f"{name}.{suffix}"),
                "--nonblocking",
            ]
            spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def stages(name: str) -> dict[str, float]:
    """Return the share of a profiled process's samples in each of ``STAGES`` (the rest: Serve's and Ray's own)."""
    counts, total = collections.Counter(), 0
    for line in (OUT / "profiles" / f"{name}.txt").read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        counts[next((stage for stage, pattern in STAGES.items() if re.search(pattern, stack)), "Serve and Ray")] += int(
            count
        )
    return {stage: counts[stage] / max(total, 1) for stage in [*STAGES, "Serve and Ray"]}


def start_serve(haproxy: bool = False) -> int:
    """Start a local Ray on two CPUs, with Serve's transport settings, and Serve's proxy (or with ``haproxy``, Ray's
    HAProxy in front of the replicas' own HTTP servers) on a free loopback port."""
    import os

    import ray
    from ray import serve

    for name, value in TRANSPORT.items():  # as `python -m polycolor.serve` starts it
        os.environ.setdefault(name, value)
    if haproxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


class EagerModel(Model.func_or_class):  # pickled by value into its replica
    """The model deployment as it ran before the Colorizer traced its model: each batch op by op, in Python."""

    def __init__(self, config: dict):
        super().__init__(config)
        model = self.served.colorizer.model
        self.served.colorizer.forward = lambda ink, cond: model(ink, cond, hard=True)


SHAPES = {  # deployment shape -> (ServeConfig.colocate, its model deployment); the first is the default, judged
    "two deployments": (False, Model),
    "one deployment (--colocate)": (True, Model),
}
DEFAULT = next(iter(SHAPES))
EAGER = {"two deployments, the model eager (before)": (False, Model.options(func_or_class=EagerModel))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--requests", type=int, default=300, help="requests per level")
    parser.add_argument("--seconds", type=float, default=20, help="time cap per level")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the levels after a warm-up pass")
    parser.add_argument("--model-cpus", type=float, default=1, help="CPUs of the model replica (its torch threads)")
    parser.add_argument("--profile", action="store_true", help="py-spy each process under the c=32 load (needs py-spy)")
    parser.add_argument("--eager", action="store_true", help="also the default shape with the model run eagerly")
    parser.add_argument(
        "--haproxy",
        action="store_true",
        help="Ray Serve's HAProxy in place of its HTTP proxy (RAY_SERVE_ENABLE_HA_PROXY)",
    )
    args = parser.parse_args()

    from ray import serve

    port = start_serve(args.haproxy)
    body = outline_png()
    base = in_process(Colorizer.from_checkpoint(args.checkpoint, device="cpu"), body)
    gil = base["beside_busy_thread_ms_per_image"]
    print(
        f"in-process Colorizer, 1 thread: {base['images_per_s']:.1f} images/s batched "
        f"({base['cpu_ms_per_image']:.2f} ms of CPU per image); one outline alone (decode, forward, encode) "
        f"{base['alone_ms']:.1f} ms; a batch of 8 beside a thread running Python, ms per image: eager "
        f"{gil['eager_alone']:.1f} -> {gil['eager_beside_busy']:.1f}, traced {gil['traced_alone']:.1f} -> "
        f"{gil['traced_beside_busy']:.1f}",
        flush=True,
    )
    url = f"http://127.0.0.1:{port}"
    report = {"in_process": base, "haproxy": args.haproxy, "goals": GOALS, "shapes": {}}
    for shape, (colocate, model) in (SHAPES | (EAGER if args.eager else {})).items():
        cfg = ServeConfig(checkpoint=args.checkpoint, cpus=args.model_cpus, colocate=colocate)
        serve.run(application(cfg, model), name="load", route_prefix="/")
        profiling = args.profile and shape == DEFAULT
        figures = report["shapes"][shape] = measure(shape, colocate, url, body, base, args, profiling)
        if shape == DEFAULT:
            ingress = actor_process("ServeReplica:load:Ingress")
            big = report["largest_request"] = asyncio.run(largest(url, ingress, cfg))
            print(
                f"the largest request accepted ({big['outlines']} outlines of {big['image']}, {big['png_bytes_each']} "
                f"bytes of PNG each, at their own size): {big['ok']} answered in {big['seconds']:.1f} s; ingress "
                f"{big['ingress_idle_mb']:.0f} MB idle, +{big['ingress_growth_mb']:.0f} MB at its peak",
                flush=True,
            )
        serve.delete("load")
        figures["verdict"] = check(figures["runs"], colocate, base["cpu_ms_per_image"])
    floor = report["serve_floor"] = serve_floor(url, body, args)
    print(
        f"Serve alone (a no-op ingress, the same client): c=1 p50 {floor['c1']['p50_ms']:.1f} ms, c=32 "
        f"{floor['c32']['images_per_s']:.0f} requests/s; CPU ms/request at c=32: proxy "
        f"{floor['c32']['cpu_ms_per_request']['proxy']:.1f}, replica "
        f"{floor['c32']['cpu_ms_per_request']['replica']:.1f}",
        flush=True,
    )
    serve.shutdown()
    for shape, figures in report["shapes"].items():
        print(f"{shape}:")
        for line in figures["verdict"]["lines"]:
            print(f"  {line}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serve_load.json").write_text(json.dumps(report, indent=2, default=lambda v: v.item()))
    return 0 if report["shapes"][DEFAULT]["verdict"]["met"] else 1


def measure(shape: str, colocate: bool, url: str, body: bytes, base: dict, args, profiling: bool) -> dict:
    """Return each round's figures for every level against the deployed app ``load`` (``runs``): images/s, latency,
    errors, the CPU each process spent a request, the replicas' memory; with ``profiling``, where each process's
    time went under the first round's c=32 load (``profile``)."""
    replicas = {"ingress": actor_process("ServeReplica:load:Ingress")}
    if not colocate:
        replicas["model"] = actor_process("ServeReplica:load:Model")
    proxies = proxy_processes()
    processes = {"client": [psutil.Process()], "proxy": proxies} | {n: [p] for n, p in replicas.items()}
    for concurrency, outlines in LEVELS:  # warm-up: every level once, so the allocator has seen every batch size
        asyncio.run(load(url, body, concurrency, min(args.requests, 100), args.seconds, outlines))
    runs, shares = [], {}
    for round_ in range(1, args.rounds + 1):
        for concurrency, outlines in LEVELS:
            cpu = {name: cpu_seconds(p) for name, p in processes.items()}
            spies = (
                profile({n: p.pid for n, p in replicas.items()} | {"proxy": proxies[0].pid}, args.seconds / 2)
                if (profiling and round_ == 1 and (concurrency, outlines) == (32, 1))
                else []
            )
            row = asyncio.run(load(url, body, concurrency, args.requests, args.seconds, outlines))
            for spy in spies:
                spy.wait()
            cpu_ms = {
                n: measured(f"{n} CPU", (cpu_seconds(p) - cpu[n]) * 1000 / row["requests"])
                for n, p in processes.items()
            }
            model_ms = cpu_ms["model" if "model" in cpu_ms else "ingress"]  # colocated: the whole replica's
            row |= {
                "round": round_,
                "cpu_ms_per_request": cpu_ms,
                "ratio": row["images_per_s"] / base["images_per_s"],
                "model_cpu_ratio": model_ms / outlines / base["cpu_ms_per_image"],
                "rss_mb": {n: measured(f"{n}_rss_mb", p.memory_info().rss / 2**20) for n, p in replicas.items()},
            }
            if concurrency == 1:
                row |= {
                    "alone_ratio": base["alone_ms"] / row["p50_ms"],
                    "batched_ratio": 1000 / base["images_per_s"] / row["p50_ms"],
                }
            runs.append(row)
            print(
                f"{shape}, round {round_}  c={concurrency:<3} x{outlines:<2} {row['images_per_s']:6.1f} images/s "
                f"({row['ratio']:.2f} of in-process)  p50 {row['p50_ms']:5.0f}  p95 {row['p95_ms']:5.0f}  p99 "
                f"{row['p99_ms']:5.0f} ms  errors {row['errors']}  CPU ms/request: "
                + ", ".join(f"{n} {ms:.1f}" for n, ms in cpu_ms.items())
                + f"  ({'model' if 'model' in replicas else 'replica'} {row['model_cpu_ratio']:.2f}x in-process per "
                "outline)",
                flush=True,
            )
        if profiling and round_ == 1:
            for name in ("proxy", *replicas):
                shares[name] = stages(name)
                print(
                    f"profile of {name}: " + ", ".join(f"{s} {v:.0%}" for s, v in shares[name].items() if v >= 0.005),
                    flush=True,
                )
    return {"runs": runs} | ({"profile": shares} if shares else {})


def check(runs: list[dict], colocate: bool, model_cpu_ms: float) -> dict:
    """Return each goal's worst figure over the rounds, whether it is met, and the lines that say so.

    With the model in the ingress (``colocate``) one process does both: its CPU beyond the in-process model's
    (``model_cpu_ms`` an outline) stands for the ingress's, and the model's own share is not measured apart.
    """

    def worst(pick, concurrency, outlines, low=True):
        values = [pick(r) for r in runs if (r["concurrency"], r["outlines_per_request"]) == (concurrency, outlines)]
        return min(values) if low else max(values)

    figures = {
        "alone": (worst(lambda r: r["alone_ratio"], 1, 1), ">="),
        "single_c32": (worst(lambda r: r["ratio"], 32, 1), ">="),
        "many_c32": (worst(lambda r: r["ratio"], 32, 16), ">="),
        "ingress_cpu_ms": (
            worst(lambda r: r["cpu_ms_per_request"]["ingress"] - (model_cpu_ms if colocate else 0), 32, 1, low=False),
            "<=",
        ),
    }
    if not colocate:
        figures["model_cpu_ratio"] = (
            max(worst(lambda r: r["model_cpu_ratio"], 32, n, low=False) for n in (1, 16)),
            "<=",
        )
    met = {
        name: value >= GOALS[name] if sign == ">=" else value <= GOALS[name] for name, (value, sign) in figures.items()
    }
    lines = [
        f"goal {name}: {value:.2f} {sign} {GOALS[name]}: {'met' if met[name] else 'NOT met'}"
        for name, (value, sign) in figures.items()
    ]
    return {
        "figures": {n: float(v) for n, (v, _) in figures.items()},
        "met": all(met.values()),
        "each": met,
        "lines": lines,
    }


if __name__ == "__main__":
    sys.exit(main())
