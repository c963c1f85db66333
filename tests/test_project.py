"""The README's commands and CI agree."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.DOTALL)
    test_command = next(block for block in blocks if "pytest" in block)
    assert test_command in (ROOT / ".ci" / "run").read_text()
