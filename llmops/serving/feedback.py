"""User feedback on served answers, and reviewers' decisions on them, in a database (SQLAlchemy).

SQLite in the project (.llmops/serve/feedback.db) by default; LLMOPS_FEEDBACK_DB names
another database by its SQLAlchemy URL (postgresql+psycopg://..., with its driver installed),
kept out of params.yaml because a URL may hold a password. Three tables:

    requests   every answered request's id, version, prompt and answer (PII masked), so feedback
               can name it and a correction can become a training row
    feedback   POST /v1/feedback: a rating (1-5), an optional correction and comment
    reviews    a person's decision on a flagged response: accepted (with the correction that
               becomes a training row) or rejected; `dataset` is the corrections file it went into
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from llmops.core.errors import LlmopsError
from llmops.core.layout import FEEDBACK_DB as DEFAULT_DB

DB_ENV = "LLMOPS_FEEDBACK_DB"
MIN_RATING, MAX_RATING = 1, 5

metadata = MetaData()
requests = Table(
    "requests", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("time", DateTime(timezone=True), nullable=False, index=True),
    Column("model_version", String(64)),
    Column("prompt", Text, nullable=False),
    Column("answer", Text, nullable=False),
)
feedback = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), ForeignKey("requests.request_id"), nullable=False, index=True),
    Column("time", DateTime(timezone=True), nullable=False, index=True),
    Column("rating", Integer, nullable=False),
    Column("correction", Text),
    Column("comment", Text),
)
reviews = Table(
    "reviews", metadata,
    Column("request_id", String(64), ForeignKey("requests.request_id"), primary_key=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("accepted", Integer, nullable=False),
    Column("correction", Text),
    Column("reviewer", String(128), nullable=False),
    Column("reason", Text, nullable=False),
    Column("dataset", String(512)),  # the corrections file (dataset version) an accepted correction went into
)


class FeedbackError(LlmopsError):
    """Feedback or a review that cannot be stored; the message says why."""


class UnknownRequest(FeedbackError):
    """No answered request has this id."""


def database_url(root: str | os.PathLike) -> str:
    return os.environ.get(DB_ENV) or f"sqlite:///{Path(root).resolve() / DEFAULT_DB}"


class Store:
    """The feedback database of a project (tables made on first use)."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
            if url.startswith("sqlite"):
                # servers and the monitor write from several processes: WAL lets readers work beside one writer
                event.listen(self.engine, "connect", lambda conn, _: conn.execute("PRAGMA journal_mode=WAL"))
            # another process (a replica starting beside this one) may make a table after our look and before our
            # CREATE: look again. Each retry finds at least one more table made, so one per table is enough; a real
            # fault raises on the last
            for attempt in range(len(metadata.tables) + 1):
                try:
                    metadata.create_all(self.engine)
                    break
                except OperationalError:
                    if attempt == len(metadata.tables):
                        raise
        except SQLAlchemyError as exc:
            raise FeedbackError(f"the feedback database {self._safe_url()} cannot be used: {exc.orig or exc}") from None

    def _safe_url(self) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    def record_request(self, request_id: str, moment: datetime, version: str | None, prompt: str, answer: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(requests).values(request_id=request_id, time=moment, model_version=version,
                                                 prompt=prompt, answer=answer))

    def add_feedback(self, request_id: str, rating: int, correction: str | None = None,
                     comment: str | None = None) -> int:
        """Store one piece of feedback; returns its id.

        Raises:
            UnknownRequest: no answered request has this id.
        """
        with self.engine.begin() as conn:
            if conn.execute(select(requests.c.request_id).where(requests.c.request_id == request_id)).first() is None:
                raise UnknownRequest(f"no answered request has the id {request_id!r}")
            row = conn.execute(insert(feedback).values(request_id=request_id, time=datetime.now(timezone.utc),
                                                       rating=rating, correction=correction, comment=comment))
            return row.inserted_primary_key[0]

    def feedback_for(self, request_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The latest feedback on each of these requests (request id -> rating, correction, comment)."""
        found: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for ids in _chunks(request_ids):
                for row in conn.execute(select(feedback).where(feedback.c.request_id.in_(ids))
                                        .order_by(feedback.c.id)).mappings():
                    found[row["request_id"]] = dict(row)
        return found

    def request(self, request_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(requests).where(requests.c.request_id == request_id)).mappings().first()
        if row is None:
            raise UnknownRequest(f"no answered request has the id {request_id!r}")
        return dict(row)

    def review(self, request_id: str, accepted: bool, reviewer: str, reason: str, correction: str | None) -> None:
        """Record a person's decision on a response; an accepted one needs a correction (the right answer).

        Raises:
            UnknownRequest, FeedbackError: no such request, no correction to accept, or already decided.
        """
        self.request(request_id)
        if accepted and not (correction or "").strip():
            raise FeedbackError(f"{request_id}: nothing to accept: no correction given (--correction) and the user "
                                "sent none")
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(reviews).values(request_id=request_id, time=datetime.now(timezone.utc),
                                                    accepted=int(accepted), correction=correction, reviewer=reviewer,
                                                    reason=reason))
        except IntegrityError:
            raise FeedbackError(f"{request_id} was already reviewed") from None

    def reviewed(self, request_ids: list[str]) -> set[str]:
        """Those of these requests a person has decided on."""
        found: set[str] = set()
        with self.engine.connect() as conn:
            for ids in _chunks(request_ids):
                found |= set(conn.execute(select(reviews.c.request_id).where(reviews.c.request_id.in_(ids))).scalars())
        return found

    def accepted(self, unused_only: bool = False) -> list[dict[str, Any]]:
        """Accepted corrections with their prompts, oldest first; `unused_only`: those in no dataset yet."""
        query = (select(requests.c.request_id, requests.c.prompt, reviews.c.correction, reviews.c.dataset,
                        reviews.c.time).join(reviews, reviews.c.request_id == requests.c.request_id)
                 .where(reviews.c.accepted == 1).order_by(reviews.c.time, reviews.c.request_id))
        if unused_only:
            query = query.where(reviews.c.dataset.is_(None))
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def mark_used(self, request_ids: list[str], dataset: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(reviews).where(reviews.c.request_id.in_(request_ids)).values(dataset=dataset))


def _chunks(ids: list[str], size: int = 500):
    """Bounded IN lists: a window's ids can outnumber what one SQL statement may bind."""
    for start in range(0, len(ids), size):
        yield ids[start:start + size]
