"""docker-machine's --format templates (Go's text/template subset) and their errors."""

from __future__ import annotations

import pytest

from machine import gotemplate
from machine.errors import UsageError

HOST = {"Name": "web1", "ActiveHost": True, "State": "Running", "Driver": {"IPAddress": "10.0.0.5", "SSHPort": 22},
        "HostOptions": {"EngineOptions": {"Labels": ["env=prod", "tier=web"]}}, "Error": ""}


@pytest.mark.parametrize(("source", "expected"), [
    ("{{.Name}}", "web1"),
    ("{{ .Driver.IPAddress }}:{{.Driver.SSHPort}}", "10.0.0.5:22"),
    ("{{.ActiveHost}}", "true"),
    ("{{if .ActiveHost}}*{{else}}-{{end}} {{.Name}}", "* web1"),
    ("{{if .Error}}broken{{else}}fine{{end}}", "fine"),
    ("{{range .HostOptions.EngineOptions.Labels}}[{{.}}]{{end}}", "[env=prod][tier=web]"),
    ("{{join .HostOptions.EngineOptions.Labels \",\"}}", "env=prod,tier=web"),
    ("{{json .Driver}}", '{"IPAddress":"10.0.0.5","SSHPort":22}'),
    ("{{upper .State}} {{lower .Name}} {{len .HostOptions.EngineOptions.Labels}}", "RUNNING web1 2"),
    ("{{.Name}}\\t{{.State}}", "web1\tRunning"),
    ("a {{- .Name -}} b", "aweb1b"),
])
def test_templates_render_as_go_renders_them(source: str, expected: str):
    assert gotemplate.parse(source).render(HOST) == expected


def test_a_table_has_a_header_and_aligned_columns():
    template = gotemplate.parse("table {{.Name}}\\t{{.Driver.IPAddress}}")
    rows = [HOST, {**HOST, "Name": "a-much-longer-name", "Driver": {"IPAddress": "10.0.0.6"}}]
    assert gotemplate.render_rows(template, rows).splitlines() == [
        "NAME                 IPADDRESS",
        "web1                 10.0.0.5",
        "a-much-longer-name   10.0.0.6",
    ]


@pytest.mark.parametrize(("source", "message"), [
    ("{{.Nmae}}", "unknown field .Nmae (known here: .Name, .ActiveHost"),
    ("{{.Driver.Ip}}", "unknown field .Driver.Ip (known here: .IPAddress, .SSHPort)"),
    ("{{if .Name}}x", "a block is not closed with '{{end}}'"),
    ("{{if .Name}}a{{else}}b{{else}}c{{end}}", "'{{if}}' without '{{end}}'"),
    ("{{end}}", "'{{end}}' without an if or range"),
    ("{{.Name", "unclosed action"),
    ("{{}}", "empty action"),
    ("{{printf \"%s\" .Name}}", "unknown function 'printf'"),
    ("{{Name}}", "'Name' is neither a field"),
    ("{{join .Name}}", "wrong arguments for join"),
    ("{{if}}x{{end}}", "'{{if}}' needs a value"),
    ("{{range}}x{{end}}", "'{{range}}' needs a value"),
    ('{{"\\x"}}', 'is not a valid string'),
    ("{{range .ActiveHost}}x{{end}}", "range over .ActiveHost, which is neither a list nor a map"),
    ("{{range .Driver.SSHPort}}x{{end}}", "range over .Driver.SSHPort, which is neither a list nor a map"),
])
def test_a_bad_template_is_one_clear_error(source: str, message: str):
    with pytest.raises(UsageError) as error:
        gotemplate.parse(source).render(HOST)
    assert message in str(error.value)
