"""The ``orders-export`` command line (see ``orders-export --help``)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.orm import Session

from shared.errors import ConfigurationError, NotFound, OrdersExportError
from shared.models import Role, User
from shared.settings import Settings, load_settings

#: Exit status for bad usage or configuration.
EXIT_USAGE = 2
#: Exit status when the named thing does not exist.
EXIT_NOT_FOUND = 3


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


def cmd_dev(args: argparse.Namespace) -> int:
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
    return parser


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
    except OrdersExportError as exc:
        print(f"orders-export: {exc.message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
