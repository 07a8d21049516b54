"""Who may see what: every account-scoped action asks here, at the time of the action."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import Forbidden, NotFound
from shared.models import Account, ExportJob, Membership, Role, User


def account_for(
    session: Session, slug: str, user: User, *, admin: bool = False
) -> tuple[Account, Role]:
    """The account and the user's current role in it.

    Unknown accounts and accounts the user is not a member of are indistinguishable (NotFound);
    a member asking for an admin action gets Forbidden.
    """
    row = session.execute(
        select(Account, Membership.role)
        .join(Membership, Membership.account_id == Account.id)
        .where(Account.slug == slug, Membership.user_id == user.id)
    ).first()
    if row is None:
        raise NotFound("no such account")
    account, role = row
    if admin and role is not Role.ADMIN:
        raise Forbidden("only account admins may do this")
    return account, role


def export_for(session: Session, export_id: str, user: User) -> tuple[ExportJob, Account, Role]:
    """An export and the user's current role in its account.

    Unknown exports, malformed ids and exports of accounts the user is not a member of are
    indistinguishable (NotFound); what a role may do is the caller's decision.
    """
    try:
        key = uuid.UUID(export_id)
    except ValueError:
        raise NotFound("no such export") from None
    row = session.execute(
        select(ExportJob, Account, Membership.role)
        .join(Account, Account.id == ExportJob.account_id)
        .join(Membership, (Membership.account_id == Account.id) & (Membership.user_id == user.id))
        .where(ExportJob.id == key)
    ).first()
    if row is None:
        raise NotFound("no such export")
    job, account, role = row
    return job, account, role


def accounts_of(session: Session, user: User) -> list[tuple[Account, Role]]:
    rows = session.execute(
        select(Account, Membership.role)
        .join(Membership, Membership.account_id == Account.id)
        .where(Membership.user_id == user.id)
        .order_by(Account.name)
    ).all()
    return [(account, role) for account, role in rows]
