"""The running agent's configuration, checked in a process of its own.

`edge-agent run` reads its file, a reloaded file and every configuration the cloud pushes
through `load_config_apart` / `parse_config_apart`: a short-lived child interpreter
(`python -m agent.configcheck`) validates the text exactly as `agent.config.parse_config`
does, with pydantic, and hands back the checked dataclasses (pickled) or the problems. The
agent's own process never imports pydantic: the library and the validators it builds would
stay in its memory for as long as it runs, about 13 MB of an edge box's RAM (README
"Footprint").

The child is the same interpreter with the same flags and environment (so `${VAR}`
substitution sees what the agent sees), started with `-P` (the working directory is not put
on its import path). It reads one request on stdin and writes one answer on stdout:

    request:  pickle of (text, source, env or None, replay)
    answer:   pickle of ("ok", AgentConfig) or ("error", message, [Problem, ...])
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, ConfigError, parse_config, read_config_text

# Validating a plant-sized file takes well under a second; a child that takes this long is
# stuck (a machine swapping to death), and the start or reload fails with a message.
CHECK_TIMEOUT_S = 120.0


def _command() -> list[str]:
    flags = ["-P"]
    if sys.flags.optimize:
        flags.append("-" + "O" * sys.flags.optimize)
    return [sys.executable, *flags, "-m", "agent.configcheck"]


def parse_config_apart(
    text: str,
    source: str = "<config>",
    env: dict[str, str] | None = None,
    *,
    replay: bool = False,
) -> AgentConfig:
    """`parse_config(text, source, env, replay=replay)`, validated in a child process."""
    request = pickle.dumps((text, source, env, replay), protocol=pickle.HIGHEST_PROTOCOL)
    try:
        done = subprocess.run(
            _command(),
            input=request,
            capture_output=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{source}: the configuration could not be checked: {exc}") from None
    answer: Any = None
    if done.returncode == 0:
        try:
            answer = pickle.loads(done.stdout)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError):
            answer = None
    if isinstance(answer, tuple) and answer[:1] == ("ok",) and isinstance(answer[1], AgentConfig):
        return answer[1]
    if isinstance(answer, tuple) and answer[:1] == ("error",) and len(answer) == 3:
        raise ConfigError(answer[1], answer[2])
    said = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no answer"]
    raise ConfigError(
        f"{source}: the configuration check ended without an answer "
        f"(exit status {done.returncode}): {said[0]}"
    )


def load_config_apart(path: Path | str) -> AgentConfig:
    """`load_config(path)`, validated in a child process."""
    p = Path(path)
    return parse_config_apart(read_config_text(p), str(p))


def main() -> None:
    text, source, env, replay = pickle.loads(sys.stdin.buffer.read())
    answer: tuple[Any, ...]
    try:
        answer = ("ok", parse_config(text, source, env, replay=replay))
    except ConfigError as exc:
        answer = ("error", str(exc), exc.problems)
    sys.stdout.buffer.write(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
