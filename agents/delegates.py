"""The plan and work-product shapes, and the sub-agents EXECUTOR delegates to.

Each shape is a pydantic model: its JSON schema constrains the model's decoding (so
the answer is always parseable JSON of that shape) and the same model validates the
answer. String and list limits bound a complete answer to a few hundred characters; the
policy's ``max_tokens`` per agent leaves room for about one token per character (a
small model spelling out digits), so an answer is not cut short.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trinity.agents.models.providers.base import Completion
from trinity.contract import (
    CONSTITUTION_VIOLATION,
    CRITICAL_ERROR,
    DUPLICATION,
    FEATURE_REQUEST,
    FLAKY_TEST,
)
from trinity.errors import InvalidModelOutput

Short = Annotated[str, Field(min_length=3, max_length=48)]
Line = Annotated[str, Field(min_length=3, max_length=80)]

QUALITY_ENFORCER = "QualityEnforcer"
AGENCY_CODE_AGENT = "AgencyCodeAgent"
TEST_GENERATOR = "TestGenerator"
PLANNER = "Planner"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlanTask(_Strict):
    description: Line
    acceptance: Line


class Plan(_Strict):
    summary: Line
    steps: list[Short] = Field(min_length=1, max_length=3)
    # One task per signal: one event -> one signal -> one task -> one outcome, so the
    # number of messages an event causes is fixed (see the burst test).
    tasks: list[PlanTask] = Field(min_length=1, max_length=1)


class ProposedChange(_Strict):
    file: Short
    change: Line
    rationale: Line
    risk: Literal["low", "medium", "high"]


class RefactoringPlan(_Strict):
    target_module: Short
    steps: list[Short] = Field(min_length=1, max_length=3)
    verification: Line


class TestPlan(_Strict):
    suspected_cause: Line
    tests: list[Short] = Field(min_length=1, max_length=3)
    stabilization: Line


class ImplementationPlan(_Strict):
    milestones: list[Short] = Field(min_length=1, max_length=3)
    size: Literal["small", "medium", "large"]
    acceptance: Line


@cache
def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema, built once (pydantic takes ~0.3 ms per call, on every model
    call of ARCHITECT and EXECUTOR); shared, so callers must not change it."""
    return model.model_json_schema()


def parse_as(model: type[_Strict]) -> Any:
    """A parser for the router: the answer validated as ``model``, as a dict."""
    def parse(completion: Completion) -> dict[str, Any]:
        try:
            return model.model_validate_json(completion.content).model_dump()
        except ValidationError as exc:
            cut = " (cut at max_tokens)" if completion.finish_reason == "length" else ""
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "answer"
            raise InvalidModelOutput(
                f"answer is not a valid {model.__name__}{cut}: {where}: {first['msg']}"
            ) from None
    return parse


@dataclass(frozen=True)
class Delegate:
    """A sub-agent: its role and the work product it returns."""

    name: str
    product: type[_Strict]
    role: str

    @property
    def product_kind(self) -> str:
        return {ProposedChange: "proposed_change", RefactoringPlan: "refactoring_plan",
                TestPlan: "test_plan", ImplementationPlan: "implementation_plan"}[self.product]


# What each pattern is delegated to; critical errors get an emergency fix.
_DELEGATES: dict[str, Delegate] = {
    CONSTITUTION_VIOLATION: Delegate(
        QUALITY_ENFORCER, ProposedChange,
        "You are QualityEnforcer. Propose the smallest code change that makes the code "
        "comply with the project's rules (typing, linting, style)."),
    CRITICAL_ERROR: Delegate(
        AGENCY_CODE_AGENT, ProposedChange,
        "You are AgencyCodeAgent on an emergency fix. Propose the smallest safe code "
        "change that stops the failure."),
    DUPLICATION: Delegate(
        AGENCY_CODE_AGENT, RefactoringPlan,
        "You are AgencyCodeAgent. Plan a refactoring that merges the duplicated code "
        "into one shared place."),
    FLAKY_TEST: Delegate(
        TEST_GENERATOR, TestPlan,
        "You are TestGenerator. Find the likely cause of the flaky test and list tests "
        "that pin it down."),
    FEATURE_REQUEST: Delegate(
        PLANNER, ImplementationPlan,
        "You are the Planner. Break the requested feature into implementation "
        "milestones."),
}


def delegate_for(pattern: str | None) -> Delegate:
    try:
        return _DELEGATES[pattern or ""]
    except KeyError:
        raise KeyError(f"no delegate for pattern {pattern!r}") from None


def delegate_named(name: str, pattern: str | None) -> Delegate:
    """The delegate a task names, checked against its pattern."""
    delegate = delegate_for(pattern)
    if delegate.name != name:
        raise KeyError(f"task names delegate {name!r} but pattern {pattern!r} goes to "
                       f"{delegate.name}")
    return delegate
