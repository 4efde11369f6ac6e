"""The label server under load: N annotators at once against one real `rlhfkit label serve` process,
each looping "submit an answer + get the next item" (POST /api/labels, one round trip), on SQLite and
on PostgreSQL. Prints labels/s and the round trip's latency percentiles per backend, as a table.

    python benchmarks/label_load.py                                  # both backends, 100,000 items, 50 x 200
    python benchmarks/label_load.py --backend sqlite --seconds 60    # each client labels for 60 s instead
    python benchmarks/label_load.py --smoke --backend sqlite         # tiny: 1,000 items, 5 clients x 20

The project is created directly (Store.create with parsed rows: compare items, overlap 1); the server
runs as a subprocess (`python -m rlhfkit label serve DB --quiet`), the clients are threads with one
httpx.Client each (tests/label_load.py), all on 127.0.0.1. PostgreSQL is a throw-away cluster started
from the local binaries (tests/label_services.PostgresServer, fsync off as in the tests); it is
stopped and removed afterwards. Every run is checked at the end: each acknowledged label stored once.

Two ways to load it: closed loop (default: each client sends its next answer as soon as the last one
is answered: the most the server can take, with 50 requests always waiting, so latency = 50 / rate),
and paced (`--rate R`: R labels/s offered over all clients on a fixed schedule: the latency people see
at that load). Clients use a light http.client connection by default (`--client httpx` for the tests'
client, which costs the shared CPU about as much as the server does).

Columns: `labels/s` over the whole run; `sustained` over the middle 80% of the answers (no ramp-up,
no stragglers); p50/p95/p99 of the submit+next round trip seen by the clients; `server CPU` the
server process's CPU time per label (and, for PostgreSQL, the database's); `retries` connection
errors and 5xx answers retried. Clients and server share this machine's cores: the numbers are a
floor for the server alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.label_load import LoadClient, check_labels, drain, percentile, run_clients, summary  # noqa: E402
from tests.label_server import LabelServer  # noqa: E402


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime of a process (+ its reaped children's with `children`), from /proc; 0 if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def postgres_cpu(data_dir: Path) -> float:
    """CPU seconds of a PostgreSQL cluster: the postmaster, its live backends and the reaped ones."""
    try:
        master = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total = cpu_seconds(master, children=True)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == master:
                total += cpu_seconds(int(entry.name))
    return total


def create_project(target: str, n_items: int) -> float:
    """A compare project with n_items items (overlap 1); the seconds it took."""
    from rlhfkit.data.sources import Row
    from rlhfkit.label.items import Settings, parse_rows
    from rlhfkit.label.store import Store

    start = time.perf_counter()
    settings = Settings(kind="compare", overlap=1)
    rows = [Row(f"row {i + 1}", {"prompt": f"Question {i}: which answer is better?",
                                 "responses": [f"answer {i} (first)", f"answer {i} (second)"]}) for i in range(n_items)]
    Store.create(target, settings, parse_rows(rows, settings, "benchmark rows")).close()
    return time.perf_counter() - start


def run_backend(backend: str, a: argparse.Namespace, workdir: Path) -> dict:
    pg = None
    if backend == "postgres":
        from tests.label_services import PostgresServer, find_pg_bindir

        bindir, why = find_pg_bindir()
        if bindir is None:
            raise SystemExit(f"--backend postgres: {why}")
        pg = PostgresServer(bindir)
        pg.start()
    try:
        target = pg.new_database("label_bench") if pg else str(workdir / "bench.db")
        created = create_project(target, a.items)
        print(f"{backend}: created {a.items} items in {created:.1f} s", file=sys.stderr)
        with LabelServer(target) as srv:
            log = drain(srv)
            interval = a.clients / a.rate if a.rate else 0.0
            clients = [LoadClient(f"bench{i}", srv.add_annotator(f"bench{i}"), srv.url, resend_every=a.resend_every,
                                  transport=a.client, interval=interval) for i in range(a.clients)]
            for c in clients:  # every client holds its first task before the clock starts
                c.task = c.next_task()
            stop = threading.Event()
            per_client = a.labels_per_client if a.seconds is None else 10**9
            timer = None
            if a.seconds is not None:
                timer = threading.Timer(a.seconds, stop.set)
            server_cpu0 = cpu_seconds(srv.proc.pid)
            db_cpu0 = postgres_cpu(pg.data) if pg else 0.0
            if timer is not None:
                timer.start()
            def work(c: LoadClient) -> None:
                if interval:  # spread the clients' schedules over one interval
                    time.sleep(interval * int(c.name.removeprefix("bench")) / a.clients)
                c.label(per_client, stop=stop)

            seconds = run_clients(clients, work, timeout=(a.seconds or 0) + 900)
            stop.set()
            server_cpu = cpu_seconds(srv.proc.pid) - server_cpu0
            db_cpu = postgres_cpu(pg.data) - db_cpu0 if pg else 0.0
            labels = sum(c.submitted for c in clients)
            for c in clients:
                c.close()
            if not a.no_check:
                check_labels(target, clients, expected=labels, overlap=1, exact=True)
            errors = [line for line in log if "Traceback" in line or "ERROR" in line]
    finally:
        if pg is not None:
            pg.stop()
    lat = [x for c in clients for x in c.latencies]
    done_at = sorted(t for c in clients for t in c.done_at)
    sustained = float("nan")
    if len(done_at) >= 10:
        lo, hi = len(done_at) // 10, (len(done_at) * 9) // 10
        if done_at[hi] > done_at[lo]:
            sustained = (hi - lo) / (done_at[hi] - done_at[lo])
    counts = summary(clients)
    return {"backend": backend, "items": a.items, "clients": a.clients, "labels": labels, "seconds": seconds,
            "rate": labels / seconds if seconds else float("nan"), "sustained": sustained,
            "p50": 1000 * percentile(lat, 50), "p95": 1000 * percentile(lat, 95), "p99": 1000 * percentile(lat, 99),
            "server_cpu_ms": 1000 * server_cpu / max(labels, 1), "db_cpu_ms": 1000 * db_cpu / max(labels, 1),
            "retries": counts["retried"], "server_errors": len(errors)}


def table(results: list[dict]) -> str:
    head = ("| backend | items | clients | labels | seconds | labels/s | sustained | p50 ms | p95 ms | p99 ms "
            "| server CPU ms/label | DB CPU ms/label | retries |")
    lines = [head, "| --- " + "| ---: " * 12 + "|"]
    for r in results:
        db = f"{r['db_cpu_ms']:.1f}" if r["backend"] == "postgres" else "-"
        lines.append(f"| {r['backend']} | {r['items']} | {r['clients']} | {r['labels']} | {r['seconds']:.1f} "
                     f"| {r['rate']:.0f} | {r['sustained']:.0f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} "
                     f"| {r['server_cpu_ms']:.1f} | {db} | {r['retries']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--clients", type=int, default=50, help="concurrent annotators (threads)")
    p.add_argument("--items", type=int, default=100_000, help="items in the project")
    p.add_argument("--labels-per-client", type=int, default=200, help="answers each client submits")
    p.add_argument("--seconds", type=float, default=None,
                   help="label for this long instead of --labels-per-client answers each")
    p.add_argument("--resend-every", type=int, default=0,
                   help="send every n-th answer twice with the same submission id (0: never)")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="raw: http.client keep-alive (light, leaves the CPU to the server); httpx: as the tests")
    p.add_argument("--rate", type=float, default=0.0,
                   help="offered load in labels/s over all clients, paced on a fixed schedule (0: as fast as "
                        "answers come back)")
    p.add_argument("--smoke", action="store_true", help="tiny run: 1,000 items, 5 clients x 20 labels")
    p.add_argument("--no-check", action="store_true", help="skip the end check (each answer stored once)")
    a = p.parse_args(argv)
    if a.smoke:
        a.items, a.clients, a.labels_per_client, a.seconds = 1000, 5, 20, None
    if a.seconds is None and a.clients * (a.labels_per_client + 1) > a.items:
        p.error(f"--items {a.items}: fewer than --clients x (--labels-per-client + 1) = "
                f"{a.clients * (a.labels_per_client + 1)}")
    backends = ["sqlite", "postgres"] if a.backend == "both" else [a.backend]
    results = []
    with tempfile.TemporaryDirectory(prefix="rlhfkit-label-bench-") as tmp:
        for backend in backends:
            results.append(run_backend(backend, a, Path(tmp)))
            r = results[-1]
            print(f"{backend}: {r['labels']} labels in {r['seconds']:.1f} s", file=sys.stderr)
    each = f"{a.seconds:g} s each" if a.seconds else f"{a.labels_per_client} labels each"
    pace = f"offered {a.rate:g} labels/s" if a.rate else "closed loop (next request as soon as the answer is back)"
    print(f"label server load: {a.clients} clients ({a.client}), submit + next item per round trip, {each}, {pace}, "
          f"{os.cpu_count()} CPUs")
    print(table(results))
    bad = [r for r in results if r["server_errors"]]
    for r in bad:
        print(f"{r['backend']}: the server logged {r['server_errors']} error lines", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
