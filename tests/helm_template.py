"""`helm template` for tests, in Python: renders deploy/helm's chart without the helm binary.

helm is not on PyPI, so the deploy tests render the chart with this: Go's text/template
language (actions, `{{-`/`-}}` trimming, pipelines, variables, if/else if/range/with,
define/include/template) and the Sprig and Helm functions the chart uses, with Helm's own
semantics where they bite: values pass through JSON (every number is a float64, printed
by Go's %v, so 1000000 prints as 1e+06), a missing key reads as nothing, printing a
field of nothing is an error, map keys range in sorted order, `toYaml` drops the final
newline, `required` and `fail` stop the render, and values.schema.json is checked.

What is outside that subset (an unknown function, a construct not listed) is refused with
the file and line, never guessed: a chart that renders here uses only what is
implemented, and what is implemented follows Go and Helm (tests/test_helm_template.py).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# --- lexing ------------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<raw>`[^`]*`)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<num>-?(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?))
  | (?P<op>:=|=|\||\(|\)|,)
  | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
""", re.X)
KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block"}


class TemplateError(Exception):
    """The chart could not be rendered; the message names the template and line."""


class _Failed(Exception):
    """`required` or `fail` stopped the render (Helm's 'execution error')."""


@dataclass
class Token:
    kind: str
    text: str
    spaced: bool  # whitespace before it (tells `(x).y` from `(x) .y`)


def _tokens(source: str, where: str) -> list[Token]:
    found, pos, spaced = [], 0, False
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None:
            raise TemplateError(f"{where}: cannot read {source[pos:pos + 20]!r}")
        kind = match.lastgroup or ""
        if kind == "ws":
            spaced = True
        else:
            found.append(Token(kind, match.group(), spaced))
            spaced = False
        pos = match.end()
    return found


# --- the tree ----------------------------------------------------------------------------


@dataclass
class Pipeline:
    declare: list[str]
    assign: bool  # `=` (set an existing variable) rather than `:=`
    commands: list[list[Any]]  # each command: operands (literal, Field, Var, Sub, Func)


@dataclass
class Lit:
    value: Any


@dataclass
class Field:
    base: Any  # None: dot; Var or Sub: that value
    names: list[str]


@dataclass
class Var:
    name: str


@dataclass
class Sub:
    pipeline: Pipeline


@dataclass
class Func:
    name: str


@dataclass
class Node:
    kind: str  # text, action, if, range, with, template
    where: str
    text: str = ""
    pipeline: Pipeline | None = None
    branches: list[tuple[Pipeline, list[Node]]] = field(default_factory=list)
    body: list[Node] = field(default_factory=list)
    otherwise: list[Node] = field(default_factory=list)
    name: str = ""


def _pieces(source: str) -> Iterator[tuple[str, str, int]]:
    """('text', text, line) and ('action', inside, line), trim markers applied."""
    pos, trim_next = 0, False
    for match in _ACTION.finditer(source):
        text = source[pos:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        line = source.count("\n", 0, match.start()) + 1
        if text:
            yield "text", text, line
        inner = match.group(2)
        if not inner.strip().startswith("/*"):
            yield "action", inner, line
        elif not inner.strip().endswith("*/"):
            raise TemplateError(f"line {line}: unclosed comment")
        trim_next = bool(match.group(3))
        pos = match.end()
    text = source[pos:]
    yield "text", text.lstrip() if trim_next else text, source.count("\n") + 1


class _Parser:
    def __init__(self, source: str, name: str) -> None:
        self.name = name
        self.items = list(_pieces(source))
        self.pos = 0
        self.defines: dict[str, list[Node]] = {}

    def parse(self) -> list[Node]:
        nodes, stop = self._block()
        if stop is not None:
            raise TemplateError(f"{stop[1]}: unexpected {{{{{stop[0]}}}}}")
        return nodes

    def _block(self) -> tuple[list[Node], tuple[str, str, list[Token]] | None]:
        """Nodes up to an `else` or `end` (returned as the stop), or the end of the file."""
        nodes: list[Node] = []
        while self.pos < len(self.items):
            kind, text, line = self.items[self.pos]
            self.pos += 1
            where = f"{self.name}:{line}"
            if kind == "text":
                nodes.append(Node("text", where, text=text))
                continue
            tokens = _tokens(text, where)
            if not tokens:
                raise TemplateError(f"{where}: empty action")
            head = tokens[0].text if tokens[0].kind == "ident" else ""
            if head in ("else", "end"):
                return nodes, (head, where, tokens[1:])
            nodes.extend(self._control(head, tokens, where))
        return nodes, None

    def _control(self, head: str, tokens: list[Token], where: str) -> list[Node]:
        if head in ("if", "with", "range"):
            return [self._conditional(head, tokens[1:], where)]
        if head == "define":
            name = _string_operand(tokens[1:], where)
            body, stop = self._block()
            if stop is None or stop[0] != "end":
                raise TemplateError(f"{where}: define {name!r} has no end")
            self.defines[name] = body
            return []
        if head == "template":
            if len(tokens) < 2 or tokens[1].kind not in ("str", "raw"):
                raise TemplateError(f"{where}: template needs a name")
            rest = _PipelineParser(tokens[2:], where).pipeline() if len(tokens) > 2 else None
            return [Node("template", where, name=_unquote(tokens[1]), pipeline=rest)]
        if head in ("block", "break", "continue"):
            raise TemplateError(f"{where}: {{{{{head}}}}} is not supported by this renderer")
        return [Node("action", where, pipeline=_PipelineParser(tokens, where).pipeline())]

    def _conditional(self, head: str, tokens: list[Token], where: str) -> Node:
        node = Node(head, where)
        pipeline = _PipelineParser(tokens, where, in_range=head == "range").pipeline()
        body, stop = self._block()
        node.branches.append((pipeline, body))
        while stop is not None and stop[0] == "else" and stop[2]:
            again = stop[2]
            if again[0].text != head or head == "range":
                raise TemplateError(f"{stop[1]}: 'else {again[0].text}' inside {head}")
            more = _PipelineParser(again[1:], stop[1]).pipeline()
            body, stop = self._block()
            node.branches.append((more, body))
        if stop is not None and stop[0] == "else":
            node.otherwise, stop = self._block()
        if stop is None or stop[0] != "end":
            raise TemplateError(f"{where}: {{{{{head}}}}} has no {{{{end}}}}")
        return node


def _unquote(token: Token) -> str:
    return token.text[1:-1] if token.kind == "raw" else str(json.loads(token.text))


def _string_operand(tokens: list[Token], where: str) -> str:
    if len(tokens) != 1 or tokens[0].kind not in ("str", "raw"):
        raise TemplateError(f"{where}: expected one quoted name")
    return _unquote(tokens[0])


class _PipelineParser:
    def __init__(self, tokens: list[Token], where: str, in_range: bool = False) -> None:
        self.tokens, self.where, self.pos, self.in_range = tokens, where, 0, in_range

    def pipeline(self, closing: bool = False) -> Pipeline:
        declare, assign = self._declaration()
        commands: list[list[Any]] = [[]]
        while self.pos < len(self.tokens):
            token = self.tokens[self.pos]
            if token.text == ")" and token.kind == "op":
                if not closing:
                    raise TemplateError(f"{self.where}: unexpected ')'")
                break
            self.pos += 1
            if token.kind == "op" and token.text == "|":
                commands.append([])
            else:
                commands[-1].append(self._operand(token))
        if not all(commands):
            raise TemplateError(f"{self.where}: empty command in pipeline")
        return Pipeline(declare, assign, commands)

    def _declaration(self) -> tuple[list[str], bool]:
        names: list[str] = []
        pos = self.pos
        while pos < len(self.tokens) and self.tokens[pos].kind == "var":
            names.append(self.tokens[pos].text)
            pos += 1
            if pos < len(self.tokens) and self.tokens[pos].text == "," and self.in_range:
                pos += 1
                continue
            break
        if names and pos < len(self.tokens) and self.tokens[pos].text in (":=", "="):
            self.pos = pos + 1
            return names, self.tokens[pos].text == "="
        return [], False

    def _operand(self, token: Token) -> Any:
        operand = self._term(token)
        nxt = self.tokens[self.pos] if self.pos < len(self.tokens) else None
        if nxt is not None and nxt.kind == "field" and not nxt.spaced and nxt.text != ".":
            self.pos += 1
            return Field(operand, nxt.text.split(".")[1:])
        return operand

    def _term(self, token: Token) -> Any:
        kind, text = token.kind, token.text
        if kind in ("str", "raw"):
            return Lit(_unquote(token))
        if kind == "num":
            return Lit(_number(text))
        if kind == "field":
            return Field(None, [] if text == "." else text.split(".")[1:])
        if kind == "var":
            name, *names = text.split(".")
            return Field(Var(name), names) if names else Var(name)
        if kind == "op" and text == "(":
            inner = self.pipeline(closing=True)
            if self.pos >= len(self.tokens) or self.tokens[self.pos].text != ")":
                raise TemplateError(f"{self.where}: unclosed '('")
            self.pos += 1
            return Sub(inner)
        if kind == "ident":
            if text in ("true", "false"):
                return Lit(text == "true")
            if text == "nil":
                return Lit(None)
            if text in KEYWORDS:
                raise TemplateError(f"{self.where}: unexpected {text!r}")
            return Func(text)
        raise TemplateError(f"{self.where}: unexpected {text!r}")


def _number(text: str) -> int | float:
    if text.lower().lstrip("-").startswith("0x"):
        return int(text, 16)
    return float(text) if any(c in text for c in ".eE") else int(text)


# --- values and printing -----------------------------------------------------------------


def as_json(value: Any) -> Any:
    """`value` as Helm holds values after YAML -> JSON: every number a float."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    raise TemplateError(f"a value of type {type(value).__name__} cannot be in values")


def go_float(value: float) -> str:
    """A float64 as Go's %v prints it: strconv's 'g' with the shortest digits, which uses
    an exponent when it is below -4 or at least 6 (so 1000000 prints as 1e+06)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    sign = "-" if math.copysign(1, value) < 0 else ""
    if value == 0:
        return sign + "0"
    _, digit_tuple, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    point = len(digits) + int(exponent)  # the decimal point sits after this many digits
    if not -4 <= point - 1 < 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        shown = point - 1
        return f"{sign}{mantissa}e{'-' if shown < 0 else '+'}{abs(shown):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def go_print(value: Any) -> str:
    """`value` as {{ }} prints it (fmt %v, Helm's '<no value>' -> '')."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, int | str):
        return str(value)
    raise TemplateError(f"printing a {type(value).__name__} directly: use toYaml or join")


def truth(value: Any) -> bool:
    """Go's truth: false, 0, nil, '' and empty lists and maps are false."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str | list | dict):
        return len(value) > 0
    return True


# --- functions ---------------------------------------------------------------------------


_KINDS = ((bool, "bool"), (int, "int"), (float, "float"), (str, "string"))


def _kind(value: Any) -> str:
    """Go's basic kind of `value` (bool before int: a Python bool is an int)."""
    if value is None:
        return "nil"
    return next((name for type_, name in _KINDS if isinstance(value, type_)), "other")


def _eq(first: Any, *others: Any) -> bool:
    for other in others:
        if first is None or other is None:
            if first is other:
                return True
            continue
        if _kind(first) != _kind(other) or _kind(first) == "other":
            raise TemplateError(f"eq: incompatible types for comparison: {first!r}, {other!r}")
        if first == other:
            return True
    return False


def _compare(name: str, test: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(a: Any, b: Any) -> bool:
        if _kind(a) != _kind(b) or _kind(a) not in ("int", "float", "string"):
            raise TemplateError(f"{name}: incompatible types for comparison: {a!r}, {b!r}")
        return test(a, b)
    return compare


def _go_quote(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif not char.isprintable():
            out.append(f"\\x{ord(char):02x}" if ord(char) < 0x80 else f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def strval(value: Any) -> str:
    """Sprig's strval: a string as it is, anything else as %v (nil as '<nil>')."""
    if value is None:
        return "<nil>"
    return go_print(value)


def _printf(fmt: str, *args: Any) -> str:
    values = list(args)

    def verb(match: re.Match[str]) -> str:
        spec = match.group(1)
        if spec == "%":
            return "%"
        if not values:
            return f"%!{spec}(MISSING)"
        value = values.pop(0)
        if spec == "d":
            if _kind(value) != "int":
                return f"%!d({_go_type(value)}={strval(value)})"
            return str(value)
        if spec == "q":
            return _go_quote(strval(value))
        return strval(value) if value is not None or spec == "v" else "%!s(<nil>)"

    text = re.sub(r"%([%vsdq])", verb, fmt)
    if values:
        text += "%!(EXTRA " + ", ".join(f"{_go_type(v)}={strval(v)}" for v in values) + ")"
    return text


def _go_type(value: Any) -> str:
    return {"int": "int", "float": "float64", "string": "string", "bool": "bool"}.get(
        _kind(value), "interface {}")


def _empty(value: Any) -> bool:
    return not truth(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        try:
            return int(float(value)) if value.strip() else 0
        except ValueError:
            return 0
    return 0


def _to_yaml(value: Any) -> str:
    if value is None:
        return "null"
    text = str(yaml.safe_dump(_ints_where_integral(value), default_flow_style=False,
                              sort_keys=True, width=10**9))
    return text.removesuffix("\n...\n").rstrip("\n")  # a scalar: no document-end marker


def _ints_where_integral(value: Any) -> Any:
    """Floats as encoding/json writes them: 64.0 -> 64 (then YAML keeps the integer)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints_where_integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints_where_integral(v) for v in value]
    return value


def _indent(spaces: Any, text: Any) -> str:
    pad = " " * _to_int(spaces)
    return pad + strval(text).replace("\n", "\n" + pad)


def _dict(*pairs: Any) -> dict[str, Any]:
    if len(pairs) % 2:
        pairs = (*pairs, "")
    return {strval(pairs[i]): pairs[i + 1] for i in range(0, len(pairs), 2)}


def _set(mapping: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    mapping[key] = value
    return mapping


def _required(message: str, value: Any) -> Any:
    if value is None or value == "":
        raise _Failed(message)
    return value


def _fail(message: str) -> Any:
    raise _Failed(message)


def _index(container: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(container, dict):
            container = container.get(key)
        elif isinstance(container, list) and _kind(key) == "int":
            if not 0 <= key < len(container):
                raise TemplateError(f"index out of range: {key}")
            container = container[key]
        else:
            raise TemplateError(f"cannot index {container!r} with {key!r}")
    return container


def _len(value: Any) -> int:
    if not isinstance(value, str | list | dict):
        raise TemplateError(f"len of {_go_type(value)}")
    return len(value)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    # Go text/template builtins ('and' and 'or' are in _Render: they stop early)
    "not": lambda a: not truth(a),
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "lt": _compare("lt", lambda a, b: a < b),
    "le": _compare("le", lambda a, b: a <= b),
    "gt": _compare("gt", lambda a, b: a > b),
    "ge": _compare("ge", lambda a, b: a >= b),
    "len": _len,
    "index": _index,
    "print": lambda *a: "".join(strval(v) for v in a),
    "printf": _printf,
    # Sprig
    "default": lambda fallback, *given: given[0] if given and not _empty(given[0]) else fallback,
    "empty": _empty,
    "coalesce": lambda *a: next((v for v in a if not _empty(v)), None),
    "ternary": lambda yes, no, test: yes if truth(test) else no,
    "quote": lambda *a: " ".join(_go_quote(strval(v)) for v in a if v is not None),
    "squote": lambda *a: " ".join(f"'{strval(v)}'" for v in a if v is not None),
    "toString": strval,
    "int": _to_int,
    "indent": _indent,
    "nindent": lambda n, text: "\n" + _indent(n, text),
    "trim": lambda s: strval(s).strip(),
    "lower": lambda s: strval(s).lower(),
    "upper": lambda s: strval(s).upper(),
    "trunc": lambda n, s: strval(s)[:_to_int(n)] if _to_int(n) >= 0 else strval(s)[_to_int(n):],
    "trimSuffix": lambda suffix, s: strval(s).removesuffix(suffix),
    "trimPrefix": lambda prefix, s: strval(s).removeprefix(prefix),
    "replace": lambda old, new, s: strval(s).replace(old, new),
    "contains": lambda sub, s: sub in strval(s),
    "hasPrefix": lambda prefix, s: strval(s).startswith(prefix),
    "join": lambda sep, items: sep.join(strval(v) for v in (items or [])),
    "list": lambda *a: list(a),
    "append": lambda items, value: [*(items or []), value],
    "dict": _dict,
    "set": _set,
    "hasKey": lambda d, k: k in d,
    "required": _required,
    "fail": _fail,
    # Helm
    "toYaml": _to_yaml,
}


# --- evaluation --------------------------------------------------------------------------


class _Render:
    def __init__(self, defines: dict[str, list[Node]]) -> None:
        self.defines = defines
        self.depth = 0

    def run(self, nodes: list[Node], dot: Any, scope: list[dict[str, Any]]) -> str:
        out: list[str] = []
        scope.append({})
        try:
            for node in nodes:
                out.append(self._node(node, dot, scope))
        finally:
            scope.pop()
        return "".join(out)

    def _node(self, node: Node, dot: Any, scope: list[dict[str, Any]]) -> str:
        try:
            return self._dispatch(node, dot, scope)
        except _Failed as failed:
            raise TemplateError(f"execution error at ({node.where}): {failed}") from failed
        except TemplateError as error:
            if str(error).startswith(("execution error", "template:")):
                raise
            raise TemplateError(f"template: {node.where}: {error}") from error

    def _dispatch(self, node: Node, dot: Any, scope: list[dict[str, Any]]) -> str:
        if node.kind == "text":
            return node.text
        if node.kind == "action":
            assert node.pipeline is not None
            value = self.pipeline(node.pipeline, dot, scope)
            return "" if node.pipeline.declare else go_print(value)
        if node.kind == "template":
            data = self.pipeline(node.pipeline, dot, scope) if node.pipeline else None
            return self.include(node.name, data)
        if node.kind == "range":
            return self._range(node, dot, scope)
        for pipeline, body in node.branches:  # if / with
            scope.append({})
            try:
                value = self.pipeline(pipeline, dot, scope)
                if truth(value):
                    return self.run(body, value if node.kind == "with" else dot, scope)
            finally:
                scope.pop()
        return self.run(node.otherwise, dot, scope)

    def _range(self, node: Node, dot: Any, scope: list[dict[str, Any]]) -> str:
        pipeline, body = node.branches[0]
        names = pipeline.declare
        plain = Pipeline([], False, pipeline.commands)
        value = self.pipeline(plain, dot, scope)
        if isinstance(value, dict):
            items = [(k, value[k]) for k in sorted(value)]
        elif isinstance(value, list):
            items = list(enumerate(value))
        elif value is None:
            items = []
        else:
            raise TemplateError(f"range can't iterate over {value!r}")
        if not items:
            return self.run(node.otherwise, dot, scope)
        out = []
        for key, item in items:
            frame = {names[-1]: item} if names else {}
            if len(names) == 2:
                frame[names[0]] = key
            scope.append(frame)
            try:
                out.append(self.run(body, item, scope))
            finally:
                scope.pop()
        return "".join(out)

    def include(self, name: str, data: Any) -> str:
        if name not in self.defines:
            raise TemplateError(f"no template {name!r} associated with the chart")
        self.depth += 1
        if self.depth > 100:
            raise TemplateError(f"include {name!r}: recursion too deep")
        try:
            return self.run(self.defines[name], data, [{"$": data}])
        finally:
            self.depth -= 1

    def pipeline(self, pipeline: Pipeline, dot: Any, scope: list[dict[str, Any]]) -> Any:
        value: Any = _NOTHING
        for command in pipeline.commands:
            value = self._command(command, dot, scope, value)
        for name in pipeline.declare:
            if pipeline.assign:
                frame = next((f for f in reversed(scope) if name in f), None)
                if frame is None:
                    raise TemplateError(f"undefined variable: {name}")
                frame[name] = value
            else:
                scope[-1][name] = value
        return value

    def _command(self, command: list[Any], dot: Any, scope: list[dict[str, Any]],
                 piped: Any) -> Any:
        head, *rest = command
        if isinstance(head, Func) and head.name in ("and", "or"):
            return self._and_or(head.name, rest, dot, scope, piped)
        if isinstance(head, Func):
            args = [self._operand(a, dot, scope) for a in rest]
            if piped is not _NOTHING:
                args.append(piped)
            return self.call(head.name, args)
        if rest or piped is not _NOTHING:
            raise TemplateError(f"can't give arguments to a non-function {head!r}")
        return self._operand(head, dot, scope)

    def _and_or(self, name: str, operands: list[Any], dot: Any,
                scope: list[dict[str, Any]], piped: Any) -> Any:
        """The first false (and) or true (or) argument, evaluating no further; else the
        last (Go 1.18's short-circuit)."""
        thunks: list[Callable[[], Any]] = [
            lambda o=o: self._operand(o, dot, scope) for o in operands]  # type: ignore[misc]
        if piped is not _NOTHING:
            thunks.append(lambda: piped)
        if not thunks:
            raise TemplateError(f"{name} needs at least one argument")
        value = None
        for thunk in thunks:
            value = thunk()
            if truth(value) == (name == "or"):
                return value
        return value

    def call(self, name: str, args: list[Any]) -> Any:
        if name == "include":
            if len(args) != 2:
                raise TemplateError("include takes a name and a value")
            return self.include(args[0], args[1])
        if name == "tpl":
            raise TemplateError("tpl is not supported by this renderer")
        function = FUNCTIONS.get(name)
        if function is None:
            raise TemplateError(f'function "{name}" not defined')
        try:
            return function(*args)
        except TypeError as error:
            raise TemplateError(f"wrong arguments for {name}: {error}") from error

    def _operand(self, operand: Any, dot: Any, scope: list[dict[str, Any]]) -> Any:
        if isinstance(operand, Lit):
            return operand.value
        if isinstance(operand, Var):
            for frame in reversed(scope):
                if operand.name in frame:
                    return frame[operand.name]
            raise TemplateError(f"undefined variable: {operand.name}")
        if isinstance(operand, Sub):
            return self.pipeline(operand.pipeline, dot, scope)
        if isinstance(operand, Field):
            base = dot if operand.base is None else self._operand(operand.base, dot, scope)
            return _fields(base, operand.names)
        if isinstance(operand, Func):
            return self.call(operand.name, [])
        raise TemplateError(f"unexpected operand {operand!r}")


_NOTHING = object()


def _fields(value: Any, names: list[str]) -> Any:
    for name in names:
        if isinstance(value, dict):
            value = value.get(name)
        elif value is None:
            raise TemplateError(f"nil pointer evaluating interface {{}}.{name}")
        else:
            raise TemplateError(f"can't evaluate field {name} in type {_go_type(value)}")
    return value


# --- Helm --------------------------------------------------------------------------------


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing: maps merge key by key, anything else is replaced, null deletes."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass
class Chart:
    path: Path
    metadata: dict[str, Any]
    values: dict[str, Any]
    schema: dict[str, Any] | None
    templates: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> Chart:
        metadata = yaml.safe_load((path / "Chart.yaml").read_text())
        values = yaml.safe_load((path / "values.yaml").read_text()) or {}
        schema_path = path / "values.schema.json"
        schema = json.loads(schema_path.read_text()) if schema_path.exists() else None
        templates = {f"{metadata['name']}/templates/{p.name}": p.read_text()
                     for p in sorted((path / "templates").iterdir()) if p.is_file()}
        return cls(path, metadata, values, schema, templates)


def render(chart: Chart, values: dict[str, Any] | None = None, *, release: str = "aimesh",
           namespace: str = "aimesh") -> dict[str, str]:
    """Template name -> rendered text (partials `_*.tpl` and NOTES.txt left out), as
    `helm template RELEASE CHART -n NAMESPACE -f values` renders them."""
    merged = merge_values(chart.values, values or {})
    if chart.schema is not None:
        _validate(chart.schema, merged)
    top = {
        "Values": as_json(merged),
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm",
                    "IsInstall": True, "IsUpgrade": False, "Revision": 1},
        "Chart": {k[:1].upper() + k[1:]: v for k, v in chart.metadata.items()},
        "Capabilities": {"KubeVersion": {"Version": "v1.30.0"}},
    }
    parsed, defines = {}, {}
    for name, source in chart.templates.items():
        parser = _Parser(source, name)
        parsed[name] = parser.parse()
        defines.update(parser.defines)
    out = {}
    for name, nodes in parsed.items():
        base = name.rsplit("/", 1)[-1]
        if base.startswith("_") or base == "NOTES.txt":
            continue
        page = {**top, "Template": {"Name": name, "BasePath": name.rsplit("/", 1)[0]}}
        out[name] = _Render(defines).run(nodes, page, [{"$": page}])
    return out


def _validate(schema: dict[str, Any], values: Any) -> None:
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(values),
                    key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"- {'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
                 for e in errors]
        raise TemplateError("values don't meet the specifications of the schema(s):\n"
                            + "\n".join(lines))


_SEPARATOR = re.compile(r"(?:^|\s*\n)---\s*")


def manifests(rendered: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(template name, document) for every non-empty YAML document, as Helm splits them."""
    docs = []
    for name, text in rendered.items():
        for part in _SEPARATOR.split(text):
            try:
                doc = yaml.safe_load(part)
            except yaml.YAMLError as error:
                raise TemplateError(f"{name}: rendered YAML does not parse: {error}\n"
                                    f"{part}") from error
            if doc:
                docs.append((name, doc))
    return docs
