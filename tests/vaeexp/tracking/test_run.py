"""A tracked run's params (vaeexp.tracking.run): the config, flattened."""

from vaeexp.tracking.run import flatten


def test_flatten_nested_config():
    tree = {"a": 1, "data": {"name": "mnist", "mirrors": ["u", "v"], "x": {"y": None}}}
    assert flatten(tree) == {
        "a": "1",
        "data.name": "mnist",
        "data.mirrors": "['u', 'v']",
        "data.x.y": "None",
    }
