"""Bounded load generator for a local amskv server: N generate requests from C concurrent clients.

    python scripts/loadgen.py --url http://127.0.0.1:8000 --requests 500 --concurrency 64

Prints one JSON object: status counts, error codes, transport failures, latency p50/p95/p99 and
images/s. Bounded on purpose: loopback URLs only, a fixed number of requests, a per-request timeout
and a total time limit after which no new request is sent. Each request is sent once (a 503 is an
outcome, not retried); with --backoff a client that got a 503 waits its Retry-After (capped) before
its next request, as a polite client would. Exit status: 0 when every request got 200 or a 503 with
Retry-After, 1 when any request was lost (timed out, reset) or got anything else.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

GENERATE_PATH = "/v1/generate"


@dataclass
class Outcome:
    """One request's fate. `status` is None when no HTTP response came back."""

    status: int | None
    latency_s: float
    images: int = 0
    code: str | None = None  # the error envelope's code, for non-200 answers
    retry_after: str | None = None
    failure: str | None = None  # "refused" (never connected), or the exception name of a lost request


def loopback_base(url: str) -> str:
    """The URL without trailing slash; refuses anything that is not a loopback HTTP address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url must be an http(s) URL, got {url!r}")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--url must point at a loopback host (127.0.0.0/8, ::1, localhost), got {host!r}")
    return url.rstrip("/")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def request_body(index: int, images_per_request: int, num_classes: int) -> dict:
    return {"class_labels": [index % num_classes], "n": images_per_request, "seed": index}


async def send_one(client: httpx.AsyncClient, url: str, body: dict, timeout_s: float) -> Outcome:
    began = time.perf_counter()
    try:
        response = await client.post(url, json=body, timeout=timeout_s)
    except httpx.ConnectError:
        return Outcome(None, time.perf_counter() - began, failure="refused")
    except httpx.HTTPError as exc:  # read timeout, reset, server closed mid-request: the request is lost
        return Outcome(None, time.perf_counter() - began, failure=type(exc).__name__)
    latency = time.perf_counter() - began
    if response.status_code == 200:
        return Outcome(200, latency, images=len(response.json()["data"]))
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "no_envelope"
    return Outcome(response.status_code, latency, code=code, retry_after=response.headers.get("retry-after"))


async def run_load(url: str, *, requests: int, concurrency: int, timeout_s: float, max_time_s: float,
                   images_per_request: int = 1, num_classes: int = 10, backoff_cap_s: float = 0.0,
                   keepalive: bool = True) -> dict:
    """Send `requests` requests from `concurrency` clients; returns the summary (see `summarize`)."""
    base = loopback_base(url)
    next_index = iter(range(requests))
    outcomes: list[Outcome] = []
    stop_sending_at = time.monotonic() + max_time_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency if keepalive else 0)
    headers = {} if keepalive else {"Connection": "close"}

    async def client_loop(client: httpx.AsyncClient) -> None:
        for index in next_index:  # the shared iterator hands each index to exactly one client
            if time.monotonic() >= stop_sending_at:
                return
            outcome = await send_one(client, base + GENERATE_PATH,
                                     request_body(index, images_per_request, num_classes), timeout_s)
            outcomes.append(outcome)
            if outcome.failure == "refused":
                return  # the server is gone (e.g. after SIGTERM); this client stops
            if outcome.status == 503 and backoff_cap_s > 0:
                await asyncio.sleep(min(float(outcome.retry_after or 1), backoff_cap_s))

    began = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, headers=headers) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return summarize(outcomes, time.perf_counter() - began, requests=requests, concurrency=concurrency)


def summarize(outcomes: list[Outcome], wall_s: float, *, requests: int, concurrency: int) -> dict:
    statuses: dict[str, int] = {}
    codes: dict[str, int] = {}
    failures: dict[str, int] = {}
    for outcome in outcomes:
        key = str(outcome.status) if outcome.status is not None else "none"
        statuses[key] = statuses.get(key, 0) + 1
        if outcome.code:
            codes[outcome.code] = codes.get(outcome.code, 0) + 1
        if outcome.failure:
            failures[outcome.failure] = failures.get(outcome.failure, 0) + 1
    ok = [o.latency_s for o in outcomes if o.status == 200]
    answered = [o.latency_s for o in outcomes if o.status is not None]
    images = sum(o.images for o in outcomes)
    refused = failures.get("refused", 0)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "sent": len(outcomes),
        "not_sent": requests - len(outcomes),
        "status_counts": dict(sorted(statuses.items())),
        "error_codes": dict(sorted(codes.items())),
        "refused": refused,
        "lost": sum(failures.values()) - refused,
        "failures": failures,
        "unexpected_status": sum(1 for o in outcomes if o.status not in (None, 200, 503)),
        "missing_retry_after": sum(1 for o in outcomes if o.status == 503 and not o.retry_after),
        "images": images,
        "wall_s": round(wall_s, 3),
        "images_per_s": round(images / wall_s, 3) if wall_s > 0 else None,
        "latency_s": {name: _round(percentile(ok, q)) for name, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "latency_all_answers_s": {name: _round(percentile(answered, q))
                                  for name, q in (("p50", 50), ("p95", 95), ("p99", 99))},
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def healthy(summary: dict) -> bool:
    """Every sent request got 200 or a 503 carrying Retry-After; nothing lost or unexpected."""
    return summary["lost"] == 0 and summary["unexpected_status"] == 0 and summary["missing_retry_after"] == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    parser.add_argument("--requests", type=int, default=500, help="total requests (each sent once)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (1..256)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    parser.add_argument("--max-time", type=float, default=600.0, help="no new request after this many seconds")
    parser.add_argument("--images-per-request", type=int, default=1, help="the request's n (one label each)")
    parser.add_argument("--num-classes", type=int, default=10, help="labels cycle over 0..num_classes-1")
    parser.add_argument("--backoff", type=float, default=0.0, metavar="CAP_S",
                        help="after a 503, wait its Retry-After, at most CAP_S seconds (0 = no wait)")
    parser.add_argument("--no-keepalive", action="store_true", help="a new connection per request")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests must be 1..100000 and --concurrency 1..256")
    if args.timeout <= 0 or args.max_time <= 0:
        parser.error("--timeout and --max-time must be positive")
    try:
        loopback_base(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    summary = asyncio.run(run_load(args.url, requests=args.requests, concurrency=args.concurrency,
                                   timeout_s=args.timeout, max_time_s=args.max_time,
                                   images_per_request=args.images_per_request, num_classes=args.num_classes,
                                   backoff_cap_s=args.backoff, keepalive=not args.no_keepalive))
    print(json.dumps(summary, indent=2))
    return 0 if healthy(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
