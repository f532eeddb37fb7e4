"""torchrun: ranks wait for rank 0's long work (a cache build) past the default group's timeout."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import datetime, os, sys, time
    from hpa.engine.distributed import barrier, init_distributed, main_first
    rank, world = init_distributed("cpu", timeout=datetime.timedelta(seconds=3))  # the default group: 3 s
    long_wait = sys.argv[1] == "main_first"
    def build():  # rank 0's "cache": longer than the default group's timeout
        time.sleep(8)
        return "built"
    if long_wait:
        out = main_first(build)
    else:  # the old way: rank 0 works, the others wait on a barrier of the default group
        out = build() if rank == 0 else None
        barrier()
    barrier()  # the default group still works afterwards
    print(f"rank {rank}/{world}: {out}", flush=True)
""")


def _torchrun(tmp_path, mode):
    script = tmp_path / "wait.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), mode]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_ranks_wait_for_rank_0_past_the_default_timeout(tmp_path):
    proc = _torchrun(tmp_path, "main_first")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2: built" in proc.stdout and "rank 1/2: None" in proc.stdout


@pytest.mark.slow
def test_a_plain_barrier_would_time_out(tmp_path):
    """The control: the same wait on the default group's barrier fails after its 3-s timeout."""
    proc = _torchrun(tmp_path, "barrier")
    assert proc.returncode != 0 and "rank 1/2" not in proc.stdout and "Timed out" in proc.stderr
