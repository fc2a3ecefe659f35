"""The plan and work-product shapes, and the sub-agents EXECUTOR delegates to.

Each shape is a msgspec ``Struct``: its JSON schema constrains the model's decoding (so
the answer is always parseable JSON of that shape) and the same type validates the
answer. msgspec rather than pydantic: ARCHITECT and EXECUTOR run for the whole test, and
pydantic costs each of them ~10 MB of private memory where msgspec costs ~1 MB. String
and list limits bound a complete answer to a few hundred characters; the
policy's ``max_tokens`` per agent leaves room for about one token per character (a
small model spelling out digits), so an answer is not cut short.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import msgspec

from trinity.agents.models.providers.base import Completion
from trinity.contract import (
    CONSTITUTION_VIOLATION,
    CRITICAL_ERROR,
    DUPLICATION,
    FEATURE_REQUEST,
    FLAKY_TEST,
)
from trinity.errors import InvalidModelOutput

Short = Annotated[str, msgspec.Meta(min_length=3, max_length=48)]
Line = Annotated[str, msgspec.Meta(min_length=3, max_length=80)]
# One to three short items (steps, tests, milestones).
Items = Annotated[list[Short], msgspec.Meta(min_length=1, max_length=3)]

QUALITY_ENFORCER = "QualityEnforcer"
AGENCY_CODE_AGENT = "AgencyCodeAgent"
TEST_GENERATOR = "TestGenerator"
PLANNER = "Planner"


class _Strict(msgspec.Struct, forbid_unknown_fields=True):
    """A shape whose answer may hold no field it does not name."""


class PlanTask(_Strict):
    description: Line
    acceptance: Line


class Plan(_Strict):
    summary: Line
    steps: Items
    # One task per signal: one event -> one signal -> one task -> one outcome, so the
    # number of messages an event causes is fixed (see the burst test).
    tasks: Annotated[list[PlanTask], msgspec.Meta(min_length=1, max_length=1)]


class ProposedChange(_Strict):
    file: Short
    change: Line
    rationale: Line
    risk: Literal["low", "medium", "high"]


class RefactoringPlan(_Strict):
    target_module: Short
    steps: Items
    verification: Line


class TestPlan(_Strict):
    suspected_cause: Line
    tests: Items
    stabilization: Line


class ImplementationPlan(_Strict):
    milestones: Items
    size: Literal["small", "medium", "large"]
    acceptance: Line


@cache
def schema_of(model: type[msgspec.Struct]) -> dict[str, Any]:
    """``model``'s JSON schema, built once (on every model call of ARCHITECT and EXECUTOR
    otherwise); shared, so callers must not change it.

    The shape itself is the root object and only nested shapes are ``$defs`` (msgspec
    makes the root a ``$ref`` too, which some OpenAI-compatible servers do not follow),
    and a choice lists its values in the order they are written (msgspec sorts them;
    a model shown the schema reads "low, medium, high" better than "high, low, medium").
    """
    schema: dict[str, Any] = msgspec.json.schema(model)
    defs = dict(schema.pop("$defs", {}))
    root = defs.pop(model.__name__)
    for name, hint in get_type_hints(model).items():
        if get_origin(hint) is Literal:
            root["properties"][name]["enum"] = list(get_args(hint))
    return {**root, "$defs": defs} if defs else root


@cache
def _decoder(model: type[_Strict]) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(model)


def parse_as(model: type[_Strict]) -> Any:
    """A parser for the router: the answer validated as ``model``, as a dict."""
    decoder = _decoder(model)

    def parse(completion: Completion) -> dict[str, Any]:
        try:
            answer: dict[str, Any] = msgspec.to_builtins(decoder.decode(completion.content))
        except msgspec.DecodeError as exc:  # not JSON, or JSON of another shape
            cut = " (cut at max_tokens)" if completion.finish_reason == "length" else ""
            raise InvalidModelOutput(
                f"answer is not a valid {model.__name__}{cut}: {_problem(exc)}") from None
        return answer
    return parse


def _problem(exc: msgspec.DecodeError) -> str:
    """msgspec's reason as ``where: what``: "Expected `str` of length <= 80 - at
    `$.tasks[0].description`" reads "tasks.0.description: Expected `str` of length <= 80"."""
    what, sep, at = str(exc).rpartition(" - at `$")
    if not sep:
        return f"answer: {exc}"
    where = at.rstrip("`").replace("[", ".").replace("]", "").lstrip(".")
    return f"{where or 'answer'}: {what}"


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
