"""Run Locust against embedserve: start a local server unless a host is given, write the
reports, and stop everything it started (also on failure, Ctrl-C or SIGTERM).

From the repository root (``make loadtest`` calls this)::

    .venv/bin/python -m loadtests.run [--host URL] [--users 64] [--spawn-rate 16]
        [--time 60s] [--profile single|batch|mixed|sidecar] [--corpus mixed|short] [--model NAME]
        [--reports-dir loadtests/reports] [any other locust option, e.g. --batch-max 32]

Without ``--host`` it starts ``python -m embedserve serve --host 127.0.0.1 --port <free>``
with this environment (so server settings such as ``BATCH_MAX_TEXTS=32`` apply), waits for
``/health``, and stops it with SIGTERM (SIGKILL past a bound) once Locust is done: devkit's
launcher (`devkit.launcher.running_server`) does all three. Every wait
is bounded. Reports go to ``<reports-dir>/<timestamp>/``: Locust's ``loadtest_stats.csv``,
``loadtest_failures.csv``, ``loadtest_exceptions.csv``, ``loadtest_stats_history.csv`` and
``report.html``, plus ``run.json`` (the parameters), ``metrics.json`` (the server's
``/metrics`` after the run, when it serves them) and ``server.log`` (a server started here).

Exit status: Locust's (1 when any request failed), 2 when the server did not start.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from devkit.launcher import ServerError, running_server

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
PROFILES = {
    "single": ["SingleTextUser"],
    "batch": ["BatchUser"],
    "mixed": [],  # []: none named, the mixed profile
    "sidecar": ["IngestUser", "QueryUser"],
}
CSV_PREFIX = "loadtest"
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 45.0  # past the server's default 30 s shutdown grace
LOCUST_STOP_TIMEOUT_S = 10  # Locust's --stop-timeout: in-flight requests finish, bounded
LOCUST_MARGIN_S = 120.0  # Locust start-up and report writing, beyond the run and the ramp


class Terminated(Exception):
    """We got SIGTERM: unwind through the blocks that stop what we started."""


def parse_timespan(text: str) -> int:
    """Seconds in a Locust time span: ``90``, ``90s``, ``2m``, ``1h30m``, ``1m30s``."""
    found = re.fullmatch(r"\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s?)?\s*", text)
    if not found or not any(found.groups()):
        raise argparse.ArgumentTypeError(f"not a time span: {text!r} (e.g. 60s, 2m, 1h30m)")
    hours, minutes, seconds = (int(part or 0) for part in found.groups())
    return hours * 3600 + minutes * 60 + seconds


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """Status and body of ``GET url``; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM `proc`, wait up to `timeout_s`, then SIGKILL and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def local_server(log_path: Path) -> Iterator[str]:
    """Start the server on a free loopback port with our environment (its settings apply),
    yield its URL once healthy, stop it on exit. Raises ServerError, with the log's tail,
    when it does not become healthy."""
    print(f"loadtest: starting a server on a free loopback port; log {log_path}")
    with running_server(
        inherit_settings=True,
        log_file=log_path,
        startup_timeout_s=STARTUP_TIMEOUT_S,
        stop_timeout_s=STOP_TIMEOUT_S,
    ) as server:
        print(f"loadtest: server pid {server.pid} healthy on {server.base_url}")
        try:
            yield server.base_url
        finally:
            print(f"loadtest: stopping server pid {server.pid}")
    print(f"loadtest: server pid {server.pid} stopped (exit status {server.proc.returncode})")


def locust_command(args: argparse.Namespace, host: str, out: Path, extra: list[str]) -> list[str]:
    """The headless Locust invocation for `args`, writing its reports into `out`."""
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    command += ["--host", host, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate)]
    command += ["--run-time", f"{args.time}s", "--stop-timeout", str(LOCUST_STOP_TIMEOUT_S)]
    command += ["--csv", str(out / CSV_PREFIX), "--html", str(out / "report.html")]
    command += ["--only-summary", "--corpus", args.corpus]
    if args.model:
        command += ["--model", args.model]
    return command + extra + PROFILES[args.profile]


def run_locust(command: list[str], timeout_s: float) -> int:
    """Run Locust (in our process group: a Ctrl-C reaches it too); its exit status.

    When we are interrupted, Locust gets up to 30 s to write its reports (a Ctrl-C has
    reached it already; for our SIGTERM it is sent a SIGINT, which makes it save the HTML
    report too), then is terminated.
    """
    proc = subprocess.Popen(command, cwd=ROOT)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"loadtest: Locust still running after {timeout_s:g}s; stopping it")
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        if isinstance(exc, Terminated) and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30.0)
        raise
    finally:
        _stop(proc, 30.0)


def summary(out: Path) -> str:
    """The run's figures from Locust's CSV: one line per row, then the failures."""
    with (out / f"{CSV_PREFIX}_stats.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    lines = [
        f"{'type':<7}{'name':<30}{'requests':>9}{'fails':>7}{'req/s':>9}{'texts/s':>9}"
        f"{'median':>8}{'p95':>8}{'p99':>8}{'mean':>9}  (ms)"
    ]
    for row in rows:
        server = row["Type"] == "SERVER"
        texts = float(row["Requests/s"]) * float(row["Average Content Size"]) if server else None
        lines.append(
            f"{row['Type'] or '':<7}{row['Name']:<30}{row['Request Count']:>9}"
            f"{row['Failure Count']:>7}{float(row['Requests/s']):>9.1f}"
            f"{'' if texts is None else f'{texts:.1f}':>9}{row['50%']:>8}{row['95%']:>8}"
            f"{row['99%']:>8}{float(row['Average Response Time']):>9.2f}"
        )
    failures_csv = out / f"{CSV_PREFIX}_failures.csv"
    if failures_csv.is_file():
        with failures_csv.open(newline="") as file:
            for row in csv.DictReader(file):
                lines.append(f"failure: {row['Occurrences']} x {row['Name']}: {row['Error']}")
    return "\n".join(lines)


def _report_dir(base: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", *(f"-{n}" for n in range(2, 100))):
        candidate = base / f"{stamp}{suffix}"
        with contextlib.suppress(FileExistsError):
            candidate.mkdir(parents=True)
            return candidate
    raise RuntimeError(f"no free report directory for {stamp} under {base}")


def _git_revision() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip()
    return ""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.run",
        description="Unknown options are passed to Locust (see loadtests/locustfile.py).",
    )
    parser.add_argument("--host", default="", help="server URL (default: start one locally)")
    parser.add_argument("--users", type=int, default=64, help="concurrent users (64)")
    parser.add_argument("--spawn-rate", type=float, default=16, help="users started per second")
    parser.add_argument("--time", type=parse_timespan, default=60, help="run time (60s)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="single")
    parser.add_argument("--corpus", choices=("mixed", "short"), default="mixed")
    parser.add_argument("--model", default="", help="model_name to send (server default)")
    parser.add_argument("--reports-dir", type=Path, default=ROOT / "loadtests" / "reports")
    return parser.parse_known_args(argv)


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise Terminated


def _save_metrics(host: str, out: Path) -> None:
    code, body = http_get(f"{host}/metrics")
    if code == 200:
        (out / "metrics.json").write_bytes(body)


def run(args: argparse.Namespace, extra: list[str], out: Path) -> int:
    """Start the server if needed, run Locust, save the server's metrics, stop the server."""
    timeout_s = args.time + args.users / args.spawn_rate + LOCUST_STOP_TIMEOUT_S + LOCUST_MARGIN_S
    with contextlib.ExitStack() as stack:
        host = args.host.rstrip("/")
        if not host:
            try:
                host = stack.enter_context(local_server(out / "server.log"))
            except ServerError as exc:
                print(f"loadtest: {exc}", file=sys.stderr)
                return 2
        stack.callback(_save_metrics, host, out)  # runs before the server is stopped
        command = locust_command(args, host, out, extra)
        info = {**vars(args), "reports_dir": str(args.reports_dir), "extra": extra}
        info.update(host=host, command=command, revision=_git_revision(), started=time.time())
        (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"loadtest: {args.profile} profile, {args.users} users for {args.time}s -> {out}")
        return run_locust(command, timeout_s)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    if args.users < 1 or args.spawn_rate <= 0 or args.time < 1:
        print("loadtest: --users, --spawn-rate and --time must be positive", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    out = _report_dir(args.reports_dir)
    try:
        status = run(args, extra, out)
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        status = 130
    except Terminated:
        print("loadtest: terminated", file=sys.stderr)
        status = 128 + signal.SIGTERM
    if (out / f"{CSV_PREFIX}_stats.csv").is_file():
        print(f"\nloadtest summary ({args.profile}, {args.users} users, {args.time}s):")
        print(summary(out))
    print(f"loadtest: reports in {out} (exit status {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())
