"""Where things are, for tests in any folder: the repository, the package, ``tests/`` and this support folder.

Tests live one folder below ``tests/`` (``unit/``, ``faults/``...), so a path built from a test's own
``__file__`` depends on its folder; these constants do not. Subprocesses that import the support
modules put ``SUPPORT_DIR`` on their ``sys.path``.
"""

from __future__ import annotations

import os

SUPPORT_DIR = os.path.dirname(os.path.abspath(__file__))
TESTS_DIR = os.path.dirname(SUPPORT_DIR)
DATA_DIR = os.path.join(TESTS_DIR, "data")
REPO_ROOT = os.path.dirname(TESTS_DIR)
PACKAGE_DIR = os.path.join(REPO_ROOT, "dist_guardian")
