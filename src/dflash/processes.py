"""Processes: whether one still runs, dying with the process that started a job, and exclusive lock files."""

from __future__ import annotations

import ctypes
import fcntl
import functools
import os
import select
import signal
import socket
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1
SHELLS = frozenset({"sh", "bash", "dash", "zsh"})
WATCHED_ENV = "DFLASH_WATCHED"          # the pid whose starter a watcher process already watches (kept across exec)


def _proc_state(pid: int) -> str | None:
    """Linux /proc state letter of `pid` (None when gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    if Path("/proc").is_dir():
        state = _proc_state(pid)
        return state is not None and state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------- parent death


@functools.cache
def libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` to this process when the thread that started it ends (kept across exec); False
    where that cannot be asked (not Linux)."""
    lib = libc()
    return lib is not None and lib.prctl(PR_SET_PDEATHSIG, int(sig)) == 0


def parent_death_hook(sig: int = signal.SIGTERM):
    """A subprocess `preexec_fn` that sets the parent-death signal in the child (None where there is none). libc
    is loaded here, in the parent: the child only makes the system call. Start children from long-lived threads."""
    lib = libc()
    if lib is None:
        return None

    def hook() -> None:
        lib.prctl(PR_SET_PDEATHSIG, int(sig))

    return hook


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _name_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def job_starter() -> int:
    """The process that started this job: the nearest ancestor that is not a shell running the job's command line
    (Snakemake runs each job through bash, which stays alive when Snakemake is killed; a Ray launch adds a script)."""
    pid = os.getppid()
    while _name_of(pid) in SHELLS:
        up = _parent_of(pid)
        if not up or up <= 1:
            break
        pid = up
    return pid


def end_with_starter(sig: int = signal.SIGTERM) -> None:
    """Make this process (and what it execs: torchrun, a Ray launch script) get `sig` when the process that started
    it ends, even through a shell: the parent-death signal for the parent, and a small watcher process for the
    starter behind a shell (it waits on a pidfd, and dies with this process). A `kill -9` of Snakemake then leaves
    no stage job running."""
    parent = os.getppid()
    if not parent_death_signal(sig):
        return
    if os.getppid() != parent:             # the parent ended before the signal was asked for
        os.kill(os.getpid(), sig)
    starter = job_starter()
    if starter == parent or os.environ.get(WATCHED_ENV) == str(os.getpid()):   # none needed, or one from before exec
        return
    try:
        pidfd = os.pidfd_open(starter)
    except (AttributeError, OSError):      # Linux < 5.3 or the starter is gone: nothing to watch
        return
    job = os.getpid()
    if os.fork():
        os.close(pidfd)
        os.environ[WATCHED_ENV] = str(job)
        return
    try:                                   # the watcher: nothing of the job's (its lock files) kept open
        parent_death_signal(signal.SIGKILL)
        if os.getppid() == job:
            os.closerange(3, pidfd)
            os.closerange(pidfd + 1, os.sysconf("SC_OPEN_MAX"))
            poll = select.poll()
            poll.register(pidfd, select.POLLIN)
            poll.poll()
            os.kill(job, sig)
    finally:
        os._exit(0)


# ---------------------------------------------------------------------------------------------- lock files


def try_lock(path: Path) -> int | None:
    """An exclusive `flock` on `path` (created if missing), or None when another process holds it. The lock lasts
    as long as the returned descriptor: this process and any it execs (the descriptor is inheritable); the kernel
    frees it when they end. The file then records this process's pid and host."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.set_inheritable(fd, True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def lock_holder(path: Path) -> str:
    """'process <pid> on <host>' as a lock file records its holder ('another process' where it records none)."""
    try:
        pid, _, host = Path(path).read_text().strip().partition(" ")
    except OSError:
        pid = host = ""
    if not pid.isdigit():
        return "another process"
    return f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
