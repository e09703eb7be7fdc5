"""The worker: runs jobs from the queues of one app."""

from baton.worker.settings import WorkerSettings, parse_queues
from baton.worker.worker import Worker

__all__ = ["Worker", "WorkerSettings", "parse_queues"]
