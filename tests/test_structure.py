"""The codebase's shape targets (docs/ARCHITECTURE.md): no class over 400 lines, no function over 120, the rules
behind one interface, docs/ARCHITECTURE.md's module map naming every module that exists, and docstrings of
their own."""

from __future__ import annotations

import ast
import pathlib

import pytest

import zeroadamw
from zeroadamw.rules import RULES, Rule

SRC = pathlib.Path(zeroadamw.__file__).parent
MAX_CLASS, MAX_FUNCTION = 400, 120


def _nodes():
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(SRC), node, node.end_lineno - node.lineno + 1


def test_no_class_over_400_lines_no_function_over_120():
    too_big = [f"{path}:{node.lineno} {node.name} ({n} lines)" for path, node, n in _nodes()
               if n > (MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION)]
    assert not too_big, "split these: " + "; ".join(too_big)


def test_architecture_map_names_every_module():
    text = (SRC.parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    missing = [str(p.relative_to(SRC)) for p in SRC.glob("*.py")
               if p.name != "__init__.py" and p.name not in text]
    assert not missing, f"docs/ARCHITECTURE.md does not mention {missing}"


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_implements_its_kind_of_update(name):
    rule = RULES[name]()
    assert isinstance(rule, Rule) and rule.name == name
    own = type(rule).kernel if rule.elementwise else type(rule).update_bucket
    base = Rule.kernel if rule.elementwise else Rule.update_bucket
    assert own is not base, f"rule {name!r} must override {'kernel' if rule.elementwise else 'update_bucket'}"
    for key in rule.hyper_keys:  # a rule's hyperparameters are ShardedAdamW constructor keywords
        import inspect

        assert key in inspect.signature(zeroadamw.ShardedAdamW.__init__).parameters


def test_unknown_rule_names_the_choices():
    import torch

    with pytest.raises(ValueError, match="adamw, lomo, adalomo"):
        zeroadamw.ShardedAdamW([torch.nn.Parameter(torch.zeros(3))], rule="adam")


def test_every_public_name_has_its_own_docstring():
    import inspect

    import zeroadamw.checkpoint
    import zeroadamw.functional

    missing = []
    for mod in (zeroadamw, zeroadamw.functional, zeroadamw.checkpoint):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
                if not own or not own.strip():
                    missing.append(f"{mod.__name__}.{name}")
    assert not missing, f"no docstring of their own: {missing}"
