"""Phase hooks: a shell command run when a phase starts (e.g. stop Redis for an outage drill).

Off by default: a scenario file must not run commands just because someone load-tests with it.
``--allow-hooks`` turns them on. The command runs with ``/bin/sh -c``, with the environment
plus ``LOADTEST_PHASE``, ``LOADTEST_SCENARIO`` and ``LOADTEST_TARGET``; its output and exit
status go into the report. A hook that outlives its ``timeout_s`` is killed. Hooks run beside
the traffic, never blocking the arrivals.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from .scenario import Hook

__all__ = ["run_hook"]

_OUTPUT_LIMIT = 4000


async def run_hook(hook: Hook, *, phase: str, scenario: str, target: str, allowed: bool,
                   at_s: float) -> dict[str, Any]:
    """Run (or skip) one hook; the result is a JSON-ready dict for the report."""
    result: dict[str, Any] = {"phase": phase, "at_s": round(at_s, 3), "command": hook.command}
    if not allowed:
        result["skipped"] = "hooks are off; pass --allow-hooks to run them"
        return result
    env = {**os.environ, "LOADTEST_PHASE": phase, "LOADTEST_SCENARIO": scenario,
           "LOADTEST_TARGET": target}
    started = time.monotonic()
    proc = await asyncio.create_subprocess_shell(
        hook.command, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), hook.timeout_s)
        result["exit_status"] = proc.returncode
    except TimeoutError:
        _kill_group(proc.pid)  # the shell and whatever it started: they hold the pipe
        output, _ = await proc.communicate()
        result["exit_status"] = None
        result["timed_out"] = True
    except asyncio.CancelledError:
        if proc.returncode is None:
            _kill_group(proc.pid)
            await proc.wait()
        raise
    result["seconds"] = round(time.monotonic() - started, 3)
    result["output"] = output.decode("utf-8", "replace")[-_OUTPUT_LIMIT:]
    return result


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # start_new_session: the group id is the shell's pid
    except ProcessLookupError:
        pass
