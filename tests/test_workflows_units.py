"""Workflow rules without servers: definitions, templates, the DAG checks, the graph's
dependents."""

from __future__ import annotations

from pathlib import Path

import pytest

from aimesh_tasks.errors import InvalidInput
from aimesh_tasks.workflows.dag import dependents, feeders, find_cycle, validate_workflow
from aimesh_tasks.workflows.model import Step, Workflow, load_workflow, parse_workflow
from aimesh_tasks.workflows.steps import step_message
from aimesh_tasks.workflows.template import TemplateError, references, render


def _flow(*steps: tuple[str, list[str]], prompt: str = "do {id}") -> Workflow:
    return Workflow(agent_id="unit-agent", steps=[
        Step(id=sid, prompt=prompt.format(id=sid), depends_on=deps) for sid, deps in steps])


def test_template_renders_dependency_text_and_never_rescans_it() -> None:
    template = "Summarise {{ steps.a.text }} and {{steps.b.text}}."
    assert references(template) == ["a", "b"]
    rendered = render(template, {"a": "{{ steps.b.text }}", "b": "two"})
    assert rendered == "Summarise {{ steps.b.text }} and two."


@pytest.mark.parametrize(("template", "words"), [
    ("{{ steps.a.output }}", "not a supported expression"),
    ("{{ __import__('os') }}", "not a supported expression"),
    ("{{ steps.a.text | upper }}", "not a supported expression"),
    ("open {{ steps.a.text", "never closed"),
])
def test_template_refuses_anything_but_step_text(template: str, words: str) -> None:
    with pytest.raises(TemplateError, match=words):
        references(template)


def test_render_names_a_missing_output() -> None:
    with pytest.raises(KeyError, match="steps.x.text"):
        render("{{ steps.x.text }}", {})


def test_levels_of_chain_fan_out_and_diamond() -> None:
    assert validate_workflow(_flow(("a", []), ("b", ["a"]), ("c", ["b"])), 10) == [
        ["a"], ["b"], ["c"]]
    fan = _flow(*[(f"r{n}", []) for n in range(3)], ("g", ["r0", "r1", "r2"]))
    assert validate_workflow(fan, 10) == [["r0", "r1", "r2"], ["g"]]
    diamond = _flow(("d", ["b", "c"]), ("b", ["a"]), ("c", ["a"]), ("a", []))
    assert validate_workflow(diamond, 10) == [["a"], ["b", "c"], ["d"]]


def test_feeders_name_the_quoted_step_at_the_end_of_the_longest_answer_chain() -> None:
    flow = Workflow(agent_id="unit-agent", steps=[
        Step(id="a", prompt="start"),
        Step(id="b", prompt="on {{ steps.a.text }}", depends_on=["a"]),
        Step(id="c", prompt="on {{ steps.b.text }}", depends_on=["b"]),
        Step(id="side", prompt="alone"),
        Step(id="order-only", prompt="no quote", depends_on=["c"]),
        Step(id="join", prompt="{{ steps.side.text }} and {{ steps.c.text }}",
             depends_on=["side", "c"]),
    ])
    fed = feeders(flow.steps, validate_workflow(flow, 10))
    assert fed == {"a": None, "b": "a", "c": "b", "side": None, "order-only": None,
                   "join": "c"}
    message = step_message(flow.agent_id, flow.step("join"), "run-1", {"side": "x", "c": "y"},
                           fed["join"])
    assert message.metadata["aimesh.parent_id"] == "run-1.c"
    assert "aimesh.parent_id" not in step_message(flow.agent_id, flow.step("a"), "run-1",
                                                  {}).metadata


@pytest.mark.parametrize(("steps", "field", "words"), [
    ([], "steps", "at least one step"),
    ([("a", []), ("a", [])], "steps.a", "two steps have the id 'a'"),
    ([("a", ["ghost"])], "steps.a.depends_on", "'ghost' is not a step"),
    ([("a", ["c"]), ("b", ["a"]), ("c", ["b"])], "steps.a.depends_on", "a -> c -> b -> a"),
    ([("a", ["a"])], "steps.a.depends_on", "cycle: a -> a"),
])
def test_graph_errors_name_the_step_and_the_rule(
    steps: list[tuple[str, list[str]]], field: str, words: str
) -> None:
    with pytest.raises(InvalidInput, match=words) as caught:
        validate_workflow(_flow(*steps), 10)
    assert caught.value.field == field


def test_too_many_steps_names_the_setting() -> None:
    with pytest.raises(InvalidInput, match="AIMESH_WORKFLOW_MAX_STEPS"):
        validate_workflow(_flow(*[(f"s{n}", []) for n in range(4)]), 3)


def test_template_quoting_a_step_that_is_not_a_dependency_is_refused() -> None:
    flow = Workflow(agent_id="unit-agent", steps=[
        Step(id="a", prompt="x"), Step(id="b", prompt="y"),
        Step(id="c", prompt="{{ steps.a.text }} {{ steps.b.text }}", depends_on=["a"])])
    with pytest.raises(InvalidInput, match="'b' is not in its depends_on") as caught:
        validate_workflow(flow, 10)
    assert caught.value.field == "steps.c.prompt"


def test_find_cycle_on_a_larger_graph() -> None:
    graph = {"a": ["b"], "b": ["c", "d"], "c": [], "d": ["e"], "e": ["b"]}
    assert find_cycle(graph) == ["b", "d", "e", "b"]
    assert find_cycle({"a": ["b"], "b": []}) is None


def test_bad_definition_fields_are_named() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_workflow({"agent_id": "ok-agent", "steps": [{"id": "a", "prompt": "x",
                                                           "max_tokens": 0}]})
    assert caught.value.field == "steps[0].max_tokens"
    with pytest.raises(InvalidInput, match="agent_id"):
        parse_workflow({"agent_id": "Not Valid", "steps": []})
    with pytest.raises(InvalidInput, match="policy"):
        parse_workflow({"agent_id": "a", "steps": [], "policy": "sometimes"})


def test_yaml_and_json_files_load_the_same_workflow(tmp_path: Path) -> None:
    (tmp_path / "w.yaml").write_text(
        "agent_id: planner\npolicy: continue\nsteps:\n  - id: a\n    prompt: hi\n"
        "  - id: b\n    prompt: 'say {{ steps.a.text }}'\n    depends_on: [a]\n")
    (tmp_path / "w.json").write_text(
        '{"agent_id": "planner", "policy": "continue", "steps": [{"id": "a", "prompt": "hi"},'
        ' {"id": "b", "prompt": "say {{ steps.a.text }}", "depends_on": ["a"]}]}')
    assert load_workflow(tmp_path / "w.yaml") == load_workflow(tmp_path / "w.json")
    (tmp_path / "bad.yaml").write_text("steps: [unclosed")
    with pytest.raises(InvalidInput, match="not valid YAML"):
        load_workflow(tmp_path / "bad.yaml")


def test_dependents_invert_depends_on_in_definition_order() -> None:
    not_sp = _flow(("a", []), ("b", []), ("c", ["a", "b"]), ("d", ["b"]), ("e", []))
    assert dependents(not_sp.to_json_dict()["steps"]) == {
        "a": ["c"], "b": ["c", "d"], "c": [], "d": [], "e": []}
