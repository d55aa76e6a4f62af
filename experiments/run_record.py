"""What every result JSON written under experiments/ records about its run: git commit, command line, date, device,
jax version. Scripts in benchmarks/ and studies/ put experiments/ on sys.path and call `with_run_record(result)`."""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    """git's answer here; a copy without .git (the GPU machine gets the working tree only) reads
    $HYPERATTN_JAX_GIT_COMMIT, set by whoever copied it, for `rev-parse HEAD`."""
    if args == ("rev-parse", "HEAD") and os.environ.get("HYPERATTN_JAX_GIT_COMMIT"):
        return os.environ["HYPERATTN_JAX_GIT_COMMIT"]
    try:
        return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _dirty() -> bool | None:
    """Whether tracked files differ from the commit; None where there is no git checkout to ask."""
    answer = _git("status", "--porcelain", "--untracked-files=no")
    return None if answer.startswith("unknown") else bool(answer)


def run_record() -> dict:
    """{"git_commit", "git_dirty", "command", "date", "device", "backend", "jax_version"} of the running process."""
    import jax

    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": _dirty(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
    }


def with_run_record(result: dict) -> dict:
    """`result` with a "run" entry holding `run_record()` (the script's own keys are kept as they are)."""
    return {"run": run_record(), **result}
