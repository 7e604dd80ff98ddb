"""A small, safe template syntax for step prompts (pure): `{{ steps.<id>.text }}` only.

A step's prompt may quote the answer of a step it depends on:

    "Summarise these findings: {{ steps.research.text }}"

Nothing else is evaluated: no attribute access beyond `.text`, no filters, no code. Any
other `{{ ... }}` expression, or a `{{` left open, is an error naming the expression, so a
typo is caught at submit instead of reaching a model as literal braces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

EXPRESSION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
REFERENCE = re.compile(r"^\s*steps\.([A-Za-z][A-Za-z0-9_-]{0,63})\.text\s*$")


class TemplateError(ValueError):
    """A template expression that is not `{{ steps.<id>.text }}`."""


def _step_of(expression: str) -> str:
    found = REFERENCE.match(expression)
    if found is None:
        raise TemplateError(
            f"'{{{{{expression}}}}}' is not a supported expression; the only one is "
            "'{{ steps.<step id>.text }}'"
        )
    return found.group(1)


def references(template: str) -> list[str]:
    """The step ids a template quotes, in order of first use; TemplateError if malformed."""
    found: list[str] = []
    for match in EXPRESSION.finditer(template):
        step_id = _step_of(match.group(1))
        if step_id not in found:
            found.append(step_id)
    leftover = EXPRESSION.sub("", template)
    if "{{" in leftover:
        raise TemplateError("'{{' is opened but never closed with '}}'")
    return found


def render(template: str, outputs: Mapping[str, str]) -> str:
    """The template with every `{{ steps.<id>.text }}` replaced by that step's text.

    The replacement text is inserted as is and never scanned again, so an answer that
    itself contains braces cannot inject an expression. KeyError names a missing step.
    """
    references(template)  # malformed templates fail here, before anything is substituted

    def substitute(match: re.Match[str]) -> str:
        step_id = _step_of(match.group(1))
        if step_id not in outputs:
            raise KeyError(f"steps.{step_id}.text: no output for step '{step_id}'")
        return outputs[step_id]

    return EXPRESSION.sub(substitute, template)


def placeholder_size(template: str, output_bytes: Mapping[str, int]) -> int:
    """UTF-8 bytes of the template once rendered, with each reference counted as the
    given number of bytes (used to plan a step's worst case before its inputs exist)."""
    fixed = len(EXPRESSION.sub("", template).encode("utf-8"))
    return fixed + sum(output_bytes[m] for m in _all_references(template))


def _all_references(template: str) -> list[str]:
    return [_step_of(match.group(1)) for match in EXPRESSION.finditer(template)]
