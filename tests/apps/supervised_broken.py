"""An app that imports in the supervisor but not in the worker processes it starts, as
after a deploy that broke a module the supervisor had already imported."""

from __future__ import annotations

import os

import baton
from baton.worker.supervisor import ENV_SUPERVISOR_PID

if ENV_SUPERVISOR_PID in os.environ:
    raise RuntimeError("tests.apps.supervised_broken cannot be imported in a worker process")

app = baton.Baton()
