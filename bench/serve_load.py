"""Bounded HTTP load on a local Serve application vs the in-process Colorizer, measured side by side.

    python bench/serve_load.py --checkpoint runs/first/best [--requests 200] [--seconds 30] [--rounds 4]

For batching on and off: concurrency 1, 8 and 32 of single-outline requests and concurrency 32 of 16-outline
requests on loopback (a fixed number of requests, capped in time): images/s, p50/p95/p99 latency, errors; the
CPU each request cost the load client, Serve's HTTP proxy, the ingress replica and the model replica (each
found through Ray's state API; a figure that is not a measurement stops the bench); both replicas' memory
after a warm-up pass at every level and after each measured level of four rounds; then their peak memory with
every slot taken at once by the largest image accepted. L4's budget: a single outline's p95 at concurrency c
within c times its p50 alone, in the same run. Goal: 16-outline requests >= 0.7 of in-process. Next
to it, the in-process Colorizer's batch throughput on the same checkpoint with one thread (the model
replica's share: Ray gives a 1-CPU actor one torch thread) and with all threads.
Writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw

from polycolor import synth
from polycolor.predict import Colorizer
from polycolor.serve import ServeConfig, application

ROOT = Path(__file__).resolve().parents[1]


def outline_png() -> bytes:
    ink = synth.draw_outline(synth.shape_points("star", np.random.default_rng(0)) * 40 + 64, 2, 128)
    buffer = io.BytesIO()
    Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def in_process(colorizer: Colorizer, threads: int, images: int = 128, repeats: int = 3) -> float:
    """Images/s of ``Colorizer.colorize_arrays`` at its own batch size; the best of ``repeats`` runs."""
    torch.set_num_threads(threads)
    outlines = np.repeat(synth.generate(1, seed=0).outlines, images, axis=0)
    colorizer.colorize_arrays(outlines[:32], colorizer.condition(["red"] * 32))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        colorizer.colorize_arrays(outlines, colorizer.condition(["red"] * images))
        rates.append(images / (time.perf_counter() - start))
    return max(rates)


async def load(url: str, body: bytes, concurrency: int, requests: int, seconds: float, images: int = 1) -> dict:
    """``requests`` POSTs of ``images`` outlines each (repeated ``image`` fields when more than one) from
    ``concurrency`` clients, capped at ``seconds``."""
    files = [("image", (f"{i}.png", body, "image/png")) for i in range(images)]
    latencies, errors, queue = [], 0, asyncio.Queue()
    for _ in range(requests):
        queue.put_nowait(None)
    deadline = time.perf_counter() + seconds

    async def user(client: httpx.AsyncClient):
        nonlocal errors
        while not queue.empty() and time.perf_counter() < deadline:
            queue.get_nowait()
            start = time.perf_counter()
            answer = await client.post(url, files=files, data={"color": "red"})
            latencies.append(time.perf_counter() - start)
            errors += answer.status_code != 200 or (images > 1 and any("error" in item for item in answer.json()))

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    p = np.percentile(latencies, [50, 95, 99]) * 1000
    return {
        "concurrency": concurrency,
        "images_per_request": images,
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "images_per_s": images * len(latencies) / wall,
        "p50_ms": p[0],
        "p95_ms": p[1],
        "p99_ms": p[2],
        "errors": errors,
    }


async def full_queue(url: str, replicas: dict[str, psutil.Process], cfg: ServeConfig) -> dict:
    """Every slot of the ingress (``max_ongoing_requests``) taken at once by the largest image it accepts (an
    outline at ``max_pixels``): each replica's peak RSS over its idle RSS, sampled every 20 ms."""
    side = int(cfg.max_pixels**0.5)
    image = Image.new("L", (side, side), 255)
    ImageDraw.Draw(image).rectangle(
        (side // 8, side // 8, side * 7 // 8, side * 7 // 8), outline=0, width=max(1, side // 128)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    body, done = buffer.getvalue(), asyncio.Event()
    idle = {name: process.memory_info().rss for name, process in replicas.items()}
    peak = dict(idle)

    async def watch():
        while not done.is_set():
            for name, process in replicas.items():
                peak[name] = max(peak[name], process.memory_info().rss)
            await asyncio.sleep(0.02)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=cfg.max_ongoing_requests)) as client:
        watcher = asyncio.create_task(watch())
        answers = await asyncio.gather(
            *(
                client.post(url, files={"image": ("big.png", body, "image/png")}, data={"color": "red"})
                for _ in range(cfg.max_ongoing_requests)
            )
        )
        done.set()
        await watcher
    return {
        "image": f"{side}x{side}",
        "png_bytes": len(body),
        "requests": len(answers),
        "ok": sum(a.status_code == 200 for a in answers),
        **{
            f"{name}_{when}_rss_mb": measured(f"{name}_{when}_rss_mb", rss[name] / 2**20)
            for name in replicas
            for when, rss in (("idle", idle), ("peak", peak))
        },
    }


def actor_process(class_name: str) -> psutil.Process:
    """The live Ray actor process of ``class_name`` (e.g. ServeReplica:load:Ingress, ProxyActor), found through
    Ray's state API; exits when there is not exactly one, rather than measure some other process."""
    import ray
    from ray.util.state import list_actors

    found = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("state", "=", "ALIVE"), ("class_name", "=", class_name)],
    )
    if len(found) != 1:
        raise SystemExit(f"error: found {len(found)} live {class_name} actors, expected one; no figure printed")
    return psutil.Process(found[0].pid)


def start_serve() -> int:
    """A local Ray on two CPUs with Serve's proxy on a free loopback port; returns the port."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def measured(name: str, value: float) -> float:
    """``value``, or exit: a zero CPU time or a tiny memory means the wrong process was watched."""
    if value <= 0 or (name.endswith("rss_mb") and value < 50):
        raise SystemExit(f"error: {name} = {value}, which is not a measurement of a working process; no figure printed")
    return value


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--seconds", type=float, default=30, help="time cap per concurrency level")
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="passes over the levels after the warm-up (memory must not grow between them)",
    )
    parser.add_argument(
        "--model-cpus",
        type=float,
        default=1,
        help="CPUs of the model replica (Ray gives it as many torch threads); the ingress reserves none",
    )
    args = parser.parse_args()

    import ray
    from ray import serve

    port = start_serve()
    threads = torch.get_num_threads()
    colorizer = Colorizer.from_checkpoint(args.checkpoint, device="cpu")
    body, whole = outline_png(), in_process(colorizer, threads)
    baseline = in_process(colorizer, 1)
    print(
        f"in-process Colorizer batch throughput: {baseline:.1f} images/s with 1 thread (a 1-CPU model replica's "
        f"share), {whole:.1f} with {threads}; "
        f"{1000 / baseline:.1f} ms of CPU per image"
    )
    report = {"in_process_images_per_s": baseline, f"in_process_images_per_s_{threads}_threads": whole, "runs": []}
    levels = ((1, 1), (8, 1), (32, 1), (32, 16))  # (concurrency, outlines per request)
    for batching, batch_size in (("on", 32), ("off", 1)):
        cfg = ServeConfig(
            checkpoint=args.checkpoint, max_batch_size=batch_size, batch_wait_s=0.01, cpus=args.model_cpus
        )
        serve.run(application(cfg), name="load", route_prefix="/")
        url = f"http://127.0.0.1:{port}/colorize"
        replicas = {
            "ingress": actor_process("ServeReplica:load:Ingress"),
            "model": actor_process("ServeReplica:load:Model"),
        }
        processes = {"client": psutil.Process(), "proxy": actor_process("ProxyActor")} | replicas
        for concurrency, images in levels:  # warm-up: a pass at every level, so the allocator has seen every batch size
            asyncio.run(load(url, body, concurrency, args.requests, args.seconds, images))
        memory = {name: [measured(f"{name}_rss_mb", p.memory_info().rss / 2**20)] for name, p in replicas.items()}
        for round_ in range(1, args.rounds + 1):
            for concurrency, images in levels:
                cpu = {name: cpu_seconds(p) for name, p in processes.items()}
                row = asyncio.run(load(url, body, concurrency, args.requests, args.seconds, images))
                cpu_ms = {
                    name: measured(f"{name} CPU", (cpu_seconds(p) - cpu[name]) * 1000 / row["requests"])
                    for name, p in processes.items()
                }
                for name, p in replicas.items():
                    memory[name].append(measured(f"{name}_rss_mb", p.memory_info().rss / 2**20))
                row |= {
                    "batching": batching,
                    "round": round_,
                    "ratio_to_in_process": row["images_per_s"] / baseline,
                    f"ratio_to_{threads}_threads": row["images_per_s"] / whole,
                    "cpu_ms_per_request": cpu_ms,
                    "rss_mb": {name: m[-1] for name, m in memory.items()},
                }
                report["runs"].append(row)
                print(
                    f"batching {batching:>3}  round {round_}  c={concurrency:<3} x{images:<2} "
                    f"{row['images_per_s']:6.1f} images/s  "
                    f"p50 {row['p50_ms']:5.0f} ms  p95 {row['p95_ms']:5.0f} ms  p99 {row['p99_ms']:5.0f} ms  errors "
                    f"{row['errors']}  "
                    f"ratio {row['ratio_to_in_process']:.2f} (to {threads} threads "
                    f"{row[f'ratio_to_{threads}_threads']:.2f})  "
                    f"CPU ms/request: {', '.join(f'{name} {ms:.1f}' for name, ms in cpu_ms.items())}",
                    flush=True,
                )
        report[f"rss_mb_batching_{batching}"] = memory
        # L4's budget, from the same run: at concurrency c a single outline's p95 is within c times its p50 alone
        # (no request waits longer than every other client's served before it, one by one).
        mine = [r for r in report["runs"] if r["batching"] == batching and r["images_per_request"] == 1]
        alone = np.median([r["p50_ms"] for r in mine if r["concurrency"] == 1])
        mine = [r for r in mine if r["concurrency"] > 1]
        for r in mine:
            r["p95_budget_ms"] = r["concurrency"] * alone
        print(
            f"p95 budget (concurrency x {alone:.0f} ms alone): "
            + ", ".join(f"c={r['concurrency']} {r['p95_ms']:.0f} of {r['p95_budget_ms']:.0f} ms" for r in mine)
            + f": {'within' if all(r['p95_ms'] <= r['p95_budget_ms'] for r in mine) else 'NOT within'}"
        )
        if batching == "on":
            full = report["full_queue"] = asyncio.run(full_queue(url, replicas, cfg))
            print(
                f"every slot taken: {full['requests']} requests at once, each a {full['image']} outline "
                f"({full['png_bytes']} bytes of PNG), "
                f"{full['ok']} answered 200; RSS idle -> peak: "
                + ", ".join(
                    f"{name} {full[f'{name}_idle_rss_mb']:.0f} -> {full[f'{name}_peak_rss_mb']:.0f} MB"
                    for name in replicas
                ),
                flush=True,
            )
        for name, m in memory.items():
            print(
                f"{name} memory after warm-up, then after each level: {' -> '.join(f'{v:.0f}' for v in m)} MB; "
                f"end of each round vs warm-up: {', '.join(f'{v - m[0]:+.0f}' for v in m[:: len(levels)][1:])} MB"
            )
        serve.delete("load")
    serve.shutdown()
    ray.shutdown()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
