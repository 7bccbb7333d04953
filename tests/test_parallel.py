"""hpelib.parallel: jobs in spawned worker processes, their thread share, results and failures."""

from __future__ import annotations

import os
import time

import pytest

from hpelib import parallel


def sleepy_job(seconds: float, fail: bool = False) -> tuple[int, int, float, float]:
    """Module level, so a spawned worker can import it by name. Returns its process id, its
    torch threads, and when it started and ended."""
    import torch

    start = time.time()
    time.sleep(seconds)
    if fail:
        raise ValueError("this job was told to fail")
    return os.getpid(), torch.get_num_threads(), start, time.time()


def test_jobs_run_side_by_side_with_their_share_of_threads():
    polls, finished = [], []
    out = parallel.run_jobs(sleepy_job, {"b": {"seconds": 2.0}, "a": {"seconds": 2.0}}, workers=2,
                            on_poll=polls.append, on_done=lambda name, result: finished.append(name))
    assert list(out) == ["b", "a"]  # the order of the jobs, whatever order they finished in
    (pid_b, threads_b, start_b, end_b), (pid_a, threads_a, start_a, end_a) = out.values()
    assert pid_a != pid_b and os.getpid() not in (pid_a, pid_b)
    assert max(start_a, start_b) < min(end_a, end_b)  # the two sleeps overlapped in time
    assert threads_a == threads_b == parallel.worker_threads(2)
    assert sorted(finished) == ["a", "b"] and polls[-1] == {"a": "done", "b": "done"}


def test_a_failing_job_is_named_and_the_others_still_finish():
    finished = []
    with pytest.raises(parallel.JobError, match="job 'bad' failed: ValueError: this job was told to fail") as e:
        parallel.run_jobs(sleepy_job, {"bad": {"seconds": 0.1, "fail": True}, "good": {"seconds": 0.5}}, workers=2,
                          on_done=lambda name, result: finished.append(name))
    assert finished == ["good"]
    assert isinstance(e.value.__cause__, ValueError)


def test_workers_is_checked():
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        parallel.run_jobs(sleepy_job, {"a": {"seconds": 0}}, workers=0)


def test_pickled_hands_data_over_and_cleans_up():
    data = {"a": [1, 2, 3], "b": "x"}
    with parallel.pickled(data) as path:
        assert path.is_file() and parallel.unpickle(path) == data
    assert not path.exists()
