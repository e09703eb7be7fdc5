"""The workflow engine: DAGs of jobs gated by their dependencies.

The queue core (inserter, producer, completer) knows nothing of workflows; it calls the
engine at its moments (see :mod:`baton.worker.engine`). Here live gating
(:mod:`.gate`), the engine the worker runs (:mod:`.engine`), settlement and the sweep
(:mod:`.settle`), step announcements (:mod:`.announce`), the client's reads and
writes (:mod:`.store`) and resuming a failed workflow (:mod:`.resume`).
"""

from baton.workflows.resume import resume_workflow, retry_step
from baton.workflows.settle import SETTLED_STATES, cancel_step, sweep
from baton.workflows.store import (
    WorkflowInfo,
    append,
    dump_result,
    get,
    insert,
    result,
    results,
)

__all__ = ["SETTLED_STATES", "WorkflowInfo", "append", "cancel_step", "dump_result", "get",
           "insert", "result", "results", "resume_workflow", "retry_step", "sweep"]
