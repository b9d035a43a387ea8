"""Child processes, one way for every package: a free port, "die with the parent", the one
supervisor (:func:`run_child`) and the one way a child's error reaches its parent.

A child that fails on a user error prints one line, ``ERROR_MARK <message>`` (:func:`report_error`),
and exits non-zero; the supervisor tees the child's output to a log (and the terminal) and
returns the last such message with the exit code, so the parent's own one-line error can
name the cause. The child runs in its own session and gets SIGTERM when the parent dies
(even by SIGKILL); a parent stopped by Ctrl-C or SIGTERM stops the child's whole session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

ERROR_MARK = "train-stage worker: error:"  # the one line a failing rank prints (report_error)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child before exec (``preexec_fn``): the kernel sends it ``sig`` when its parent
    dies, even by SIGKILL (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def report_error(err: BaseException) -> None:
    """In a child: the one line its supervisor reads back (the error's first line)."""
    text = str(err).strip()
    print(f"{ERROR_MARK} {text.splitlines()[0] if text else type(err).__name__}", file=sys.stderr, flush=True)


def run_child(cmd: list[str], env: dict[str, str], log_path: Path, echo: bool = True) -> tuple[int, str | None]:
    """Run ``cmd`` to its end, its output appended to ``log_path`` (and passed through byte for
    byte to this process's stdout with ``echo``) → (exit code, the last ``ERROR_MARK`` message).

    Note: the child runs in its own session (``start_new_session``): Ctrl-C or SIGTERM of this
    process stops the child's whole process group on the way out, and PR_SET_PDEATHSIG
    covers a SIGKILL of this process.
    """
    errors: list[str] = []
    carry = b""
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, preexec_fn=die_with_parent)
        previous = _raise_on_sigterm()
        try:
            assert proc.stdout is not None
            out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
            while chunk := os.read(proc.stdout.fileno(), 65536):
                log.write(chunk)
                *lines, carry = (carry + chunk).split(b"\n")
                errors += [ln.decode(errors="replace") for ln in lines if ERROR_MARK.encode() in ln]
                if not echo:
                    continue
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:
                    sys.stdout.write(chunk.decode(errors="replace"))
            rc = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM of this process: stop the child too
            stop_child(proc)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    if ERROR_MARK.encode() in carry:
        errors.append(carry.decode(errors="replace"))
    return rc, errors[-1].split(ERROR_MARK, 1)[1].strip() if errors else None


def _raise_on_sigterm():
    """SIGTERM → SystemExit(143) while the child runs, so it is stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def stop_child(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the child's session (it and everything it started), SIGKILL after ``grace`` s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
