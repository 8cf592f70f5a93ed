"""The send budget: a lone send goes on in the turn that asks, a burst is
spread over turns, at most the budget per turn, in the order asked."""
import asyncio
import random
from collections import Counter

import pytest

from service.turn_budget import TurnBudget


async def _turn_counter():
    """A function giving the number of the loop's current turn: a callback
    that schedules itself runs once per turn."""
    loop = asyncio.get_running_loop()
    turns = 0
    ticker = None

    def tick():
        nonlocal turns, ticker
        turns += 1
        ticker = loop.call_soon(tick)

    tick()
    return (lambda: turns), (lambda: ticker.cancel())


def test_a_lone_take_is_granted_without_a_turn():
    async def scenario():
        budget = TurnBudget(4)
        assert budget.take().done()
    asyncio.run(scenario())


def test_a_burst_goes_on_at_most_the_budget_per_turn_in_the_order_asked():
    async def scenario():
        budget = TurnBudget(4)
        turn, stop = await _turn_counter()
        went_on: list[tuple[int, int]] = []

        async def send(index: int):
            await budget.take()
            went_on.append((index, turn()))

        await asyncio.gather(*(send(index) for index in range(10)))
        stop()
        return went_on

    went_on = asyncio.run(scenario())
    assert [index for index, _ in went_on] == list(range(10))
    per_turn = Counter(turn for _, turn in went_on)
    assert max(per_turn.values()) <= 4, per_turn
    assert len(per_turn) == 3, per_turn
    # The first four went on in the turn they asked, without waiting.
    assert per_turn[went_on[0][1]] == 4


def test_a_cancelled_waiter_gives_its_grant_to_the_next():
    async def scenario():
        budget = TurnBudget(1)
        assert budget.take().done()
        cancelled, waiting = budget.take(), budget.take()
        cancelled.cancel()
        await waiting
        return waiting.done()
    assert asyncio.run(scenario())


@pytest.mark.parametrize("seed", range(5))
def test_takes_at_random_turns_go_on_at_most_the_budget_per_turn(seed):
    """Senders start in random turns, some while others wait: in no turn do
    more go on than the budget, the waiters woken in it included."""
    rng = random.Random(seed)
    starts = [rng.randrange(0, 12) for _ in range(rng.randrange(20, 60))]

    async def scenario():
        budget = TurnBudget(4)
        turn, stop = await _turn_counter()
        went_on: list[int] = []
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        async def send():
            await budget.take()
            went_on.append(turn())
            if len(went_on) == len(starts) and not done.done():
                done.set_result(None)

        first = turn()

        def start_due():
            for _ in range(starts.count(turn() - first)):
                loop.create_task(send())
            if turn() - first < max(starts):
                loop.call_soon(start_due)

        start_due()
        await asyncio.wait_for(done, 10)
        stop()
        return went_on

    per_turn = Counter(asyncio.run(scenario()))
    assert max(per_turn.values()) <= 4, f"seed {seed}: {sorted(per_turn.items())}"
