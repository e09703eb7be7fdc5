"""A Django site that enqueues in its requests' transactions (tests/test_frameworks.py).

Run as ``python -m tests.apps.django_site`` with ``BATON_DATABASE_URL`` set: Django's
settings can be configured once per process, so the checks run in a process of their own.
Each check asserts what docs/frameworks.md says of Django's connection; the process exits
non-zero at the first that fails.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import django  # type: ignore[import-untyped]
from django.conf import settings  # type: ignore[import-untyped]
from psycopg.conninfo import conninfo_to_dict

_url = conninfo_to_dict(os.environ["BATON_DATABASE_URL"])
settings.configure(
    DATABASES={"default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _url["dbname"], "USER": _url.get("user", ""),
        "PASSWORD": _url.get("password", ""), "HOST": _url.get("host", ""),
        "PORT": _url.get("port", ""),
        "ATOMIC_REQUESTS": True,
    }},
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["testserver"],
    USE_TZ=True,
)
django.setup()

import psycopg  # noqa: E402
from django.db import connection, transaction  # type: ignore[import-untyped]  # noqa: E402
from django.http import HttpRequest, JsonResponse  # type: ignore[import-untyped]  # noqa: E402
from django.test import Client  # type: ignore[import-untyped]  # noqa: E402
from django.urls import path  # type: ignore[import-untyped]  # noqa: E402

import baton  # noqa: E402

jobs = baton.Baton()


@jobs.step(name="site.note")
def note(text: str) -> str:
    return text


@jobs.step(name="site.once", unique=True)
def once(key: str) -> str:
    return key


def raw() -> psycopg.Connection[Any]:
    """Django's own psycopg connection (inside ``atomic()`` it is connected)."""
    assert isinstance(connection.connection, psycopg.Connection)
    return connection.connection


def steps_of(step: str) -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM baton.jobs WHERE step = %s", [step])
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


def view(request: HttpRequest) -> JsonResponse:
    """With ATOMIC_REQUESTS the whole view is the request's transaction."""
    job_id = jobs.enqueue_sync(note.new(text=request.POST["text"]), conn=raw())
    if request.POST.get("fail"):
        transaction.set_rollback(True)
        return JsonResponse({"error": "refused"}, status=422)
    return JsonResponse({"job_id": job_id}, status=201)


urlpatterns = [path("notes", view)]


def check_atomic_requests() -> None:
    client = Client()
    assert client.post("/notes", {"text": "kept"}).status_code == 201
    assert client.post("/notes", {"text": "dropped", "fail": "1"}).status_code == 422
    with connection.cursor() as cur:
        cur.execute("SELECT args->>'text' FROM baton.jobs WHERE step = 'site.note'")
        assert cur.fetchall() == [("kept",)]


def check_savepoint() -> None:
    with transaction.atomic():
        outer = jobs.enqueue_sync(note.new(text="outer"), conn=raw())
        try:
            with transaction.atomic():  # a savepoint
                jobs.enqueue_sync(note.new(text="inner"), conn=raw())
                raise RuntimeError("inner block fails")
        except RuntimeError:
            pass
    assert jobs.get_job_sync(outer).args == {"text": "outer"}
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM baton.jobs WHERE args->>'text' = 'inner'")
        assert cur.fetchone() == (0,)


def enqueue_everything() -> tuple[int, int]:
    """A COPY batch, a plain batch, a keyed job, a unique job and a workflow; return how
    many jobs of site.note and of site.once that makes."""
    conn = raw()
    assert not conn.autocommit  # atomic() turned it off: baton commits nothing
    batch = jobs.enqueue_many_sync(note.new_many({"text": f"b{i}"} for i in range(100)),
                                   conn=conn)
    assert len(batch) == 100
    jobs.enqueue_many_sync([note.new(text="small"), note.new(text="batch")], conn=conn)
    keyed = jobs.enqueue_sync(note.new(text="k"), conn=conn, idempotency_key="k-1")
    assert jobs.enqueue_sync(note.new(text="k"), conn=conn, idempotency_key="k-1") == keyed
    first = jobs.enqueue_sync(once.new(key="a"), conn=conn)
    again = jobs.enqueue_sync(once.new(key="a"), conn=conn)
    assert again == first and again.duplicate
    wf = baton.Workflow("site")
    wf.add("a", note.new(text="wf-a"))
    wf.add("b", note.new(text="wf-b"), deps=["a"])
    jobs.insert_sync(wf, conn=conn)
    return 100 + 2 + 1 + 2, 1


def check_rollback_and_commit() -> None:
    before = steps_of("site.note"), steps_of("site.once")
    try:
        with transaction.atomic():
            enqueue_everything()
            raise RuntimeError("the request fails")
    except RuntimeError:
        pass
    assert (steps_of("site.note"), steps_of("site.once")) == before  # nothing left
    with transaction.atomic():
        notes, onces = enqueue_everything()
    assert (steps_of("site.note"), steps_of("site.once")) == (before[0] + notes,
                                                              before[1] + onces)


def main() -> None:
    jobs.migrate_sync()
    check_atomic_requests()
    check_savepoint()
    check_rollback_and_commit()
    jobs.close_sync()
    sys.stdout.write("django checks passed\n")


if __name__ == "__main__":
    main()
