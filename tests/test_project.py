"""The README's commands and CI agree."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.DOTALL)
    test_command = next(block for block in blocks if "pytest" in block)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_runtime_imports_leave_the_training_code_alone():
    """`import dag_safety` and the runtime modules a user touches never import the mini model's training scripts
    (`dag_safety.mini.training`)."""
    code = (
        "import sys, dag_safety, dag_safety.mini, dag_safety.cli, dag_safety.pipeline, dag_safety.attach;"
        "print(sorted(m for m in sys.modules if m.startswith('dag_safety.mini.training')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
