"""The README's CPU example runs unchanged, as a new user would paste it."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "# runs on a CPU"


def cpu_example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE)
    marked = [block for block in blocks if block.startswith(MARKER + "\n")]
    assert len(marked) == 1, f"README.md should have one ```python block starting with {MARKER!r}, found {len(marked)}"
    return marked[0]


def test_readme_cpu_example_runs(tmp_path):
    # A new process, as a user's: nothing imported by the test session leaks into it.
    result = subprocess.run(
        [sys.executable, "-c", cpu_example()], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"README's CPU example failed:\n{result.stderr[-3000:]}"
    assert "PSNR against uncached" in result.stdout
