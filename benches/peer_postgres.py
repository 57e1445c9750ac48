#!/usr/bin/env python3
"""Peer comparison: kpi-service against raw sled and "a table in PostgreSQL plus GROUP BY".

One run measures the three sides on the same generated data, one after the other (each
alone on the machine), and prints every side and the ratios, as a table and as one JSON
line:

  kpi-service  `kpi-load generate` writes the workload as CSV; a fresh `kpi-server`
               (release build, empty data directory, durable defaults) gets the same
               measurements from `kpi-load ingest` (batches of --batch, --producers
               streams); `kpi-load query` asks GetAggregates for 24 monthly buckets of
               one SUM KPI, --query-requests times with --query-concurrency in flight.
  raw sled     after kpi-server has stopped and before PostgreSQL starts: `kpi-load sled`
               writes the same measurements into a fresh sled database (one key per
               measurement, its protobuf encoding as the value, an apply_batch and a
               flush per --batch, from --producers threads), the most direct durable
               code on the store the service uses; then it answers the same 24 monthly
               buckets by a full scan decoding every value, --sled-queries times, one
               at a time (no index: the baseline writes no code beyond the scan).
  PostgreSQL   a private cluster (initdb into a temp dir, 127.0.0.1 only, fsync=on,
               synchronous_commit=on) with one table
                 measurements(kpi_id, occurred_at, value, channel, subject)
               and its indexes created before the load; the same measurements.csv is
               loaded with COPY FROM STDIN, by default in --batch-row transactions from
               --producers connections (each batch committed durably, as ours), then
               ANALYZE; the same 24 monthly buckets are asked with
                 SELECT date_trunc('month', occurred_at, <KPI timezone>), sum(value), count(*)
                 ... WHERE kpi_id = $1 AND occurred_at >= $2 AND occurred_at < $3
                 GROUP BY 1 ORDER BY 1
               by pgbench (C client, prepared statement, after a warm-up) with the same
               concurrency and request count.

The answers are compared bucket by bucket with kpi-service's (count exact, sum within
1e-6 relative); a disagreement is reported loudly and the script exits with status 2.
Ratios are written so that above 1 means kpi-service does better: throughput
ours/other, latency and disk other/ours.

The script installs what it lacks: PostgreSQL server binaries (apt-get) when none are
found, and the Python packages psycopg (PostgreSQL client) and grpcio-tools (to read
kpi-server's answer through stubs generated from proto/ at run time) with pip. Run as
root, the cluster belongs to the `postgres` user (created when missing). Everything
lives in one temporary directory, removed at the end unless --keep (the sled database
is removed as soon as it is measured, to leave the disk to PostgreSQL); kpi-server and
PostgreSQL are stopped on exit, also after Ctrl-C or an error.

Not part of CI. Figures and caveats: BENCHMARKS.md, "Peer comparison: raw sled and
PostgreSQL".
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import importlib
import json
import math
import os
import platform
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

REPO_ROOT = Path(__file__).resolve().parent.parent

# A fixed default end keeps runs reproducible; it must not lie in the future, since
# kpi-server rejects measurements more than a few minutes ahead of its clock. It is
# midnight of 1 November 2026 in Europe/Amsterdam (the workload's usual zone), so the 24
# monthly buckets before it are whole months of data (November 2024 to October 2026).
DEFAULT_END = "2026-10-31T23:00:00Z"

# Targets from issue 6: ingest at least 5x PostgreSQL's rate, queries at least 50x faster.
INGEST_TARGET_RATIO = 5.0
QUERY_TARGET_RATIO = 50.0

# Relative tolerance of the bucket comparison: both sides add the same doubles, ours with
# compensated summation and PostgreSQL's float8 sum without, so only rounding may differ.
SUM_RELATIVE_TOLERANCE = 1e-6

QUERY_BUCKETS = 24


def log(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the results."""
    print(f"[peer-pg {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A step failed; the message says which and where its output is."""


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benches/peer_postgres.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "example: python3 benches/peer_postgres.py --measurements 1000000\n"
            "         python3 benches/peer_postgres.py --kpi-bin-dir ../target/release --side ours\n"
            "Progress goes to stderr; stdout gets the table and one JSON line."
        ),
    )
    workload = parser.add_argument_group("workload (the same on every side)")
    workload.add_argument("--measurements", type=int, default=10_000_000,
                          help="measurements to generate and load (default %(default)s)")
    workload.add_argument("--kpis", type=int, default=1000,
                          help="KPIs in the workload (default %(default)s)")
    workload.add_argument("--seed", type=int, default=1, help="generator seed (default %(default)s)")
    workload.add_argument("--end", default=DEFAULT_END,
                          help="end of the generated time range, RFC 3339 (default %(default)s); "
                               "the query asks the 24 whole months before it, in the KPI's timezone")
    workload.add_argument("--producers", type=int, default=4,
                          help="concurrent ingest streams / sled writer threads / COPY connections "
                               "(default %(default)s)")
    workload.add_argument("--batch", type=int, default=1000,
                          help="measurements per acknowledged batch / sled flush / COPY transaction "
                               "(default %(default)s)")
    workload.add_argument("--query-requests", type=int, default=10_000,
                          help="aggregate queries of kpi-service and PostgreSQL (default %(default)s)")
    workload.add_argument("--query-concurrency", type=int, default=4,
                          help="queries in flight (default %(default)s)")
    workload.add_argument("--query-kpi", default=None,
                          help="KPI to query (default: the first SUM KPI, preferring one named revenue)")
    workload.add_argument("--sled-queries", type=int, default=3,
                          help="full scans timed on the raw sled side, one at a time; each reads "
                               "every measurement (default %(default)s)")

    pg = parser.add_argument_group("PostgreSQL")
    pg.add_argument("--pg-bin-dir", type=Path, default=None,
                    help="directory with initdb, pg_ctl, postgres, pgbench (default: found, or installed)")
    pg.add_argument("--pg-shared-buffers", default="2GB", help="shared_buffers (default %(default)s)")
    pg.add_argument("--pg-max-wal-size", default="4GB",
                    help="max_wal_size, so checkpoints do not dominate the load (default %(default)s)")
    pg.add_argument("--pg-load", choices=["batched", "single"], default="batched",
                    help="batched: --batch rows per COPY transaction from --producers connections "
                         "(as ours); single: the whole file in one COPY (default %(default)s)")
    pg.add_argument("--pg-index", choices=["plain", "plain+channel", "covering"], default="plain+channel",
                    help="indexes created before the load: plain = (kpi_id, occurred_at); "
                         "plain+channel adds (kpi_id, channel, occurred_at) for label filters; "
                         "covering = (kpi_id, occurred_at) INCLUDE (value) plus VACUUM after the "
                         "load, so the query is an index-only scan (default %(default)s)")

    run = parser.add_argument_group("run")
    run.add_argument("--side", choices=["all", "both", "ours", "sled", "pg"], default="all",
                     help="all: kpi-service, raw sled and PostgreSQL (default); both: kpi-service "
                          "and PostgreSQL; or only one side")
    run.add_argument("--data-dir", type=Path, default=None,
                     help="use kpis.csv and measurements.csv from this directory instead of "
                          "`kpi-load generate` (only with --side pg)")
    run.add_argument("--kpi-bin-dir", type=Path, default=None,
                     help="directory holding kpi-server and kpi-load (skips the build); "
                          "e.g. another worktree's target/release (the raw sled side needs a "
                          "kpi-load with the sled scenario)")
    run.add_argument("--skip-build", action="store_true",
                     help="do not run cargo build; use the binaries already in the target dir")
    run.add_argument("--keep", action="store_true", help="keep the temporary directory")
    run.add_argument("--work-dir", type=Path, default=None,
                     help="parent of the temporary directory (default: the system temp dir)")
    args = parser.parse_args(argv)
    if args.data_dir is not None and args.side != "pg":
        parser.error("--data-dir only with --side pg: kpi-load ingest generates its own data")
    for name in ("measurements", "kpis", "producers", "batch", "query_requests", "query_concurrency",
                 "sled_queries"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    args.end_time = parse_rfc3339(args.end)
    args.sides = {"all": ("ours", "sled", "pg"), "both": ("ours", "pg")}.get(args.side, (args.side,))
    return args


def parse_rfc3339(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise SystemExit(f"RFC 3339 time needs an offset or Z: {text}")
    return value.astimezone(dt.timezone.utc)


# ----------------------------------------------------------------------------------------
# Installing what is missing
# ----------------------------------------------------------------------------------------


def ensure_python_module(module: str, pip_spec: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        log(f"installing {pip_spec} with pip")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", pip_spec], check=True, stdout=sys.stderr)
        importlib.invalidate_caches()
        importlib.import_module(module)


def find_pg_bin_dir(explicit: Path | None) -> Path:
    """The newest PostgreSQL server binaries on the machine; apt-get installs them if none."""
    if explicit is not None:
        if not (explicit / "initdb").exists():
            raise BenchError(f"no initdb in --pg-bin-dir {explicit}")
        return explicit

    def candidates() -> list[Path]:
        found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
        found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
        pg_config = shutil.which("pg_config")
        if not found and pg_config:
            bindir = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
            if (bindir / "initdb").exists():
                found.append(bindir)
        return found

    found = candidates()
    if not found:
        log("no PostgreSQL server binaries found: apt-get install -y postgresql")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=True, env=env, stdout=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "postgresql"], check=True, env=env, stdout=sys.stderr)
        found = candidates()
        if not found:
            raise BenchError("apt-get installed postgresql but no initdb was found under /usr/lib/postgresql")
    bin_dir = found[-1]
    if not (bin_dir / "pgbench").exists():
        raise BenchError(f"no pgbench in {bin_dir} (Debian ships it in postgresql-client)")
    return bin_dir


# ----------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None, timeout_s: float, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BenchError(f"{what} exited with status {process.returncode}; see {log_path}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise BenchError(f"{what} did not accept connections on 127.0.0.1:{port} within {timeout_s:.0f} s; see {log_path}")


def directory_bytes(path: Path) -> int:
    """Apparent size (sum of file lengths), as BENCHMARKS.md reports the store's footprint."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(latencies_us: list[float]) -> dict[str, float]:
    values = sorted(latencies_us)
    return {
        "p50_us": percentile(values, 0.50),
        "p90_us": percentile(values, 0.90),
        "p99_us": percentile(values, 0.99),
        "max_us": values[-1] if values else math.nan,
    }


def run_logged(command: list[str], log_path: Path, what: str, **kwargs) -> str:
    """Runs a command to completion; stdout is returned, stderr goes to log_path."""
    log(f"{what}: {' '.join(str(c) for c in command)}")
    with open(log_path, "ab") as err:
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, **kwargs)
    stdout = completed.stdout.decode()
    if completed.returncode != 0:
        raise BenchError(f"{what} failed with status {completed.returncode}; stderr in {log_path}\n{stdout[-2000:]}")
    return stdout


def last_json_line(stdout: str, scenario: str) -> dict:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and f'"{scenario}"' in line:
            return json.loads(line)
    raise BenchError(f"no JSON line with scenario {scenario!r} in kpi-load's output:\n{stdout[-2000:]}")


@dataclass
class Workload:
    """The generated CSV files and the KPI the query asks for."""

    directory: Path
    query_kpi: str
    query_timezone: str
    query_start: dt.datetime
    query_end: dt.datetime

    @property
    def measurements_csv(self) -> Path:
        return self.directory / "measurements.csv"


@dataclass
class SideResult:
    """What one side measured; None where it was not measured."""

    name: str
    ingest: dict = field(default_factory=dict)
    query: dict = field(default_factory=dict)
    disk_bytes: int | None = None
    disk_detail: dict = field(default_factory=dict)
    buckets: dict[int, tuple[float, int]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def choose_query_kpi(kpis_csv: Path, wanted: str | None) -> tuple[str, str]:
    with open(kpis_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if wanted is not None:
        for row in rows:
            if row["kpi_id"] == wanted:
                return row["kpi_id"], row["timezone"] or "UTC"
        raise BenchError(f"--query-kpi {wanted} is not in {kpis_csv}")
    sums = [row for row in rows if row["kind"].upper().removeprefix("KPI_KIND_") == "SUM"]
    if not sums:
        raise BenchError(f"no SUM KPI in {kpis_csv}")
    revenue = [row for row in sums if "revenue" in row["kpi_id"]]
    row = (revenue or sums)[0]
    return row["kpi_id"], row["timezone"] or "UTC"


def month_range(end: dt.datetime, timezone: str, months: int) -> tuple[dt.datetime, dt.datetime]:
    """`[start, stop)` of `months` local months in `timezone` that end with the month
    containing the last millisecond before `end`, as UTC instants: the range `kpi-load
    query` asks for."""
    zone = ZoneInfo(timezone)
    last = (end - dt.timedelta(milliseconds=1)).astimezone(zone)
    after = last.year * 12 + last.month  # month index of the month after `last`
    first = after - months

    def local_month_start(index: int) -> dt.datetime:
        return dt.datetime(index // 12, index % 12 + 1, 1, tzinfo=zone).astimezone(dt.timezone.utc)

    return local_month_start(first), local_month_start(after)


def rfc3339(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------
# Our side: kpi-server + kpi-load
# ----------------------------------------------------------------------------------------


def kpi_binaries(args: argparse.Namespace) -> Path:
    if args.kpi_bin_dir is not None:
        bin_dir = args.kpi_bin_dir.resolve()
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
        bin_dir = target / "release"
        if not args.skip_build:
            log("building kpi-server and kpi-load (release)")
            built = subprocess.run(
                ["cargo", "build", "--release", "--bin", "kpi-server", "--bin", "kpi-load"],
                cwd=REPO_ROOT, stdout=sys.stderr,
            )
            if built.returncode != 0:
                raise BenchError("cargo build failed (a checkout without kpi-load can use --kpi-bin-dir)")
    for name in ("kpi-server", "kpi-load"):
        if not (bin_dir / name).exists():
            raise BenchError(f"no {name} in {bin_dir} (build it, or pass --kpi-bin-dir)")
    return bin_dir


def workload_flags(args: argparse.Namespace) -> list[str]:
    return ["--seed", str(args.seed), "--kpis", str(args.kpis),
            "--measurements", str(args.measurements), "--end", args.end]


class KpiServer:
    """A kpi-server on a free loopback port with a fresh data directory."""

    def __init__(self, binary: Path, data_dir: Path, log_path: Path) -> None:
        self.port = free_loopback_port()
        self.data_dir = data_dir
        self.log_path = log_path
        log(f"starting kpi-server on 127.0.0.1:{self.port}, data in {data_dir}")
        with open(log_path, "ab") as out:
            # Its own session: a Ctrl-C on the terminal reaches us, and we stop it cleanly.
            self.process = subprocess.Popen(
                [str(binary), "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(data_dir)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_for_port(self.port, self.process, 60, "kpi-server", log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            log("kpi-server did not stop within 120 s of SIGTERM; killing it")
            self.process.kill()
            self.process.wait()


class AggregatesClient:
    """Reads GetAggregates through Python stubs generated from proto/ at run time."""

    def __init__(self, stub_dir: Path, log_path: Path) -> None:
        ensure_python_module("grpc_tools", "grpcio-tools")
        from grpc_tools import protoc  # noqa: PLC0415 (installed above)
        import grpc_tools  # noqa: PLC0415

        proto_root = REPO_ROOT / "proto"
        protos = sorted(str(p.relative_to(proto_root)) for p in (proto_root / "kpi" / "v1").glob("*.proto"))
        include = Path(grpc_tools.__file__).parent / "_proto"
        stub_dir.mkdir(parents=True, exist_ok=True)
        status = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}",
                              f"--python_out={stub_dir}", f"--grpc_python_out={stub_dir}", *protos])
        if status != 0:
            raise BenchError(f"generating Python stubs from {proto_root} failed")
        sys.path.insert(0, str(stub_dir))
        self.query_pb2 = importlib.import_module("kpi.v1.query_pb2")
        self.query_grpc = importlib.import_module("kpi.v1.query_pb2_grpc")
        self.kpi_pb2 = importlib.import_module("kpi.v1.kpi_pb2")
        import grpc  # noqa: PLC0415

        self.grpc = grpc

    def monthly_buckets(self, url: str, kpi_id: str, start: dt.datetime, end: dt.datetime) -> dict[int, tuple[float, int]]:
        from google.protobuf.timestamp_pb2 import Timestamp  # noqa: PLC0415

        start_ts, end_ts = Timestamp(), Timestamp()
        start_ts.FromDatetime(start.astimezone(dt.timezone.utc).replace(tzinfo=None))
        end_ts.FromDatetime(end.astimezone(dt.timezone.utc).replace(tzinfo=None))
        request = self.query_pb2.GetAggregatesRequest(
            kpi_id=kpi_id, grain=self.kpi_pb2.GRAIN_MONTH, start=start_ts, end=end_ts,
            fill=self.query_pb2.FILL_NONE,
        )
        buckets: dict[int, tuple[float, int]] = {}
        with self.grpc.insecure_channel(url.removeprefix("http://")) as channel:
            stub = self.query_grpc.QueryStub(channel)
            for response in stub.GetAggregates(request, timeout=60):
                bucket = response.bucket
                total = bucket.sum if bucket.HasField("sum") else bucket.value
                buckets[bucket.start.seconds] = (total, bucket.count)
        return buckets


def run_ours(args: argparse.Namespace, bin_dir: Path, workload: Workload, work: Path,
             cleanup: contextlib.ExitStack) -> SideResult:
    result = SideResult("kpi-service")
    result.info["loadavg_start"] = os.getloadavg()
    kpi_load = str(bin_dir / "kpi-load")
    data_dir = work / "kpi-data"
    server = KpiServer(bin_dir / "kpi-server", data_dir, work / "kpi-server.log")
    cleanup.callback(server.stop)

    stdout = run_logged(
        [kpi_load, "ingest", "--addr", server.url, "--producers", str(args.producers),
         "--batch", str(args.batch), *workload_flags(args)],
        work / "kpi-load.log", "kpi-load ingest",
    )
    sys.stderr.write(stdout)
    result.ingest = last_json_line(stdout, "ingest")

    stdout = run_logged(
        [kpi_load, "query", "--addr", server.url, "--concurrency", str(args.query_concurrency),
         "--requests", str(args.query_requests), "--kpi", workload.query_kpi, "--grain", "MONTH",
         "--buckets", str(QUERY_BUCKETS), *workload_flags(args)],
        work / "kpi-load.log", "kpi-load query",
    )
    sys.stderr.write(stdout)
    result.query = last_json_line(stdout, "query")
    # Both sides must ask the same range; kpi-load reports the one it asked.
    asked = (result.query.get("range_start"), result.query.get("range_end"))
    if None not in asked:
        asked_range = tuple(parse_rfc3339(text) for text in asked)
        if asked_range != (workload.query_start, workload.query_end):
            log(f"WARNING: kpi-load query asked [{asked[0]}, {asked[1]}), not [{rfc3339(workload.query_start)}, "
                f"{rfc3339(workload.query_end)}); PostgreSQL and the agreement check follow kpi-load")
            workload.query_start, workload.query_end = asked_range

    log("reading kpi-server's buckets for the agreement check")
    client = AggregatesClient(work / "stubs", work / "stubs.log")
    result.buckets = client.monthly_buckets(server.url, workload.query_kpi, workload.query_start, workload.query_end)

    log("stopping kpi-server (SIGTERM) to measure its settled data directory")
    server.stop()
    result.disk_bytes = directory_bytes(data_dir)
    result.disk_detail = {"data_dir_bytes": result.disk_bytes}
    # The split tells the event log (the source of truth) from the projection snapshot.
    for child in sorted(data_dir.iterdir()):
        if child.is_dir():
            result.disk_detail[f"{child.name}_bytes"] = directory_bytes(child)
    result.info["loadavg_end"] = os.getloadavg()
    return result


# ----------------------------------------------------------------------------------------
# Raw sled side: kpi-load sled, no server
# ----------------------------------------------------------------------------------------


def run_sled(args: argparse.Namespace, bin_dir: Path, workload: Workload, work: Path) -> SideResult:
    result = SideResult("raw sled")
    result.info["loadavg_start"] = os.getloadavg()
    data_dir = work / "sled-data"
    stdout = run_logged(
        [str(bin_dir / "kpi-load"), "sled", "--data-dir", str(data_dir), "--producers", str(args.producers),
         "--batch", str(args.batch), "--queries", str(args.sled_queries), "--kpi", workload.query_kpi,
         "--grain", "MONTH", "--buckets", str(QUERY_BUCKETS), *workload_flags(args)],
        work / "kpi-load.log", "kpi-load sled",
    )
    sys.stderr.write(stdout)
    result.ingest = last_json_line(stdout, "sled")
    result.query = last_json_line(stdout, "sled_query")
    result.disk_bytes = result.ingest["disk_bytes"]
    result.disk_detail = {"data_dir_bytes": result.disk_bytes}
    asked = (parse_rfc3339(result.query["range_start"]), parse_rfc3339(result.query["range_end"]))
    if asked != (workload.query_start, workload.query_end):
        log(f"WARNING: kpi-load sled summed [{rfc3339(asked[0])}, {rfc3339(asked[1])}), not "
            f"[{rfc3339(workload.query_start)}, {rfc3339(workload.query_end)}); the agreement check will show it")
    result.buckets = {int(parse_rfc3339(bucket["start"]).timestamp()): (float(bucket["sum"]), int(bucket["count"]))
                      for bucket in result.query["answer"]}
    result.info["keys"] = result.ingest["keys"]
    result.info["open_seconds"] = result.query["open_seconds"]
    # The answer is kept in `buckets`; the JSON summary need not carry it twice.
    del result.query["answer"]
    if not args.keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    result.info["loadavg_end"] = os.getloadavg()
    return result


# ----------------------------------------------------------------------------------------
# PostgreSQL side
# ----------------------------------------------------------------------------------------


def cluster_user() -> str | None:
    """The account that owns the cluster: None (ourselves) unless we are root, since
    PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        log("creating system user postgres for the private cluster")
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
                       check=True, stdout=sys.stderr)
    return "postgres"


class PostgresCluster:
    """A private cluster in a temp dir, listening on 127.0.0.1 only."""

    def __init__(self, bin_dir: Path, root: Path, args: argparse.Namespace) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.log_path = root / "postgres.log"
        self.port = free_loopback_port()
        self.user = cluster_user()
        self.started = False
        root.mkdir(parents=True)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{root}'",
            # Durable, as PostgreSQL ships: every commit waits for its WAL fsync.
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "shared_buffers": args.pg_shared_buffers,
            "max_wal_size": args.pg_max_wal_size,
            # A just-in-time compile costs milliseconds; this is a short OLTP-style query.
            "jit": "off",
            # The aggregate reads one KPI; a parallel plan only adds worker start-up.
            "max_parallel_workers_per_gather": "0",
            "max_connections": str(max(100, args.query_concurrency + args.producers + 10)),
        }

    def _run(self, command: list[str], what: str) -> None:
        with open(self.root / "commands.log", "ab") as out:
            completed = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, user=self.user,
                                       cwd=self.root, start_new_session=True)
        if completed.returncode != 0:
            raise BenchError(f"{what} failed with status {completed.returncode}; see {self.root / 'commands.log'}")

    def start(self) -> None:
        log(f"initdb {self.data}" + (f" as {self.user}" if self.user else ""))
        self._run([str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--locale=C"], "initdb")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# peer_postgres.py\n")
            for key, value in self.settings.items():
                conf.write(f"{key} = {value}\n")
        log(f"starting PostgreSQL on 127.0.0.1:{self.port}")
        self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path),
                   "-w", "-t", "120", "start"], "pg_ctl start")
        self.started = True
        wait_for_port(self.port, None, 30, "PostgreSQL", self.log_path)

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        with contextlib.suppress(BenchError):
            self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"], "pg_ctl stop")

    @property
    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"


def read_batches(path: Path, batch: int) -> list[bytes]:
    """measurements.csv without its header, as COPY payloads of `batch` lines each."""
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    del data
    if lines and lines[0].startswith(b"kpi_id,"):
        lines = lines[1:]
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += b"\n"
    return [b"".join(lines[i:i + batch]) for i in range(0, len(lines), batch)]


COPY_SQL = "COPY measurements (kpi_id, occurred_at, value, channel, subject) FROM STDIN (FORMAT csv)"


def load_batched(conninfo: str, batches: list[bytes], producers: int) -> tuple[float, list[float]]:
    """Each batch is one COPY in its own (autocommit) transaction: acknowledged = durable."""
    import psycopg  # noqa: PLC0415

    work: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    for payload in batches:
        work.put(payload)
    for _ in range(producers):
        work.put(None)
    latencies: list[list[float]] = [[] for _ in range(producers)]
    failure: list[BaseException] = []
    connections = [psycopg.connect(conninfo, autocommit=True) for _ in range(producers)]
    start_barrier = threading.Barrier(producers + 1)

    def producer(index: int) -> None:
        conn = connections[index]
        start_barrier.wait()
        try:
            with conn.cursor() as cur:
                while (payload := work.get()) is not None and not failure:
                    began = time.perf_counter()
                    with cur.copy(COPY_SQL) as copy:
                        copy.write(payload)
                    latencies[index].append((time.perf_counter() - began) * 1e6)
        except BaseException as error:  # noqa: BLE001 (reported by the caller)
            failure.append(error)

    threads = [threading.Thread(target=producer, args=(i,), daemon=True) for i in range(producers)]
    for thread in threads:
        thread.start()
    start_barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    for conn in connections:
        conn.close()
    if failure:
        raise BenchError(f"COPY failed: {failure[0]!r}")
    return seconds, [x for per_thread in latencies for x in per_thread]


def load_single(conninfo: str, path: Path) -> float:
    """The whole file in one COPY, one transaction: PostgreSQL's fastest bulk path."""
    import psycopg  # noqa: PLC0415

    with psycopg.connect(conninfo, autocommit=True) as conn, conn.cursor() as cur, open(path, "rb") as f:
        began = time.perf_counter()
        with cur.copy(COPY_SQL.replace("(FORMAT csv)", "(FORMAT csv, HEADER true)")) as copy:
            while block := f.read(1 << 20):
                copy.write(block)
        return time.perf_counter() - began


def pg_index_statements(kind: str) -> list[str]:
    if kind == "covering":
        return ["CREATE INDEX measurements_kpi_time ON measurements (kpi_id, occurred_at) INCLUDE (value)"]
    statements = ["CREATE INDEX measurements_kpi_time ON measurements (kpi_id, occurred_at)"]
    if kind == "plain+channel":
        statements.append("CREATE INDEX measurements_kpi_channel_time ON measurements (kpi_id, channel, occurred_at)")
    return statements


def aggregate_sql(timezone: str, placeholders: tuple[str, str, str]) -> str:
    quoted_zone = "'" + timezone.replace("'", "''") + "'"
    kpi, start, end = placeholders
    return (
        f"SELECT date_trunc('month', occurred_at, {quoted_zone}) AS bucket, sum(value), count(*) "
        f"FROM measurements WHERE kpi_id = {kpi} AND occurred_at >= {start} AND occurred_at < {end} "
        "GROUP BY 1 ORDER BY 1"
    )


def run_pgbench(cluster: PostgresCluster, work: Path, workload: Workload, clients: int,
                requests: int, log_latencies: bool) -> list[float]:
    """Runs the aggregate query `requests` times from `clients` connections (prepared
    statement, parameters $1..$3); returns the per-request latencies in µs."""
    script = work / "aggregate.sql"
    script.write_text(aggregate_sql(workload.query_timezone, (":kpi", ":t0", ":t1")) + ";\n")
    per_client = max(1, requests // clients)
    threads = max(1, min(clients, os.cpu_count() or 1))
    log_dir = work / ("pgbench-log" if log_latencies else "pgbench-warmup")
    log_dir.mkdir(exist_ok=True)
    command = [
        str(cluster.bin_dir / "pgbench"), "-n", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres",
        "-M", "prepared", "-c", str(clients), "-j", str(threads), "-t", str(per_client),
        "-f", str(script),
        "-D", f"kpi={workload.query_kpi}", "-D", f"t0={rfc3339(workload.query_start)}",
        "-D", f"t1={rfc3339(workload.query_end)}",
    ]
    if log_latencies:
        command += ["-l", f"--log-prefix={log_dir / 'pgbench'}"]
    command.append("postgres")
    stdout = run_logged(command, work / "pgbench.log", "pgbench" if log_latencies else "pgbench warm-up")
    with open(work / "pgbench.log", "a") as out:
        out.write(stdout)
    if not log_latencies:
        return []
    latencies = []
    for file in log_dir.glob("pgbench*"):
        for line in file.read_text().splitlines():
            fields = line.split()
            # client_id transaction_no latency_us script_no epoch_s epoch_us
            latencies.append(float(fields[2]))
    if len(latencies) != per_client * clients:
        raise BenchError(f"pgbench logged {len(latencies)} requests, expected {per_client * clients}")
    return latencies


def run_pg(args: argparse.Namespace, workload: Workload, work: Path, cleanup: contextlib.ExitStack) -> SideResult:
    ensure_python_module("psycopg", "psycopg[binary]")
    import psycopg  # noqa: PLC0415

    result = SideResult("PostgreSQL")
    loadavg_start = os.getloadavg()
    bin_dir = find_pg_bin_dir(args.pg_bin_dir)
    cluster = PostgresCluster(bin_dir, work / "pg", args)
    cleanup.callback(cluster.stop)
    cluster.start()

    with psycopg.connect(cluster.conninfo, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = {name: conn.execute(f"SHOW {name}").fetchone()[0]
                    for name in ("shared_buffers", "max_wal_size", "fsync", "synchronous_commit",
                                 "full_page_writes", "wal_level", "checkpoint_timeout", "jit")}
        conn.execute("CREATE TABLE measurements (kpi_id text NOT NULL, occurred_at timestamptz NOT NULL, "
                     "value double precision NOT NULL, channel text, subject text)")
        for statement in pg_index_statements(args.pg_index):
            conn.execute(statement)
    result.info = {"server_version": version, "settings": settings, "load": args.pg_load,
                   "indexes": pg_index_statements(args.pg_index), "bin_dir": str(bin_dir),
                   "loadavg_start": loadavg_start}
    log(f"PostgreSQL {version}; {settings}")

    rows = None
    if args.pg_load == "batched":
        log(f"splitting {workload.measurements_csv} into COPY batches of {args.batch} (untimed)")
        batches = read_batches(workload.measurements_csv, args.batch)
        log(f"loading {len(batches)} batches from {args.producers} connections")
        seconds, batch_latencies = load_batched(cluster.conninfo, batches, args.producers)
        del batches
        result.ingest.update(latency_summary(batch_latencies))
        result.ingest["batches"] = len(batch_latencies)
    else:
        log("loading the whole file in one COPY")
        seconds = load_single(cluster.conninfo, workload.measurements_csv)

    with psycopg.connect(cluster.conninfo, autocommit=True) as conn:
        rows = conn.execute("SELECT count(*) FROM measurements").fetchone()[0]
        result.ingest.update({"scenario": "ingest", "items": rows, "seconds": seconds, "items_per_s": rows / seconds})
        log(f"loaded {rows} rows in {seconds:.1f} s = {rows / seconds:,.0f} rows/s; ANALYZE")
        began = time.perf_counter()
        if args.pg_index == "covering":
            conn.execute("VACUUM (ANALYZE) measurements")
        else:
            conn.execute("ANALYZE measurements")
        result.ingest["analyze_seconds"] = time.perf_counter() - began
        total, heap, indexes = conn.execute(
            "SELECT pg_total_relation_size('measurements'), pg_relation_size('measurements'), "
            "pg_indexes_size('measurements')").fetchone()
        result.disk_bytes = total
        result.disk_detail = {"total_relation_bytes": total, "heap_bytes": heap, "index_bytes": indexes}
        conn.execute("CHECKPOINT")
        result.disk_detail["cluster_dir_bytes_after_checkpoint"] = directory_bytes(cluster.data)

        sql = aggregate_sql(workload.query_timezone, ("%s", "%s", "%s"))
        params = (workload.query_kpi, workload.query_start, workload.query_end)
        for start, total_value, count in conn.execute(sql, params).fetchall():
            result.buckets[int(start.timestamp())] = (float(total_value), int(count))
        plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).fetchall()
        (work / "pg-plan.txt").write_text("\n".join(line[0] for line in plan) + "\n")
        result.info["plan_first_line"] = plan[0][0] if plan else ""

    log("pgbench warm-up, then the measured run")
    run_pgbench(cluster, work, workload, args.query_concurrency,
                max(args.query_concurrency * 20, args.query_requests // 10), log_latencies=False)
    began = time.perf_counter()
    latencies = run_pgbench(cluster, work, workload, args.query_concurrency, args.query_requests, log_latencies=True)
    seconds = time.perf_counter() - began
    result.query = {"scenario": "query", "requests": len(latencies), "seconds": seconds,
                    "requests_per_s": len(latencies) / seconds, **latency_summary(latencies)}
    cluster.stop()
    result.info["loadavg_end"] = os.getloadavg()
    return result


# ----------------------------------------------------------------------------------------
# Comparison and report
# ----------------------------------------------------------------------------------------


def compare_buckets(first: SideResult, second: SideResult) -> list[str]:
    ours, theirs = first.buckets, second.buckets
    a, b = first.name, second.name
    problems = []
    for start in sorted(set(ours) | set(theirs)):
        when = dt.datetime.fromtimestamp(start, dt.timezone.utc).isoformat()
        if start not in ours:
            problems.append(f"bucket {when}: only {b} has it {theirs[start]}")
            continue
        if start not in theirs:
            problems.append(f"bucket {when}: only {a} has it {ours[start]}")
            continue
        (our_sum, our_count), (their_sum, their_count) = ours[start], theirs[start]
        if our_count != their_count:
            problems.append(f"bucket {when}: count {our_count} ({a}) vs {their_count} ({b})")
        scale = max(abs(our_sum), abs(their_sum), 1e-12)
        if abs(our_sum - their_sum) > SUM_RELATIVE_TOLERANCE * scale:
            problems.append(f"bucket {when}: sum {our_sum!r} ({a}) vs {their_sum!r} ({b})")
    if not ours and not theirs:
        problems.append(f"neither {a} nor {b} returned a bucket: the query range holds no data")
    return problems


def compare_sides(sides: list[SideResult]) -> list[str] | None:
    """Every side's answer against the first's (kpi-service's when it ran); None with one side."""
    if len(sides) < 2:
        return None
    return [problem for other in sides[1:] for problem in compare_buckets(sides[0], other)]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return None
    return numerator / denominator


def fmt(value: float | int | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def fmt_loadavg(values: tuple[float, float, float]) -> str:
    return " ".join(f"{value:.1f}" for value in values)


def report(args: argparse.Namespace, workload: Workload, ours: SideResult | None, sled: SideResult | None,
           pg: SideResult | None, problems: list[str] | None) -> dict:
    def get(side: SideResult | None, part: str, key: str) -> float | None:
        if side is None:
            return None
        value = getattr(side, part).get(key)
        return float(value) if value is not None else None

    def per_item(side: SideResult | None) -> float | None:
        if side is None or side.disk_bytes is None:
            return None
        items = get(side, "ingest", "items")
        return side.disk_bytes / items if items else None

    # Every ratio is "how many times better kpi-service does": throughput ours/other,
    # latency and disk other/ours.
    def faster(other: SideResult | None, part: str, key: str) -> float | None:
        return ratio(get(ours, part, key), get(other, part, key))

    def quicker(other: SideResult | None, part: str, key: str) -> float | None:
        return ratio(get(other, part, key), get(ours, part, key))

    def smaller(other: SideResult | None) -> float | None:
        return ratio(per_item(other), per_item(ours))

    ingest_ratio = faster(pg, "ingest", "items_per_s")
    p50_ratio = quicker(pg, "query", "p50_us")
    p99_ratio = quicker(pg, "query", "p99_us")
    disk_ratio = smaller(pg)
    sled_ingest_ratio = faster(sled, "ingest", "items_per_s")
    sled_p50_ratio = quicker(sled, "query", "p50_us")
    sled_p99_ratio = quicker(sled, "query", "p99_us")
    sled_disk_ratio = smaller(sled)

    pg_version = pg.info.get("server_version") if pg else None
    loaded = get(ours, "ingest", "items") or get(sled, "ingest", "items") or get(pg, "ingest", "items")
    workload_text = (f"{int(loaded):,} measurements" if loaded else f"{args.measurements:,} measurements")
    workload_text += f" from {args.data_dir}" if args.data_dir else f", {args.kpis} KPIs, seed {args.seed}"
    names = [name for side, name in ((ours, "kpi-service"), (sled, "raw sled"), (pg, f"PostgreSQL {pg_version}"))
             if side is not None]
    title = f"Peer comparison: {' vs '.join(names)} -- {workload_text}"

    def cells(part: str, key: str, digits: int = 0) -> tuple[str, str, str]:
        return tuple(fmt(get(side, part, key), digits) for side in (ours, sled, pg))

    query_target = f"PG/ours >= {QUERY_TARGET_RATIO:g}x"
    rows = [
        ("ingest, measurements/s (durable)", *cells("ingest", "items_per_s"), sled_ingest_ratio, ingest_ratio,
         f"ours/PG >= {INGEST_TARGET_RATIO:g}x"),
        ("ingest batch latency p50, us", *cells("ingest", "p50_us"), None, None, ""),
        ("ingest batch latency p99, us", *cells("ingest", "p99_us"), None, None, ""),
        (f"query p50 ({QUERY_BUCKETS} monthly buckets), us", *cells("query", "p50_us", 1), sled_p50_ratio, p50_ratio,
         query_target),
        ("query p90, us", *cells("query", "p90_us", 1), quicker(sled, "query", "p90_us"),
         quicker(pg, "query", "p90_us"), ""),
        ("query p99, us", *cells("query", "p99_us", 1), sled_p99_ratio, p99_ratio, query_target),
        ("query max, us", *cells("query", "max_us", 1), None, None, ""),
        ("disk bytes per measurement", fmt(per_item(ours), 1), fmt(per_item(sled), 1), fmt(per_item(pg), 1),
         sled_disk_ratio, disk_ratio, ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(title)
    answered = next((side.buckets for side in (ours, sled, pg) if side is not None), {})
    rows_in_range = sum(count for _sum, count in answered.values())
    print(f"  query: {workload.query_kpi} ({workload.query_timezone}), [{rfc3339(workload.query_start)}, "
          f"{rfc3339(workload.query_end)}), {rows_in_range:,} measurements in range, "
          f"{args.query_requests} requests, {args.query_concurrency} in flight"
          + (f" (raw sled: {args.sled_queries} full scans, one at a time)" if sled else "")
          + f"; ingest: batches of {args.batch}, {args.producers} producers")
    print("  ratios: above 1 means kpi-service does better (throughput ours/other, latency and disk other/ours)")

    def ratio_text(value: float | None) -> str:
        if value is None:
            return "-"
        # Two decimals below 10x: the sled ratios of ingest lie around 1.
        return f"{value:,.2f}x" if value < 10 else f"{value:,.1f}x"

    print(f"  {'':{width}}  {'kpi-service':>14}  {'raw sled':>14}  {'PostgreSQL':>14}  {'vs sled':>9}  "
          f"{'vs PG':>9}  target (vs PG)")
    for label, our_text, sled_text, pg_text, vs_sled, vs_pg, target in rows:
        verdict = ""
        if vs_pg is not None and target:
            goal = INGEST_TARGET_RATIO if target.startswith("ours/PG") else QUERY_TARGET_RATIO
            verdict = "  met" if vs_pg >= goal else "  MISSED"
        print(f"  {label:{width}}  {our_text:>14}  {sled_text:>14}  {pg_text:>14}  {ratio_text(vs_sled):>9}  "
              f"{ratio_text(vs_pg):>9}  {target}{verdict}")
    for side in (ours, sled, pg):
        if side is not None:
            # Other work on the machine skews every figure; say how busy it was.
            print(f"  {side.name}: load average (1/5/15 min) before {fmt_loadavg(side.info['loadavg_start'])}, "
                  f"after {fmt_loadavg(side.info['loadavg_end'])}")
    if ours is not None:
        parts = ", ".join(f"{key.removesuffix('_bytes')} {fmt(value)}" for key, value in ours.disk_detail.items()
                          if key != "data_dir_bytes")
        print(f"  kpi-service: data directory {fmt(ours.disk_bytes)} bytes after SIGTERM ({parts})")
    if sled is not None:
        print(f"  raw sled: data directory {fmt(sled.disk_bytes)} bytes after close, {fmt(sled.info['keys'])} keys; "
              f"reopen {sled.info['open_seconds']:.3f} s; each query a full scan of every key")
    if pg is not None:
        disk = pg.disk_detail
        print(f"  PostgreSQL: pg_total_relation_size {fmt(disk['total_relation_bytes'])} bytes "
              f"(heap {fmt(disk['heap_bytes'])}, indexes {fmt(disk['index_bytes'])}); whole cluster "
              f"after CHECKPOINT {fmt(disk['cluster_dir_bytes_after_checkpoint'])} bytes")
        print(f"  PostgreSQL: load {pg.info['load']}, ANALYZE {pg.ingest.get('analyze_seconds', math.nan):.1f} s, "
              f"plan: {pg.info['plan_first_line']}")
        for statement in pg.info["indexes"]:
            print(f"  PostgreSQL: {statement}")
        print("  PostgreSQL settings: " + ", ".join(f"{k}={v}" for k, v in pg.info["settings"].items()))
    sides = [side for side in (ours, sled, pg) if side is not None]
    if problems is None:
        print("  agreement: not checked (one side only)")
    elif problems:
        print(f"  agreement: MISMATCH in {len(problems)} place(s), see stderr")
    else:
        print(f"  agreement: {len(sides[0].buckets)} buckets, {' = '.join(side.name for side in sides)}: counts "
              f"equal, sums within {SUM_RELATIVE_TOLERANCE:g} relative")

    summary = {
        "scenario": "peer_postgres",
        "measurements": args.measurements, "kpis": args.kpis, "seed": args.seed, "end": args.end,
        "producers": args.producers, "batch": args.batch,
        "query_requests": args.query_requests, "query_concurrency": args.query_concurrency,
        "sled_queries": args.sled_queries,
        "query_kpi": workload.query_kpi, "query_timezone": workload.query_timezone,
        "query_start": rfc3339(workload.query_start), "query_end": rfc3339(workload.query_end),
        "query_measurements_in_range": rows_in_range,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "ours": None if ours is None else {"ingest": ours.ingest, "query": ours.query, "info": ours.info,
                                            "disk_bytes": ours.disk_bytes, "disk": ours.disk_detail,
                                            "disk_bytes_per_measurement": per_item(ours)},
        "sled": None if sled is None else {"ingest": sled.ingest, "query": sled.query, "info": sled.info,
                                            "disk_bytes": sled.disk_bytes,
                                            "disk_bytes_per_measurement": per_item(sled)},
        "postgres": None if pg is None else {"version": pg_version, "info": pg.info, "ingest": pg.ingest,
                                              "query": pg.query, "disk": pg.disk_detail,
                                              "disk_bytes_per_measurement": per_item(pg)},
        "ratios": {"ingest_ours_over_pg": ingest_ratio, "query_p50_pg_over_ours": p50_ratio,
                   "query_p99_pg_over_ours": p99_ratio, "disk_pg_over_ours": disk_ratio,
                   "ingest_ours_over_sled": sled_ingest_ratio, "query_p50_sled_over_ours": sled_p50_ratio,
                   "query_p99_sled_over_ours": sled_p99_ratio, "disk_sled_over_ours": sled_disk_ratio},
        "agreement": None if problems is None else {"ok": not problems, "sides": [side.name for side in sides],
                                                    "problems": problems},
    }
    print(json.dumps(summary, separators=(",", ":")))
    sys.stdout.flush()
    return summary


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def raise_keyboard_interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers are stopped and the temp dir removed.
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    with contextlib.ExitStack() as cleanup:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="kpi-peer-pg-", dir=args.work_dir))
        # The cluster's user (postgres) must reach its directory inside.
        os.chmod(work, 0o755)
        if args.keep:
            cleanup.callback(lambda: log(f"kept {work}"))
        else:
            cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        try:
            bin_dir = None
            if "ours" in args.sides or "sled" in args.sides or args.data_dir is None:
                bin_dir = kpi_binaries(args)
            if "pg" in args.sides:
                ensure_python_module("psycopg", "psycopg[binary]")
                find_pg_bin_dir(args.pg_bin_dir)

            if args.data_dir is not None:
                data = args.data_dir.resolve()
            else:
                data = work / "workload"
                run_logged([str(bin_dir / "kpi-load"), "generate", "--out", str(data), *workload_flags(args)],
                           work / "kpi-load.log", "kpi-load generate")
            for name in ("kpis.csv", "measurements.csv"):
                if not (data / name).exists():
                    raise BenchError(f"no {name} in {data}")
            kpi_id, timezone = choose_query_kpi(data / "kpis.csv", args.query_kpi)
            start, end = month_range(args.end_time, timezone, QUERY_BUCKETS)
            workload = Workload(data, kpi_id, timezone, start, end)
            log(f"query KPI {kpi_id} ({timezone}), range [{rfc3339(start)}, {rfc3339(end)})")

            # One side at a time, each alone on the machine: kpi-server is stopped before
            # the sled side starts, and PostgreSQL starts after the sled side has ended.
            ours = run_ours(args, bin_dir, workload, work, cleanup) if "ours" in args.sides else None
            sled = run_sled(args, bin_dir, workload, work) if "sled" in args.sides else None
            pg = run_pg(args, workload, work, cleanup) if "pg" in args.sides else None
            problems = compare_sides([side for side in (ours, sled, pg) if side is not None])
            report(args, workload, ours, sled, pg, problems)
            if problems:
                print("\n" + "!" * 78, file=sys.stderr)
                print("MISMATCH: the sides disagree on the aggregate:", file=sys.stderr)
                for problem in problems:
                    print(f"  {problem}", file=sys.stderr)
                print("!" * 78, file=sys.stderr)
                return 2
            return 0
        except (BenchError, subprocess.CalledProcessError) as error:
            log(f"error: {error}")
            if not args.keep:
                log("rerun with --keep to inspect the logs")
            return 1
        except KeyboardInterrupt:
            log("interrupted; stopping servers")
            return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
