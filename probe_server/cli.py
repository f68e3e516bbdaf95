"""The ``probe-server`` command line: ``main(argv) -> int``, tested by calling it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sqlite3
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config, ConfigError, check_paths, load_config, parse_endpoint
from .logs import setup_logging
from .server import Listeners, StartupError, endpoint_text, serve

log = logging.getLogger("probe_server")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def run_async(coroutine: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed, else on asyncio's own loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine)


def _demo_banner(config: Config) -> Callable[[Listeners], None]:
    """What ``make run`` prints: where to open the survey, and how to see the visit."""

    def show(listeners: Listeners) -> None:
        site = config.sites.ipv4
        scheme = "https" if site.tls_cert is not None else "http"
        survey = site.base_url or f"{scheme}://{endpoint_text(listeners.http['ipv4'])}"
        # Quoted for the shell: the path may hold spaces or quotes.
        db = shlex.quote(str(config.resolve(config.database.path)))
        query = "SELECT * FROM session_summary ORDER BY id DESC LIMIT 1"
        what = "probe-server demo" if config.source is None else "probe-server"
        print(
            f"\n{what} is running (Ctrl-C stops it).\n"
            f"  Open the survey in a browser:  {survey}/\n"
            f"  The same page as an MTurk preview:\n"
            f"    {survey}/?assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE&hitId=DEMOHIT\n"
            "  The paper's other experiments, and the pages in other languages:\n"
            f"    {survey}/?survey=speedtest   {survey}/?survey=tool\n"
            f"    {survey}/?lang=ja   (ja, tr, hi; with survey=... too)\n"
            "  Then see what was recorded for your visit:\n"
            f"    sqlite3 -header -column {db} '{query}'\n",
            flush=True,
        )
        # The dig lines name the demo's zone.
        if "udp_ipv4" in listeners.dns and config.source is None:
            host, port = listeners.dns["udp_ipv4"].getsockname()[:2]
            print(
                "  DNS for example.org answers on UDP and TCP, IPv4 and IPv6:\n"
                f"    dig @{host} -p {port} +norec v6.example.org AAAA\n"
                f"    dig @{host} -p {port} +norec v6.example.org A   (NODATA: no A record)\n",
                flush=True,
            )

    return show


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    check_paths(config)
    # --log-level, when given, wins over the config's [logging] level.
    setup_logging(args.log_level or config.logging.level, config.logging.format)
    banner = args.config is None if args.banner is None else args.banner
    on_ready = _demo_banner(config) if banner else None
    return run_async(serve(config, on_ready=on_ready))


def cmd_report(args: argparse.Namespace) -> int:
    # Imported here: the server never needs geoip2 or matplotlib.
    from .analysis.geo import GEOLITE_HINT, enrich, open_geoip
    from .analysis.report import build_report, render_json, render_markdown, write_outputs
    from .store import SchemaError, open_sync

    config = load_config(args.config)
    db = Path(args.db) if args.db else config.resolve(config.database.path)
    if args.format == "csv" and args.out is None:
        print(
            "probe-server: report: --format csv writes one file per table: give --out DIR",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not db.is_file():
        print(f"probe-server: report: {db}: no such database", file=sys.stderr)
        return EXIT_FAILURE
    with open_geoip(config) as geo:
        if not geo.configured:
            if args.refresh_geoip:
                print(
                    "probe-server: report: --refresh-geoip needs [geoip] databases to ask"
                    " again; without them the stored answers would be lost",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            print(f"probe-server: {GEOLITE_HINT}", file=sys.stderr)
        try:
            conn = open_sync(db)
            try:
                enrich(conn, geo, refresh=args.refresh_geoip, stream=sys.stderr)
            finally:
                conn.close()
            report = build_report(db, top=args.top, min_sample=args.min_sample)
        except (sqlite3.DatabaseError, SchemaError) as e:
            # Not a database, a damaged one, or one of a newer probe-server.
            print(f"probe-server: report: {db}: {e}", file=sys.stderr)
            return EXIT_FAILURE
    if args.out is not None:
        for path in write_outputs(report, args.format, Path(args.out)):
            print(path)
    elif args.format == "json":
        sys.stdout.write(render_json(report))
    else:
        sys.stdout.write(render_markdown(report))
    return EXIT_OK


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _resolver(value: str) -> tuple[str, int]:
    """``9.9.9.9``, ``2001:db8::1``, ``127.0.0.1:5353`` or ``[::1]:5353`` (port 53 by default)."""
    if not value.startswith("[") and value.count(":") != 1:
        value = f"[{value}]:53" if ":" in value else f"{value}:53"
    try:
        return parse_endpoint(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_check(args: argparse.Namespace) -> int:
    from .check import FAIL, PASS, Checker, Options, Result

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(Result(FAIL, "config", str(e)).line(), flush=True)
        return EXIT_FAILURE
    print(Result(PASS, "config", str(config.source or "built-in demo config")).line(), flush=True)
    counts = {"PASS": 1, "FAIL": 0, "SKIP": 0}

    def emit(result: Result) -> None:
        counts[result.status] += 1
        print(result.line(), flush=True)

    options = Options(
        public=args.public,
        resolvers=args.resolver or [],
        authoritative_port=args.authoritative_port,
        timeout=args.timeout,
    )
    ok = Checker(config, options, emit).run()
    total = counts["PASS"] + counts["FAIL"]
    if ok:
        print(f"probe-server check: all {total} checks passed ({counts['SKIP']} skipped)")
        return EXIT_OK
    print(f"probe-server check: {counts['FAIL']} of {total} checks FAILED")
    return EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    from .mturk import cli as mturk_cli

    parser = argparse.ArgumentParser(
        prog="probe-server", description="Crowdsourced IPv4/IPv6 measurement server."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: the config's [logging] level for serve (INFO without one), INFO for"
        " fake-mturk, WARNING for hits (its output is for people)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser(
        "serve", help="run the probe server (demo config without --config)"
    )
    serve_parser.add_argument("--config", metavar="FILE", help="TOML config file")
    serve_parser.add_argument(
        "--banner",
        action=argparse.BooleanOptionalAction,
        help="print the survey's URL and a sqlite3 command that shows the last visit"
        " once listening (default: only for the demo, without --config)",
    )
    serve_parser.set_defaults(func=cmd_serve)

    report_parser = commands.add_parser(
        "report",
        help="the paper's tables, Figure 2 and preview counts from the database",
        description="Classify and geolocate the addresses in the database (answers are"
        " stored, so later reports repeat them), then write the paper's Tables 1-3,"
        " the IPv6 breakdown, Figure 2 and the preview counts.",
    )
    report_parser.add_argument("--config", metavar="FILE", help="TOML config file ([geoip])")
    report_parser.add_argument(
        "--db", metavar="FILE", help="database (default: database.path from the config)"
    )
    report_parser.add_argument("--format", choices=["md", "csv", "json"], default="md")
    report_parser.add_argument(
        "--out",
        metavar="DIR",
        help="write the report, figure2.png and figure2.csv here (default: report to stdout)",
    )
    report_parser.add_argument(
        "--top", type=_positive, default=6, metavar="N", help="countries named in Tables 1-2"
    )
    report_parser.add_argument(
        "--min-sample",
        type=_positive,
        default=30,
        metavar="N",
        help="mark adoption rates from fewer IPv4 addresses than this (default 30)",
    )
    report_parser.add_argument(
        "--refresh-geoip",
        action="store_true",
        help="look every address up again in the configured databases",
    )
    # Its output is for people: migrations and lookups are not news.
    report_parser.set_defaults(func=cmd_report, default_log_level="WARNING")

    check_parser = commands.add_parser(
        "check",
        help="check a deployment: config, zones, TLS, sockets (and --public DNS)",
        description="One PASS/FAIL/SKIP line per check; exit status 1 if any failed.",
    )
    check_parser.add_argument("--config", metavar="FILE", help="TOML config file")
    check_parser.add_argument(
        "--public",
        action="store_true",
        help="also ask public DNS: the names, the delegation at the parent, our servers",
    )
    check_parser.add_argument(
        "--resolver",
        metavar="ADDRESS[:PORT]",
        action="append",
        type=_resolver,
        help="recursive resolver for --public (repeatable; default: the system's)",
    )
    check_parser.add_argument(
        "--authoritative-port",
        metavar="PORT",
        type=int,
        default=53,
        help="port on which the parent's and our name servers are asked (default 53)",
    )
    check_parser.add_argument(
        "--timeout", metavar="SECONDS", type=float, default=5.0, help="per DNS question"
    )
    check_parser.set_defaults(func=cmd_check)
    mturk_cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level or getattr(args, "default_log_level", "INFO"))
    try:
        result: int = args.func(args)
    except ConfigError as e:
        print(f"probe-server: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as e:
        print(f"probe-server: cannot start: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return result


def run() -> None:
    sys.exit(main())
