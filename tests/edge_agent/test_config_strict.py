"""The strict loader: types, every problem at once, each with where its value was set."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.config import Config, SerialPort, config_from_toml, load_config
from edge_agent.config_positions import key_lines
from edge_agent.errors import ConfigProblemsError

HEAD = '[agent]\nstore_id = "s"\n'  # two lines: a section under test starts on line 3

# A wrong value of every TOML kind, for each type a key can have.
WRONG: dict[type, list[str]] = {
    int: ['"1884"', "true", "1.5", "[1]", "{a = 1}", "1979-05-27"],
    float: ['"1.5"', "false", "[1.5]", "{a = 1}", "07:32:00"],
    bool: ['"no"', '"true"', "1", "0", "[true]", "{a = true}"],
    str: ["1", "true", "1.5", '["a"]', '{a = "b"}', "1979-05-27T07:32:00Z"],
}


def _keys() -> list[tuple[str, str, type]]:
    keys = []
    for section in dataclasses.fields(Config):
        if section.name == "serial":
            continue
        hints = typing.get_type_hints(typing.get_type_hints(Config)[section.name])
        keys += [(section.name, key, kind) for key, kind in hints.items()]
    return keys


CASES = [
    pytest.param(section, key, literal, id=f"{section}.{key}={literal}")
    for section, key, kind in _keys()
    for literal in WRONG[kind][:2]  # two per key here; every kind below for one key per type
]


def _problems(text: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigProblemsError) as raised:
        config_from_toml(text, environ or {}, "agent.toml")
    return {problem.key: f"{problem.origin} {problem.problem}" for problem in raised.value.problems}


@pytest.mark.parametrize(("section", "key", "literal"), CASES)
def test_a_value_of_the_wrong_type_is_refused_with_its_line(
    section: str, key: str, literal: str
) -> None:
    if section != "agent":
        text = f"{HEAD}[{section}]\n\n{key} = {literal}\n"
    elif key == "store_id":
        text = f"[agent]\n\n\n\n{key} = {literal}\n"
    else:
        text = f'[agent]\nstore_id = "s"\n\n\n{key} = {literal}\n'
    problems = _problems(text)
    assert problems[f"{section}.{key}"].startswith("agent.toml:5 must be ")


@pytest.mark.parametrize(
    ("key", "literals"),
    [
        ("mqtt.port", WRONG[int]),
        ("sync.interval_s", WRONG[float]),
        ("mqtt.tls", WRONG[bool]),
        ("mqtt.host", WRONG[str]),
    ],
)
def test_every_kind_of_wrong_value_for_each_type(key: str, literals: list[str]) -> None:
    section, name = key.split(".")
    for literal in literals:
        problems = _problems(f"{HEAD}[{section}]\n{name} = {literal}\n")
        assert list(problems) == [key], literal
        assert problems[key].startswith("agent.toml:4 must be "), literal


def test_every_problem_is_reported_at_once_in_reading_order() -> None:
    text = (
        "[agent]\n"  # 1
        'store_id = "bad id!"\n'  # 2
        'note = """\n'  # 3: an unknown key holding a multi-line string
        "port = 5\n"  # 4: inside the string, not a key
        '"""\n'  # 5
        "[mqtt]\n"  # 6
        'port = "1884"\n'  # 7
        'tls = "no"\n'  # 8
        "qos = 2\n"  # 9
        "hots = [\n"  # 10: a multi-line array
        '  "a = b",\n'  # 11: not a key
        "]\n"  # 12
        "[[serial.ports]]\n"  # 13
        'url = "/dev/a"\n'  # 14
        "[[serial.ports]]\n"  # 15
        'url = "/dev/b"\n'  # 16
        'baud = "fast"\n'  # 17
        "[sync]\n"  # 18
        "interval_s = nan\n"  # 19
        "batch_size = 99999999999999999999999\n"  # 20
        "[nope]\n"  # 21
    )
    with pytest.raises(ConfigProblemsError) as raised:
        config_from_toml(text, {}, "agent.toml")
    found = [(problem.origin, problem.key) for problem in raised.value.problems]
    assert found == [
        ("agent.toml:2", "agent.store_id"),
        ("agent.toml:3", "agent.note"),
        ("agent.toml:7", "mqtt.port"),
        ("agent.toml:8", "mqtt.tls"),
        ("agent.toml:9", "mqtt.qos"),
        ("agent.toml:10", "mqtt.hots"),
        ("agent.toml:17", "serial.ports[1].baud"),
        ("agent.toml:19", "sync.interval_s"),
        ("agent.toml:20", "sync.batch_size"),
        ("agent.toml:21", "nope"),
    ]
    message = str(raised.value)
    assert message.startswith("config: 10 problems:\n")
    assert "agent.toml:7: mqtt.port: must be an integer, got '1884' (a string)" in message
    assert "agent.toml:8: mqtt.tls: must be true or false, got 'no' (a string)" in message
    assert raised.value.key == "agent.store_id"  # the first, for callers that read one


@pytest.mark.parametrize("section", [f.name for f in dataclasses.fields(Config)])
def test_an_unknown_key_lists_the_valid_keys_of_its_table(section: str) -> None:
    problems = _problems(f"{HEAD}[{section}]\nno_such_key = 1\n".replace(f"{HEAD}[agent]", HEAD))
    problem = problems[f"{section}.no_such_key"]
    assert problem.startswith(f"agent.toml:4 unknown key (valid keys of [{section}]: ")
    section_type = typing.get_type_hints(Config)[section]
    for key in typing.get_type_hints(section_type):
        assert key in problem


@pytest.mark.parametrize(
    ("port", "key", "where"),
    [
        ("url = true", "serial.ports[0].url", "4 must be a string, got true (a boolean)"),
        ('url = "/dev/a"\nbaud = "fast"', "serial.ports[0].baud", "5 must be an integer, got"),
        ("url = {a = 1}", "serial.ports[0].url", "4 must be a string, got a table"),
        ("baud = 9600", "serial.ports[0].url", "3 is required"),  # at the port's header
    ],
)
def test_a_serial_port_of_the_wrong_type(port: str, key: str, where: str) -> None:
    found = _problems(f"{HEAD}[[serial.ports]]\n{port}\n")
    assert list(found) == [key]
    assert found[key].startswith(f"agent.toml:{where}")


def test_an_unknown_key_of_a_serial_port_lists_the_port_keys() -> None:
    problems = _problems(f'{HEAD}[[serial.ports]]\nurl = "/dev/a"\nbaud_rate = 9600\n')
    listed = ", ".join(f.name for f in dataclasses.fields(SerialPort))
    assert problems["serial.ports[0].baud_rate"] == (
        f"agent.toml:5 unknown key (valid keys of [serial.ports[0]]: {listed})"
    )


@pytest.mark.parametrize(
    ("literal", "problem"),
    [
        (str(10**30), "is out of range (at most 64-bit integers)"),
        (str(-(10**30)), "is out of range (at most 64-bit integers)"),
        (str(2**63), "is out of range (at most 64-bit integers)"),
        ("{port = 1}", "must be an integer, got a table"),
        ("[[1], [2]]", "must be an integer, got an array"),
        ("inf", "must be an integer, got inf (a number)"),
    ],
)
def test_absurd_integers(literal: str, problem: str) -> None:
    found = _problems(f"{HEAD}[mqtt]\nport = {literal}\n")["mqtt.port"]
    assert found.startswith(f"agent.toml:4 {problem}")


@pytest.mark.parametrize("literal", ["nan", "-nan", "inf", "-inf", "+inf"])
def test_nan_and_infinite_numbers(literal: str) -> None:
    problem = _problems(f"{HEAD}[model]\nepsilon = {literal}\n")["model.epsilon"]
    assert problem.startswith("agent.toml:4 must be a finite number, got ")


def test_a_table_where_a_section_value_belongs() -> None:
    problems = _problems('agent = "s"\n[mqtt.port]\nx = 1\n')
    assert problems["agent"] == "agent.toml:1 must be a table ([agent]), got 's' (a string)"
    assert problems["mqtt.port"] == "agent.toml:2 must be an integer, got a table"


def test_a_bad_environment_override_names_the_variable(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f"{HEAD}[mqtt]\nport = 1883\n")
    environ = {
        "EDGE_AGENT__MQTT__PORT": "1884x",
        "EDGE_AGENT__MQTT__TLS": "no",
        "EDGE_AGENT__SYNC__TIMEOUT_S": "nan",
        "EDGE_AGENT__MQTT__PROT": "1",
        "EDGE_AGENT__NOPE": "1",
    }
    with pytest.raises(ConfigProblemsError) as raised:
        load_config(config, environ)
    found = {problem.key: (problem.origin, problem.problem) for problem in raised.value.problems}
    assert found["mqtt.port"] == (
        "environment EDGE_AGENT__MQTT__PORT",
        "must be an integer, got '1884x' (a string)",
    )
    assert found["mqtt.tls"][0] == "environment EDGE_AGENT__MQTT__TLS"
    assert found["sync.timeout_s"] == (
        "environment EDGE_AGENT__SYNC__TIMEOUT_S",
        "must be a finite number, got nan",
    )
    assert found["mqtt.prot"][0] == "environment EDGE_AGENT__MQTT__PROT"
    assert found["mqtt.prot"][1].startswith("unknown key (valid keys of [mqtt]: host, port")
    assert found["EDGE_AGENT__NOPE"][0] == "environment"
    # The file's own value, overridden, is no longer the problem: the variable is.
    assert str(config) not in str(raised.value)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("EDGE_AGENT__MQTT__PORT", " 1884 ", 1884),
        ("EDGE_AGENT__MQTT__TLS", "TRUE", True),
        ("EDGE_AGENT__MQTT__TLS", "0", False),
        ("EDGE_AGENT__SYNC__INTERVAL_S", "2", 2.0),
        ("EDGE_AGENT__MQTT__HOST", "123", "123"),
    ],
)
def test_environment_text_is_read_as_the_keys_type(name: str, value: str, expected: object) -> None:
    config = config_from_toml(HEAD, {name: value})
    section, key = name.removeprefix("EDGE_AGENT__").lower().split("__")
    assert getattr(getattr(config, section), key) == expected


def test_a_drop_in_with_errors_names_its_file_and_lines(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'{HEAD}[mqtt]\nhost = "broker"\nport = 1883\n')
    dropin = tmp_path / "conf.d" / "20-site.toml"
    dropin.parent.mkdir()
    dropin.write_text('# site overrides\n[mqtt]\nport = "1884"\n\n[http]\nport = -1\n')
    with pytest.raises(ConfigProblemsError) as raised:
        load_config(config, {})
    found = [(problem.origin, problem.key) for problem in raised.value.problems]
    assert found == [(f"{dropin}:3", "mqtt.port"), (f"{dropin}:6", "http.port")]


def test_a_range_problem_names_the_layer_that_set_the_value(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f"{HEAD}[mqtt]\nqos = 1\n")
    dropin = tmp_path / "conf.d" / "10-qos.toml"
    dropin.parent.mkdir()
    dropin.write_text("[mqtt]\nqos = 2\n")
    with pytest.raises(ConfigProblemsError) as raised:
        load_config(config, {})
    assert [str(problem) for problem in raised.value.problems] == [
        f"{dropin}:2: mqtt.qos: must be 0 or 1"
    ]


def test_the_line_index_places_the_shapes_a_config_uses() -> None:
    text = (
        "top = 1\n"  # 1
        "[a]\n"  # 2
        "'quoted key' = 2\n"  # 3
        'b.c = """x\n'  # 4
        "d = 3\n"  # 5: in the string
        '"""\n'  # 6
        "e = [\n"  # 7
        "  {f = 1},\n"  # 8
        "]\n"  # 9
        '[[ "x" . y ]]\n'  # 10
        "z = 1 # z = 2\n"  # 11
        "[[x.y]]\n"  # 12
        "z = 2\n"  # 13
    )
    assert key_lines(text) == {
        ("top",): 1,
        ("a",): 2,
        ("a", "quoted key"): 3,
        ("a", "b", "c"): 4,
        ("a", "e"): 7,
        ("x", "y"): 10,
        ("x", "y", 0): 10,
        ("x", "y", 0, "z"): 11,
        ("x", "y", 1): 12,
        ("x", "y", 1, "z"): 13,
    }


_SCALAR_KEYS = _keys()


@settings(max_examples=200, deadline=None)
@given(
    chosen=st.lists(
        st.tuples(st.sampled_from(_SCALAR_KEYS), st.integers(0, 5)),
        min_size=1,
        max_size=12,
        unique_by=lambda item: item[0][:2],
    ),
    blank_lines=st.lists(st.integers(0, 3), min_size=12, max_size=12),
)
def test_any_set_of_wrong_values_is_reported_whole_with_the_right_lines(
    chosen: list[tuple[tuple[str, str, type], int]], blank_lines: list[int]
) -> None:
    """Wrong values under random keys, in random sections, with blank lines between: every
    one is reported, at its own line, and nothing else is."""
    by_section: dict[str, list[tuple[str, str]]] = {}
    for (section, key, kind), pick in chosen:
        literals = WRONG[kind]
        by_section.setdefault(section, []).append((key, literals[pick % len(literals)]))
    lines = ["[agent]", 'store_id = "s"'] if "agent" not in by_section else []
    expected: dict[str, int] = {}
    gaps = iter(blank_lines)
    for section, assignments in by_section.items():
        lines.append(f"[{section}]")
        if section == "agent" and all(key != "store_id" for key, _ in assignments):
            lines.append('store_id = "s"')
        for key, literal in assignments:
            lines += [""] * next(gaps)
            lines.append(f"{key} = {literal}")
            expected[f"{section}.{key}"] = len(lines)
    text = "\n".join(lines) + "\n"
    with pytest.raises(ConfigProblemsError) as raised:
        config_from_toml(text, {}, "agent.toml")
    found = {problem.key: problem.origin for problem in raised.value.problems}
    if "agent.store_id" in expected:  # a wrong store_id also leaves it missing: one problem
        assert found.pop("agent.store_id") == f"agent.toml:{expected.pop('agent.store_id')}"
    assert found == {key: f"agent.toml:{line}" for key, line in expected.items()}


def test_an_override_does_not_hide_a_section_that_is_not_a_table(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'sync = "https://x"\n{HEAD}')
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "sync-token").write_text("t\n")
    environ = {"EDGE_AGENT__SYNC__TOKEN": "t", "CREDENTIALS_DIRECTORY": str(credentials)}
    with pytest.raises(ConfigProblemsError) as raised:
        load_config(config, environ)
    assert [str(problem) for problem in raised.value.problems] == [
        f"{config}:1: sync: must be a table ([sync]), got 'https://x' (a string)"
    ]
