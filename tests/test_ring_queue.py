
import pytest

from conftest import random_uuid
from paycore.core.ring_queue import RingQueue


def new_id() -> bytes:
    return random_uuid().bytes


def test_pops_in_fifo_order():
    queue = RingQueue(8)
    payments = [(new_id(), cents) for cents in (2005, 1, 0, -3, 2**63 - 1)]
    for payment in payments:
        assert queue.push(*payment)
    assert len(queue) == len(payments)
    assert [queue.pop() for _ in payments] == payments
    assert queue.pop() is None
    assert len(queue) == 0


def test_wraps_around_many_times_with_a_model():
    capacity = 7
    queue = RingQueue(capacity)
    model = []
    counter = 0
    # Uneven push/pop bursts move head and tail across the array end in every phase.
    for round_number in range(500):
        for _ in range(round_number % 5 + 1):
            payment = (counter.to_bytes(16, "big"), counter)
            counter += 1
            accepted = queue.push(*payment)
            assert accepted == (len(model) < capacity)
            if accepted:
                model.append(payment)
        for _ in range(round_number % 4 + 1):
            expected = model.pop(0) if model else None
            assert queue.pop() == expected
        assert len(queue) == len(model)
        assert queue.is_full == (len(model) == capacity)
    assert counter > 10 * capacity


def test_full_and_empty_edges():
    queue = RingQueue(3)
    assert queue.capacity == 3
    assert not queue.is_full
    assert queue.pop() is None
    ids = [new_id() for _ in range(4)]
    assert all(queue.push(each, 100) for each in ids[:3])
    assert queue.is_full
    assert not queue.push(ids[3], 100)
    assert not queue.push_front(ids[3], 100)
    assert len(queue) == 3
    assert queue.pop() == (ids[0], 100)
    assert not queue.is_full
    assert queue.push(ids[3], 100)
    assert [queue.pop()[0] for _ in range(3)] == ids[1:]
    assert queue.pop() is None


def test_capacity_one():
    queue = RingQueue(1)
    first, second = new_id(), new_id()
    for _ in range(3):
        assert queue.push(first, 1)
        assert queue.is_full
        assert not queue.push(second, 2)
        assert queue.pop() == (first, 1)
        assert queue.push_front(second, 2)
        assert queue.pop() == (second, 2)
        assert queue.pop() is None


def test_push_front_is_popped_first():
    queue = RingQueue(4)
    first, second, retried, retried_again = (new_id() for _ in range(4))
    queue.push(first, 1)
    queue.push(second, 2)
    assert queue.pop() == (first, 1)
    assert queue.push_front(retried, 3)
    assert queue.push_front(retried_again, 4)  # wraps below index 0
    assert [queue.pop() for _ in range(3)] == [(retried_again, 4), (retried, 3), (second, 2)]


def test_push_front_into_empty_queue_then_push():
    queue = RingQueue(2)
    retried, fresh = new_id(), new_id()
    assert queue.push_front(retried, 5)
    assert queue.push(fresh, 6)
    assert queue.pop() == (retried, 5)
    assert queue.pop() == (fresh, 6)


def test_clear_empties_and_reuses():
    queue = RingQueue(2)
    queue.push(new_id(), 1)
    queue.push(new_id(), 2)
    queue.clear()
    assert len(queue) == 0 and not queue.is_full
    assert queue.pop() is None
    payment = (new_id(), 3)
    assert queue.push(*payment)
    assert queue.pop() == payment


@pytest.mark.parametrize("capacity", [0, -1])
def test_rejects_capacity_below_one(capacity):
    with pytest.raises(ValueError):
        RingQueue(capacity)


def test_rejects_bad_uuid_bytes():
    queue = RingQueue(2)
    for bad in (b"", b"x" * 15, b"x" * 17, random_uuid().hex.encode()):
        with pytest.raises(ValueError):
            queue.push(bad, 1)
        with pytest.raises(ValueError):
            queue.push_front(bad, 1)
    with pytest.raises(TypeError):
        queue.push(None, 1)
    with pytest.raises(TypeError):
        queue.push(str(random_uuid()), 1)
    with pytest.raises(OverflowError):
        queue.push(new_id(), 2**63)
    assert len(queue) == 0


def test_large_capacity_allocates_and_huge_one_fails():
    queue = RingQueue(65536)
    assert queue.capacity == 65536
    with pytest.raises(MemoryError):
        RingQueue(2**62)
