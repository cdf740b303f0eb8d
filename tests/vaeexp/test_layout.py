"""The house rules, checked: imports go one way, modules stay small, defaults are stated once."""

from __future__ import annotations

import ast
import graphlib
import json
import re
import typing
from dataclasses import fields, is_dataclass
from enum import Enum
from pathlib import Path

import yaml
from omegaconf import MISSING

from vaeexp.config import Config
from vaeexp.paths import CONF_DIR, PROJECT_ROOT
from vaeexp.validate import RULES

PACKAGE = PROJECT_ROOT / "vaeexp"
# Lower layers never import higher ones: where things live -> config -> data/model -> a sweep's
# jobs -> the step -> the trainer -> tracking/film -> compare, recipe -> the stacked launcher ->
# sweep -> the commands.
LAYERS = [
    ["vaeexp.paths", "vaeexp.process"],
    ["vaeexp.config"],
    ["vaeexp.validate", "vaeexp.data", "vaeexp.model", "vaeexp.optim", "vaeexp.cli"],
    ["vaeexp.jobs"],
    ["vaeexp.likelihood", "vaeexp.checkpoint", "vaeexp.images"],
    ["vaeexp.step"],
    ["vaeexp.trainer"],
    ["vaeexp.tracking", "vaeexp.film"],
    ["vaeexp.compare", "vaeexp.slurm", "vaeexp.recipe"],
    ["vaeexp.stacked"],
    ["vaeexp.sweep"],
    ["vaeexp.app", "vaeexp.iwae", "vaeexp.sync", "vaeexp.ui"],
    ["vaeexp.__main__"],
]
COMMANDS = len(LAYERS) - 2  # `python -m vaeexp.<package>` entry points sit with the commands
MAX_LINES = 500  # one concept a module; past this, it is two


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every vaeexp module `name` imports, function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    out = set()
    for target in found:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name and not name.startswith(f"{target}."):
            out.add(target)
    return out


def _layer(name: str) -> int:
    if name.endswith(".__main__") and name != "vaeexp.__main__":
        return COMMANDS
    for rank, group in enumerate(LAYERS):
        if any(name == g or name.startswith(f"{g}.") for g in group):
            return rank
    raise AssertionError(f"{name} has no place in LAYERS: add it where it belongs")


def test_imports_go_one_way_without_cycles():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    upward = [
        f"{src} -> {dst}"
        for src, targets in graph.items()
        for dst in targets
        if _layer(dst) > _layer(src)
        or (_layer(dst) == _layer(src) and src.split(".")[:2] != dst.split(".")[:2])
    ]
    assert not upward, upward
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a cycle


def test_no_module_is_large():
    large = {
        str(p.relative_to(PROJECT_ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not large, large


def _defaults(node: object, prefix: str = "") -> dict[str, object]:
    out = {}
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            out |= _defaults(value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = getattr(value, "value", value)
    return out


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def test_conf_never_restates_a_default():
    """Defaults live in the schema only; presets (experiment/) pin values on purpose."""
    defaults = _defaults(Config())
    restated = []
    for path in CONF_DIR.rglob("*.yaml"):
        group = path.relative_to(CONF_DIR).parts[0]
        if group in ("experiment", "hydra", "hparams_search"):
            continue
        tree = yaml.safe_load(path.read_text()) or {}
        tree.pop("defaults", None)
        prefix = "" if path.parent == CONF_DIR else f"{group}."
        for key, value in _flat(tree, prefix).items():
            if key in defaults and defaults[key] == value:
                restated.append(f"{path.relative_to(CONF_DIR)}: {key}")
    assert not restated, restated


def _documented() -> dict[str, tuple[str, str]]:
    """docs/settings.md's key table: key -> (default, allowed), as written."""
    row = re.compile(r"^\| `([\w.]+)`(?:, `([\w.]+)`)? \| (.*?) \| (.*?) \| .* \|$")
    out = {}
    for line in (PROJECT_ROOT / "docs" / "settings.md").read_text().splitlines():
        if m := row.match(line):
            for key in filter(None, m.group(1, 2)):
                out[key] = (m.group(3), m.group(4))
    return out


def _field_types(node: type, prefix: str = "") -> dict[str, object]:
    out = {}
    for f in fields(node):
        kind = typing.get_type_hints(node)[f.name]
        if is_dataclass(kind):
            out |= _field_types(kind, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = kind
    return out


def test_the_settings_table_is_the_schema_and_its_checks():
    """docs/settings.md lists every key of the schema with its default and what is allowed: an
    enum's values, true/false for a switch, and the check's own words (vaeexp.validate)."""
    documented, defaults, types = _documented(), _defaults(Config()), _field_types(Config)
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    assert set(defaults) - set(documented) == set()  # every key, documented
    assert set(documented) - set(defaults) - groups <= {"hydra/launcher"}  # and nothing else
    wrong = []
    for key, kind in types.items():
        default, allowed = documented[key]
        if isinstance(kind, type) and issubclass(kind, Enum):
            expected = ", ".join(f"`{e.value}`" for e in kind)
            if allowed != expected:
                wrong.append(f"{key}: allowed {allowed!r}, the schema: {expected!r}")
        elif kind is bool and allowed != "true, false":
            wrong.append(f"{key}: allowed {allowed!r}, a switch: 'true, false'")
        value = defaults[key]
        if value == MISSING or (isinstance(value, str) and "${" in value):
            continue  # set by a group, or resolved at run time: the table says from what
        written = default.split(" (")[0].strip("`")
        if isinstance(value, float):
            same = re.fullmatch(r"[\d.]+(e-?\d+)?", written) and float(written) == value
        else:
            same = written == (value if isinstance(value, str) else json.dumps(value))
        if not same:
            wrong.append(f"{key}: default {default!r}, the schema: {value!r}")
    for key, _, allowed in RULES:
        if documented[key][1] != allowed:
            wrong.append(f"{key}: allowed {documented[key][1]!r}, the check: {allowed!r}")
    assert not wrong, "\n".join(wrong)
