"""README's DDP script runs as written under torchrun on two CPU processes (gloo).

README's python blocks run in one process (tests/test_readme.py); a torchrun script needs its own
processes, so this test writes the block that starts with ``# train_ddp.py`` to a file and
launches it the way README says, with ``torch.distributed.run --standalone --nproc_per_node=2``.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ddp_script() -> str:
    blocks = re.findall(r"```py\n(# train_ddp\.py.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1, "README has exactly one train_ddp.py block"
    return blocks[0]


def test_readme_ddp_script_runs_under_torchrun_with_replicas_equal_at_x(tmp_path):
    (tmp_path / "train_ddp.py").write_text(ddp_script())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train_ddp.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "2 ranks: replicas bit-identical at x; ddp.pt saved by rank 0, loaded by all" in result.stdout
    assert (tmp_path / "ddp.pt").exists()
