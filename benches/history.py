#!/usr/bin/env python3
"""History benchmark (issue 13): does kpi-server get worse as its history grows?

One command ingests one long, reproducible stream into one kpi-server in --rounds equal
pieces and, after every piece, measures the server as it is at that size:

  ingest       `kpi-load ingest --first N --count M`: the round's piece of the one stream
               of --measurements (evenly spaced over two years ending at --end, 5 % late
               by 1 to 60 days), --producers streams of --batch; the round's rate.
  memory       VmRSS and VmHWM of the server (/proc/PID/status) after the round's queries;
               VmHWM is the peak since the server's last start.
  disk         size of the data directory: allocated blocks (what `du` reports) and the
               sum of file lengths.
  queries      `kpi-load query`, --query-requests calls at --query-concurrency, p50/p99:
                 now     24 monthly buckets of --query-kpi up to --end (all the data);
                 cold    --cold-buckets monthly buckets ending --cold-offset months before
                         --end's month: the start of the span, written in the first round
                         and not touched since about the third (late events reach back 60
                         days), so from then on they are cold;
                 as-of   the 24 months of "now", each call as of a seq drawn uniformly
                         from [1, head] (seeded by the round); an as-of call may fold the
                         log up to its seq, so this one is bounded by --as-of-requests and
                         --as-of-max-secs, and reports how many calls it made.
  restart      every --restart-every rounds and on the last: SIGTERM, timing the graceful
               shutdown until the process exits; then a new process, timed from its start
               until `kpi-load ready` gets its first GetAggregates answer. On the last
               round also kill -9 and the same timed start.

A row is printed per round as it goes (stdout), progress goes to stderr; at the end a
markdown table and one JSON line with every figure. --quick runs a tiny version (seconds)
to check the script and the binaries.

Nothing is built: the script takes kpi-server and kpi-load from --bin-dir (default
$CARGO_TARGET_DIR/release, else target/release; run `cargo build --release` first).
--server-arg passes flags through to kpi-server (repeatable, e.g.
--server-arg=--memory-budget=256). The data directory is a temporary one, removed at
the end unless --keep, or --data-dir (kept). The server is always stopped on exit, also
after Ctrl-C, SIGTERM or an error. Python 3 standard library only; not part of CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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

REPO_ROOT = Path(__file__).resolve().parent.parent

# Issue 13's end of the two-year span: reproducible, and in the past of the machines the
# benchmark runs on (the server rejects occurred_at more than a few minutes ahead).
DEFAULT_END = "2026-11-27T00:00:00Z"

# What --quick changes, unless given explicitly: a smoke run of a few seconds per round.
QUICK = {
    "measurements": 30_000,
    "rounds": 3,
    "kpis": 16,
    "query_requests": 200,
    "as_of_requests": 20,
    "as_of_max_secs": 10.0,
}

DEFAULTS = {
    "measurements": 50_000_000,
    "rounds": 10,
    "kpis": 1000,
    "query_requests": 2000,
    "as_of_requests": 200,
    "as_of_max_secs": 120.0,
}


def log(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the results."""
    print(f"[history {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A step failed; the message says which and where its output is."""


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benches/history.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "example: cargo build --release && python3 benches/history.py\n"
            "         python3 benches/history.py --quick\n"
            "         python3 benches/history.py --server-arg=--memory-budget=256 --rounds 5"
        ),
    )
    workload = parser.add_argument_group("workload")
    workload.add_argument("--measurements", type=int, default=None,
                          help=f"measurements in the whole stream (default {DEFAULTS['measurements']:_})")
    workload.add_argument("--rounds", type=int, default=None,
                          help=f"equal pieces of the stream, measured after each (default {DEFAULTS['rounds']})")
    workload.add_argument("--kpis", type=int, default=None,
                          help=f"KPIs, 4 series each by the channel label (default {DEFAULTS['kpis']})")
    workload.add_argument("--seed", type=int, default=1, help="generator seed (default %(default)s)")
    workload.add_argument("--end", default=DEFAULT_END,
                          help="end of the two-year span, RFC 3339 (default %(default)s)")
    workload.add_argument("--event-ids", action="store_true",
                          help="give every measurement an event id (the server deduplicates them)")
    workload.add_argument("--producers", type=int, default=4, help="ingest streams (default %(default)s)")
    workload.add_argument("--batch", type=int, default=1000,
                          help="measurements per acknowledged batch (default %(default)s)")

    queries = parser.add_argument_group("queries")
    queries.add_argument("--query-kpi", default="revenue_001", help="KPI asked (default %(default)s)")
    queries.add_argument("--query-requests", type=int, default=None,
                         help=f"calls of the now and cold queries (default {DEFAULTS['query_requests']})")
    queries.add_argument("--query-concurrency", type=int, default=4,
                         help="calls in flight (default %(default)s)")
    queries.add_argument("--query-max-secs", type=float, default=300.0,
                         help="bound on each now/cold query run (default %(default)s)")
    queries.add_argument("--cold-buckets", type=int, default=3,
                         help="monthly buckets of the cold query (default %(default)s)")
    queries.add_argument("--cold-offset", type=int, default=22,
                         help="months between the cold query's last bucket and --end's (default "
                              "%(default)s: November 2024 to January 2025 for the default --end)")
    queries.add_argument("--as-of-requests", type=int, default=None,
                         help=f"calls of the as-of query (default {DEFAULTS['as_of_requests']})")
    queries.add_argument("--as-of-max-secs", type=float, default=None,
                         help=f"bound on the as-of query run (default {DEFAULTS['as_of_max_secs']:.0f})")

    run = parser.add_argument_group("run")
    run.add_argument("--quick", action="store_true",
                     help="tiny sizes for a smoke run: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                                    for k, v in QUICK.items()))
    run.add_argument("--restart-every", type=int, default=1,
                     help="stop and restart the server every K rounds (always on the last; default %(default)s)")
    run.add_argument("--no-kill", action="store_true", help="skip the kill -9 restart of the last round")
    run.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                     help="extra kpi-server flag, passed through (repeatable; write --server-arg=--flag=value)")
    run.add_argument("--bin-dir", type=Path, default=None,
                     help="directory with kpi-server and kpi-load (default $CARGO_TARGET_DIR/release "
                          "or target/release)")
    run.add_argument("--data-dir", type=Path, default=None,
                     help="the server's data directory (must be empty or absent; kept at the end); "
                          "default: inside the temporary directory")
    run.add_argument("--work-dir", type=Path, default=None,
                     help="parent of the temporary directory (default: the system temp dir)")
    run.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    run.add_argument("--json-out", type=Path, default=None, help="also write the final JSON here")
    run.add_argument("--ready-timeout", type=float, default=1800.0,
                     help="longest wait for a (re)started server's first answer, s (default %(default)s)")
    run.add_argument("--stop-timeout", type=float, default=600.0,
                     help="longest wait for the server to exit after SIGTERM, s (default %(default)s)")
    args = parser.parse_args(argv)
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else default)
    for name in ("measurements", "rounds", "kpis", "producers", "batch", "query_requests",
                 "query_concurrency", "as_of_requests", "restart_every", "cold_buckets"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.rounds > args.measurements:
        parser.error("--rounds must not exceed --measurements")
    if args.cold_offset < 0:
        parser.error("--cold-offset must not be negative")
    return args


# ----------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def directory_sizes(path: Path) -> tuple[int, int]:
    """(allocated bytes as `du` counts them, sum of file lengths) of a directory tree."""
    allocated = apparent = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                status = os.lstat(os.path.join(root, name))
                allocated += status.st_blocks * 512
                apparent += status.st_size
    return allocated, apparent


def proc_status_kib(pid: int, keys: tuple[str, ...] = ("VmRSS", "VmHWM")) -> dict[str, int | None]:
    """Fields of /proc/PID/status in KiB (None where missing, e.g. the process is gone)."""
    found: dict[str, int | None] = dict.fromkeys(keys)
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in found:
                    with contextlib.suppress(ValueError, IndexError):
                        found[name] = int(value.split()[0])
    return found


def last_json_line(stdout: str, scenario: str) -> dict:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and f'"scenario":"{scenario}"' in line.replace(" ", ""):
            return json.loads(line)
    raise BenchError(f"no JSON line with scenario {scenario!r} in kpi-load's output:\n{stdout[-2000:]}")


def fmt(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def mib(kib_or_bytes: int | None, unit: int) -> float | None:
    return None if kib_or_bytes is None else kib_or_bytes * unit / (1024 * 1024)


# ----------------------------------------------------------------------------------------
# The server and the load tool
# ----------------------------------------------------------------------------------------


class KpiServer:
    """The one kpi-server of the run: started, stopped and restarted on one data directory
    and port. Only the process this object started is ever signalled."""

    def __init__(self, binary: Path, data_dir: Path, extra_args: list[str], log_path: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.log_path = log_path
        self.port = free_loopback_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchError("kpi-server is not running")
        return self.process.pid

    def start(self) -> float:
        """Starts the process; returns its start instant (time.monotonic())."""
        command = [str(self.binary), "--data-dir", str(self.data_dir),
                   "--listen", f"127.0.0.1:{self.port}", *self.extra_args]
        log(f"starting {' '.join(command)}")
        with open(self.log_path, "ab") as out:
            started = time.monotonic()
            # Its own session: a Ctrl-C on the terminal reaches us, and we stop it ourselves.
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return started

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"kpi-server exited with status {self.process.returncode}; see {self.log_path}")

    def stop(self, timeout_s: float) -> tuple[float, int]:
        """SIGTERM, then waits for the exit: (seconds it took, exit status)."""
        process = self.process
        if process is None or process.poll() is not None:
            raise BenchError(f"kpi-server is not running to be stopped; see {self.log_path}")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            process.kill()
            process.wait()
            raise BenchError(f"kpi-server did not exit within {timeout_s:.0f} s of SIGTERM; killed it") from error
        took = time.monotonic() - started
        self.process = None
        return took, status

    def kill(self) -> None:
        """kill -9 and reap (no-op when not running)."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self.process = None


@dataclass
class Tool:
    """Runs kpi-load commands against the server, with the run's workload flags."""

    binary: Path
    args: argparse.Namespace
    log_path: Path

    def workload_flags(self) -> list[str]:
        flags = ["--seed", str(self.args.seed), "--kpis", str(self.args.kpis),
                 "--measurements", str(self.args.measurements), "--end", self.args.end]
        if self.args.event_ids:
            flags.append("--event-ids")
        return flags

    def run(self, server: KpiServer, command: str, scenario: str, extra: list[str],
            timeout_s: float | None = None) -> dict:
        argv = [str(self.binary), "--addr", server.url, "--quiet", command, *self.workload_flags(), *extra]
        with open(self.log_path, "ab") as err, tempfile.TemporaryFile() as out:
            err.write(f"\n$ {' '.join(argv)}\n".encode())
            err.flush()
            tool = subprocess.Popen(argv, stdout=out, stderr=err)
            # A server that dies (a bad --server-arg, a crash) ends the tool at once instead
            # of leaving `ready` to retry until its timeout. A thread watches, so the wait
            # below returns the moment the tool exits (restart times are milliseconds).
            done = threading.Event()
            server_died = threading.Event()

            def watch_server() -> None:
                while not done.wait(0.02):
                    if server.process is None or server.process.poll() is not None:
                        server_died.set()
                        with contextlib.suppress(ProcessLookupError):
                            tool.kill()
                        return

            watcher = threading.Thread(target=watch_server, daemon=True)
            watcher.start()
            try:
                status = tool.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired as error:
                raise BenchError(f"kpi-load {command} did not finish within {timeout_s:.0f} s") from error
            finally:
                done.set()
                if tool.poll() is None:
                    tool.kill()
                    tool.wait()
                watcher.join()
            out.seek(0)
            stdout = out.read().decode(errors="replace")
        if server_died.is_set():
            server.check_alive()
            raise BenchError(f"kpi-server is gone; see {server.log_path}")
        if status != 0:
            server.check_alive()
            raise BenchError(f"kpi-load {command} failed with status {status}; "
                             f"stderr in {self.log_path}\n{stdout[-2000:]}")
        return last_json_line(stdout, scenario)

    def ready(self, server: KpiServer, started: float, empty: bool = False) -> float:
        """Waits for the first answered GetAggregates; seconds since `started`. On an empty
        data directory (`empty`) the KPI's NOT_FOUND is that answer."""
        self.run(server, "ready", "ready",
                 ["--timeout-secs", str(int(self.args.ready_timeout)), "--kpi", self.args.query_kpi,
                  *(["--allow-not-found"] if empty else [])],
                 timeout_s=self.args.ready_timeout + 60)
        return time.monotonic() - started

    def query(self, server: KpiServer, extra: list[str], requests: int, max_secs: float) -> dict:
        return self.run(server, "query", "query",
                        ["--kpi", self.args.query_kpi, "--grain", "MONTH",
                         "--concurrency", str(self.args.query_concurrency),
                         "--requests", str(requests),
                         "--duration-secs", str(max(1, int(max_secs))), *extra],
                        timeout_s=max_secs + 600)


# ----------------------------------------------------------------------------------------
# The rounds
# ----------------------------------------------------------------------------------------


@dataclass
class Round:
    """What one round measured; None where it was not measured."""

    round: int
    first: int
    count: int
    measurements_so_far: int
    events_so_far: int | None = None
    ingest_s: float | None = None
    ingest_per_s: float | None = None
    ingest_batch_p99_ms: float | None = None
    duplicates: int | None = None
    rss_after_ingest_mib: float | None = None
    rss_mib: float | None = None
    hwm_mib: float | None = None
    disk_mib: float | None = None
    disk_apparent_mib: float | None = None
    queries: dict = field(default_factory=dict)
    shutdown_s: float | None = None
    shutdown_status: int | None = None
    restart_s: float | None = None
    kill_restart_s: float | None = None


QUERY_KINDS = ("now", "cold", "as_of")

COLUMNS = [
    ("round", "round", lambda r: str(r.round)),
    ("events", "events", lambda r: fmt(r.events_so_far)),
    ("ingest/s", "ingest_per_s", lambda r: fmt(r.ingest_per_s)),
    ("RSS MiB", "rss_mib", lambda r: fmt(r.rss_mib)),
    ("HWM MiB", "hwm_mib", lambda r: fmt(r.hwm_mib)),
    ("disk MiB", "disk_mib", lambda r: fmt(r.disk_mib)),
    ("stop s", "shutdown_s", lambda r: fmt(r.shutdown_s, 2)),
    ("start s", "restart_s", lambda r: fmt(r.restart_s, 2)),
    ("kill-9 start s", "kill_restart_s", lambda r: fmt(r.kill_restart_s, 2)),
    ("now p99 ms", None, lambda r: fmt(r.queries.get("now", {}).get("p99_ms"), 2)),
    ("cold p99 ms", None, lambda r: fmt(r.queries.get("cold", {}).get("p99_ms"), 2)),
    ("as-of p99 ms", None, lambda r: fmt(r.queries.get("as_of", {}).get("p99_ms"), 2)),
    ("as-of calls", None, lambda r: fmt(r.queries.get("as_of", {}).get("calls"))),
]


def row_cells(result: Round) -> list[str]:
    return [cell(result) for _title, _key, cell in COLUMNS]


def print_row(cells: list[str], widths: list[int]) -> None:
    print("  ".join(cell.rjust(width) for cell, width in zip(cells, widths)), flush=True)


def query_figures(report: dict) -> dict:
    return {
        "calls": report.get("ops"),
        "errors": report.get("errors"),
        "buckets": report.get("items"),
        "p50_ms": report["p50_us"] / 1000 if "p50_us" in report else None,
        "p99_ms": report["p99_us"] / 1000 if "p99_us" in report else None,
        "max_ms": report["max_us"] / 1000 if "max_us" in report else None,
        "first_error": report.get("first_error"),
    }


def measure_queries(tool: Tool, server: KpiServer, args: argparse.Namespace, round_no: int) -> tuple[dict, int | None]:
    """The round's three query runs; also returns the log's head the as-of run saw."""
    figures = {}
    now = tool.query(server, ["--buckets", "24"], args.query_requests, args.query_max_secs)
    figures["now"] = query_figures(now)
    cold = tool.query(server, ["--buckets", str(args.cold_buckets), "--end-offset-buckets", str(args.cold_offset)],
                      args.query_requests, args.query_max_secs)
    figures["cold"] = query_figures(cold)
    as_of = tool.query(server, ["--buckets", "24", "--as-of-random", "--as-of-seed", str(round_no)],
                       args.as_of_requests, args.as_of_max_secs)
    figures["as_of"] = query_figures(as_of)
    for kind, figure in figures.items():
        if figure["errors"]:
            log(f"WARNING: {figure['errors']} {kind} calls failed, first: {figure['first_error']}")
    return figures, as_of.get("as_of_head")


def run_rounds(args: argparse.Namespace, server: KpiServer, tool: Tool, header_widths: list[int]) -> tuple[list[Round], float]:
    started = server.start()
    first_start_s = tool.ready(server, started, empty=True)
    log(f"server answered {first_start_s:.2f} s after its start (empty data directory)")
    tool.run(server, "setup", "setup", [])
    results: list[Round] = []
    sent = 0
    for round_no in range(1, args.rounds + 1):
        upto = args.measurements * round_no // args.rounds
        result = Round(round=round_no, first=sent, count=upto - sent, measurements_so_far=upto)
        log(f"round {round_no}/{args.rounds}: ingest measurements [{sent:,}, {upto:,})")
        ingest = tool.run(server, "ingest", "ingest",
                          ["--producers", str(args.producers), "--batch", str(args.batch),
                           "--first", str(sent), "--count", str(result.count)])
        if ingest.get("rejected_batches"):
            raise BenchError(f"the server rejected {ingest['rejected_batches']} batches, first: "
                             f"{ingest.get('first_rejection')}")
        if ingest.get("items") != result.count:
            raise BenchError(f"ingest acknowledged {ingest.get('items')} of {result.count} measurements")
        sent = upto
        result.ingest_s = ingest.get("seconds")
        result.ingest_per_s = ingest.get("items_per_s")
        result.ingest_batch_p99_ms = ingest["p99_us"] / 1000 if "p99_us" in ingest else None
        result.duplicates = ingest.get("duplicates")
        result.rss_after_ingest_mib = mib(proc_status_kib(server.pid)["VmRSS"], 1024)

        log(f"round {round_no}: queries")
        result.queries, head = measure_queries(tool, server, args, round_no)
        result.events_so_far = head if head is not None else args.kpis + upto
        memory = proc_status_kib(server.pid)
        result.rss_mib = mib(memory["VmRSS"], 1024)
        result.hwm_mib = mib(memory["VmHWM"], 1024)

        last = round_no == args.rounds
        if last or round_no % args.restart_every == 0:
            log(f"round {round_no}: SIGTERM")
            result.shutdown_s, result.shutdown_status = server.stop(args.stop_timeout)
            if result.shutdown_status != 0:
                log(f"WARNING: kpi-server exited with status {result.shutdown_status} after SIGTERM")
            # Measured stopped: nothing is being written, the directory is settled.
            allocated, apparent = directory_sizes(args.data_dir)
            result.disk_mib, result.disk_apparent_mib = mib(allocated, 1), mib(apparent, 1)
            result.restart_s = tool.ready(server, server.start())
            if last and not args.no_kill:
                log(f"round {round_no}: kill -9")
                server.kill()
                result.kill_restart_s = tool.ready(server, server.start())
        else:
            allocated, apparent = directory_sizes(args.data_dir)
            result.disk_mib, result.disk_apparent_mib = mib(allocated, 1), mib(apparent, 1)
        results.append(result)
        print_row(row_cells(result), header_widths)
    return results, first_start_s


def markdown(results: list[Round]) -> str:
    titles = [title for title, _key, _cell in COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---:|" * len(titles)]
    for result in results:
        lines.append("| " + " | ".join(row_cells(result)) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def raise_keyboard_interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def binaries(args: argparse.Namespace) -> Path:
    if args.bin_dir is not None:
        bin_dir = args.bin_dir.resolve()
    else:
        bin_dir = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target")) / "release"
    for name in ("kpi-server", "kpi-load"):
        if not (bin_dir / name).exists():
            raise BenchError(f"no {name} in {bin_dir}: run `cargo build --release` or pass --bin-dir")
    return bin_dir


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server is stopped and the temp dir removed.
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    with contextlib.ExitStack() as cleanup:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="kpi-history-", dir=args.work_dir))
        if args.keep:
            cleanup.callback(lambda: log(f"kept {work}"))
        else:
            cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        server: KpiServer | None = None
        try:
            bin_dir = binaries(args)
            if args.data_dir is None:
                args.data_dir = work / "data"
            elif args.data_dir.exists() and any(args.data_dir.iterdir()):
                raise BenchError(f"--data-dir {args.data_dir} is not empty; the benchmark starts from nothing")
            args.data_dir = args.data_dir.resolve()
            server = KpiServer(bin_dir / "kpi-server", args.data_dir, args.server_arg, work / "kpi-server.log")
            # Registered after the directory's removal, so it runs first: the server is
            # gone before its directory is removed.
            cleanup.callback(server.kill)
            tool = Tool(bin_dir / "kpi-load", args, work / "kpi-load.log")
            log(f"{args.measurements:,} measurements of {args.kpis} KPIs in {args.rounds} rounds; "
                f"data in {args.data_dir}, logs in {work}")
            titles = [title for title, _key, _cell in COLUMNS]
            widths = [max(len(title), 8) for title in titles]
            print_row(titles, widths)
            results, first_start_s = run_rounds(args, server, tool, widths)
            server.stop(args.stop_timeout)

            print()
            print(markdown(results))
            summary = {
                "benchmark": "history",
                "measurements": args.measurements,
                "rounds": args.rounds,
                "kpis": args.kpis,
                "seed": args.seed,
                "end": args.end,
                "event_ids": args.event_ids,
                "producers": args.producers,
                "batch": args.batch,
                "server_args": args.server_arg,
                "query": {"kpi": args.query_kpi, "requests": args.query_requests,
                          "concurrency": args.query_concurrency, "cold_buckets": args.cold_buckets,
                          "cold_offset": args.cold_offset, "as_of_requests": args.as_of_requests,
                          "as_of_max_secs": args.as_of_max_secs},
                "first_start_s": first_start_s,
                "rounds_measured": [vars(result) for result in results],
            }
            line = json.dumps(summary)
            print(line)
            if args.json_out is not None:
                args.json_out.write_text(line + "\n")
            return 0
        except BenchError as error:
            log(f"error: {error}")
            for path in (work / "kpi-server.log", work / "kpi-load.log"):
                with contextlib.suppress(OSError):
                    tail = path.read_text(errors="replace").splitlines()[-15:]
                    if tail:
                        log(f"last lines of {path.name}:\n  " + "\n  ".join(tail))
            if not args.keep:
                log("rerun with --keep to inspect the logs")
            return 1
        except KeyboardInterrupt:
            log("interrupted; stopping the server")
            return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
