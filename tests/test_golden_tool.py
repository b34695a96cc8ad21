"""tools/golden_outputs.py, the safety net of the emitter's redesign (issue 23)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_golden_outputs_tool_runs_the_symbp_of_its_own_checkout():
    """tools/golden_outputs.py (the safety net for this refactor) records the outputs of the
    checkout it lives in, not those of whatever checkout an editable install points to."""
    probe = ("import runpy, sys; sys.path[0] = sys.argv[1]; "
             "runpy.run_path(sys.argv[1] + '/golden_outputs.py'); "
             "print(sys.modules['symbp'].__file__)")
    done = subprocess.run([sys.executable, "-c", probe, str(ROOT / "tools")], cwd="/",
                          capture_output=True, text=True, check=True)
    assert Path(done.stdout.strip()).resolve() == ROOT / "symbp" / "__init__.py"
