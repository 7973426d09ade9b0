"""A soak of the Serve application: mixed good and bad requests at the replicas' capacity for ten minutes.

    python bench/serve_soak.py --checkpoint runs/first/best [--minutes 10] [--concurrency 8]

``concurrency`` clients send, without pause, a fixed mix: single outlines in several colours and sizes,
16-outline requests, and bad requests (unknown colours, corrupt images, malformed JSON, oversized bodies,
wrong content types). It reports, per minute, requests answered, good requests that failed, bad requests
that got anything but their 4xx, the p95 latency of good single-outline requests, the RSS, open file
descriptors and threads of the ingress and model replicas (found through Ray's state API), the CPU
seconds each of them, Serve's proxy and the client used that minute (each minute counts exactly sixty
seconds of answers). At the end, for each process, the CPU milliseconds per
request in the second minute and the last, by thread: a server that slows down shows it in its own threads,
a machine that slows down shows it in the client's request loop as well, whose work per request is fixed.

Before the soak, one client alone measures each kind's latency. The p95 budget of a single outline is its
own latency plus the ``concurrency - 1`` requests ahead of it in the mix's order, each served alone, one by
one: the 95th percentile of that sum over the mix's positions (no request waits longer than if every other
client's request were served before it; a 16-outline request ahead costs sixteen outlines). The verdict:
0 failed good requests, 0 bad requests answered other than 4xx, every minute's p95 within the budget, RSS
after the first minute within 5% of that minute's, and file descriptors and threads back to the first
minute's count or below.
Writes bench/results/serve_soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import math
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image
from serve_load import actor_process, start_serve  # bench/ is on the path when run as a script

from polycolor import synth
from polycolor.serve import ServeConfig, application

ROOT = Path(__file__).resolve().parents[1]
REPLICAS = ("ingress", "model")  # what the verdict judges; the client and Serve's proxy are sampled too


def png_of(outline: np.ndarray, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.where(outline, 0, 255).astype(np.uint8)).resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def request_mix(limit_bytes: int) -> list[tuple[str, dict, bool]]:
    """(label, httpx.post keyword arguments, whether it is good) for each kind of request in the mix."""
    outlines = synth.generate(4, seed=11).outlines
    good = [png_of(o, size) for o, size in zip(outlines, (128, 96, 256, 200))]
    b64 = base64.b64encode(good[0]).decode()
    return [
        *(
            (f"single {i}", {"files": {"image": ("o.png", g)}, "data": {"color": colour}}, True)
            for i, (g, colour) in enumerate(zip(good, ("red", "teal", "#ff8800", "navy blue")))
        ),
        ("json original size", {"json": {"image": b64, "color": "green", "size": "original"}}, True),
        (
            "16 outlines",
            {"files": [("image", (f"{i}.png", good[i % 4])) for i in range(16)], "data": {"color": "purple"}},
            True,
        ),
        ("unknown colour", {"files": {"image": ("o.png", good[0])}, "data": {"color": "no such colour"}}, False),
        ("corrupt image", {"files": {"image": ("o.png", good[0][:60])}, "data": {"color": "red"}}, False),
        ("malformed JSON", {"content": b'{"image": ', "headers": {"content-type": "application/json"}}, False),
        (
            "oversized body",
            {"content": b"0" * (limit_bytes + 1), "headers": {"content-type": "application/json"}},
            False,
        ),
        ("wrong content type", {"content": b"image=1", "headers": {"content-type": "text/plain"}}, False),
    ]


async def alone(url: str, mix: list, requests: int = 10) -> list[float]:
    """The median latency of each kind of request in ``mix`` from one client with nothing else in flight."""
    medians = []
    async with httpx.AsyncClient(timeout=60) as client:
        for label, kwargs, good in mix:
            latencies = []
            for _ in range(requests):
                start = time.perf_counter()
                answer = await client.post(url, **kwargs)
                latencies.append(time.perf_counter() - start)
                if good != (answer.status_code == 200):
                    raise RuntimeError(f"{label}: answered {answer.status_code} alone")
            medians.append(float(np.median(latencies)))
    return medians


def p95_budget(mix: list, latencies: list[float], concurrency: int) -> float:
    """A single outline alone, plus the ``concurrency - 1`` requests ahead of it in the mix's order served alone
    one by one: the 95th percentile over the mix's positions."""
    ahead = [sum(latencies[(start + k) % len(mix)] for k in range(concurrency - 1)) for start in range(len(mix))]
    return latencies[0] + float(np.percentile(ahead, 95))


def sample(processes: dict[str, psutil.Process]) -> dict:
    """Each process's RSS, open descriptors, threads and CPU seconds used so far, in all and by thread name."""
    return {
        name: {
            "rss_mb": p.memory_info().rss / 2**20,
            "fds": p.num_fds(),
            "threads": p.num_threads(),
            "cpu_s": sum(p.cpu_times()[:2]),
            "thread_cpu_s": thread_cpu(p),
        }
        for name, p in processes.items()
    }


def thread_cpu(process: psutil.Process) -> dict[str, float]:
    """CPU seconds used so far by each thread name of ``process`` (threads of one name summed)."""
    used: dict[str, float] = {}
    for thread in process.threads():
        try:
            name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
        except OSError:  # ended since
            continue
        used[name] = used.get(name, 0.0) + thread.user_time + thread.system_time
    return used


def cost_shift(rows: list[dict], processes, top: int = 3) -> str:
    """Where each process's CPU per request grew from the second minute (the first is warm-up) to the last:
    the thread names whose CPU milliseconds per request rose most."""

    def per_request(before: dict, after: dict, name: str) -> dict[str, float]:
        was, now = before[name]["thread_cpu_s"], after[name]["thread_cpu_s"]
        return {t: (now[t] - was.get(t, 0.0)) * 1000 / after["answered"] for t in now}

    lines = []
    for name in processes:
        first, last = per_request(rows[0], rows[1], name), per_request(rows[-2], rows[-1], name)
        grown = sorted(last, key=lambda t: last[t] - first.get(t, 0.0), reverse=True)[:top]
        shown = ", ".join(f"{t} {first.get(t, 0.0):.2f} -> {last[t]:.2f}" for t in grown)
        lines.append(
            f"  {name}: {sum(first.values()):.2f} -> {sum(last.values()):.2f} CPU ms per request; most grown: {shown}"
        )
    return "\n".join(lines)


async def soak(
    url: str, mix: list, minutes: float, concurrency: int, processes: dict[str, psutil.Process]
) -> list[dict]:
    """Per minute: requests answered, good requests failed, bad requests not answered 4xx, good p95, and a sample
    of each replica taken at the minute's end."""
    minutes_done: list[dict] = []
    kinds = itertools.cycle(mix)
    window = {"answered": 0, "good_failed": 0, "bad_not_4xx": 0, "latencies": []}
    began = time.perf_counter()
    deadline = began + minutes * 60
    start_cpu = {n: now["cpu_s"] for n, now in sample(processes).items()}

    async def user(client: httpx.AsyncClient):
        while time.perf_counter() < deadline:
            label, kwargs, good = next(kinds)
            start = time.perf_counter()
            try:
                answer = await client.post(url, **kwargs)
                status = answer.status_code
            except httpx.TransportError:
                status = 0
            window["answered"] += 1
            if good:
                window["good_failed"] += status != 200 or (
                    label == "16 outlines" and any("error" in item for item in answer.json())
                )
                if label.startswith("single"):
                    window["latencies"].append(time.perf_counter() - start)
            else:
                window["bad_not_4xx"] += not 400 <= status < 500

    async def clock():
        # Windows end on fixed marks (the last at the deadline), and each is counted before the sampling, so every
        # full minute counts exactly sixty seconds of answers.
        for mark in range(1, math.ceil(minutes) + 1):
            end = min(began + 60 * mark, deadline)
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            row = {k: window[k] for k in ("answered", "good_failed", "bad_not_4xx")} | {
                "seconds": end - began - 60 * (mark - 1)
            }
            row["good_single_p95_ms"] = (
                float(np.percentile(window["latencies"], 95) * 1000) if window["latencies"] else None
            )
            window.update(answered=0, good_failed=0, bad_not_4xx=0, latencies=[])
            row |= sample(processes)
            minutes_done.append(row)
            used = {
                n: row[n]["cpu_s"] - (minutes_done[-2][n]["cpu_s"] if len(minutes_done) > 1 else start_cpu[n])
                for n in processes
            }
            replicas = ", ".join(
                f"{n} {row[n]['rss_mb']:.0f} MB {row[n]['fds']} fds {row[n]['threads']} threads {used[n]:.0f} CPU s"
                for n in processes
            )
            print(
                f"minute {len(minutes_done):>2}: {row['answered']} answered in {row['seconds']:.0f} s, good failed "
                f"{row['good_failed']}, "
                f"bad not 4xx {row['bad_not_4xx']}, good p95 {row['good_single_p95_ms'] or 0:.0f} ms; {replicas}",
                flush=True,
            )

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(clock(), *(user(client) for _ in range(concurrency)))
    return minutes_done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="clients sending without pause (the replica's capacity here: see serve_load)",
    )
    args = parser.parse_args()

    import ray
    from ray import serve

    port = start_serve()
    cfg = ServeConfig(checkpoint=args.checkpoint)
    serve.run(application(cfg), name="soak", route_prefix="/")
    processes = {
        "client": psutil.Process(),
        "proxy": actor_process("ProxyActor"),
        "ingress": actor_process("ServeReplica:soak:Ingress"),
        "model": actor_process("ServeReplica:soak:Model"),
    }
    url, mix = f"http://127.0.0.1:{port}/colorize", request_mix(int(cfg.max_body_mb * 2**20))
    try:
        latencies = asyncio.run(alone(url, mix))
        budget_ms = p95_budget(mix, latencies, args.concurrency) * 1000
        shown = ", ".join(f"{label} {t * 1000:.0f}" for (label, _, _), t in zip(mix, latencies))
        print(
            f"one client alone (ms): {shown}; single-outline p95 budget at concurrency {args.concurrency}: "
            f"{budget_ms:.0f} ms",
            flush=True,
        )
        rows = asyncio.run(soak(url, mix, args.minutes, args.concurrency, processes))
    finally:
        serve.shutdown()
        ray.shutdown()
    first, later = rows[0], rows[1:]
    verdict = {
        "alone_ms": {label: t * 1000 for (label, _, _), t in zip(mix, latencies)},
        "p95_budget_ms": budget_ms,
        "worst_p95_ms": max(r["good_single_p95_ms"] or 0 for r in rows),
        "good_failed": sum(r["good_failed"] for r in rows),
        "bad_not_4xx": sum(r["bad_not_4xx"] for r in rows),
        "rss_drift": {
            n: max(abs(r[n]["rss_mb"] / first[n]["rss_mb"] - 1) for r in later) if later else None for n in REPLICAS
        },
        "fds_growth": {n: later[-1][n]["fds"] - first[n]["fds"] if later else None for n in REPLICAS},
        "threads_growth": {n: later[-1][n]["threads"] - first[n]["threads"] if later else None for n in REPLICAS},
    }
    held = (
        verdict["good_failed"] == 0
        and verdict["bad_not_4xx"] == 0
        and bool(later)
        and verdict["worst_p95_ms"] <= budget_ms
        and all(d <= 0.05 for d in verdict["rss_drift"].values())
        and all(g <= 0 for g in (*verdict["fds_growth"].values(), *verdict["threads_growth"].values()))
    )
    print(
        f"{sum(r['answered'] for r in rows)} requests in {args.minutes:g} min; good failed "
        f"{verdict['good_failed']}, bad not 4xx {verdict['bad_not_4xx']}; "
        f"worst p95 {verdict['worst_p95_ms']:.0f} ms (budget {budget_ms:.0f}); "
        "RSS drift after minute 1: "
        f"{', '.join(f'{n} {d:.1%}' for n, d in verdict['rss_drift'].items() if d is not None)}; "
        f"fds {verdict['fds_growth']}, threads {verdict['threads_growth']} (last minute vs first): "
        f"{'held' if held else 'NOT held'}"
    )
    if len(rows) >= 3:
        print("CPU per request, second minute -> last, by thread:\n" + cost_shift(rows, processes), flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_soak.json").write_text(json.dumps({"minutes": rows, "verdict": verdict, "held": held}, indent=2))
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
