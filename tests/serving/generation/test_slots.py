"""The generation server's bounds that need no model: one client's share of the slots, the number
of chat messages and the length of stop strings."""

import asyncio

import pytest

from flywheel.config import GenerateServingConfig
from flywheel.serving.generation.app import GenerationSlots
from flywheel.serving.generation.openai import MAX_MESSAGES, MAX_STOP_CHARS, parse_openai
from flywheel.serving.http.errors import RequestInvalid
from flywheel.serving.http.metrics import GenerationMetrics, ServingMetrics


def test_one_client_can_never_hold_every_slot_and_the_whole_line():
    async def scenario():
        slots = GenerationSlots(1, 2, GenerationMetrics(ServingMetrics()))  # 3 places, 2 for one client
        release = asyncio.Event()
        granted = []

        async def ask(client):
            async with slots.slot(client) as ok:
                granted.append((client, ok))
                if ok:
                    await release.wait()

        hog = [asyncio.create_task(ask("10.0.0.9")) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert ("10.0.0.9", False) in granted  # its third is refused while two are held
        other = asyncio.create_task(ask("10.0.0.7"))
        await asyncio.sleep(0.05)
        assert slots.held["10.0.0.7"] == 1  # another caller still gets a place in line
        release.set()
        await asyncio.gather(*hog, other)
        assert granted.count(("10.0.0.7", True)) == 1 and not slots.held

    asyncio.run(scenario())


def test_chat_messages_and_stop_strings_are_bounded_before_any_work():
    cfg = GenerateServingConfig()
    many = [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)
    with pytest.raises(RequestInvalid, match=f"at most {MAX_MESSAGES} messages"):
        parse_openai({"model": "m", "messages": many}, cfg, chat=True)
    with pytest.raises(RequestInvalid, match="stop"):
        parse_openai({"model": "m", "prompt": "x", "stop": "y" * (MAX_STOP_CHARS + 1)}, cfg, chat=False)
    ok = parse_openai({"model": "m", "prompt": "x", "stop": "y" * MAX_STOP_CHARS}, cfg, chat=False)
    assert ok.stop == ("y" * MAX_STOP_CHARS,)
