"""The Python `helm template` (tests/helm_template.py) against Go text/template and Helm
behaviour: each expected output is what helm 3 prints for the same template and values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm_template import Chart, TemplateError, go_float, manifests, render


def chart(tmp_path: Path, templates: dict[str, str], values: str = "",
          schema: str | None = None) -> Chart:
    (tmp_path / "templates").mkdir(exist_ok=True)
    (tmp_path / "Chart.yaml").write_text(
        "apiVersion: v2\nname: demo\nversion: 1.2.3\nappVersion: '0.9'\n")
    (tmp_path / "values.yaml").write_text(values)
    if schema is not None:
        (tmp_path / "values.schema.json").write_text(schema)
    for name, text in templates.items():
        (tmp_path / "templates" / name).write_text(text)
    return Chart.load(tmp_path)


def one(tmp_path: Path, template: str, values: str = "",
        overrides: dict[str, Any] | None = None) -> str:
    return render(chart(tmp_path, {"t.yaml": template}, values), overrides)["demo/templates/t.yaml"]


def test_text_actions_and_trim_markers(tmp_path: Path) -> None:
    assert one(tmp_path, "a: {{ .Values.x }}\n", "x: hi") == "a: hi\n"
    assert one(tmp_path, "a:\n  {{- .Values.x }}\n", "x: hi") == "a:hi\n"
    assert one(tmp_path, "a: {{ .Values.x -}}\n\n  b", "x: hi") == "a: hib"
    assert one(tmp_path, "{{/* a comment */}}x\n{{- /* trimmed */ -}}\ny") == "xy"
    assert one(tmp_path, "{{ -3 }}") == "-3", "'{{-3' is a number, not a trim marker"


def test_numbers_from_values_are_float64_printed_as_go_does(tmp_path: Path) -> None:
    values = "small: 64\nbig: 1000000\nhalf: 0.5\ntiny: 0.00001\nbig2: 123456789\n"
    text = one(tmp_path, "{{ .Values.small }} {{ .Values.big }} {{ .Values.half }} "
                         "{{ .Values.tiny }} {{ .Values.big2 }} {{ 7 }}", values)
    assert text == "64 1e+06 0.5 1e-05 1.23456789e+08 7"
    assert [go_float(v) for v in (100000.0, 0.0001, -2.5, 1e21, 3.0e-7, 120.0)] == \
        ["100000", "0.0001", "-2.5", "1e+21", "3e-07", "120"]
    assert one(tmp_path, '{{ printf "%d" .Values.n }}|{{ .Values.n | int }}', "n: 3") == \
        "%!d(float64=3)|3"


def test_missing_keys_read_as_nothing_and_their_fields_fail(tmp_path: Path) -> None:
    assert one(tmp_path, "[{{ .Values.nope }}]") == "[]"
    with pytest.raises(TemplateError, match="nil pointer evaluating interface {}.b"):
        one(tmp_path, "{{ .Values.a.b }}")
    with pytest.raises(TemplateError, match=r"demo/templates/t.yaml:2"):
        one(tmp_path, "ok\n{{ .Values.a.b }}")


def test_if_else_if_with_range_and_variables(tmp_path: Path) -> None:
    template = (
        "{{- if .Values.disabled }}off{{ else if .Values.enabled }}on{{ else }}neither{{ end }}\n"
        "{{- with .Values.m }} {{ .k }}{{ end }}\n"
        "{{- range $key, $value := .Values.map }} {{ $key }}={{ $value }}{{ end }}\n"
        "{{- range $i, $v := .Values.list }} {{ $i }}:{{ $v }}{{ end }}\n"
        "{{- range .Values.empty }}x{{ else }} empty{{ end }}\n"
        "{{- $n := 0 }}{{ range .Values.list }}{{ $n = . }}{{ end }} last={{ $n }}\n"
        "{{- range .Values.list }}{{ $.Values.m.k }}{{ end }}")
    values = ("disabled: false\nenabled: 'yes'\nm: {k: v}\nmap: {b: 2, a: 1}\n"
              "list: [x, y]\nempty: []\n")
    assert one(tmp_path, template, values) == "on v a=1 b=2 0:x 1:y empty last=yvv"


def test_truth_follows_go(tmp_path: Path) -> None:
    template = "{{ range .Values.items }}{{ if . }}T{{ else }}F{{ end }}{{ end }}"
    values = "items: [0, 1, '', 'a', [], [1], {}, {a: 1}, null, false, true]"
    assert one(tmp_path, template, values) == "FTFTFTFTFFT"


def test_and_or_stop_early(tmp_path: Path) -> None:
    assert one(tmp_path, "{{ and .Values.a .Values.a.b }}|{{ or .Values.x .Values.y }}",
               "y: fallback") == "|fallback"
    assert one(tmp_path, "{{ if and .Values.a (not .Values.b) }}yes{{ end }}", "a: 1") == "yes"


def test_define_include_nindent_and_toyaml(tmp_path: Path) -> None:
    templates = {
        "_helpers.tpl": '{{- define "demo.labels" -}}\napp: {{ .name }}\n'
                        'tier: {{ .tier | default "web" }}\n{{- end }}',
        "t.yaml": "metadata:\n  labels:\n    {{- include \"demo.labels\" "
                  "(dict \"name\" .Chart.Name) | nindent 4 }}\n"
                  "spec:\n  {{- toYaml .Values.spec | nindent 2 }}\n",
    }
    values = "spec: {replicas: 2, cpu: '500m', z: [1, 2], enabled: true}\n"
    out = render(chart(tmp_path, templates, values))
    assert "demo/templates/_helpers.tpl" not in out
    assert out["demo/templates/t.yaml"] == (
        "metadata:\n  labels:\n    app: demo\n    tier: web\n"
        "spec:\n  cpu: 500m\n  enabled: true\n  replicas: 2\n  z:\n  - 1\n  - 2\n")


def test_the_template_action_renders_a_define_with_its_data(tmp_path: Path) -> None:
    assert one(tmp_path, '{{ define "x" }}[{{ . }}]{{ end }}{{ template "x" "a" }}'
                         '{{ template "x" }}') == "[a][]"
    with pytest.raises(TemplateError, match="no template 'y'"):
        one(tmp_path, '{{ template "y" }}')


def test_sprig_functions_the_chart_uses(tmp_path: Path) -> None:
    template = ('{{ quote .Values.s }} {{ .Values.n | quote }} {{ squote "x" }} '
                '{{ join "," .Values.l }} {{ printf "%s-%v" "a" .Values.n }} '
                '{{ "abcdef" | trunc 3 }} {{ trimSuffix "-" "ab-" }} {{ replace "." "-" "a.b" }} '
                '{{ hasKey .Values "s" }} {{ empty "" }} {{ eq .Values.s "q\\"t" }} '
                '{{ ternary "y" "n" true }} {{ len .Values.l }} {{ index .Values.l 1 }} '
                '{{ toString 5 }} {{ default "d" .Values.zero }}')
    values = 's: q"t\nn: 20\nl: [a, b]\nzero: 0\n'
    assert one(tmp_path, template, values) == \
        '"q\\"t" "20" \'x\' a,b a-20 abc ab a-b true true true y 2 b 5 d'


def test_eq_of_an_int_literal_and_a_value_is_an_error_as_in_go(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="incompatible types"):
        one(tmp_path, "{{ eq .Values.n 1 }}", "n: 1")
    assert one(tmp_path, "{{ eq .Values.n 1.0 }}", "n: 1") == "true"


def test_required_fail_and_unknown_functions_stop_the_render(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"execution error at \(demo/templates/t.yaml:1\)"
                                            r": give a password"):
        one(tmp_path, '{{ required "give a password" .Values.password }}')
    assert one(tmp_path, '{{ required "x" .Values.p }}', "p: s3cret") == "s3cret"
    with pytest.raises(TemplateError, match="no"):
        one(tmp_path, '{{ fail "no" }}')
    with pytest.raises(TemplateError, match='function "sha256sum" not defined'):
        one(tmp_path, '{{ sha256sum "x" }}')
    with pytest.raises(TemplateError, match="has no"):
        one(tmp_path, "{{ if true }}open")


def test_user_values_merge_over_the_chart_defaults(tmp_path: Path) -> None:
    values = "a: {b: 1, c: 2}\nl: [1, 2]\ngone: x\n"
    text = one(tmp_path, "{{ toYaml .Values }}", values,
               {"a": {"c": 3}, "l": [9], "gone": None, "new": True})
    assert yaml.safe_load(text) == {"a": {"b": 1, "c": 3}, "l": [9], "new": True}


def test_values_schema_is_checked_with_the_path_of_each_error(tmp_path: Path) -> None:
    schema = ('{"type": "object", "properties": {"replicas": {"type": "integer", '
              '"minimum": 1}}, "additionalProperties": false}')
    made = chart(tmp_path, {"t.yaml": "r: {{ .Values.replicas }}"}, "replicas: 1", schema)
    assert render(made)["demo/templates/t.yaml"] == "r: 1"
    with pytest.raises(TemplateError, match="replicas: 0 is less than the minimum of 1"):
        render(made, {"replicas": 0})
    with pytest.raises(TemplateError, match="Additional properties"):
        render(made, {"replica": 2})


def test_manifests_split_documents_and_drop_empty_ones(tmp_path: Path) -> None:
    template = ("---\n{{ if false }}kind: A\n{{ end }}---\nkind: B\n---\n# only a comment\n"
                "---\nkind: C\n")
    docs = manifests(render(chart(tmp_path, {"t.yaml": template})))
    assert [d["kind"] for _, d in docs] == ["B", "C"]
