"""The mutation list of tests/mutation_check.py still fits the code: every search text occurs exactly once in its file,
and every selected test exists, so the (slow, manual) mutation check cannot rot silently."""
import ast
import re

import pytest

from tests.mutation_check import MUTATIONS, REPO, verdict


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_search_text_occurs_exactly_once_and_selected_tests_exist(mutation):
    source = (REPO / mutation.path).read_text()
    assert source.count(mutation.find) == 1, f"{mutation.path} holds the search text {source.count(mutation.find)} times"
    assert mutation.replace != mutation.find and mutation.replace not in source
    assert mutation.tests
    for node in mutation.tests:
        path, _, rest = node.partition("::")
        test_file = REPO / path
        assert test_file.is_file(), node
        if rest:
            name = re.sub(r"\[.*\]$", "", rest)
            defined = {n.name for n in ast.walk(ast.parse(test_file.read_text())) if isinstance(n, ast.FunctionDef)}
            assert name in defined, f"{node}: no test {name} in {path}"


def test_names_are_unique_and_verdicts_read_pytest():
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS) >= 10
    failed = "FAILED tests/test_x.py::test_y[a] - AssertionError: out: relative error 1e0\n1 failed in 1s"
    assert verdict(1, failed) == "caught"
    assert verdict(0, "3 passed") == "MISSED"
    assert verdict(-11, "") == "caught (crash)"
    assert verdict(4, "ERROR: not found") == verdict(5, "no tests ran") == verdict(-999, "timed out") == "ERROR"
