"""Every scenario of the fault catalog (FAULTS.md, F01...F49) has at least one test named after it.

FAULTS.md lives beside the repository, in ``../shared/FAULTS.md`` (CI checks out the project with
``shared/`` next to it). When it is absent, the ids come from ``tests/data/FAULTS_ids.txt``, a copy
generated from it (one id per line); when both exist they must agree, so the copy cannot go stale.
The test functions are found with ``ast`` in ``tests/**/*.py``: a function ``test_...`` covers every
id its name contains (``test_F11_F12_...`` covers both), so ``pytest -k F21`` runs F21's tests.
"""

from __future__ import annotations

import ast
import glob
import os
import re

import repo_paths

HERE = repo_paths.TESTS_DIR  # every test folder is scanned from here
REPO = repo_paths.REPO_ROOT
FAULTS_MD = os.path.join(REPO, "..", "shared", "FAULTS.md")
IDS_COPY = os.path.join(HERE, "data", "FAULTS_ids.txt")
ID_RE = re.compile(r"F(\d{2})(?!\d)")
ENTRY_RE = re.compile(r"^- \*\*(F\d{2})\b", re.MULTILINE)  # "- **F37 Planted checkpoint by another user.**"


def ids_from_markdown(text: str) -> list[str]:
    return ENTRY_RE.findall(text)


def catalog_ids() -> list[str]:
    if os.path.isfile(FAULTS_MD):
        with open(FAULTS_MD, encoding="utf-8") as f:
            return ids_from_markdown(f.read())
    with open(IDS_COPY, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


# Trust, round two: a second range of ids, one per class of finding of the adversarial review
# (README, "Security"). Each class needs a test named after it, like the F range.
TRUST_IDS = {
    "T01": "code execution through DCP (bytes items, planted directories, BUILD state on classes)",
    "T02": "retention deleting the job's own progress (other compat or layout, unmirrored, prune)",
    "T03": "one bad manifest stopping every save (numbers that do not round-trip)",
    "T04": "hangs and quadratic work in the resume path",
    "T05": "wrong or partial state reported as success",
    "T06": "async save that is not a snapshot",
    "T07": "bad arguments (unknown scheme, names ending in a newline)",
    "T08": "memory and time bounded by what the attacker controls",
    "T09": "saves that can never be resumed (a symlinked run dir)",
    "T10": "damage outside the tensors (the state tree)",
}
TRUST_ID_RE = re.compile(r"T(\d{2})(?!\d)")


def test_functions(id_re: re.Pattern[str] = ID_RE, letter: str = "F") -> dict[str, list[str]]:
    """id -> the test functions (``file::name``) whose name contains it."""
    out: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(HERE, "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                for num in id_re.findall(node.name):
                    out.setdefault(f"{letter}{num}", []).append(f"{os.path.basename(path)}::{node.name}")
    return out


test_functions.__test__ = False  # a helper, not a test


def test_catalog_ids_are_F01_to_F49():
    ids = catalog_ids()
    assert ids == [f"F{i:02d}" for i in range(1, 50)], ids


def test_committed_id_copy_matches_FAULTS_md():
    """The fallback copy is what FAULTS.md says (checked wherever shared/ is present)."""
    with open(IDS_COPY, encoding="utf-8") as f:
        copy = [line.strip() for line in f if line.strip()]
    assert copy == [f"F{i:02d}" for i in range(1, 50)]
    if os.path.isfile(FAULTS_MD):
        with open(FAULTS_MD, encoding="utf-8") as f:
            assert ids_from_markdown(f.read()) == copy, (
                "tests/data/FAULTS_ids.txt is stale: regenerate it from FAULTS.md"
            )


def test_every_catalog_fault_has_a_named_test():
    have = test_functions()
    missing = [i for i in catalog_ids() if not have.get(i)]
    assert not missing, f"fault scenarios without a test named after them: {missing}"


def test_every_trust_finding_has_a_named_test():
    have = test_functions(TRUST_ID_RE, "T")
    missing = [i for i in TRUST_IDS if not have.get(i)]
    assert not missing, f"trust findings without a test named after them: {missing}"
    assert sorted(have) == sorted(TRUST_IDS), f"tests name unknown trust ids: {sorted(set(have) - set(TRUST_IDS))}"


def test_the_scan_sees_real_names():
    """The scanner is not vacuous: it finds this file's own functions and splits combined names."""
    have = test_functions()
    assert "test_faults_catalog.py::test_committed_id_copy_matches_FAULTS_md" not in have.get("F01", [])
    assert any(n.endswith("::test_F37_planted_checkpoint_by_another_user") for n in have["F37"])
    assert ID_RE.findall("test_F11_F12_multirank") == ["11", "12"] and ID_RE.findall("test_F100") == []
    assert ids_from_markdown("- **F07 Manifest present, data missing.** Inject:\n- **F08 Data**") == ["F07", "F08"]


def test_fallback_copy_is_used_without_shared(monkeypatch, tmp_path):
    """A clean clone without ../shared still checks every id, from the committed copy."""
    import test_faults_catalog as me

    monkeypatch.setattr(me, "FAULTS_MD", str(tmp_path / "absent" / "FAULTS.md"))
    assert me.catalog_ids() == [f"F{i:02d}" for i in range(1, 50)]
