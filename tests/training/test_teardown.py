"""A launched worker whose process-group teardown never returns still ends, with the run's exit code."""

import subprocess
import sys
import textwrap
import time

from tests.distributed.launching import free_port

# A worker's end as the CLI runs it, under the watchdog: a teardown that blocks (a gloo barrier the peer never
# joins; in CI rank 0 waited in gloo's teardown on a peer that had finished).
WORKER = textwrap.dedent("""
    import datetime, os, sys, time
    import torch.distributed as dist
    from sparsetune.training import teardown

    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))
    dist.barrier()
    if rank == 1:
        time.sleep(120)  # alive, never joining rank 0's teardown barrier
        os._exit(0)
    print("rank 0: run finished", flush=True)
    teardown.close_and_leave(lambda: dist.barrier(), int(sys.argv[3]), rank=0, seconds=float(sys.argv[4]))
""")


def test_a_hung_teardown_ends_with_the_runs_exit_code(tmp_path):
    code = 2  # what the run would exit with (a one-line error here); 0 for a finished run goes the same way
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(free_port())
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port, str(code), "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    out, err = procs[0].communicate(timeout=100)
    ended = time.monotonic() - start
    procs[1].kill()  # the peer would wait 120 s more: rank 0 did not wait for it
    procs[1].communicate()
    assert procs[0].returncode == code, err[-2000:]
    assert "run finished" in out
    assert "rank 0: the process group's teardown did not end within 3 s" in err
    assert ended < 60  # the watchdog's 3 s (plus start-up), not the peer's 120 s
