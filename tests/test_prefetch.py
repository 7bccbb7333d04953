"""hpelib.data.prefetch: batches made ahead in a spawned process are the stream's own batches."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hpelib.data import tasks
from hpelib.data.prefetch import BackgroundStream, DataWorkerError
from hpelib.data.synth import SceneRenderer


class FailingStream:
    """Module level, so the spawned worker can unpickle it; batch 2 raises."""

    batch_size = 1

    def batch(self, step: int, part: int = 0) -> list:
        if step == 2:
            raise ValueError("no scene for step 2")
        return [step, part]


def _same(a, b) -> bool:
    return (a.prompt, a.answer, a.task) == (b.prompt, b.answer, b.task) and \
        np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_background_batches_equal_the_streams_own_in_any_order():
    stream = tasks.SampleStream(SceneRenderer("synth-train", 64), tasks.BASE_MIX, batch_size=4, seed=3)
    with BackgroundStream(stream) as background:
        assert background.batch_size == 4
        # consecutive steps, then a jump back (a resumed run) and another part (data-parallel rank)
        for step, part in [(0, 0), (1, 0), (2, 0), (0, 0), (5, 1)]:
            got, want = background.batch(step, part=part), stream.batch(step, part=part)
            assert len(got) == len(want) == 4
            assert all(_same(g, w) for g, w in zip(got, want)), (step, part)
    with pytest.raises(DataWorkerError, match="closed"):
        background.batch(0)


def test_several_workers_make_the_same_batches_as_one():
    stream = tasks.SampleStream(SceneRenderer("synth-train", 64), tasks.BASE_MIX, batch_size=2, seed=5)
    with BackgroundStream(stream, workers=3) as background:
        assert background.depth == 3 * 2  # each worker keeps its next batches in hand
        for step in [0, 1, 2, 3, 4, 5, 6, 2]:
            got, want = background.batch(step), stream.batch(step)
            assert all(_same(g, w) for g, w in zip(got, want)), step
        assert len(background._processes) == 3
    assert background._processes == []
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        BackgroundStream(stream, workers=0)


def test_a_failing_batch_is_raised_with_the_workers_traceback():
    with BackgroundStream(FailingStream()) as background:
        assert background.batch(0) == [0, 0]
        assert background.batch(1) == [1, 0]
        with pytest.raises(DataWorkerError, match=r"(?s)batch 2 \(part 0\).*ValueError: no scene for step 2"):
            background.batch(2)


def test_an_unpicklable_stream_is_refused_by_name():
    class Local:  # a local class cannot be pickled by reference
        batch_size = 1
        lock = threading.Lock()

    with pytest.raises(TypeError, match="picklable stream; Local"):
        BackgroundStream(Local())
    with pytest.raises(ValueError, match="depth must be >= 1"):
        BackgroundStream(FailingStream(), depth=0)


def test_the_base_step_benchmark_times_every_way(capsys):
    from hpelib import bench

    assert bench.main(["base-step", "--profile", "smoke", "--steps", "1", "--repeat", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "s / step" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(bench.BASE_STEP_VARIANTS)
    assert all(float(row.split(" | ")[1]) > 0 for row in rows)
    with pytest.raises(SystemExit):
        bench.main(["base-step", "--steps", "0"])


def test_the_lora_step_benchmark_times_every_setting(capsys):
    from hpelib import bench

    assert bench.main(["lora-step", "--profile", "smoke", "--steps", "1", "--repeat", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "s / step" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(bench.LORA_STEP_VARIANTS)
    assert all(float(row.split(" | ")[1]) > 0 for row in rows)
