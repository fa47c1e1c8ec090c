"""Waiting on a multiprocessing pipe from asyncio, for the helpers that run work in child
processes (notebook 07's application fleet, notebook 11's HTTP load client)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def recv(pipe: Any, gone: Callable[[], BaseException]) -> Any:
    """The next message on ``pipe`` without blocking the event loop; raises ``gone()`` when the
    process at the other end has exited."""
    loop = asyncio.get_running_loop()
    while not pipe.poll():
        ready = loop.create_future()
        try:
            loop.add_reader(pipe.fileno(), _wake, ready)
        except NotImplementedError:  # an event loop without add_reader (Windows)
            return await asyncio.to_thread(_recv_or_raise, pipe, gone)
        try:
            await ready
        finally:
            loop.remove_reader(pipe.fileno())
    return _recv_or_raise(pipe, gone)


def _recv_or_raise(pipe: Any, gone: Callable[[], BaseException]) -> Any:
    try:
        return pipe.recv()
    except EOFError:
        raise gone() from None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
