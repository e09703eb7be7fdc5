"""Workflows compiled from data (a JSON template), validated before anything runs."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from baton.dag import Workflow
from baton.errors import WorkflowError

if TYPE_CHECKING:
    from baton.app import Baton


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobTemplate(_Strict):
    """A job: a registered step name and its arguments."""

    step: str
    args: dict[str, Any] = Field(default_factory=dict)


class StepTemplate(JobTemplate):
    """One step, or (with ``models``) a multi-model fan-out group."""

    name: str
    deps: list[str] = Field(default_factory=list)
    ignore_cancelled: bool | None = None
    ignore_discarded: bool | None = None
    model: str | None = None
    models: list[str] | None = None
    synthesize_with: JobTemplate | None = None
    min_success: int | None = None
    budget_usd: Decimal | None = None
    """With ``models``: the group's budget (see :meth:`Workflow.budget`)."""


class WorkflowTemplate(_Strict):
    """A whole workflow as data."""

    label: str = "workflow"
    ignore_cancelled: bool = False
    ignore_discarded: bool = False
    debug: bool = False
    models: dict[str, str] = Field(default_factory=dict)
    budget_usd: Decimal | None = None
    steps: list[StepTemplate]


def compile_template(app: Baton, data: dict[str, Any] | str) -> Workflow:
    """Build a :class:`Workflow` from a template (a dict or its JSON text).

    Every step must be registered with ``app``; its args are validated as ``new()`` does.

    :raises WorkflowError: if the template is malformed or names an unknown step.
    :raises ArgsError: if a step's args are invalid.
    """
    try:
        template = (WorkflowTemplate.model_validate_json(data) if isinstance(data, str)
                    else WorkflowTemplate.model_validate(data))
    except ValidationError as exc:
        raise WorkflowError(f"invalid workflow template: {exc}") from exc
    wf = Workflow(template.label, ignore_cancelled=template.ignore_cancelled,
                  ignore_discarded=template.ignore_discarded, debug=template.debug,
                  models=dict(template.models), budget_usd=template.budget_usd)
    for spec in template.steps:
        job = app.get_step(spec.step).new(**spec.args)
        if spec.models is not None:
            synth = (app.get_step(spec.synthesize_with.step).new(**spec.synthesize_with.args)
                     if spec.synthesize_with else None)
            wf.add_fan_out(spec.name, job, models=spec.models, deps=spec.deps,
                           synthesize_with=synth, min_success=spec.min_success,
                           ignore_cancelled=spec.ignore_cancelled,
                           ignore_discarded=spec.ignore_discarded,
                           budget_usd=spec.budget_usd)
        else:
            if spec.budget_usd is not None:
                raise WorkflowError(
                    f"step {spec.name!r}: budget_usd is for a fan-out group (with models) or "
                    "the whole workflow")
            wf.add(spec.name, job, deps=spec.deps, ignore_cancelled=spec.ignore_cancelled,
                   ignore_discarded=spec.ignore_discarded, model=spec.model,
                   min_success=spec.min_success)
    wf.validate()
    return wf
