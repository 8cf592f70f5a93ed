import threading
from pathlib import Path

import pytest

from service.os_threads import OS_NAME_BYTES, start_named_thread


def test_the_operating_system_sees_the_thread_s_name():
    running, finish = threading.Event(), threading.Event()

    def work() -> None:
        running.set()
        finish.wait(5)

    thread = start_named_thread(work, "record-reader")
    try:
        assert running.wait(5)
        assert Path(f"/proc/self/task/{thread.native_id}/comm").read_text().strip() == "record-reader"
        assert thread.name == "record-reader" and thread.daemon
    finally:
        finish.set()
        thread.join(5)


def test_a_name_the_kernel_would_cut_short_is_refused():
    with pytest.raises(ValueError, match="at most 15 bytes"):
        start_named_thread(lambda: None, "x" * (OS_NAME_BYTES + 1))
    assert [t for t in threading.enumerate() if t.name.startswith("xxx")] == []
