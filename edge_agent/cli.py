"""``edge-agent``: run the service, the demo, check a config, ask for status, read the buffer."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent import __version__, logs
from edge_agent.config import DEFAULT_CONFIG_PATH, Config, HttpSection, load_config
from edge_agent.errors import (
    ConfigError,
    DemoInterruptedError,
    EdgeAgentError,
    PortInUseError,
    StorageError,
)

log = logging.getLogger("edge_agent")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Until a config is read: its [log] section applies from _load on.
    logs.configure(args.log_level or "info", os.environ.get("EDGE_AGENT__LOG__FORMAT", "logfmt"))
    try:
        result: int = args.handler(args)
    except (ConfigError, PortInUseError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    except DemoInterruptedError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except EdgeAgentError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    return result


class _Parser(argparse.ArgumentParser):
    """Every subcommand answers ``--version`` too (``edge-agent status --version``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=__version__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("EDGE_AGENT_LOG_LEVEL"),
        help="debug, info, warning, error (default: [log] level of the config, else info)",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
        command.add_argument(
            "--config", type=Path, default=None, help=f"default: {DEFAULT_CONFIG_PATH}"
        )
        return command

    run = with_config(commands.add_parser("run", help="run the agent (the systemd service)"))
    run.set_defaults(handler=_run)

    demo = commands.add_parser("demo", help="the whole system on this machine, one command")
    demo.add_argument("--duration", type=float, default=None, help="seconds; default: until Ctrl-C")
    demo.add_argument("--broker", default=None, help="HOST:PORT of a broker; default: embedded")
    demo.add_argument(
        "--data-dir", type=Path, default=None, help="default: a temporary one, removed at exit"
    )
    demo.add_argument(
        "--keep-data", action="store_true", help="keep the temporary data directory at exit"
    )
    demo.add_argument("--http-port", type=int, default=8787, help="0: any free port")
    demo.add_argument("--rate", type=float, default=20.0, help="simulated messages per second")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--no-serial", action="store_true", help="without the simulated serial shelf")
    demo.add_argument("--no-sync", action="store_true", help="without the central store")
    demo.set_defaults(handler=_demo)

    check = with_config(commands.add_parser("check-config", help="validate a config file"))
    check.set_defaults(handler=_check_config)

    status = with_config(commands.add_parser("status", help="ask the local status endpoint"))
    status.set_defaults(handler=_status)

    buffer = commands.add_parser(
        "buffer", help="inspect, export, erase a customer, salvage a damaged file"
    )
    buffer_commands = buffer.add_subparsers(dest="buffer_command", required=True)
    stats = with_config(buffer_commands.add_parser("stats", help="figures about the buffer"))
    stats.set_defaults(handler=_buffer_stats)
    export = with_config(buffer_commands.add_parser("export", help="every buffered envelope"))
    export.add_argument("--format", choices=["jsonl"], default="jsonl")
    export.set_defaults(handler=_buffer_export)
    erase = with_config(buffer_commands.add_parser("erase", help="erase a customer's data"))
    erase.add_argument("--customer", required=True)
    erase.set_defaults(handler=_buffer_erase)
    salvage = with_config(
        buffer_commands.add_parser(
            "salvage", help="copy every readable event of a damaged file into the buffer"
        )
    )
    salvage.add_argument("file", type=Path, help="e.g. buffer.db.damaged-<time>")
    salvage.set_defaults(handler=_buffer_salvage)
    clear = with_config(
        buffer_commands.add_parser(
            "clear-salvage", help="forget the salvage figures shown on /status and /metrics"
        )
    )
    clear.set_defaults(handler=_buffer_clear_salvage)
    _model_commands(commands, with_config)
    _quarantine_commands(commands, with_config)
    return parser


def _quarantine_commands(commands: Any, with_config: Callable[[Any], Any]) -> None:
    quarantine = commands.add_parser(
        "quarantine", help="list, show and replay quarantined inputs (after a schema fix)"
    )
    verbs = quarantine.add_subparsers(dest="quarantine_command", required=True)
    listing = with_config(verbs.add_parser("list", help="one JSON object per input, oldest first"))
    listing.add_argument("--reason", default=None, help="e.g. unknown_type")
    listing.add_argument("--source", default=None, help="a prefix, e.g. mqtt:edge/store-001/")
    listing.add_argument("--limit", type=int, default=None)
    listing.set_defaults(handler=_quarantine_list)
    show = with_config(verbs.add_parser("show", help="one input with its raw bytes"))
    show.add_argument("id", type=int)
    show.set_defaults(handler=_quarantine_show)
    replay = with_config(
        verbs.add_parser(
            "replay", help="re-decode; commit what now passes, keep the rest with its new reason"
        )
    )
    replay.add_argument("--reason", default=None, help="only inputs quarantined for this reason")
    replay.add_argument("--id", type=int, action="append", default=[], dest="ids")
    replay.add_argument("--dry-run", action="store_true", help="report only; change nothing")
    replay.set_defaults(handler=_quarantine_replay)


def _model_commands(commands: Any, with_config: Callable[[Any], Any]) -> None:
    model = commands.add_parser("model", help="the suggestion model in use: status, rollback")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    status = with_config(model_commands.add_parser("status", help="current and previous model"))
    status.set_defaults(handler=_model_status)
    rollback = with_config(
        model_commands.add_parser("rollback", help="switch back to the previous model")
    )
    rollback.set_defaults(handler=_model_rollback)


def _model_store(config: Config) -> Any:
    from edge_agent.personalize.model_store import ModelStore
    from models import DEFAULT_MODEL_DIR

    configured = Path(config.model.path) if config.model.path else DEFAULT_MODEL_DIR
    return ModelStore(config.data_dir, configured)


def _model_status(args: argparse.Namespace) -> int:
    from edge_agent.personalize.model_status import describe

    print(json.dumps(describe(_model_store(_load(args))), indent=2))
    return 0


def _model_rollback(args: argparse.Namespace) -> int:
    # The running agent follows the pointer file within [model] watch_interval_s.
    state = _model_store(_load(args)).rollback()
    print(json.dumps({"current": state.current, "previous": state.previous}))
    return 0


def _load(args: argparse.Namespace) -> Config:
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    config = load_config(path)
    logs.configure(args.log_level or config.log.level, config.log.format)
    return config


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from edge_agent.app import run_until_signalled

    asyncio.run(run_until_signalled(_load(args)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from edge_agent.demo import DemoOptions, run_demo
    from edge_agent.demo.summary import explain

    broker = None
    if args.broker:
        host, _, port = args.broker.rpartition(":")
        broker = (host or "127.0.0.1", int(port))
    options = DemoOptions(
        args.duration,
        broker,
        args.data_dir,
        args.http_port,
        args.rate,
        args.seed,
        serial=not args.no_serial,
        sync=not args.no_sync,
        keep_data=args.keep_data,
    )
    summary = asyncio.run(run_demo(options))
    print("\n".join(explain(summary)), flush=True)
    print(json.dumps(summary, indent=2), flush=True)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from edge_agent.preflight import environment_warnings

    config = _load(args)
    # The machine's side (data_dir, serial devices, the broker's name): warnings only, as
    # the config may be checked before the box is in the store.
    for warning in environment_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"ok: store_id={config.agent.store_id} data_dir={config.data_dir} "
        f"broker={config.mqtt.host}:{config.mqtt.port} serial_ports={len(config.serial.ports)} "
        f"sync={'on' if config.sync.url else 'off'}"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    # No config anywhere: the agent listens where the defaults say, so ask there.
    http = HttpSection()
    if args.config is not None or DEFAULT_CONFIG_PATH.exists():
        http = _load(args).http
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{http.port}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            print(json.dumps(json.loads(response.read()), indent=2))
    except (urllib.error.URLError, OSError) as exc:
        print(f"edge-agent: status endpoint {url} not reachable: {exc}", file=sys.stderr)
        return 1
    return 0


def _buffer_stats(args: argparse.Namespace) -> int:
    from edge_agent.buffer import inspect

    config = _load(args)
    with inspect.open_read_only(config.buffer_path) as connection:
        print(json.dumps(inspect.stats(connection), indent=2))
    return 0


def _buffer_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edge_agent.buffer import inspect, salvage

    config = _load(args)
    connection = inspect.open_read_only(config.buffer_path)
    try:
        total = salvage.expected_rows(connection)
        # The damage-tolerant reader: only whole envelopes (JSON objects) reach stdout.
        reader = salvage.RowReader(connection)
        printed = 0
        out = sys.stdout
        with tqdm(total=total, unit="ev", disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
            for row in reader.rows():
                out.write(row.envelope_text)
                out.write("\n")
                printed += 1
                bar.update()
        out.flush()
    finally:
        connection.close()
    # A broken leaf hides its rows without an error; the indexes still count them.
    skipped = max(reader.unreadable, total - printed)
    if skipped:
        print(
            f"edge-agent: skipped {skipped} damaged rows that could not be read as whole "
            "envelopes (see docs/operations.md, 'A damaged buffer: salvage counts')",
            file=sys.stderr,
        )
    return 0


def _buffer_erase(args: argparse.Namespace) -> int:
    from edge_agent.buffer import erasure, inspect

    config = _load(args)
    connection = inspect.open_for_writing(config.buffer_path)
    try:
        deleted = erasure.erase_customer(connection, args.customer)
    finally:
        connection.close()
    print(json.dumps({"customer_id": args.customer, "deleted": deleted}))
    return 0


def _buffer_salvage(args: argparse.Namespace) -> int:
    from edge_agent.buffer import salvage

    config = _load(args)
    damaged: Path = args.file
    if damaged.resolve() == config.buffer_path.resolve():
        raise StorageError(f"{damaged} is the live buffer; salvage a file moved aside from it")
    connection = salvage.open_target(config.buffer_path)
    try:
        result = salvage.salvage_into(connection, damaged)
    finally:
        connection.close()
    # The running agent picks the new rows and figures up at its next recount (60 s).
    print(json.dumps(result.as_dict()))
    return 0


def _buffer_clear_salvage(args: argparse.Namespace) -> int:
    from edge_agent.buffer import inspect, salvage

    config = _load(args)
    connection = inspect.open_for_writing(config.buffer_path)
    try:
        cleared = salvage.clear_record(connection)
    finally:
        connection.close()
    print(json.dumps({"cleared": cleared.as_status() if cleared else None}))
    return 0


def _quarantine_list(args: argparse.Namespace) -> int:
    from edge_agent.buffer import inspect, quarantine

    config = _load(args)
    with contextlib.closing(inspect.open_read_only(config.buffer_path)) as connection:
        rows = quarantine.list_rows(connection, args.reason, args.source, args.limit)
    for row in rows:
        print(json.dumps(row.summary()))
    return 0


def _quarantine_show(args: argparse.Namespace) -> int:
    from edge_agent.buffer import inspect, quarantine

    config = _load(args)
    with contextlib.closing(inspect.open_read_only(config.buffer_path)) as connection:
        row = quarantine.get_row(connection, args.id)
    if row is None:
        print(f"edge-agent: no quarantined input with id {args.id}", file=sys.stderr)
        return 1
    print(json.dumps(row.as_dict(), indent=2))
    return 0


def _quarantine_replay(args: argparse.Namespace) -> int:
    from edge_agent.buffer import inspect, quarantine
    from edge_agent.replay import redecoder

    config = _load(args)
    redecode = redecoder(config)
    # One write transaction beside the running agent: SQLite's lock orders the two writers.
    with contextlib.closing(inspect.open_for_writing(config.buffer_path)) as connection:
        result = quarantine.replay(
            connection, redecode, reason=args.reason, ids=args.ids, dry_run=args.dry_run
        )
    print(json.dumps(result.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
