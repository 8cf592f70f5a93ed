"""The Redis client against a real redis-server: pipelining, errors, lost
connections, an unreachable server, scripts the server does not know yet."""
from __future__ import annotations

import asyncio
import time

import pytest
import uvloop
from redis_server import ScratchRedis

from paycore.service.store import resp
from paycore.service.store.resp import (
    RedisAddress,
    RedisClient,
    RedisError,
    RedisUnavailable,
    Script,
    parse_url,
)

SCENARIO_TIMEOUT_S = 10


def run(scenario) -> None:
    """scenario() on uvloop, bounded: a hang fails the test."""
    uvloop.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S))

def test_urls_name_a_tcp_or_unix_address_and_a_database():
    assert parse_url("redis://10.0.0.5:6380/3") == RedisAddress(host="10.0.0.5", port=6380, db=3)
    assert parse_url("redis://redis") == RedisAddress(host="redis", port=6379, db=0)
    assert parse_url("redis+unix:///run/redis.sock?db=4") == RedisAddress(unix_path="/run/redis.sock", db=4)
    for bad in ("http://redis:6379/0", "redis://user:secret@redis:6379/0", "redis://redis/x",
                "redis+unix://?db=1"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_a_batch_goes_out_in_one_write_and_replies_come_back_in_order(redis_url, monkeypatch):
    writes = []
    send = resp._Connection.send
    monkeypatch.setattr(resp._Connection, "send",
                        lambda connection, data, pending: (writes.append(len(pending)),
                                                           send(connection, data, pending)))

    async def scenario():
        client = RedisClient(redis_url)
        replies = []
        for value in range(500):
            replies.append(client.execute(b"RPUSH", b"list", value))
            replies.append(client.execute("LINDEX", "list", -1))
        client.flush()
        assert await asyncio.gather(*replies) == [
            reply for value in range(500) for reply in (value + 1, str(value).encode())]
        # Nobody flushes: the scheduled flush sends it anyway, as one batch.
        assert await asyncio.wait_for(asyncio.gather(client.execute("LLEN", "list"),
                                                     client.execute("LPOP", "list")), 1) == [500, b"0"]
        client.close()

    run(scenario)
    # One write for the first batch (after connecting), one for the second.
    assert writes == [1000, 2]


def test_an_error_reply_fails_its_own_command_only(redis_url):
    async def scenario():
        client = RedisClient(redis_url)
        results = await asyncio.gather(
            client.execute("SET", "key", "text"), client.execute("INCR", "key"),
            client.execute("NOSUCHCOMMAND"), client.execute("GET", "key"),
            client.execute("GET", "key", convert=lambda reply: reply.upper()),
            return_exceptions=True)
        assert results[0] == b"OK" and results[3] == b"text" and results[4] == b"TEXT"
        assert isinstance(results[1], RedisError) and "not an integer" in str(results[1])
        assert isinstance(results[2], RedisError) and "unknown command" in str(results[2])
        client.close()

    run(scenario)


async def held_by_the_server(client: RedisClient, url: str) -> asyncio.Future:
    """A command the server holds without answering (BLPOP of an empty list),
    once the server says it holds it."""
    waiting = client.execute("BLPOP", "nothing", 10)
    client.flush()
    observer = RedisClient(url)
    while b"cmd=blpop" not in await observer.execute("CLIENT", "LIST"):
        await asyncio.sleep(0.01)
    observer.close()
    return waiting


def test_a_lost_server_fails_what_waits_fast_and_the_client_reconnects_when_it_is_back(tmp_path):
    with ScratchRedis(str(tmp_path)) as server:
        async def scenario():
            url = f"redis://127.0.0.1:{server.port}/2"
            client = RedisClient(url)
            assert await client.execute("SET", "key", "before") == b"OK"
            waiting = await held_by_the_server(client, url)
            server.kill()
            with pytest.raises(RedisUnavailable):
                await asyncio.wait_for(waiting, 2)

            started = time.monotonic()
            with pytest.raises(RedisUnavailable):
                await client.execute("GET", "key")
            assert time.monotonic() - started < 0.5  # refused: no waiting for the timeout

            server.start()
            assert await client.execute("SET", "key", "after") == b"OK"
            client.close()

        run(scenario)
        # The new connection selected the URL's database again.
        keyspace = server.call("INFO", "keyspace")
        assert b"db2:keys=1" in keyspace and b"db0:" not in keyspace


def test_a_server_that_never_answers_fails_the_commands_after_the_connect_timeout():
    async def scenario():
        silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        # A database to select: the connection is not usable before the server answers.
        client = RedisClient(f"redis://127.0.0.1:{port}/1", connect_timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(RedisUnavailable):
            await asyncio.wait_for(client.execute("PING"), 2)
        assert 0.25 < time.monotonic() - started < 1.0
        client.close()
        silent.close()

    run(scenario)


def test_a_server_that_stops_answering_fails_what_waits_after_the_reply_timeout(redis_url):
    async def scenario():
        client = RedisClient(redis_url, reply_timeout_s=0.3)
        assert await client.execute("PING") == b"PONG"
        # Paused, the server holds every command's reply back: a hung server.
        outside = RedisClient(redis_url)
        assert await outside.execute("CLIENT", "PAUSE", 1500, "ALL") == b"OK"
        started = time.monotonic()
        with pytest.raises(RedisUnavailable):
            await client.execute("PING")
        assert 0.25 < time.monotonic() - started < 1.0
        # Once the server answers again, so does the client, on a new connection.
        await asyncio.sleep(1.5)
        assert await client.execute("PING") == b"PONG"
        client.close()
        outside.close()

    run(scenario)


def test_a_script_the_server_lacks_runs_by_eval_and_is_loaded_for_next_time(redis_url):
    script = Script("redis.call('INCRBY', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[1])")
    failing = Script("return redis.error_reply('ERR on purpose')")

    async def scenario():
        client = RedisClient(redis_url)
        assert await client.execute("SCRIPT", "FLUSH") == b"OK"
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
        assert await asyncio.gather(*(client.run(script, ["counter"], [5]) for _ in range(3))) == [
            b"5", b"10", b"15"]
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
        assert await client.run(script, ["counter"], [1], convert=int) == 16
        with pytest.raises(RedisError, match="on purpose"):
            await client.run(failing, [], [])
        client.close()

    run(scenario)


def test_unix_socket(tmp_path):
    with ScratchRedis(str(tmp_path), unix_socket=True) as server:
        async def scenario():
            client = RedisClient(f"redis+unix://{server.socket_path}?db=5")
            assert await client.execute("SET", "key", "value") == b"OK"
            client.close()

        run(scenario)
        assert b"db5:keys=1" in server.call("INFO", "keyspace")


def test_closing_fails_what_waits_and_what_comes_after(redis_url):
    async def scenario():
        client = RedisClient(redis_url)
        waiting = await held_by_the_server(client, redis_url)
        client.close()
        with pytest.raises(RedisUnavailable):
            await asyncio.wait_for(waiting, 1)
        with pytest.raises(RedisUnavailable):
            await client.execute("PING")

    run(scenario)
