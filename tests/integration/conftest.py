import pytest_twisted

from harness import Mock, start_gateway, stop_gateway


@pytest_twisted.async_yield_fixture
async def mocks():
    """Two in-process mock backends, fast by default."""
    started = [Mock("a"), Mock("b")]
    yield started
    for m in started:
        await m.stop()


@pytest_twisted.async_yield_fixture
async def gateway_factory():
    """Start real ``twistd ntonix`` processes; all are stopped at teardown."""
    procs = []

    async def start(*args, env=None, **kw):
        proc = await start_gateway(list(args), env=env, **kw)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        await stop_gateway(p)
