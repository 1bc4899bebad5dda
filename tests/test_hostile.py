"""Issue 14's corpus: every hostile or careless input is refused by its CLI in one line
(exit 1, no traceback) and left unchanged. Time and memory are measured by
benchmarks/bench_hostile.py, not asserted here."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostile_corpus import CASES, build_case, prepare, refused_cleanly, run_case, snapshot


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    prepare(root)
    return root


def inputs(root, d):
    """Everything the case may read (its own inputs and the shared models), lock files aside."""
    return {k: v for part in (d, root / "base", root / "model")
            for k, v in snapshot(part).items() if not k.endswith(".lock")}


def test_the_corpus_is_large():
    assert len(CASES) >= 100
    assert {case.cli for case in CASES.values()} == {"convert", "chat", "generate", "serve"}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_in_one_line_and_left_unchanged(root, name):
    d, argv = build_case(name, root)
    before = inputs(root, d)
    code, stderr, _ = run_case(name, argv)
    assert refused_cleanly(code, stderr), f"exit {code}: {stderr[-2000:]}"
    assert inputs(root, d) == before
