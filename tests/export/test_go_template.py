"""The Go-template subset the Modelfile check renders with, on templates whose Go output is known."""

from __future__ import annotations

import pytest

from finsight.export.go_template import GoTemplateError, render

MESSAGES = [{"Role": "system", "Content": "S"}, {"Role": "user", "Content": "U1"},
            {"Role": "assistant", "Content": "A1"}, {"Role": "user", "Content": "U2"}]


def test_fields_conditions_and_trimming():
    assert render("a {{ .X }} b", {"X": "x"}) == "a x b"
    assert render("a  {{- .X -}}  b", {"X": "x"}) == "axb"  # {{- and -}} eat the spaces beside them
    assert render("{{ if .X }}yes{{ else }}no{{ end }}", {"X": ""}) == "no"
    assert render('{{ if eq .X "b" }}1{{ else if eq .X "c" }}2{{ else }}3{{ end }}', {"X": "c"}) == "2"
    assert render("{{ if and .X (not .Y) }}ok{{ end }}", {"X": 1, "Y": 0}) == "ok"
    assert render("{{ if gt (len .L) 2 }}long{{ end }}", {"L": [1, 2, 3]}) == "long"
    assert render('{{ "a\\nb" }}', {}) == "a\nb"


def test_range_with_index_element_and_root():
    template = ("{{- range $i, $m := .Messages }}{{ $i }}:{{ $m.Role }}={{ .Content }}"
                "{{ if eq $i 0 }}({{ $.System }}){{ end }};{{ end }}")
    assert render(template, {"Messages": MESSAGES, "System": "S"}) == "0:system=S(S);1:user=U1;2:assistant=A1;3:user=U2;"
    assert render("{{ range .Messages }}{{ .Role }} {{ end }}", {"Messages": MESSAGES}) == "system user assistant user "


@pytest.mark.parametrize("template, message", [
    ("{{ if .X }}never closed", "without {{ end }}"),
    ("{{ end }}", "unexpected"),
    ("{{ index .L 0 }}", "unknown function or value 'index'"),
    ("{{ $nobody }}", "undefined variable"),
])
def test_what_it_does_not_understand_is_an_error(template, message):
    with pytest.raises(GoTemplateError, match=message):
        render(template, {"X": 1, "L": [1]})
