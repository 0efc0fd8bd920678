"""ilm_dist.strict: valid documents load exactly as ``yaml.safe_load`` / ``json.loads`` do; a key given twice
in one mapping (object) is refused, naming the key and where it is."""

import json

import pytest
import yaml

from ilm_dist.strict import DuplicateKeyError, load_json, load_yaml

VALID_YAML = [
    "a: 1\nb: [1, 2.5, x]\nc: {d: null, e: true}\n",
    "- {a: 1}\n- {a: 1}\n- [a, a]\n",  # the same key in two mappings of a list is no repeat
    "train: {lr: 0.1}\nval: {lr: 0.1}\n",  # the same key in sibling mappings
    "base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  y: 3\n",  # a merge whose key the mapping overrides
    "1: one\n'1': string one\n",  # an int and a string key differ
    "",
    "just a scalar",
]


@pytest.mark.parametrize("text", VALID_YAML)
def test_valid_yaml_loads_as_safe_load(text):
    assert load_yaml(text) == yaml.safe_load(text)


def test_a_merged_key_overridden_by_the_mapping_keeps_the_mapping_s_value():
    assert load_yaml("base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  y: 3\n")["run"] == {"x": 1, "y": 3}


@pytest.mark.parametrize(
    ("text", "key", "line", "first"),
    [
        ("train:\n  lr: 1\ntrain:\n  lr: 2\n", "train", 3, 1),
        ("a: 1\nb:\n  c: 1\n  d: 2\n  c: 3\n", "c", 5, 3),
        ("runs:\n  - {x: 1}\n  - {x: 1, y: 2,\n     x: 3}\n", "x", 4, 3),
        ("1: a\n1: b\n", 1, 2, 1),
    ],
)
def test_a_yaml_key_given_twice_is_refused_naming_it_and_both_lines(text, key, line, first):
    assert isinstance(yaml.safe_load(text), dict)  # PyYAML alone keeps the last value silently
    with pytest.raises(yaml.YAMLError) as err:
        load_yaml(text)
    assert f"key {key!r} given twice in one mapping (first on line {first})" in str(err.value)
    assert err.value.problem_mark.line + 1 == line


def test_yaml_stays_safe():
    with pytest.raises(yaml.constructor.ConstructorError):
        load_yaml("!!python/object/apply:os.system ['true']\n")


VALID_JSON = [
    '{"a": 1, "b": [1, 2.5, "x"], "c": {"d": null, "e": true}}',
    '[{"a": 1}, {"a": 1}, [[{"a": 2}]]]',
    '{"train": {"lr": 0.1}, "val": {"lr": 0.1}}',
    '"plain"',
    "3.5",
    "[]",
    "{}",
]


@pytest.mark.parametrize("text", VALID_JSON)
def test_valid_json_loads_as_json_loads(text):
    assert load_json(text) == json.loads(text)
    assert load_json(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('{"a": 1, "a": 2}', "a"),
        ('{"train": {"lr": 1, "lr": 2}}', "train.lr"),
        ('{"runs": [{"x": 1}, {"x": 1, "x": 2}]}', "runs[1].x"),
        ('[{"a": 1, "a": 2}]', "[0].a"),
        ('{"a": [[{"b": 1}], [{"b": 1, "b": 2}]]}', "a[1][0].b"),
        ('{"a": {"b": [0, {"c": {"d": 1, "d": 1}}]}}', "a.b[1].c.d"),
    ],
)
def test_a_json_key_given_twice_is_refused_naming_its_path(text, path):
    assert isinstance(json.loads(text), (dict, list))  # json alone keeps the last value silently
    with pytest.raises(DuplicateKeyError) as err:
        load_json(text)
    assert str(err.value) == f"key {path!r} given twice in one object"
    assert isinstance(err.value, ValueError)


def test_malformed_json_is_json_s_own_error():
    with pytest.raises(json.JSONDecodeError):
        load_json('{"a": }')
