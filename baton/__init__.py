"""Baton: a Postgres-native job queue with DAG workflows."""

from baton.app import Baton
from baton.context import Context
from baton.dag import Workflow
from baton.errors import (
    ArgsError,
    BatonError,
    ConfigurationError,
    CycleError,
    DatabaseError,
    DuplicateStepError,
    JobNotFound,
    MigrationError,
    NoResultError,
    NoSuchStepError,
    NotADependencyError,
    NotInWorkflowError,
    OptionsError,
    OutcomeUnknownError,
    PayloadTooLargeError,
    ResultError,
    StepError,
    StepNameWarning,
    UnknownDependencyError,
    UnknownStepError,
    WorkflowError,
    WorkflowNotFound,
)
from baton.job import Job, JobSpec, JobState
from baton.signals import Cancel, Discard, Signal, Snooze
from baton.step import JobBatch, Step
from baton.worker import Worker, WorkerSettings

__all__ = [
    "ArgsError",
    "Baton",
    "BatonError",
    "Cancel",
    "ConfigurationError",
    "Context",
    "CycleError",
    "DatabaseError",
    "Discard",
    "DuplicateStepError",
    "Job",
    "JobBatch",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "MigrationError",
    "NoResultError",
    "NoSuchStepError",
    "NotADependencyError",
    "NotInWorkflowError",
    "OptionsError",
    "OutcomeUnknownError",
    "PayloadTooLargeError",
    "ResultError",
    "Signal",
    "Snooze",
    "Step",
    "StepError",
    "StepNameWarning",
    "UnknownDependencyError",
    "UnknownStepError",
    "Worker",
    "WorkerSettings",
    "Workflow",
    "WorkflowError",
    "WorkflowNotFound",
]
