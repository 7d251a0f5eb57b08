"""The distributed fixtures' retry rule (tests/native_crash.py): only native crash signatures retry."""

import pytest

from native_crash import NativeCrash, check_launch, retry_after_native_crash


def test_only_native_crashes_are_retried(capsys):
    check_launch(0, "malloc(): unaligned tcache chunk detected", "ok")  # a clean exit is never an error
    with pytest.raises(NativeCrash):
        check_launch(-6, "[rank1]: ...\nmalloc(): unaligned tcache chunk detected\n", "launch")
    with pytest.raises(AssertionError) as info:
        check_launch(1, "ValueError: bad config key", "launch")
    assert not isinstance(info.value, NativeCrash)

    attempts = []

    def build(x, attempt):
        attempts.append(attempt)
        if attempt == 0:
            raise NativeCrash("terminate called without an active exception")
        return x

    with pytest.warns(UserWarning, match=r"starting the launches over \(2 of 2\)"):
        assert retry_after_native_crash(build, 7) == 7
    assert attempts == [0, 1]
    # every retry is also printed to stderr, signature and log excerpt, so CI output shows it
    err = capsys.readouterr().err
    assert "NATIVE CRASH RETRY" in err and "'terminate called without an active exception'" in err

    def always_crash(attempt):
        raise NativeCrash("malloc(): ")

    with pytest.warns(UserWarning), pytest.raises(NativeCrash):
        retry_after_native_crash(always_crash)

    calls = []

    def crash_twice(attempt):
        calls.append(attempt)
        if attempt < 2:
            raise NativeCrash("malloc(): ")
        return "done"

    with pytest.warns(UserWarning):
        assert retry_after_native_crash(crash_twice, attempts=3) == "done"
    assert calls == [0, 1, 2]
    calls.clear()
    with pytest.warns(UserWarning), pytest.raises(NativeCrash):
        retry_after_native_crash(crash_twice, attempts=2)
    assert calls == [0, 1]
