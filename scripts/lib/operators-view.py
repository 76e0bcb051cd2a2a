#!/usr/bin/env python3
"""Measures what the operators' side costs a loaded collector (run by
`scripts/bench dashboard`): collector CPU with no dashboard open, then with
DASHBOARDS live streams (`/v1/stream`, the page a browser opens first) open
for the same window, then DASHBOARDS streams of different pages, the bytes
each stream carries after its first event,
and `/metrics` and `GET /v1/devices`: bytes and time per request.

Usage: [ROUNDS=3] operators-view.py ADMIN_URL TOKEN COLLECTOR_PID [DASHBOARDS] [WINDOW_S]
The three CPU windows alternate for ROUNDS rounds; the figures are medians.
Prints one JSON object.
"""
import http.client
import json
import os
import statistics
import sys
import threading
import time
import urllib.parse

admin, token, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
dashboards = int(sys.argv[4]) if len(sys.argv) > 4 else 5
window = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
tick = os.sysconf("SC_CLK_TCK")
host = urllib.parse.urlparse(admin).netloc


def cpu_seconds():
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


def request(path):
    """GET path: (bytes, seconds to the last byte)."""
    t0 = time.monotonic()
    c = http.client.HTTPConnection(host, timeout=60)
    c.request("GET", path, headers={"Authorization": "Bearer " + token})
    r = c.getresponse()
    body = r.read()
    took = time.monotonic() - t0
    c.close()
    if r.status != 200:
        raise SystemExit(f"GET {path}: HTTP {r.status}: {body[:200]!r}")
    return len(body), took


def follow(path, until, out):
    """Reads an SSE stream until `until` (monotonic): first event size and
    time, then the bytes and events after it."""
    t0 = time.monotonic()
    c = http.client.HTTPConnection(host, timeout=10)
    c.request("GET", path, headers={"Authorization": "Bearer " + token})
    r = c.getresponse()
    buf, first, after, events, kinds = b"", None, 0, 0, {}
    while time.monotonic() < until:
        try:
            data = r.read1(65536)
        except TimeoutError:
            continue
        if not data:
            break
        if first is None:
            buf += data
            end = buf.find(b"\n\n")
            if end < 0:
                continue
            first = {"bytes": end + 2, "seconds": time.monotonic() - t0}
            after += len(buf) - end - 2
        else:
            after += len(data)
            for line in data.split(b"\n"):
                if line.startswith(b"event:"):
                    events += 1
                    k = line[6:].strip().decode()
                    kinds[k] = kinds.get(k, 0) + 1
    c.close()
    out.append({"first": first, "bytes_after_first": after, "events_after_first": events, "kinds": kinds})


def no_dashboard():
    """Collector cores over the window with no dashboard open."""
    c0, t0 = cpu_seconds(), time.monotonic()
    time.sleep(window)
    c1, t1 = cpu_seconds(), time.monotonic()
    return (c1 - c0) / (t1 - t0)


def open_streams(paths):
    """Streams of `paths` open for the window: (collector cores, stats)."""
    streams = []
    start = time.monotonic()
    until = start + window + 3
    threads = [threading.Thread(target=follow, args=(p, until, streams)) for p in paths]
    for t in threads:
        t.start()
    time.sleep(3)  # first events delivered; measure the steady state
    c0, t0 = cpu_seconds(), time.monotonic()
    time.sleep(max(0.0, until - time.monotonic()))
    c1, t1 = cpu_seconds(), time.monotonic()
    for t in threads:
        t.join()
    seconds = until - start
    ok = [s for s in streams if s["first"]]
    return (c1 - c0) / (t1 - t0), {
        "first_event_bytes": statistics.median(s["first"]["bytes"] for s in ok),
        "first_event_seconds": max(s["first"]["seconds"] for s in ok),
        "bytes_per_sec_after_first": statistics.median(s["bytes_after_first"] / (seconds - s["first"]["seconds"]) for s in ok),
        "events_per_sec_after_first": statistics.median(s["events_after_first"] / (seconds - s["first"]["seconds"]) for s in ok),
        "event_kinds": ok[0]["kinds"] if ok else {},
    }


# 1-2. ROUNDS rounds of three windows: no dashboard, DASHBOARDS streams of
# the first page (what a browser opens first), DASHBOARDS streams of as many
# different pages (nothing shared but the fleet-wide counts). The windows
# alternate and each figure is the median over the rounds: this machine's
# speed drifts by ±10-15 % within minutes, as much as the effect measured,
# and one window of each in a row would read that drift as the dashboards'.
rounds = int(os.environ.get("ROUNDS", "3"))
idle, opened, apart_runs = [], [], []
for _ in range(rounds):
    idle.append(no_dashboard())
    opened.append(open_streams(["/v1/stream"] * dashboards))
    apart_runs.append(open_streams(["/v1/stream?offset=%d" % (100 * i) for i in range(dashboards)]))
idle_cores = statistics.median(idle)
open_cores = statistics.median(c for c, _ in opened)
apart_cores = statistics.median(c for c, _ in apart_runs)
same, apart = opened[-1][1], apart_runs[-1][1]

# 3. /metrics and the full device list, one request at a time.
metrics = [request("/metrics") for _ in range(5)]
devices = [request("/v1/devices") for _ in range(3)]
page = [request("/v1/fleet") for _ in range(5)]

print(json.dumps({
    "dashboards": dashboards,
    "window_seconds": window,
    "rounds": rounds,
    "cores_by_round": {"none": idle, "same_page": [c for c, _ in opened], "five_pages": [c for c, _ in apart_runs]},
    "cores_no_dashboard": idle_cores,
    "cores_with_dashboards": open_cores,
    "cores_with_dashboards_apart": apart_cores,
    "stream_first_event_bytes": same["first_event_bytes"],
    "stream_first_event_seconds": same["first_event_seconds"],
    "stream_bytes_per_sec_after_first": same["bytes_per_sec_after_first"],
    "stream_events_per_sec_after_first": same["events_per_sec_after_first"],
    "stream_event_kinds": same["event_kinds"],
    "stream_apart_bytes_per_sec_after_first": apart["bytes_per_sec_after_first"],
    "metrics_bytes": metrics[-1][0],
    "metrics_seconds_median": statistics.median(t for _, t in metrics),
    "metrics_seconds_max": max(t for _, t in metrics),
    "devices_json_bytes": devices[-1][0],
    "devices_json_seconds_median": statistics.median(t for _, t in devices),
    "fleet_page_bytes": page[-1][0],
    "fleet_page_seconds_median": statistics.median(t for _, t in page),
}))
