"""Users, memberships and credentials: argon2 password hashes, hashed bearer tokens, browser
sessions stored server-side, and the login throttle."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import secrets
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.errors import NotFound, TooManyAttempts, ValidationError
from shared.models import Account, ApiToken, LoginAttempt, Membership, Role, User, WebSession

#: Prefix of every bearer token, so leaked tokens are recognisable by secret scanners.
TOKEN_PREFIX = "oex_"  # noqa: S105 (a prefix, not a secret)
#: Random bytes in a bearer token (and in a browser session id).
TOKEN_BYTES = 32
#: Characters of a token kept for listings (``oex_`` + 8 random characters).
TOKEN_SHOWN_CHARS = 12
#: Token and session usage stamps are written at most this often (seconds).
TOUCH_INTERVAL_SECONDS = 60

_hasher = PasswordHasher()
# A real hash to verify against when the email is unknown, so timing does not reveal accounts.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise ValidationError("password", "at least 8 characters")
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def find_user(session: Session, email: str) -> User | None:
    return session.scalar(select(User).where(func.lower(User.email) == email.strip().lower()))


def authenticate(session: Session, email: str, password: str) -> User | None:
    """The active user with this email and password, or None (constant-ish time either way)."""
    user = find_user(session, email)
    if user is None:
        verify_password(_DUMMY_HASH, password)
        return None
    if not verify_password(user.password_hash, password) or not user.is_active:
        return None
    return user


#: Advisory lock namespaces (first key of ``pg_advisory_xact_lock(int, int)``).
_LOCK_LOGIN_CLIENT = 0x4C43  # "LC"
_LOCK_LOGIN_EMAIL = 0x4C45  # "LE"


def _normal_email(email: str) -> str:
    return email.strip().lower()[:320]


def _retry_after(session: Session, condition: Any, *, window_seconds: int) -> int:
    """Seconds until the oldest counted attempt leaves the window (at least 1)."""
    oldest = session.scalar(select(func.min(LoginAttempt.attempted_at)).where(condition))
    if oldest is None:
        return window_seconds
    left = (oldest + dt.timedelta(seconds=window_seconds)) - dt.datetime.now(dt.UTC)
    return max(1, math.ceil(left.total_seconds()))


def reserve_login_check(
    session: Session,
    *,
    email: str,
    client: str,
    max_per_email: int,
    max_per_client: int,
    window_seconds: int,
) -> int:
    """Count this login as a failure *before* the password is checked, or refuse it.

    The client's and the email's advisory locks (always taken in that order) make count and
    insert one step, so under any burst at most ``max_per_email`` checks per email and
    ``max_per_client`` per client start within a window. The caller commits at once (releasing
    the locks), checks the password, and on success calls :func:`clear_login_failures`.
    Returns the reserved row's id.
    """
    email_key = _normal_email(email)
    address = client[:100]
    session.execute(select(func.pg_advisory_xact_lock(_LOCK_LOGIN_CLIENT, func.hashtext(address))))
    session.execute(select(func.pg_advisory_xact_lock(_LOCK_LOGIN_EMAIL, func.hashtext(email_key))))
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=window_seconds)
    for condition, limit in (
        (func.lower(LoginAttempt.email) == email_key, max_per_email),
        (LoginAttempt.client == address, max_per_client),
    ):
        recent = condition & (LoginAttempt.attempted_at >= since)
        count = session.scalar(select(func.count()).select_from(LoginAttempt).where(recent))
        if int(count or 0) >= limit:
            raise TooManyAttempts(
                "too many failed logins; try again later",
                retry_after=_retry_after(session, recent, window_seconds=window_seconds),
            )
    attempt = LoginAttempt(email=email_key, client=address)
    session.add(attempt)
    session.flush()
    return attempt.id


def clear_login_failures(session: Session, email: str) -> None:
    """A successful login: that email's failures (and the pending reservation) are gone."""
    session.execute(
        delete(LoginAttempt).where(func.lower(LoginAttempt.email) == _normal_email(email))
    )


def prune_login_failures(session: Session, *, window_seconds: int) -> int:
    """Delete failures older than the throttle window (they no longer count); how many."""
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=window_seconds)
    result = session.execute(delete(LoginAttempt).where(LoginAttempt.attempted_at < since))
    return int(result.rowcount)  # type: ignore[attr-defined]


def ensure_account(
    session: Session, *, slug: str, name: str | None = None, timezone: str = "UTC"
) -> Account:
    """The account with ``slug``, created if missing (concurrency-safe)."""
    session.execute(
        insert(Account)
        .values(slug=slug, name=name or slug, timezone=timezone)
        .on_conflict_do_nothing(index_elements=["slug"])
    )
    return get_account(session, slug)


def get_account(session: Session, slug: str) -> Account:
    account = session.scalar(select(Account).where(Account.slug == slug))
    if account is None:
        raise NotFound(f"no account {slug!r}")
    return account


def upsert_user(
    session: Session, *, email: str, password: str, display_name: str | None = None
) -> User:
    """Create the user or reset its password (and reactivate it)."""
    email = email.strip()
    if "@" not in email or len(email) > 320:
        raise ValidationError("email", "not an email address")
    user = find_user(session, email)
    password_hash = hash_password(password)
    if user is None:
        user = User(
            email=email,
            display_name=display_name or email.split("@")[0],
            password_hash=password_hash,
        )
        session.add(user)
    else:
        user.password_hash = password_hash
        user.is_active = True
        end_sessions_of(session, user.id)  # a new password ends every session at once
    session.flush()
    return user


def set_membership(session: Session, *, account: Account, user: User, role: Role) -> None:
    session.execute(
        insert(Membership)
        .values(account_id=account.id, user_id=user.id, role=role)
        .on_conflict_do_update(index_elements=["account_id", "user_id"], set_={"role": role})
    )


def remove_membership(session: Session, *, account: Account, user: User) -> bool:
    """Drop the membership; True when there was one."""
    result = session.execute(
        delete(Membership).where(Membership.account_id == account.id, Membership.user_id == user.id)
    )
    removed = bool(result.rowcount)  # type: ignore[attr-defined]
    if removed:
        end_sessions_of(session, user.id)  # the browser sessions end at once (tokens stay)
    return removed


def role_in(session: Session, *, account: Account, user: User) -> Role | None:
    """The user's role in the account right now, or None when not a member."""
    return session.scalar(
        select(Membership.role).where(
            Membership.account_id == account.id, Membership.user_id == user.id
        )
    )


def token_digest(token: str) -> str:
    # Tokens carry 256 bits of randomness, so a fast hash is the right tool (no brute force).
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, user: User, *, expires_in_days: int | None = None) -> str:
    """A new bearer token for ``user``; only its digest (and first characters) are stored."""
    if expires_in_days is not None and expires_in_days < 1:
        raise ValidationError("expires-in", "at least 1 day")
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    expires_at = (
        None
        if expires_in_days is None
        else dt.datetime.now(dt.UTC) + dt.timedelta(days=expires_in_days)
    )
    session.add(
        ApiToken(
            user_id=user.id,
            token_sha256=token_digest(token),
            prefix=token[:TOKEN_SHOWN_CHARS],
            expires_at=expires_at,
        )
    )
    return token


def token_for(session: Session, token: str) -> ApiToken | None:
    """The unrevoked, unexpired token of an active user, or None."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    now = dt.datetime.now(dt.UTC)
    return session.scalar(
        select(ApiToken)
        .join(User, ApiToken.user_id == User.id)
        .where(ApiToken.token_sha256 == token_digest(token), ApiToken.revoked_at.is_(None))
        .where(or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now))
        .where(User.is_active.is_(True))
    )


def token_and_user(session: Session, token: str) -> tuple[ApiToken, User] | None:
    """Like :func:`token_for`, with the token's (active) user, in one query."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    now = dt.datetime.now(dt.UTC)
    row = session.execute(
        select(ApiToken, User)
        .join(User, ApiToken.user_id == User.id)
        .where(ApiToken.token_sha256 == token_digest(token), ApiToken.revoked_at.is_(None))
        .where(or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now))
        .where(User.is_active.is_(True))
    ).first()
    return None if row is None else (row[0], row[1])


def user_for_token(session: Session, token: str) -> User | None:
    """The active user owning this unrevoked, unexpired token, or None."""
    found = token_for(session, token)
    return None if found is None else session.get(User, found.user_id)


def needs_touch(stamp: dt.datetime | None) -> bool:
    """Usage stamps are written at most once a minute (not on every request)."""
    return stamp is None or dt.datetime.now(dt.UTC) - stamp >= dt.timedelta(
        seconds=TOUCH_INTERVAL_SECONDS
    )


def touch_token(session: Session, token_id: int) -> None:
    session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id)
        .where(
            or_(
                ApiToken.last_used_at.is_(None),
                ApiToken.last_used_at < func.now() - dt.timedelta(seconds=TOUCH_INTERVAL_SECONDS),
            )
        )
        .values(last_used_at=func.now())
    )


def tokens_of(session: Session, user: User) -> list[ApiToken]:
    """The user's tokens, oldest first (revoked ones included)."""
    return list(
        session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id))
    )


def revoke_tokens(session: Session, user: User, *, token_id: int | None = None) -> int:
    """Revoke one of the user's tokens (``token_id``) or all of them; how many were revoked.
    NotFound when ``token_id`` is not one of the user's tokens."""
    query = update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
    if token_id is not None:
        owned = session.scalar(
            select(ApiToken.id).where(ApiToken.id == token_id, ApiToken.user_id == user.id)
        )
        if owned is None:
            raise NotFound(f"{user.email} has no token {token_id}")
        query = query.where(ApiToken.id == token_id)
    result = session.execute(query.values(revoked_at=func.now()))
    return int(result.rowcount)  # type: ignore[attr-defined]


def start_web_session(session: Session, user: User) -> str:
    """A new server-side browser session; returns the random id the cookie carries."""
    sid = secrets.token_urlsafe(TOKEN_BYTES)
    session.add(WebSession(id_sha256=token_digest(sid), user_id=user.id))
    return sid


def web_session(session: Session, sid: str) -> WebSession | None:
    if len(sid) > 200:
        return None
    return session.get(WebSession, token_digest(sid))


def end_web_session(session: Session, sid: str) -> None:
    session.execute(delete(WebSession).where(WebSession.id_sha256 == token_digest(sid)))


def end_sessions_of(session: Session, user_id: int) -> None:
    """End every browser session of the user (password change, removal, deactivation)."""
    session.execute(delete(WebSession).where(WebSession.user_id == user_id))


def touch_web_session(session: Session, sid: str) -> None:
    session.execute(
        update(WebSession)
        .where(WebSession.id_sha256 == token_digest(sid))
        .values(last_seen_at=func.now())
    )


def prune_web_sessions(session: Session, *, idle_seconds: int, lifetime_seconds: int) -> int:
    """Delete sessions past their idle timeout or absolute lifetime; how many."""
    now = dt.datetime.now(dt.UTC)
    result = session.execute(
        delete(WebSession).where(
            or_(
                WebSession.last_seen_at < now - dt.timedelta(seconds=idle_seconds),
                WebSession.created_at < now - dt.timedelta(seconds=lifetime_seconds),
            )
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
