"""Jinja evaluation as Ansible does it: lazy layered variables, native lone expressions, Ansible's filters."""

from __future__ import annotations

import re

import pytest

from machine.roles.templating import OMIT, Templar, TemplateFailure, Vars
from machine.roles.yamlload import Unsafe


@pytest.fixture
def t() -> Templar:
    return Templar()


def vs(t: Templar, *layers: dict, raw: bool = False) -> Vars:
    return Vars(t, [(layer, raw) for layer in layers])


def test_lone_expression_keeps_its_type_and_text_renders(t):
    v = vs(t, {"ports": [80, 443], "name": "web"})
    assert t.template("{{ ports }}", v) == [80, 443]
    assert t.template("{{ ports | length }}", v) == 2
    assert t.template("{{ name }}-{{ ports[0] }}", v) == "web-80"
    assert t.template({"a": ["{{ name }}", 1]}, v) == {"a": ["web", 1]}
    assert t.template("{{ name }}\n", v) == "web\n"


def test_lazy_variables_and_higher_layers_win(t):
    defaults = {"base": "/opt", "path": "{{ base }}/app", "port": 1}
    extra = {"base": "/srv"}
    v = vs(t, defaults, extra)
    assert v["path"] == "/srv/app"
    assert t.template("{{ port }}", v) == 1


def test_recursive_variable_is_reported(t):
    with pytest.raises(TemplateFailure, match="recursive loop"):
        t.template("{{ a }}", vs(t, {"a": "{{ b }}", "b": "{{ a }}"}))


def test_a_variable_templated_from_an_undefined_name_is_undefined(t):
    """As ansible-core 2.19: with `x: "{{ nope }}"`, x is not defined and `default` replaces it (and so for a
    variable using x); using it fails naming `nope`."""
    v = vs(t, {"x": "{{ nope }}", "y": "{{ x }}-suffix", "w": "{{ nope.b | default(1) }}"})
    assert t.template("{{ x is defined }}", v) is False
    assert t.template("{{ x | default('dx') }}", v) == "dx"
    assert t.template("{{ y | default('dy') }}", v) == "dy"
    assert t.template("{{ x.k | default(3) }}", v) == 3
    assert t.template("{{ w }}", v) == 1
    assert t.condition("y is undefined", v)
    for use in ["{{ x }}", "a{{ y }}", "{{ x == 1 }}"]:
        with pytest.raises(TemplateFailure, match=r"^'nope' is undefined$"):
            t.template(use, v)


def test_a_list_or_dict_with_an_undefined_item_is_defined_until_that_item_is_used(t):
    """As ansible-core 2.19's lazy containers (checked with ansible-playbook): a list or dict variable, written in
    YAML or as a Jinja literal, is defined even when an item's template uses an undefined name; the items that
    are defined can be used, and the undefined one fails only where it ends up in a value: a task's argument, a
    loop, text, JSON."""
    v = vs(t, {"a": 1, "x": "{{ [a, nope] }}", "y": ["{{ a }}", "{{ nope }}"],
               "z": {"k": "{{ a }}", "u": "{{ nope }}"}, "n": "{{ {'k': a, 'l': [nope]} }}"})
    assert [t.template(f"{{{{ {name} | length }}}}", v) for name in "xyzn"] == [2, 2, 2, 2]
    assert t.template("{{ [x[0], y[0], z.k, n.k] }}", v) == [1, 1, 1, 1]
    assert t.condition("x is defined and y is defined and z is defined and 'u' in z", v)
    assert t.condition("x[1] is undefined and y[1] is undefined and z.u is undefined", v)
    assert t.template("{{ z.u | default('zu') }}", v) == "zu"
    assert t.template("{{ y | select('defined') | list }}", v) == [1]
    assert t.template("{{ [a, nope] | length }}", v) == 2
    for use in ["{{ x }}", "{{ y }}", "{{ z }}", "{{ n }}", "{{ x | default('d') }}", "y is {{ y }}",
                "{{ z | to_json }}", "{{ n | to_nice_yaml }}", ["{{ a }}", "{{ nope }}"], {"k": "{{ [nope] }}"}]:
        with pytest.raises(TemplateFailure, match=r"^'nope' is undefined$"):
            t.template(use, v)


def test_none_puts_nothing_into_text(t, tmp_path):
    """As ansible-playbook 2.19: `key={{ x }}` with x null gives `key=`, in a task's text and in a template file;
    a lone `{{ x }}` stays None, and a None inside a list is printed as Python prints it."""
    v = vs(t, {"x": None})
    assert t.template("key={{ x }}", v) == "key=" and t.template("{{ x }}", v) is None
    (tmp_path / "t.j2").write_text("a={{ x }}\nb={{ none }}|{{ [none] }}\n")
    assert t.render_file(tmp_path / "t.j2", v) == "a=\nb=|[None]\n"


def test_trailing_newlines_as_ansible(t, tmp_path):
    """As ansible-playbook 2.19's template and copy: Jinja drops each template's last newline (an included one's
    too), then the newlines the source ends with come back where the text ends with fewer."""
    v = vs(t, {"x": "a\n", "y": "b\n\n"})
    files = {"inc.j2": ('Hello {% include "w.txt" %}!\n', "Hello world!\n"), "w.txt": ("world\n", "world\n"),
             "if.j2": ("a{% if true %}b{% endif %}\n", "ab\n"), "nl.j2": ("x\n\n\n", "x\n\n\n"),
             "for.j2": ("{% for i in [1, 2] %}\n{{ i }}\n{% endfor %}\n", "1\n2\n")}
    for name, (source, _) in files.items():
        (tmp_path / name).write_text(source)
    assert {name: t.render_file(tmp_path / name, v) for name in files} == {n: out for n, (_, out) in files.items()}
    texts = {"{{ x }}\n": "a\n", "{{ y }}": "b\n\n", "{{ y }}\n": "b\n\n", "v={{ x }}\n\n": "v=a\n\n"}
    assert {text: t.template(text, v) for text in texts} == texts


def test_an_inline_if_without_else_is_no_value_but_prints_nothing(t):
    """As ansible-playbook 2.19: `x{{ 'a' if false }}y` gives `xy`, but `{{ 'a' if false }}` as a whole value (or
    inside one) fails the task, and so does a variable holding it, `default` or not."""
    v = vs(t, {"maybe": "{{ 'a' if false }}"})
    assert t.template("x{{ 'a' if false }}y", v) == "xy"
    for value in ["{{ 'a' if false }}", "{{ ['a' if false] }}", "{{ maybe }}", "{{ maybe | default('d') }}"]:
        with pytest.raises(TemplateFailure, match=r"^the inline if-expression on line 1 evaluated to false"):
            t.template(value, v)


def test_what_a_filter_or_a_template_gives_as_an_iterator_is_a_list(t):
    """As ansible-playbook 2.19: `users | map(attribute='name')` without `| list` is a list (it can be measured,
    looped over, printed), and so is a template's final `d.keys()`."""
    v = vs(t, {"users": [{"name": "a"}, {"name": "b"}], "names": "{{ users | map(attribute='name') }}",
               "d": {"k": 1}})
    assert t.template("{{ names }}", v) == ["a", "b"] and t.template("{{ names | length }}", v) == 2
    assert t.template("{{ [1, 2] | map('string') | type_debug }}", v) == "list"
    assert t.template("x{{ users | map(attribute='name') }}", v) == "x['a', 'b']"
    assert t.template("{{ d.keys() }}", v) == ["k"]
    assert t.template("{{ d.items() }}x", v) == "[['k', 1]]x"
    assert t.template("t{{ {'a': (1, 2)} }}", v) == "t{'a': [1, 2]}"


def test_what_yaml_cannot_dump_fails_the_task_and_json_lists_a_range(t):
    """As ansible-playbook 2.19: `range(3) | to_nice_yaml` fails (it used to escape as a YAML error, a traceback),
    `range(3) | to_json` gives [0, 1, 2]."""
    with pytest.raises(TemplateFailure, match="cannot represent an object"):
        t.template("{{ range(3) | to_nice_yaml }}", vs(t, {}))
    assert t.template("{{ range(3) | to_json }}", vs(t, {})) == "[0, 1, 2]"


def test_raw_layers_and_unsafe_are_not_templated(t):
    v = Vars(t, [({"out": "{{ not_a_var }}"}, True)])
    assert t.template("{{ out }}", v) == "{{ not_a_var }}"
    assert t.template(Unsafe("{{ x }}"), v) == "{{ x }}"


def test_undefined_fails_with_a_clear_message(t):
    with pytest.raises(TemplateFailure, match="'nope' is undefined"):
        t.template("x{{ nope }}", vs(t, {}))
    with pytest.raises(TemplateFailure, match="'nope' is undefined"):
        t.condition("nope == 1", vs(t, {}))
    with pytest.raises(TemplateFailure, match="Mandatory variable 'needed' not defined"):
        t.template("{{ needed | mandatory }}", vs(t, {}))


def test_an_attribute_of_an_undefined_variable_is_undefined_until_used(t):
    """As ansible-core 2.19's undefined marker: `foo.bar` with foo undefined is undefined, not an error, until it is
    printed, compared or iterated; the failure names `foo`. A missing key of a defined dict is named as Ansible does."""
    v = vs(t, {"d": {"a": 1}})
    assert t.template("{{ foo.bar | default('d') }}", v) == "d"
    assert t.template("{{ foo['bar'].baz | default('d2') }}", v) == "d2"
    assert t.template("{{ d.missing.deeper | default('d3') }}", v) == "d3"
    assert t.template("{{ (foo.bar | default({})).x | default('e') }}", v) == "e"
    assert not t.condition("foo.bar is defined", v) and t.condition("foo.bar is undefined", v)
    for use in ["{{ foo.bar }}", "a{{ foo.bar }}", "{{ foo.bar == 1 }}", "{{ foo.bar | length }}",
                "{% for i in foo.bar %}{% endfor %}"]:
        with pytest.raises(TemplateFailure, match=r"^'foo' is undefined$"):
            t.template(use, v)
    with pytest.raises(TemplateFailure, match="'foo' is undefined"):
        t.condition("foo.bar", v)
    with pytest.raises(TemplateFailure, match=r"^object of type 'dict' has no attribute 'missing'$"):
        t.template("{{ d.missing.x }}", v)


@pytest.mark.parametrize(("expr", "expected"), [
    ("missing | default('d')", "d"),
    ("'' | default('d', true)", "d"),
    ("'yes' | bool", True), ("'off' | bool", False), ("1 | bool", True),
    ("{'a': 1} | to_json", '{"a": 1}'),
    ("{'b': 1, 'a': [1]} | to_nice_json", '{\n    "a": [\n        1\n    ],\n    "b": 1\n}'),
    ("{'a': [1, 2]} | to_yaml", "a: [1, 2]\n"),
    ("['a', 'b'] | join(',')", "a,b"),
    ("'a.b.c' | regex_replace('\\.', '-')", "a-b-c"),
    ("'version 25.0.3' | regex_search('[0-9]+')", "25"),
    ("'version 25.0.3' | regex_search('([0-9]+)\\.([0-9]+)', '\\2')", ["0"]),
    ("'hi' | b64encode", "aGk="), ("'aGk=' | b64decode", "hi"),
    ("{'a': {'x': 1}} | combine({'a': {'y': 2}}, recursive=true)", {"a": {"x": 1, "y": 2}}),
    ("{'a': 1} | combine({'a': 2}, {'b': 3})", {"a": 2, "b": 3}),
    ("{'a': 1} | dict2items", [{"key": "a", "value": 1}]),
    ("[{'key': 'a', 'value': 1}] | items2dict", {"a": 1}),
    ("[1, 2, 2, 3, 1] | unique", [1, 2, 3]),
    ("[1, 2, 3] | difference([2])", [1, 3]),
    ("[[1, [2]], 3] | flatten", [1, 2, 3]),
    ("true | ternary('on', 'off')", "on"),
    ("'/etc/x.conf' | basename", "x.conf"),
    ("'25.0.1' is version('25', '>=')", True),
    ("'24.10' is version('25', '>=')", False),
    ("'2.10' is version('2.9', 'gt')", True),
    ("missing is defined", False), ("missing is undefined", True),
    ("{'failed': true} is failed", True), ("{'rc': 0} is succeeded", True),
    ("{'changed': true} is changed", True), ("{'skipped': true} is skipped", True),
    ("'a' in ['a', 'b']", True),
    ("'abc' is match('a')", True), ("'abc' is search('c')", True),
])
def test_filters_and_tests(t, expr, expected):
    assert t.template("{{ " + expr + " }}", vs(t, {})) == expected


def test_bool_filter_is_ansible_core_2_19s(t):
    """Its words in any case, unstripped; ints and booleans by their text; anything else is whether it equals 1
    (so 'y', 't' and 'n' are all false)."""
    values = "['y', 'yes', 'on', '1', 't', 'n', 'no', 'off', '0', 'f', 'Yes', ' yes', 'TRUE', 'x', 1, 0, 2, 1.0, none]"
    assert t.template("{{ " + values + " | map('bool') | list }}", vs(t, {})) == [
        False, True, True, True, False, False, False, False, False, False, True, False, True, False,
        True, False, False, True, False]


@pytest.mark.parametrize(("list_merge", "merged", "nested"), [
    ("replace", [3, 4, 2], [2, 5]), ("keep", [1, 2, 3], [1, 2]),
    ("append", [1, 2, 3, 3, 4, 2], [1, 2, 2, 5]), ("prepend", [3, 4, 2, 1, 2, 3], [2, 5, 1, 2]),
    ("append_rp", [1, 3, 4, 2], [1, 2, 5]), ("prepend_rp", [3, 4, 2, 1], [2, 5, 1]),
])
def test_combine_merges_lists_as_ansible_merge_hash(t, list_merge, merged, nested):
    v = vs(t, {"a": {"l": [1, 2, 3], "d": {"x": [1, 2], "k": 1}, "s": 1}, "b": {"l": [3, 4, 2], "d": {"x": [2, 5]}}})
    assert t.template("{{ a | combine(b, list_merge='" + list_merge + "') }}", v) == {
        "l": merged, "d": {"x": [2, 5]}, "s": 1}
    assert t.template("{{ a | combine(b, recursive=true, list_merge='" + list_merge + "') }}", v)["d"] == {
        "x": nested, "k": 1}


def test_combine_as_ansible_in_its_corners(t):
    v = vs(t, {"a": {"l": [1], "d": {"x": [1]}}, "b": {"l": [2], "d": {"x": [2]}}, "c": {"l": [3], "d": {"x": [3]}}})
    assert t.template("{{ [a, b, c] | combine(recursive=true, list_merge='prepend') }}", v) == {
        "l": [3, 2, 1], "d": {"x": [3, 2, 1]}}
    assert t.template("{{ a | combine(a, list_merge='append') }}", v) == {"l": [1], "d": {"x": [1]}}  # equal: kept
    assert t.template("{{ a | combine(list_merge='bogus') }}", v) == {"l": [1], "d": {"x": [1]}}
    with pytest.raises(TemplateFailure, match="'list_merge' argument can only be equal to 'replace', 'keep'"):
        t.template("{{ a | combine(b, list_merge='bogus') }}", v)
    with pytest.raises(TemplateFailure, match="expected dicts but got a 'dict' and a 'int'"):
        t.template("{{ a | combine([1]) }}", v)


@pytest.mark.parametrize(("expr", "expected"), [
    ("[1, none, 'None', 'null', [2, [3, none, 'null']], 'x'] | flatten", [1, 2, 3, "x"]),
    ("[1, none, 'None', [2, [3, none, 'null']]] | flatten(1)", [1, 2, [3, None, "null"]]),
    ("[1, none, 'None', 'null', [2, [3, none]]] | flatten(skip_nulls=false)", [1, None, "None", "null", 2, 3, None]),
    ("[[1], none] | flatten(0)", [[1]]),
])
def test_flatten_drops_nulls_as_ansible(t, expr, expected):
    assert t.template("{{ " + expr + " }}", vs(t, {})) == expected


def test_conditions(t):
    v = vs(t, {"n": 3, "flag": "yes", "ansible_distribution": "Debian"})
    assert t.condition("n > 2", v)
    assert t.condition(["n > 2", "flag | bool"], v)
    assert not t.condition(["n > 2", "ansible_distribution == 'Fedora'"], v)
    assert t.condition(True, v) and not t.condition(False, v)
    assert t.condition("{{ n }} == 3", v)


def test_a_condition_must_be_a_boolean_as_in_ansible_2_19(t):
    """`when: s` with s: "false" is true to Python and was run; ansible-core 2.19 fails such a task instead. A
    template whose text is `false` is an expression again, and false."""
    v = vs(t, {"s": "false", "n": 0, "items": [], "nothing": None})
    for expr, truth, kind in [("s", True, "str"), ("n", False, "int"), ("items", False, "list"),
                              ("nothing", False, "NoneType"), ("'x'", True, "str")]:
        with pytest.raises(TemplateFailure, match=re.escape(f"Conditional result ({truth}) was derived from value "
                                                            f"of type '{kind}' in '{expr}'")):
            t.condition(expr, v)
    assert not t.condition("{{ s }}", v)
    assert not t.condition("s | bool", v) and not t.condition("n != 0", v)


def test_a_backslash_in_a_string_literal_of_an_argument_is_itself(t, tmp_path):
    """As ansible-core 2.19's lexer: YAML has already read a task's escapes, so inside `{{ }}` of an argument or a
    variable a backslash stays (`\\1` is a back-reference, `\\t` two characters); in `{% %}`, in a condition's
    expression and in a template file, Jinja reads the escapes. (Texts as YAML hands them over.)"""
    v = vs(t, {"v1": r'{{ "a\tb" }}', "pat": r"\d+"})
    assert t.template(r"""{{ "1a2" | regex_replace("(\d)", "<\1>") }}|{{ "x" ~ "\t" ~ "y" }}""", v) == r"<1>a<2>|x\ty"
    assert t.template(r"""{{ "a.b" | regex_replace("\\.", "-") }}""", v) == "a.b"
    assert t.template(r"""{{ 'x_name' | regex_replace('^(.*)_name$', '\1') }}""", v) == "x"
    assert t.template(r"""{{ "a\"b" }}|{{ v1 }}|{{ 'ab12' | regex_replace(pat, 'N') }}""", v) == r'a\"b|a\tb|abN'
    assert t.template(r"""{% set z = "p\tq" %}{{ z }}""", v) == "p\tq"
    assert t.template("{{ 'x\ty' }}", v) == "x\ty"  # a tab YAML made stays a tab
    assert t.condition(r'"a\tb" | length == 3', v)
    assert t.condition(r'{{ "a\tb" | length == 4 }}', v)
    (tmp_path / "t.j2").write_text(r'{{ "x\ty" }}|{{ "1a2" | regex_replace("([0-9])", "<\1>") }}')
    assert t.render_file(tmp_path / "t.j2", v) == "x\ty|<\x01>a<\x01>"


def test_omit_placeholder(t):
    assert t.template("{{ missing | default(omit) }}", vs(t, {})) == OMIT


def test_template_file_uses_trim_blocks(t, tmp_path):
    (tmp_path / "x.j2").write_text("{% for p in ports %}\nport {{ p }}\n{% endfor %}\n")
    assert t.render_file(tmp_path / "x.j2", vs(t, {"ports": [1, 2]})) == "port 1\nport 2\n"
    (tmp_path / "bad.j2").write_text("line\n{% if %}\n")
    with pytest.raises(TemplateFailure, match=r"bad.j2:2: template syntax error"):
        t.render_file(tmp_path / "bad.j2", vs(t, {}))


def test_a_template_file_including_one_that_uses_lookup_fails_naming_that_one(t, tmp_path):
    """The file a templated src names is rendered only when its task runs: what it includes is refused then."""
    (tmp_path / "main.j2").write_text("top\n{% include 'inc.j2' %}\n")
    (tmp_path / "inc.j2").write_text("one\n{{ q('env', 'HOME') }}\n")
    with pytest.raises(TemplateFailure, match=r"^inc.j2:2: q\(\) is outside the Ansible subset pymachine runs"):
        t.render_file(tmp_path / "main.j2", vs(t, {}))


def test_compiled_code_is_kept_between_templars(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "code"
    first = Templar()
    first.code.keep(cache)
    (tmp_path / "f.j2").write_text("{{ a }}!\n")
    assert first.template("{{ a }}-{{ b }}", vs(first, {"a": 1, "b": 2})) == "1-2"
    assert first.render_file(tmp_path / "f.j2", vs(first, {"a": 1})) == "1!\n"
    first.code.save()
    assert cache.is_file()

    second = Templar()
    second.code.keep(cache)
    monkeypatch.setattr(second.env, "compile", lambda *a, **k: pytest.fail("compiled again"))
    monkeypatch.setattr(second._file_env, "compile", lambda *a, **k: pytest.fail("compiled again"))
    assert second.template("{{ a }}-{{ b }}", vs(second, {"a": 3, "b": 4})) == "3-4"
    assert second.render_file(tmp_path / "f.j2", vs(second, {"a": 3})) == "3!\n"
    (tmp_path / "f.j2").write_text("{{ a }}?\n")  # a changed file is compiled again (its checksum differs)
    monkeypatch.undo()
    assert Templar().render_file(tmp_path / "f.j2", vs(second, {"a": 3})) == "3?\n"


def kept_after(cache, source: str) -> Templar:
    """A Templar keeping its code in `cache`, which has templated `source` and saved what it compiled."""
    t = Templar()
    t.code.keep(cache)
    t.template(source, vs(t, {}))
    t.code.save()
    return t


def test_kept_code_of_another_filter_set_or_a_damaged_file_is_not_used(tmp_path):
    cache = tmp_path / "code"
    kept_after(cache, "{{ 'x' | quote }}")
    other = Templar()
    other.env.filters.pop("quote")  # as in a later version without the filter: Jinja refuses it when compiling
    other.code = type(other.code)("another stamp")
    other.code.keep(cache)
    with pytest.raises(TemplateFailure, match="quote"):
        other.template("{{ 'x' | quote }}", vs(other, {}))
    cache.write_bytes(b"garbage")
    damaged = Templar()
    damaged.code.keep(cache)
    assert damaged.template("{{ 'x' | quote }}", vs(damaged, {})) == "x"


def test_nothing_is_written_unless_something_was_compiled(tmp_path):
    t = Templar()
    t.code.save()  # not kept: nowhere to write
    t.code.keep(tmp_path / "code")
    t.code.save()
    assert not (tmp_path / "code").exists()


def test_code_of_templates_no_longer_used_is_dropped_when_saving(tmp_path):
    cache = tmp_path / "code"
    kept_after(cache, "{{ 'old' }}")
    kept_after(cache, "{{ 'new' }}")
    third = Templar()
    third.code.keep(cache)
    assert len(third.code._code) == 1  # 'new' alone: 'old' was not used by the second process


def test_kept_code_others_could_have_written_is_not_used(tmp_path):
    cache = tmp_path / "code"
    kept_after(cache, "{{ 'x' }}")
    cache.chmod(0o666)
    second = Templar()
    second.code.keep(cache)
    assert not second.code._code
