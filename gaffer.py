"""gaffer.py: keep OS processes alive, driven from any thread of a Python program.

A process supervisor in one file that needs nothing but the standard library
(Python 3.9+, Linux first-class, macOS through fallbacks).  Vendor the file or
``pip install .``.

Contents, one banner each, in dependency order (what it owns; the thread that uses it):

- Constants & platform probes: fixed numbers, pidfd support (import time).
- Errors: ProcessError, ProcessNotFound, ProcessConflict (any thread).
- Utilities: signals, names, settings' validators, accounts (any thread).
- /proc: process groups, children, cpu and memory, listening sockets (any thread).
- Cron expressions and durations: _Cron, the next time a schedule matches (any thread).
- Configuration: FlappingInfo, ProcessConfig, a child's environment (any thread).
- Events: EventEmitter (published on the loop thread, subscribed from any).
- Loop: the selector, the timer heap, the command queue (the loop thread; call() from any);
  _Worker, work done off the loop on a thread that runs while there is some.
- Reaper backends: the one child watcher, pidfd or polling, and its descriptors (loop thread).
- Cgroups (_Cgroups, _Mover): a cgroup per slot, entered by the launcher; limits, cgroup.kill.
- Held sockets (_Sockets): listening sockets bound once, handed over as systemd does (loop thread).
- Log files (_LogFiles): shared, rotated, reopened log files (loop thread).
- Process: Process, Stream, pipes and the line splitter, the process state machine (loop thread).
- Lifecycles, slots and jobs: the manager's and a job's lifecycle, _Slot, _Job (loop thread).
- Guardian: the program that stops everything if the manager dies (its own process).
- Containment (_Containment): groups, cgroups, escaped descendants, orphans, adoption (loop thread).
- Checks (_Checks): readiness and health checks, their pool, notify sockets (loop thread).
- Dependencies (_Dependencies): depends_on, the stop order, wait_ready() (loop thread).
- The sampler (_Sampler): one /proc reading per tick for stats, monitors and limits (loop thread).
- Pub/sub channels (_Topics): Channel and its hooks (fed on the loop thread, read from any).
- Restart policy, backoff and flapping (_Respawns): when an emptied slot refills (loop thread).
- Schedules (_Schedules): cron and every, a timer for each job's next run (loop thread).
- Large spawns in batches (_Batches): 20 ms of spawning a loop turn (loop thread).
- Rolling replacement (_Rollouts): reload, update, restart, recycling (loop thread).
- Apps and stop callbacks (_Apps) (loop thread).
- Manager: the public API (any thread), its commands, the slot engine and _on_exit (loop thread).
- HTTP controller, server, app (HttpHandler) and routes (a thread per connection).
- Webhooks (WebhooksApp): events posted to URLs (a thread per URL).
- Procfile and the foreground runner, serve, client commands, export, main (main thread).
- The dashboard: one page, served by the HTTP app.

Quick start::

    import sys, gaffer
    with gaffer.Manager() as manager:          # starts the loop thread
        manager.load(gaffer.ProcessConfig(
            "ticker", sys.executable, args=["-c", "import time; time.sleep(60)"],
            numprocesses=2))
        print(manager.pids("ticker"))          # [1, 2]: spawned when load returns
        manager.scale("ticker", "+1")          # 3
        manager.events.subscribe("exit", lambda evtype, msg: print(msg))
    # leaving the block stops every process gracefully and waits for them

Threading: one loop thread owns every job and process.  It sleeps in a
``selectors`` selector on pidfds (exits), pipes (output, input) and a wake-up
socket, and never polls while idle.  Public methods may be called from any
thread: they post a command to the loop and wait for its result, or run inline
when called on the loop thread itself (from an event listener).

Events (``manager.events.subscribe(pattern, listener)``, ``listener(evtype, msg)``;
``"."`` is every event, a dotted prefix such as ``"job.default.web"`` every event
below it; ``msg["event"]`` is the event name):

==============================================  ===================================
``load``, ``unload``, ``update``                name
``start``, ``stop`` (and ``job.<job>.*``)       name
``spawn`` (and ``job.<job>.*``, ``proc.<pid>.*``) name, pid, os_pid
``ready`` (same forms: its ``ready`` check passed) name, pid, os_pid, elapsed
``ready_timeout``, ``job.<job>.ready_timeout``  name, pid (stopped and respawned)
``unhealthy``, ``job.<job>.unhealthy``          name, pid, reason (failed health_retries checks: replaced)
``reap`` (same forms; stopped by a scale-down)  name, pid, os_pid
``stop_process``, ``proc.<pid>.stop``           name, pid
``exit`` (same forms as spawn)                  name, pid, os_pid, exit_status, term_signal, once,
                                                dropped_input (bytes queued for stdin, thrown away),
                                                respawn (the restart policy respawns it)
``backoff``, ``job.<job>.backoff``              name, delay (a respawn after quick exits waits)
``recycle``, ``job.<job>.recycle``              name, pid, reason (over max_rss or max_age: replaced)
``rollout``, ``rollout_failed`` (and job forms) name; reason (a rolling replacement ended)
``job.<job>.kill``, ``proc.<pid>.kill``         name, pid (kill) or not (killall), signum
``flap``, ``job.<job>.flap``                    name
``spawn_error``, ``job.<job>.spawn_error``      name, reason
``completed``, ``failed`` (and job forms)       name (a one-shot job or a scheduled run ended)
``blocked``, ``job.<job>.blocked``              name, reason (a dependency cannot meet its condition)
==============================================  ===================================

``<job>`` is ``session.name``; ``pid`` is the manager's id of a process (an int
growing from 1), ``os_pid`` the operating system's.

Talking to processes: output read from redirected pipes and custom streams is
not on ``manager.events`` but on the process, ``process.monitor_io(label,
listener)`` with ``{name, pid, data}``; ``manager.send(pid, data, stream=None)``
queues input.  ``process.stats`` and ``manager.monitor(listener, name)`` give
resource use from /proc.  ``manager.subscribe(topic)`` opens a Channel on
``EVENTS[:pattern]``, ``JOB:<job>``, ``PROCESS:<pid>``, ``STATS:<pid|job>`` or
``STREAM:<pid>``, read by callbacks or, from any thread, by ``get()``.
"""

from __future__ import annotations

__all__ = [
    "ProcessError", "ProcessNotFound", "ProcessConflict",
    "FlappingInfo", "ProcessConfig",
    "EventEmitter", "Loop", "Process", "Stream", "Manager", "Channel", "HttpHandler", "WebhooksApp", "main",
]
__version__ = "0.1.0"

import atexit
import collections
import dataclasses
import enum
import errno
import fcntl
import functools
import heapq
import io
import itertools
import logging
import os
import queue
import re
import selectors
import shlex
import signal
import socket
import stat
import string
import struct
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future

try:
    import grp
    import pwd
except ImportError:  # pragma: no cover - not a POSIX system
    grp = pwd = None

_log = logging.getLogger("gaffer")


# -- Constants & platform probes -------------------------------------------------------------------
# Fixed numbers of the machinery, and what this platform can do, probed once.

_DEFAULT_SESSION = "default"
_DEFAULT_HTTP = "127.0.0.1:4999"                # the control address: below the Procfile ports (5000 up)
_BACKOFF_FIRST, _BACKOFF_JITTER = 0.1, 0.2      # a crash loop's 2nd respawn waits 0.1 s, doubling, +-20 %
_POLL_MIN, _POLL_MAX = 0.001, 0.05              # child polling where pidfds are missing
_READ_MIN, _READ_MAX = 1 << 16, 1 << 20        # a channel's reads start small, grow when it is busy
_DRAIN_LIMIT = 1 << 26                          # bytes read from a process's pipes once it exited
_LINE_MAX = 1 << 16                             # a line of output still unfinished this long is cut there
_HISTORY = 10                                   # exited processes of a job whose output tail is kept
_SAMPLE_HISTORY = 300                           # ticks of each job's cpu and memory kept for the dashboard
_METRICS_KEEP = 300.0                           # seconds the sampler reads every process after a scrape
_MAX_WAIT = 7 * 86400.0                         # the longest any setting may make the loop wait (a week)
_MAX_SELECT = 3600.0                            # the longest one select sleeps, whatever is due
_MAX_COUNT = 1 << 31                            # the largest count a setting may hold
_ORPHAN_POLL_MIN, _ORPHAN_POLL_MAX = 0.005, 0.5  # rechecks of a group whose leader was reaped
_CHECK_DELAY_MIN, _CHECK_DELAY_MAX = 0.005, 0.1  # retries of a tcp, http or callable readiness check
_CHECK_TIMEOUT = 1.0                            # one try of a tcp or http check
_CHECK_WORKERS = 64                             # threads that run tcp, http and callable checks, made as needed
_PROBE_OUTPUT = 4096                            # bytes of an exec: check's output kept as its reason
_SPAWN_SLICE = 0.02                             # seconds of spawning a loop turn: reaping and commands go between
_ORPHAN_GIVE_UP = 10.0                          # seconds after SIGKILL a group may linger before it is forgotten
_LED_SESSIONS = 4096                            # sessions of past processes a subreaper still knows its zombies by
_SWEEP_SPACING = 0.05                           # the least time between two looks through /proc (escapees, orphans)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031 if sys.platform.startswith("linux") else None)


def _pidfd_works():
    """Whether pidfds can be used: the call must exist *and* succeed (seccomp may forbid it)."""
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


_HAVE_PIDFD = _pidfd_works()


# -- Errors ----------------------------------------------------------------------------------------
# One base class for what a manager refuses; the errno is an HTTP-like status.

class ProcessError(Exception):
    """A request the manager cannot carry out.

    Attributes:
        errno: an HTTP-like status code (400 bad request, 404, 409).
        reason: a sentence saying what and why.
    """

    def __init__(self, errno=400, reason="bad request"):
        super().__init__(errno, reason)
        self.errno = errno
        self.reason = reason

    def __str__(self):
        return self.reason


class ProcessNotFound(ProcessError):
    """An unknown job, session or process id (errno 404)."""

    def __init__(self, reason="not found"):
        super().__init__(404, reason)


class ProcessConflict(ProcessError):
    """A job of that name is already loaded in the session (errno 409)."""

    def __init__(self, reason="conflict"):
        super().__init__(409, reason)


# -- Utilities -------------------------------------------------------------------------------------
# Small pure functions: signals, names, settings, environments.  Any thread.

def _run_callback(callback):
    """Call a user's callback on the loop thread: what it raises is logged, never raised into the loop."""
    try:
        callback()
    except Exception:
        _log.exception("callback %r failed", callback)


def _is_number(text):
    """Whether text is a decimal number in ASCII digits (str.isdigit also takes '١' and '²')."""
    return isinstance(text, str) and text.isascii() and text.isdigit()


def _signum(value, setting="signal"):
    """Return the number of a signal given as 15, "15", "TERM", "SIGTERM" or "term"."""
    if _is_number(value.strip() if isinstance(value, str) else None):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 < value < signal.NSIG:
            return int(value)
    elif isinstance(value, str):
        name = value.strip().upper()
        sig = signal.Signals.__members__.get(name if name.startswith("SIG") else "SIG" + name)
        if sig is not None:
            return int(sig)
    raise ValueError("%s must be a signal number or a name such as 'TERM', got %r" % (setting, value))


def _job_name(session, name):
    """A job's full name: session.name (default.web)."""
    return "%s.%s" % (session, name)


def _slot_label(job, slot):
    """How a process is named to people: its job's name and slot (web.1); a commit's (slot 0) by its job's."""
    return "%s.%d" % (job, slot) if slot else job


_NAME = r"[A-Za-z0-9_@-]{1,128}"  # patterns stay strings: re compiles and caches them on first use


def _valid_name(setting, value):
    """A job or session name: 1 to 128 ASCII letters, digits, '_', '-' or '@' (safe in paths, topics and logs)."""
    if not isinstance(value, str) or not value:
        raise ValueError("%s must be a non-empty str, got %r" % (setting, value))
    if not re.fullmatch(_NAME, value):
        raise ValueError("%s must be 1 to 128 ASCII letters, digits, '_', '-' or '@', got %r" % (setting, value))
    return value


def _split_name(name, sessionid=None):
    """Return (session, job) for "job", "session.job" or "session/job"."""
    if not isinstance(name, str) or not name:
        raise ValueError("job name must be a non-empty str, got %r" % (name,))
    for sep in "./":
        session, found, job = name.partition(sep)
        if found:
            return session, job
    return sessionid or _DEFAULT_SESSION, name


def _int_setting(setting, value, minimum, maximum=_MAX_COUNT):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("%s must be an int, got %r" % (setting, value))
    if not minimum <= value <= maximum:
        bound = ">= %d" % minimum if value < minimum else "<= %d" % maximum
        raise ValueError("%s must be %s, got %r" % (setting, bound, value))
    return value


def _float_setting(setting, value, minimum, maximum=_MAX_WAIT):
    """A number of seconds (or another measure) within bounds: every wait the loop takes is one of these."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("%s must be a number, got %r" % (setting, value))
    if not minimum <= value <= maximum:  # also refuses nan and infinities
        bound = "<= %s" % maximum if value > maximum else ">= %s" % minimum
        raise ValueError("%s must be %s, got %r" % (setting, bound, value))
    return float(value)


def _bool_setting(setting, value):
    if not isinstance(value, bool):
        raise ValueError("%s must be True or False, got %r" % (setting, value))
    return value


def _labels(setting, value):
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError("%s must be a list of labels, got %r" % (setting, value))
    for label in value:
        if not isinstance(label, str) or not label.isidentifier():
            raise ValueError("%s: each label must be a name such as 'out', got %r" % (setting, label))
    return list(value)


def _account(setting, value, lookup):
    """Resolve a user or group given by name or number to its number."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, str) and value:
        if _is_number(value):
            return int(value)
        try:
            return lookup(value)
        except KeyError:
            raise ValueError("%s: no %s named %r" % (setting, "user" if setting == "uid" else "group",
                                                     value)) from None
    raise ValueError("%s must be a name or a number >= 0, got %r" % (setting, value))


def _may_raise_limits():
    """Whether this process may raise a hard resource limit: CAP_SYS_RESOURCE (bit 24 of CapEff, which a
    container's root may lack) on Linux, root elsewhere."""
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
        return bool(int(caps.split()[1], 16) >> 24 & 1)
    except (OSError, StopIteration, ValueError, IndexError):
        return os.geteuid() == 0


def _rlimits_setting(value):
    """Validate rlimits: {name: limit or [soft, hard]}, each an int >= 0 or "infinity"; returned as
    {name: [soft, hard]} (-1: infinity).  A hard limit above the manager's own, which only root may
    raise, is refused here rather than failing each spawn."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not a POSIX system
        resource = None
    if not isinstance(value, dict):
        raise ValueError("rlimits must be a dict such as {'nofile': 65536}, got %r" % (value,))
    known = sorted(name[7:].lower() for name in dir(resource) if name.startswith("RLIMIT_"))
    limits = {}
    for name, limit in value.items():
        if not isinstance(name, str) or name.lower() not in known:
            raise ValueError("rlimits: unknown limit %r (this system has %s)" % (name, ", ".join(known)))
        pair = list(limit) if isinstance(limit, (list, tuple)) else [limit, limit]
        if len(pair) != 2:
            raise ValueError("rlimits: %s takes a limit or [soft, hard], got %r" % (name, limit))
        soft, hard = (resource.RLIM_INFINITY if part in ("infinity", "unlimited") else
                      _int_setting("rlimits: %s" % name, part, 0) for part in pair)
        if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
            raise ValueError("rlimits: %s's soft limit %s is above its hard limit %s" % (name, soft, hard))
        own = resource.getrlimit(getattr(resource, "RLIMIT_" + name.upper()))[1]
        if own != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > own) and not _may_raise_limits():
            raise ValueError("rlimits: %s's hard limit %s is above this manager's own (%d), which it may not "
                             "raise (that takes root, with CAP_SYS_RESOURCE)"
                             % (name, "infinity" if hard == resource.RLIM_INFINITY else hard, own))
        limits[name.lower()] = [soft, hard]
    return limits


def _user_entry(uid):
    """The password database's entry of a uid, or None (no uid, no such user, or no pwd module)."""
    if uid is None or pwd is None:
        return None
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return None


def _umask_setting(value):
    """A umask: an int such as 0o027, or an octal str such as "027" or "0o027" (configs); None keeps the manager's."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        text = text[2:] if text.startswith("0o") else text
        if not re.fullmatch(r"[0-7]{1,4}", text):
            raise ValueError("umask must be an octal mode such as '027' or 0o027, got %r" % (value,))
        value = int(text, 8)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError("umask must be a mode from 0 to 0o777, got %r" % (value,))
    return value


def _expand(text, env):
    """Replace $VAR and ${VAR} from env; unknown names are left as written."""
    return string.Template(text).safe_substitute(env) if "$" in text else text


def _reject_unknown(cls, settings):
    known = [f.name for f in dataclasses.fields(cls)]
    for key in settings:
        if key not in known:
            import difflib
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = "; did you mean %r?" % close[0] if close else ""
            raise TypeError("%s has no setting %r%s" % (cls.__name__, key, hint))


def _exit_status(returncode):
    """(exit_status, term_signal) from a Popen returncode (negative means killed by a signal)."""
    return (returncode, 0) if returncode >= 0 else (0, -returncode)


def _send_signal(pid, sig, group):
    """Signal a process, or its whole process group; a process already gone is not an error."""
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        _log.warning("cannot send signal %d to %s %d: %s", sig, "group" if group else "process", pid, exc)


# -- /proc: process groups, children, use, listening sockets ---------------------------------------
# Linux's /proc (and sock_diag) read by containment, the checks and the sampler; each
# returns what it could read and treats a process gone meanwhile as gone.  Any thread.

def _proc_table():
    """{pid: (ppid, pgid, state)} of every process, from /proc (OSError without it)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry, "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
            except OSError:  # gone meanwhile
                continue
            table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_groups(pgids):
    """The process groups among pgids with a member that is not a zombie.

    kill(0) counts zombies as alive, and an init that reaps slowly (seconds, in
    some containers) would hold up every stop; /proc tells them apart where it exists.
    """
    pgids = {pgid for pgid in pgids if _group_alive(pgid)}
    if not pgids:
        return pgids
    try:
        table = _proc_table()
    except OSError:
        return pgids
    return {pgid for _, pgid, state in table.values() if state != b"Z" and pgid in pgids}


def _children_of(pid):
    """The pids of a process's children, from /proc (every thread's list); [] once it is gone."""
    children = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                children.extend(int(child) for child in f.read().split())
    except OSError:
        pass
    return children


def _own_children():
    """The pids of this process's children (any thread's), zombies included, from /proc."""
    children = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/children" % tid) as f:
                children.update(int(pid) for pid in f.read().split())
        except OSError:  # the thread ended meanwhile
            pass
    return children


def _escaped(leaders, marks, ours=frozenset()):
    """The process groups of the descendants of `leaders` ({os pid: alive}, each leader its own group)
    that left their group: {pgid: leader}.  Found through /proc: the children of each live leader and
    theirs, and the processes whose environment carries one of `marks` ({b"GAFFER_PROCESS=...": leader})
    with their own descendants, wherever they were adopted (init, a subreaper such as systemd --user).
    An exited leader is walked from its marks only: its pid may be another program's by now.  A process
    in a group of `ours` (the groups the manager's live processes lead) left nothing: its environment,
    the costly part of a look, is not read.
    """
    table, children = _proc_table(), collections.defaultdict(list)
    for pid, (ppid, _, _) in table.items():
        children[ppid].append(pid)
    roots = {leader: leader for leader, alive in leaders.items() if alive}
    for pid, (ppid, pgid, state) in table.items():
        if pgid not in leaders and pgid not in ours and state != b"Z":
            try:
                with open("/proc/%d/environ" % pid, "rb") as f:
                    environ = f.read()
            except OSError:  # gone, or another user's
                continue
            leader = next((marks[mark] for mark in marks if mark in environ), None)
            if leader is not None:
                roots[pid] = leader
    found = {}
    for root, leader in roots.items():
        todo = [root]
        while todo:
            pid = todo.pop()
            ppid, pgid, state = table.get(pid, (0, leader, b"Z"))
            if pgid != leader and state != b"Z":
                found.setdefault(pgid, leader)
            todo.extend(children.get(pid, ()))
    return found


_STAT_KEYS = ("cpu", "mem", "rss", "vms", "mem_info1", "mem_info2", "ctime", "num_threads")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _proc_stat(os_pid):
    """(cpu seconds, threads, vms, rss, age in seconds) of a process from /proc, or None without /proc."""
    try:
        with open("/proc/%d/stat" % os_pid, "rb") as f:
            fields = f.read().rpartition(b")")[2].split()  # fields[0] is field 3 of proc(5)
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
    except OSError:
        return None
    cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return cpu, int(fields[17]), int(fields[20]), int(fields[21]) * _PAGE_SIZE, uptime - int(fields[19]) / _CLOCK_TICKS


@functools.lru_cache(maxsize=1)
def _mem_total():
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


def _human(n):
    """1536 -> '1.5K', as ps and top show sizes."""
    for unit in "BKMGT":
        if n < 1024 or unit == "T":
            return ("%d%s" if unit == "B" else "%.1f%s") % (n, unit)
        n /= 1024


def _diag_listeners():
    """_tcp_listeners() through NETLINK_SOCK_DIAG: an inet_diag_req_v2 per family, states = LISTEN."""
    found = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as sock:  # NETLINK_SOCK_DIAG
        for family in (socket.AF_INET, socket.AF_INET6):
            request = struct.pack("=BBBBI48x", family, socket.IPPROTO_TCP, 0, 0, 1 << 10)  # 1 << TCP_LISTEN
            # nlmsghdr: length, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, sequence, port id
            sock.sendto(struct.pack("=IHHII", 16 + len(request), 20, 0x301, 1, 0) + request, (0, 0))
            done = False
            while not done:
                data, at = sock.recv(1 << 16), 0
                while at + 16 <= len(data) and not done:
                    length, kind = struct.unpack_from("=IH", data, at)
                    if kind == 2 or length < 16:  # NLMSG_ERROR
                        raise OSError("sock_diag refused the request")
                    done = kind == 3  # NLMSG_DONE
                    if not done:  # inet_diag_msg: family, state, timer, retrans, sockid (sport at 4)...
                        port = struct.unpack_from("!H", data, at + 16 + 4)[0]
                        waiting, _, _, inode = struct.unpack_from("=IIII", data, at + 16 + 56)
                        found[inode] = (port, waiting)
                    at += (length + 3) & ~3
    return found


def _tcp_listeners():
    """{socket inode: (port, connections waiting to be accepted)} of this network namespace's listening
    TCP sockets (IPv4 and IPv6), or None where neither sock_diag nor /proc tells (not Linux).  Asked
    of the kernel through sock_diag netlink, which answers with the listeners alone: /proc/net/tcp
    lists every TIME_WAIT socket too, and reading it can take seconds on a busy server."""
    try:
        return _diag_listeners()
    except (OSError, AttributeError, struct.error):  # no AF_NETLINK (not Linux), or a seccomp filter
        pass
    found, read = {}, False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, "rb") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        read = True
        for row in rows:  # sl local_address rem_address st tx_queue:rx_queue ... inode; st 0A is LISTEN
            fields = row.split()
            if len(fields) > 9 and fields[3] == b"0A":
                found[int(fields[9])] = (int(fields[1].rpartition(b":")[2], 16),
                                         int(fields[4].partition(b":")[2], 16))
    return found if read else None


def _listens(owner, port):
    """Whether process `owner` (an os pid) or one of its descendants holds a TCP socket listening on
    `port`; None where the system cannot tell."""
    listeners = _tcp_listeners()
    if listeners is None:
        return None
    inodes = {"socket:[%d]" % inode for inode, (bound, _) in listeners.items() if bound == port}
    todo = [owner]
    while todo:  # the process and its descendants, through their children lists
        pid = todo.pop()
        try:
            for fd in os.listdir("/proc/%d/fd" % pid):
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) in inodes:
                    return True
        except OSError:  # gone, or an fd closed meanwhile
            pass
        todo.extend(_children_of(pid))
    return False


# -- Cron expressions and durations ----------------------------------------------------------------
# A job's schedule as Vixie cron and cronie read it, in local time, and the next time it matches: what
# a schedule timer waits for (_Schedules).  Any thread: pure functions of the expression and a time.

_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
                ("day of week", 0, 7))
_CRON_NAMES = {3: ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
               4: ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]}
_CRON_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
                "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_CRON_YEARS = 28  # the calendar repeats after 28 years: a schedule that matches no day in them never runs


def _cron_value(index, text, expression):
    """One value of a cron field: a number in its range, or a month or day name (any case)."""
    name, low, high = _CRON_FIELDS[index]
    names = _CRON_NAMES.get(index, [])
    if text.lower() in names:
        return names.index(text.lower()) + (1 if index == 3 else 0)
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError("schedule %r: the %s field takes %d-%d%s, got %r" % (
            expression, name, low, high, " or a name (%s...)" % ", ".join(names[:3]) if names else "", text))
    return int(text)


def _cron_field(index, text, expression):
    """The set of values a cron field matches: lists (,) of *, a value or a range (a-b), each with an
    optional step (/n)."""
    name, low, high = _CRON_FIELDS[index]
    values = set()
    for item in text.split(","):
        spread, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError("schedule %r: the %s field's step must be a number > 0, got %r" % (expression, name, step))
        if spread == "*":
            first, last = low, high
        elif "-" in spread:
            first, last = (_cron_value(index, part, expression) for part in spread.split("-", 1))
            if first > last:
                raise ValueError("schedule %r: the %s field's range %r goes backwards" % (expression, name, spread))
        else:
            first = last = _cron_value(index, spread, expression)
            if step:  # a/n: from a to the end of the field, as cronie reads it
                last = high
        values.update(range(first, last + 1, int(step) if step else 1))
    if index == 4 and 7 in values:  # 0 and 7 are Sunday
        values = (values - {7}) | {0}
    return frozenset(values)


class _Cron:
    """A parsed cron expression: five fields (minute hour day-of-month month day-of-week) or a macro
    (@hourly, @daily, @weekly, @monthly, @yearly).  As in Vixie cron, day of month and day of week match
    with OR when both are restricted (neither starts with *), else with AND."""

    def __init__(self, expression):
        if not isinstance(expression, str):
            raise ValueError("schedule must be a cron expression such as '*/5 * * * *' or '@daily', got %r"
                             % (expression,))
        self.expression = expression
        text = _CRON_MACROS.get(expression.strip().lower(), expression)
        if text.strip().startswith("@"):
            raise ValueError("schedule %r: unknown macro (the macros are %s)" % (expression, ", ".join(_CRON_MACROS)))
        fields = text.split()
        if len(fields) != 5:
            raise ValueError("schedule %r: give five fields (minute hour day-of-month month day-of-week), got %d"
                             % (expression, len(fields)))
        self.minutes, self.hours, self.days, self.months, self.weekdays = (
            _cron_field(index, field, expression) for index, field in enumerate(fields))
        self.either_day = not fields[2].startswith("*") and not fields[4].startswith("*")
        self.hour_list, self.minute_list = sorted(self.hours), sorted(self.minutes)

    def _matches_day(self, day):
        in_month = day.day in self.days
        in_week = (day.weekday() + 1) % 7 in self.weekdays  # cron counts from Sunday
        return day.month in self.months and ((in_month or in_week) if self.either_day else (in_month and in_week))

    def next_after(self, after):
        """The first time (epoch seconds) after `after` at which the expression matches local time, or
        None if it never does.  A time that a DST change skips runs when the skipped hour ends; a time
        that a DST change repeats runs once, at its first occurrence."""
        import datetime
        start = datetime.datetime.fromtimestamp(after).replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
        day = start.date()
        for _ in range(366 * _CRON_YEARS + 1):
            if self._matches_day(day):
                for hour in self.hour_list:
                    for minute in self.minute_list:
                        naive = datetime.datetime.combine(day, datetime.time(hour, minute))
                        if naive >= start:
                            when = _local_epoch(naive)
                            if when > after:
                                return when
            day += datetime.timedelta(days=1)
        return None


def _local_epoch(naive):
    """The epoch of a local time: the earliest where the clock shows it twice (a DST change repeats an
    hour), or the end of the gap where a DST change skips it."""
    import datetime
    shown = naive.timetuple()[:5]
    found = [when for when in (time.mktime(naive.timetuple()[:8] + (dst,)) for dst in (0, 1))
             if time.localtime(when)[:5] == shown]
    if found:
        return min(found)
    later = naive
    for _ in range(24 * 60):  # skipped: the first minute after the gap that the clock shows
        later += datetime.timedelta(minutes=1)
        when = time.mktime(later.timetuple()[:8] + (-1,))
        if time.localtime(when)[:5] == later.timetuple()[:5]:
            return when
    return time.mktime(naive.timetuple()[:8] + (-1,))


def _scheduled(config):
    """Whether a job runs on a schedule (cron or every) rather than all the time."""
    return config.schedule is not None or config.every is not None


def _duration(setting, value, low=0.0, high=10 * 365 * 86400.0):
    """Seconds from a number or a duration such as "30s", "5m", "1h", "2d"."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
        if match is None:
            raise ValueError("%s must be seconds or a duration such as '30s', '5m', '1h', got %r" % (setting, value))
        value = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return _float_setting(setting, value, low, high)


# -- Configuration ---------------------------------------------------------------------------------
# Plain dataclasses, validated and normalised when made.  Any thread; the
# manager keeps its own copies, so changing a config after load changes nothing.

_LOG_FIELDS = ("session", "name", "slot", "pid", "label")  # what a log_file path may hold
_LOG_SOCKETS = {"syslog": "/dev/log", "journal": "/run/systemd/journal/socket"}


def _log_socket(log_file):
    """(kind, socket path) of a log_file that names the syslog or the journal, else None."""
    kind, colon, path = log_file.partition(":")
    if kind in _LOG_SOCKETS and (not colon or path):
        return kind, path or _LOG_SOCKETS[kind]
    return None


def _log_template(value):
    """Check a log_file: "-", "syslog[:PATH]", "journal[:PATH]", or a path whose {fields} are all
    _LOG_FIELDS (ValueError otherwise)."""
    if not isinstance(value, str) or not value:
        raise ValueError("log_file must be a path, '-', 'syslog' or 'journal', got %r" % (value,))
    if _log_socket(value) is not None:
        return
    try:
        fields = [field for _, field, spec, conversion in string.Formatter().parse(value) if field is not None]
    except ValueError as exc:
        raise ValueError("log_file %r: %s" % (value, exc)) from None
    for field in fields:
        if field not in _LOG_FIELDS:
            raise ValueError("log_file %r: unknown field {%s} (the fields are %s)"
                             % (value, field, ", ".join("{%s}" % f for f in _LOG_FIELDS)))


def _size_setting(setting, value):
    """Bytes from 1048576, "200M", "1.5G", "512KiB"... (binary units, as ps and top show sizes)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(?:i?B)?\s*", value, re.IGNORECASE)
        if match is None:
            raise ValueError("%s must be bytes or a size such as '200M' or '1.5G', got %r" % (setting, value))
        value = int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))
    return _int_setting(setting, value, 1, 1 << 60)


_CONDITIONS = ("started", "ready", "healthy", "completed", "completed_successfully")


def _depends_on(value, name):
    """Validate depends_on: a list of "job" or "session.job" (each waits until that job is ready), or a
    mapping {job: condition, or {"condition": c, "restart": bool}}, returned as {job: {condition, restart}}.
    A str is the INI form: "db, migrate:completed_successfully, cache:ready:restart"."""
    if isinstance(value, str):
        items = [item for item in re.split(r"[\s,]+", value) if item]
        value = items if not any(":" in item for item in items) else dict(map(_dep_text, items))
    if isinstance(value, dict):
        value = {dep: _dep_condition(dep, spec) for dep, spec in value.items()}
    elif not isinstance(value, (list, tuple)):
        raise ValueError("depends_on must be a list of job names or a mapping of them to conditions, got %r"
                         % (value,))
    for dep in value:
        if not isinstance(dep, str):
            raise ValueError("depends_on must hold job names, got %r" % (dep,))
        session, _, job = dep.rpartition(".")
        _valid_name("depends_on", job)
        if session:
            _valid_name("depends_on", session)
        if dep == name:
            raise ValueError("depends_on: job %r cannot depend on itself" % name)
    return value if isinstance(value, dict) else list(value)


def _dep_text(item):
    """An INI depends_on entry: JOB, JOB:CONDITION or JOB:CONDITION:restart."""
    name, *rest = item.split(":")
    if len(rest) > 2 or rest[1:] not in ([], ["restart"]):
        raise ValueError("depends_on: give JOB, JOB:CONDITION or JOB:CONDITION:restart, got %r" % item)
    return name, {"condition": rest[0] if rest else "ready", "restart": rest[1:] == ["restart"]}


def _dep_condition(dep, spec):
    """One depends_on entry's {condition, restart}: a condition's name, or a mapping of both."""
    if isinstance(spec, str):
        spec = {"condition": spec}
    if not isinstance(spec, dict) or set(spec) - {"condition", "restart"}:
        raise ValueError("depends_on: %r takes a condition or {'condition': ..., 'restart': true}, got %r"
                         % (dep, spec))
    condition = spec.get("condition", "ready")
    if condition not in _CONDITIONS:
        raise ValueError("depends_on: unknown condition %r for %r: give %s or %s"
                         % (condition, dep, ", ".join(_CONDITIONS[:-1]), _CONDITIONS[-1]))
    return {"condition": condition, "restart": _bool_setting("depends_on: %s's restart" % dep,
                                                             spec.get("restart", False))}


def _ready_check(setting, value, redirect_output):
    """Validate a readiness check (see ProcessConfig.ready); return it as given."""
    if value is None or callable(value):
        return value
    forms = "'tcp:[HOST:]PORT', 'http://...', 'exec:CMD', 'output:REGEX', 'notify', 'delay:SECONDS' or a callable"
    if not isinstance(value, str):
        raise ValueError("%s must be %s, got %r" % (setting, forms, value))
    scheme, _, rest = value.partition(":")
    if value == "notify":
        return value
    if scheme == "tcp":
        port = rest.rpartition(":")[2]
        if not rest or not ("$" in port or (_is_number(port) and 0 < int(port) < 65536)):
            raise ValueError("%s %r: give tcp:PORT or tcp:HOST:PORT (a port from 1 to 65535 or a $VAR)"
                             % (setting, value))
    elif scheme in ("http", "https"):
        if not rest.startswith("//") or not rest[2:].split("/")[0]:
            raise ValueError("%s %r: an URL such as 'http://127.0.0.1:$PORT/health'" % (setting, value))
    elif scheme == "output":
        try:
            re.compile(rest)
        except re.error as exc:
            raise ValueError("%s %r: bad regex: %s" % (setting, value, exc)) from None
        if not redirect_output:
            raise ValueError("%s %r reads the process's output: set redirect_output too" % (setting, value))
    elif scheme == "exec":
        try:
            words = shlex.split(rest)
        except ValueError as exc:
            raise ValueError("%s %r: %s" % (setting, value, exc)) from None
        if not words:
            raise ValueError("%s %r: give the command to run, as exec:CMD" % (setting, value))
    elif scheme == "delay":
        try:
            seconds = float(rest)
        except ValueError:
            raise ValueError("%s %r: give delay:SECONDS" % (setting, value)) from None
        _float_setting("%s delay" % setting, seconds, 0)
    else:
        raise ValueError("%s: unknown check %r; use %s" % (setting, value, forms))
    return value


def _env_value(setting, value):
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError("%s must hold strings, got %r" % (setting, value))


def _env_setting(setting, env):
    if not isinstance(env, dict):
        raise ValueError("%s must be a dict, got %r" % (setting, env))
    for key in env:
        if not isinstance(key, str) or not key or "=" in key:
            raise ValueError("%s: %r is not a variable name" % (setting, key))
    return {key: _env_value("%s[%r]" % (setting, key), value) for key, value in env.items()}


def _dotenv_text(text, path):
    """The variables of a .env file's text: KEY=value, quotes, 'export ' prefixes, # comments (the Procfile
    runner's -e and a job's env_file); ValueError("path:line: reason") on a bad line."""
    env = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith("export "):
            entry = entry[7:].lstrip()
        key, sep, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError("%s:%d: expected KEY=value, got %r" % (path, lineno, line))
        if value[:1] in ("'", '"'):
            quote = value[0]
            end = value.find(quote, 1)
            while quote == '"' and end > 0 and value[end - 1] == "\\":
                end = value.find(quote, end + 1)
            if end < 0 or value[end + 1:].strip()[:1] not in ("", "#"):
                raise ValueError("%s:%d: unbalanced %s in %r" % (path, lineno, quote, line))
            value = value[1:end]
            if quote == '"':
                value = re.sub(r'\\([\\"n])', lambda m: "\n" if m.group(1) == "n" else m.group(1), value)
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0]
        env[key] = value
    return env


def _env_files(setting, value):
    """Validate env_file: one path or a list of them; a path that starts with "-" may be missing."""
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) and p.lstrip("-") for p in paths):
        raise ValueError("%s must be a path or a list of paths, got %r" % (setting, value))
    return list(paths)


def _read_env_files(paths):
    """The variables of a job's env files, in order (the later win), read now: ValueError naming the file
    (and its line) where one cannot be read or parsed, unless it is missing and its name starts with "-"."""
    env = {}
    for path in paths:
        optional, name = path.startswith("-"), path[1:] if path.startswith("-") else path
        try:
            with open(name, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if optional:
                continue
            raise ValueError("env_file %s does not exist (a name that starts with '-' may be missing)" % name) from None
        except OSError as exc:
            raise ValueError("env_file %s cannot be read: %s" % (name, exc.strerror)) from None
        try:
            env.update(_dotenv_text(data.decode("utf-8"), name))
        except UnicodeDecodeError:
            raise ValueError("env_file %s is not UTF-8" % name) from None
    return env


@dataclasses.dataclass
class FlappingInfo:
    """Crash-loop detection for a job.

    `attempts` exits within `window` seconds stop the job and publish ``flap``; it
    is started again after `retry_in` seconds, at most `max_retry` times, then
    stays stopped until started by hand.

    Raises:
        ValueError: a setting out of range, naming the setting.
    """

    attempts: int = 2
    window: float = 1.0
    retry_in: float = 7.0
    max_retry: int = 5

    def __post_init__(self):
        self.attempts = _int_setting("flapping.attempts", self.attempts, 1)
        self.window = _float_setting("flapping.window", self.window, 0)
        self.retry_in = _float_setting("flapping.retry_in", self.retry_in, 0)
        self.max_retry = _int_setting("flapping.max_retry", self.max_retry, 0)


@dataclasses.dataclass(init=False)
class ProcessConfig:
    """How to run the processes of one job: ``ProcessConfig(name, cmd, **settings)``.

    Settings (all optional, see DESIGN.md "Configuration"): args, env, os_env,
    uid, gid, cwd, shell, numprocesses, flapping, redirect_output, redirect_input,
    custom_streams, graceful_timeout, stop_signal, stop_children.  Values are
    normalised: a str `args` is shlex-split, names of users, groups and signals
    become numbers, `flapping` becomes a FlappingInfo.  Dict-style access works:
    ``cfg["args"]``, ``cfg.get(key, default)``, ``key in cfg``, ``cfg[key] = value``.

    Raises:
        TypeError: an unknown setting (the message suggests the close match).
        ValueError: a bad value, naming the setting and the reason.
    """

    #: job name: no "." or "/"
    name: str
    #: program; if it holds spaces it is shlex-split and its tail goes before args
    cmd: str
    #: arguments; $VAR and ${VAR} are replaced from the process environment
    args: list = dataclasses.field(default_factory=list)
    #: added to the environment
    env: dict = dataclasses.field(default_factory=dict)
    #: .env files (a path or a list; "-path" may be missing), read at each spawn: the manager's
    #: environment (os_env), then these in order, then env
    env_file: list = dataclasses.field(default_factory=list)
    #: start from the manager's os.environ at each spawn (False: only env)
    os_env: bool = True
    #: $PORT of the process in slot 1; the one in slot N gets port + N - 1, as honcho numbers them
    port: int | None = None
    #: user and group to run as (numbers; names are resolved when the config is made); with a uid and
    #: no gid, the user's primary group; with a uid, the user's own supplementary groups and its HOME,
    #: USER, LOGNAME and SHELL (unless env sets them), as systemd's User= does
    uid: int | None = None
    gid: int | None = None
    #: the file mode creation mask of the process (0o027, or "027" in configs); None keeps the manager's
    umask: int | None = None
    #: resource limits set before the program runs, by their resource names without RLIMIT_:
    #: {"nofile": 65536, "core": 0, "nproc": [soft, hard]}; a number sets both, "infinity" lifts one
    rlimits: dict = dataclasses.field(default_factory=dict)
    #: working directory (None: the manager's)
    cwd: str | None = None
    #: run cmd through /bin/sh -c, with args appended shell-quoted
    shell: bool = False
    #: processes kept alive
    numprocesses: int = 1
    #: crash-loop detection, or None
    flapping: FlappingInfo | None = None
    #: labels for stdout then stderr; the same label twice merges them
    redirect_output: list = dataclasses.field(default_factory=list)
    #: keep a pipe to stdin for send()
    redirect_input: bool = False
    #: labels of extra duplex channels; the child finds each in $GAFFER_STREAM_<LABEL>
    custom_streams: list = dataclasses.field(default_factory=list)
    #: names of sockets the manager holds (Manager.add_socket), handed to each process at descriptors 3, 4, ...
    #: in this order, as systemd does (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID; $GAFFER_SOCKET_<NAME>)
    sockets: list = dataclasses.field(default_factory=list)
    #: with sockets: a start spawns nothing until a first connection arrives on one of them (state listening)
    on_demand: bool = False
    #: seconds between the stop signal and SIGKILL
    graceful_timeout: float = 10.0
    #: signal that asks a process to stop
    stop_signal: int = int(signal.SIGTERM)
    #: stop signal and SIGKILL go to the whole process group
    stop_children: bool = True
    #: when a process counts as ready: None (at once), "tcp:[HOST:]PORT", "http(s)://...",
    #: "output:REGEX", "notify", "delay:SECONDS", or a callable check(process) -> bool
    ready: object = None
    #: seconds a process has to become ready before it is stopped and respawned
    ready_timeout: float = 60.0
    #: jobs ("name" in the same session, or "session.name") that must be ready before this one spawns,
    #: or {job: condition} with a condition of _CONDITIONS, or {job: {"condition": c, "restart": True}}
    depends_on: object = dataclasses.field(default_factory=list)
    #: which exits are respawned: "always", "on-failure" (an exit status not in success_codes,
    #: or a signal the manager did not send) or "never"
    restart: str = "always"
    #: run the job on a cron schedule in local time ("*/5 * * * *", "@daily"): each run spawns its
    #: processes, which are not respawned ("always" reads as "never"; "on-failure" retries a failed run)
    schedule: str | None = None
    #: or run it every so long ("30s", "5m", "1h", or seconds), at fixed steps from its first run (at start)
    every: object = None
    #: a run due while the last one still runs: "skip" it, "queue" it (one at most) or "replace" the last
    concurrency: str = "skip"
    #: move each run a random amount up to this much later (seconds, or a duration such as "10m")
    jitter: object = 0.0
    #: a run missed while the manager was down runs once at start (load's last_run, serve --state)
    catch_up: bool = False
    #: exit statuses that are not failures
    success_codes: list = dataclasses.field(default_factory=lambda: [0])
    #: a process that exits sooner after its spawn is a quick exit: its slot's respawns back off
    min_uptime: float = 1.0
    #: the longest a respawn waits after consecutive quick exits
    backoff_max: float = 30.0
    #: a process whose resident memory passes this is replaced: bytes, or a size such as "200M" or "1.5G"
    max_rss: int | None = None
    #: a process older than this (seconds), plus a random 0..max_age_variance of its own, is replaced
    max_age: float | None = None
    max_age_variance: float = 0.0
    #: liveness once ready: "tcp:[HOST:]PORT", "http(s)://...", a callable check(process) -> bool,
    #: or "notify" (a WATCHDOG=1 datagram every health_interval); None checks nothing
    health: object = None
    #: seconds between two health checks, and how long each may take
    health_interval: float = 10.0
    health_timeout: float = 5.0
    #: failed health checks in a row that replace the process
    health_retries: int = 3
    #: the most processes scale() may ask of this job
    max_processes: int = 1000
    #: limits of the job's cgroup, where the manager has cgroups and the controllers are enabled:
    #: memory in bytes or a size ("512M"), CPUs (0.5: half of one), and processes
    memory_max: int | None = None
    cpu_max: float | None = None
    pids_max: int | None = None
    #: a file for the output: a path template with {session}, {name}, {slot}, {pid} and {label}, or "-"
    #: (the manager's stdout, each line prefixed "name.N |"); missing directories are made
    log_file: str | None = None
    #: a log file past this many bytes is renamed .1 (and .1 to .2...); 0 never rotates
    log_max_bytes: int = 10 << 20
    #: rotated files kept (compressed or not)
    log_backups: int = 5
    #: when a log file is rotated: "size" (past log_max_bytes), "hourly" or "daily" (at the local clock's hour
    #: or midnight, when the first line after it comes)
    log_rotate: str = "size"
    #: gzip each rotated file (.1.gz), on a thread of its own
    log_compress: bool = False
    #: each line of the log file starts with the time it was read, ISO 8601
    log_timestamps: bool = False
    #: the output kept in memory per label, also for a while after the exit (Process.tail, Manager.logs)
    tail_bytes: int = 64 << 10

    def __init__(self, name, cmd, **settings):
        _reject_unknown(type(self), settings)
        self.name = name
        self.cmd = cmd
        for f in dataclasses.fields(self)[2:]:
            if f.name in settings:
                value = settings[f.name]
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, f.name, value)
        self._normalise()

    def _normalise(self):
        """Check every setting and give it its one form, in groups: what runs, how many and how they
        stop, when they are ready and healthy, what their output becomes."""
        self._normalise_command()
        self._normalise_processes()
        self._normalise_policies()
        self._normalise_output()

    def _normalise_command(self):
        _valid_name("name", self.name)
        if not isinstance(self.cmd, str) or not self.cmd.strip():
            raise ValueError("cmd must be a non-empty str, got %r" % (self.cmd,))
        if not self.shell:
            try:
                shlex.split(self.cmd)
            except ValueError as exc:
                raise ValueError("cmd %r cannot be split: %s" % (self.cmd, exc)) from None
        if isinstance(self.args, str):
            try:
                self.args = shlex.split(self.args)
            except ValueError as exc:
                raise ValueError("args %r cannot be split: %s" % (self.args, exc)) from None
        if not isinstance(self.args, (list, tuple)):
            raise ValueError("args must be a list or a str, got %r" % (self.args,))
        self.args = [_env_value("args", a) for a in self.args]
        self.env = _env_setting("env", self.env)
        self.env_file = _env_files("env_file", self.env_file)
        _read_env_files(self.env_file)  # a missing or bad file is refused at load, not at each spawn
        self.port = None if self.port is None else _int_setting("port", self.port, 1, 65535)
        for setting in ("os_env", "shell", "redirect_input", "stop_children"):
            _bool_setting(setting, getattr(self, setting))
        self.uid = _account("uid", self.uid, lambda n: pwd.getpwnam(n).pw_uid)
        self.gid = _account("gid", self.gid, lambda n: grp.getgrnam(n).gr_gid)
        if self.uid is not None and self.gid is None and pwd is not None and _user_entry(self.uid) is None:
            raise ValueError("uid %d names no user of this system, so it has no primary group to run with: "
                             "give gid too" % self.uid)
        self.umask = _umask_setting(self.umask)
        self.rlimits = _rlimits_setting(self.rlimits)
        if self.cwd is not None:
            if not isinstance(self.cwd, (str, os.PathLike)) or not os.fspath(self.cwd):
                raise ValueError("cwd must be a path, got %r" % (self.cwd,))
            self.cwd = os.fspath(self.cwd)

    def _normalise_processes(self):
        self.numprocesses = _int_setting("numprocesses", self.numprocesses, 0)
        self.max_processes = _int_setting("max_processes", self.max_processes, 1)
        if self.numprocesses > self.max_processes:
            raise ValueError("numprocesses must be <= max_processes (%d), got %d"
                             % (self.max_processes, self.numprocesses))
        if isinstance(self.flapping, dict):
            _reject_unknown(FlappingInfo, self.flapping)
            self.flapping = FlappingInfo(**self.flapping)
        elif self.flapping is True:
            self.flapping = FlappingInfo()
        elif self.flapping is not None and not isinstance(self.flapping, FlappingInfo):
            raise ValueError("flapping must be a FlappingInfo, a dict or None, got %r" % (self.flapping,))
        self.redirect_output = _labels("redirect_output", self.redirect_output)
        if len(self.redirect_output) > 2:
            raise ValueError("redirect_output takes at most 2 labels (stdout, stderr), got %r"
                             % (self.redirect_output,))
        self.custom_streams = _labels("custom_streams", self.custom_streams)
        if isinstance(self.sockets, str):  # "web, admin", as an INI file gives it
            self.sockets = [name.strip() for name in self.sockets.split(",") if name.strip()]
        self.sockets = _labels("sockets", self.sockets)
        if len(set(self.sockets)) != len(self.sockets):
            raise ValueError("sockets: each socket is named once, got %r" % (self.sockets,))
        if _bool_setting("on_demand", self.on_demand) and not self.sockets:
            raise ValueError("on_demand needs sockets: a first connection on one of them starts the job")
        for label in self.custom_streams:
            if self.custom_streams.count(label) > 1 or label in self.redirect_output:
                raise ValueError("custom_streams: label %r is used twice" % (label,))
        self.graceful_timeout = _float_setting("graceful_timeout", self.graceful_timeout, 0)
        self.stop_signal = _signum(self.stop_signal, "stop_signal")

    def _normalise_schedule(self):
        if self.schedule is not None:
            cron = _Cron(self.schedule)
            if cron.next_after(time.time()) is None:
                raise ValueError("schedule %r matches no day: it would never run" % (self.schedule,))
        if self.every is not None:
            self.every = _duration("every", self.every, 1.0)
            if self.schedule is not None:
                raise ValueError("give schedule or every, not both")
        if self.concurrency not in ("skip", "queue", "replace"):
            raise ValueError("concurrency must be 'skip', 'queue' or 'replace', got %r" % (self.concurrency,))
        self.jitter = _duration("jitter", self.jitter, 0.0)
        if _bool_setting("catch_up", self.catch_up) and not _scheduled(self):
            raise ValueError("catch_up needs a schedule or every: it runs a missed run at start")
        if _scheduled(self) and self.on_demand:
            raise ValueError("a job runs on_demand or on a schedule, not both")

    def _normalise_policies(self):
        self.ready = _ready_check("ready", self.ready, self.redirect_output)
        self.ready_timeout = _float_setting("ready_timeout", self.ready_timeout, 0.001)
        self.depends_on = _depends_on(self.depends_on, self.name)
        if self.restart not in ("always", "on-failure", "never"):
            raise ValueError("restart must be 'always', 'on-failure' or 'never', got %r" % (self.restart,))
        self._normalise_schedule()
        if isinstance(self.success_codes, (str, bytes)) or not isinstance(self.success_codes, (list, tuple)):
            raise ValueError("success_codes must be a list of exit statuses, got %r" % (self.success_codes,))
        self.success_codes = [_int_setting("success_codes", code, 0, 255) for code in self.success_codes]
        self.min_uptime = _float_setting("min_uptime", self.min_uptime, 0)
        self.backoff_max = _float_setting("backoff_max", self.backoff_max, 0)
        self.max_rss = None if self.max_rss is None else _size_setting("max_rss", self.max_rss)
        self.max_age = None if self.max_age is None else _float_setting("max_age", self.max_age, 0.001)
        self.max_age_variance = _float_setting("max_age_variance", self.max_age_variance, 0)
        if isinstance(self.health, str) and self.health.startswith(("output:", "delay:")):
            raise ValueError("health %r: a health check is tcp:, http(s)://, exec:, notify or a callable" % self.health)
        self.health = _ready_check("health", self.health, self.redirect_output)
        self.health_interval = _float_setting("health_interval", self.health_interval, 0.001)
        self.health_timeout = _float_setting("health_timeout", self.health_timeout, 0.001)
        self.health_retries = _int_setting("health_retries", self.health_retries, 1)
        self.memory_max = None if self.memory_max is None else _size_setting("memory_max", self.memory_max)
        self.cpu_max = None if self.cpu_max is None else _float_setting("cpu_max", self.cpu_max, 0.01, 10000)
        self.pids_max = None if self.pids_max is None else _int_setting("pids_max", self.pids_max, 1)

    def _normalise_output(self):
        if self.log_file is not None:
            _log_template(self.log_file)
            if not self.redirect_output:  # a log file of nothing would surprise: capture both
                self.redirect_output = ["out", "err"]
        self.log_max_bytes = 0 if self.log_max_bytes == 0 else _size_setting("log_max_bytes", self.log_max_bytes)
        self.log_backups = _int_setting("log_backups", self.log_backups, 0, 1000)
        _bool_setting("log_timestamps", self.log_timestamps)
        if self.log_rotate not in ("size", "hourly", "daily"):
            raise ValueError("log_rotate must be 'size', 'hourly' or 'daily', got %r" % (self.log_rotate,))
        _bool_setting("log_compress", self.log_compress)
        self.tail_bytes = 0 if self.tail_bytes == 0 else _size_setting("tail_bytes", self.tail_bytes)
        if self.tail_bytes > 1 << 30:
            raise ValueError("tail_bytes must be <= 1 GiB, got %d" % self.tail_bytes)

    def to_dict(self):
        """Return the settings as a dict of plain values (JSON-ready)."""
        return _plain(self)

    @classmethod
    def from_dict(cls, data):
        """Build a config from a dict such as to_dict() returns.

        Raises:
            ValueError: `name` or `cmd` is missing, or a value is bad.
            TypeError: an unknown setting.
        """
        if not isinstance(data, dict):
            raise ValueError("a process config must be a dict, got %r" % (data,))
        settings = dict(data)
        for required in ("name", "cmd"):
            if required not in settings:
                raise ValueError("a process config needs %r" % required)
        return cls(settings.pop("name"), settings.pop("cmd"), **settings)

    def __getitem__(self, key):
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key, value):
        # Rebuilt whole so that a bad value raises and leaves the config as it was.
        self.__dict__.update(self.from_dict({**self.to_dict(), key: value}).__dict__)

    def __contains__(self, key):
        return key in _CONFIG_FIELDS

    def get(self, key, default=None):
        """Return the setting `key`, or `default` when there is no such setting."""
        return getattr(self, key) if key in self else default


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(ProcessConfig))
_FIELD_NAMES = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in (ProcessConfig, FlappingInfo)}


def _plain(value):
    """dataclasses.asdict() for a config, in a fifth of its time (info() returns one on each call): the
    containers copied, the settings' leaves (str, numbers, None, a callable) shared."""
    if type(value) in _FIELD_NAMES:
        return {name: _plain(getattr(value, name)) for name in _FIELD_NAMES[type(value)]}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
# What a process is spawned with: a change of any replaces the processes; the other settings apply in place.
_SPAWN_SETTINGS = ("cmd", "args", "env", "env_file", "os_env", "uid", "gid", "umask", "rlimits", "cwd", "shell",
                   "redirect_output", "redirect_input", "custom_streams", "sockets", "ready", "health", "log_file",
                   "log_max_bytes", "log_backups", "log_timestamps", "tail_bytes")


# Variables gaffer reads a secret from: never inherited by a process (a job's own env may still set them).
_SECRET_VARIABLES = ("GAFFER_TOKEN",)


def _inherited_env():
    """The manager's environment as a process inherits it: without the secrets gaffer itself reads."""
    env = dict(os.environ)
    for name in _SECRET_VARIABLES:
        env.pop(name, None)
    return env


def _child_env(config, extra=None):
    """A process's environment: the manager's (os_env), the user's HOME, USER, LOGNAME and SHELL (with
    a uid, as systemd's User= sets them), the job's env files, its env, then `extra` ($PORT, commit's env)."""
    env = _inherited_env() if config.os_env else {}
    user = _user_entry(config.uid)
    if user is not None:
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name, SHELL=user.pw_shell or "/bin/sh")
    env.update(_read_env_files(config.env_file))  # read at each spawn: an edit applies at the next one
    env.update(config.env)
    env.update(extra or {})
    return env


def _credentials(config):
    """Popen's (user, group, extra_groups) for a process of config.  With a uid, the group is the gid or
    the user's primary group, and the supplementary groups are the user's own, never the manager's
    (initgroups, as supervisord and systemd drop privileges).  Only root can set groups: a manager that
    is not root keeps its own, and can run as no other user anyway."""
    if config.uid is None:
        return None, config.gid, None
    user = _user_entry(config.uid)
    gid = config.gid if config.gid is not None else user.pw_gid if user is not None else None
    if gid is None:
        raise ValueError("uid %d names no user of this system any more, so it has no primary group: "
                         "give gid too" % config.uid)
    groups = None
    if os.geteuid() == 0:
        groups = os.getgrouplist(user.pw_name, gid) if user is not None else [gid]
    return config.uid, gid, groups


def _command_line(config, env):
    """The argv a process of `config` runs, with $VAR replaced from its environment."""
    args = [_expand(a, env) for a in config.args]
    if config.shell:
        return ["/bin/sh", "-c", " ".join([config.cmd] + [shlex.quote(a) for a in args])]
    return [_expand(a, env) for a in shlex.split(config.cmd)] + args


# -- Events ----------------------------------------------------------------------------------------
# Publish/subscribe by dotted topic.  The manager publishes on its loop thread;
# subscribing works from any thread.

def _topics(evtype):
    """Every pattern that receives evtype: "." and each dotted prefix, evtype included."""
    parts = evtype.split(".")
    return ["."] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _pattern(pattern):
    """A subscription pattern as stored: "a.b." means "a.b", as in the seed; "" and "." mean everything."""
    if not isinstance(pattern, str):
        raise TypeError("pattern must be a str, got %r" % (pattern,))
    return pattern.rstrip(".") or "."


class EventEmitter:
    """Delivers events to listeners subscribed by pattern.

    ``"."`` receives every event; ``"job.default.web"`` (or ``"job.default.web."``)
    receives ``job.default.web.spawn``, ``job.default.web.exit``... exactly once
    each.  A listener that raises is logged on the ``gaffer`` logger and kept.
    """

    def __init__(self):
        # Writers hold _lock; publish reads _listeners without it, since the
        # dict is replaced whole on every change and never mutated in place.
        self._lock = threading.Lock()
        self._listeners = {}  # pattern -> tuple of (listener, once)

    def subscribe(self, pattern, listener, once=False):
        """Call ``listener(evtype, msg)`` for every event matching pattern (only the next one if once)."""
        if not callable(listener):
            raise TypeError("listener must be callable, got %r" % (listener,))
        pattern = _pattern(pattern)
        with self._lock:
            listeners = dict(self._listeners)
            listeners[pattern] = listeners.get(pattern, ()) + ((listener, once),)
            self._listeners = listeners

    def subscribe_once(self, pattern, listener):
        """Call ``listener(evtype, msg)`` for the next event matching pattern only."""
        self.subscribe(pattern, listener, once=True)

    def unsubscribe(self, pattern, listener):
        """Stop calling listener for pattern; unknown pairs are ignored."""
        pattern = _pattern(pattern)
        with self._lock:
            entries = self._listeners.get(pattern, ())
            for entry in entries:
                if entry[0] == listener:
                    self._remove(pattern, entry)
                    return

    def _remove(self, pattern, entry):
        """Remove one subscription; False if it was gone already.  Caller holds _lock."""
        entries = self._listeners.get(pattern, ())
        if entry not in entries:
            return False
        listeners = dict(self._listeners)
        kept = tuple(e for e in entries if e is not entry)
        if kept:
            listeners[pattern] = kept
        else:
            del listeners[pattern]
        self._listeners = listeners
        return True

    def publish(self, evtype, *args, **kwargs):
        """Call ``listener(evtype, *args, **kwargs)`` for every matching listener, in the caller's thread.

        A message that is one dict (as the manager sends) is copied with
        ``msg["event"] = evtype``, and the listeners share that copy.  Any other
        payload is passed as it is, as the seed's emitter did.

        Returns:
            the number of listeners called.
        """
        listeners = self._listeners
        if not listeners:
            return 0
        matched = [(p, listeners[p]) for p in _topics(evtype) if p in listeners]
        if not matched:
            return 0
        if len(args) == 1 and not kwargs and isinstance(args[0], dict):
            args = (dict(args[0], event=evtype),)
        called = 0
        for pattern, entries in matched:
            for entry in entries:
                listener, once = entry
                if once:
                    with self._lock:
                        if not self._remove(pattern, entry):
                            continue  # fired already, by another thread or a nested publish
                called += 1
                try:
                    self._invoke(listener, evtype, *args, **kwargs)
                except Exception:
                    _log.exception("listener %r failed on event %r", listener, evtype)
        return called

    @staticmethod
    def _invoke(listener, evtype, *args, **kwargs):
        listener(evtype, *args, **kwargs)


# -- Loop ------------------------------------------------------------------------------------------
# The selector, the timer heap and the command queue.  Only the loop thread
# runs callbacks and timers; submit() and call() may come from any thread.

def _pass_on(target, source):
    """Give target the outcome of source (two concurrent.futures.Future)."""
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())


class _Timer:
    """A callback due at a time of the loop's clock; cancel() flags it, the heap keeps it until due."""

    __slots__ = ("when", "seq", "fn", "args", "cancelled")

    def __init__(self, when, seq, fn, args):
        self.when, self.seq, self.fn, self.args = when, seq, fn, args
        self.cancelled = False

    def __lt__(self, other):
        return (self.when, self.seq) < (other.when, other.seq)

    def cancel(self):
        self.cancelled = True


class _Watch:
    """What the selector calls for one registration; callback None once it was forgotten."""

    __slots__ = ("callback",)

    def __init__(self, callback):
        self.callback = callback


class Loop:
    """The event loop a Manager runs on its own thread.

    Apps receive it in ``start(loop, manager)``.  From any thread:
    ``call_soon_threadsafe(fn, *args)``, ``submit(fn, *args)`` (a Future) and
    ``call(fn, *args)`` (its result).  On the loop thread: ``call_later``,
    ``call_at``, ``set_events`` and ``time()``.

    Args:
        clock: the monotonic clock every deadline uses (default time.monotonic);
            tests may pass one they can move forward.
        wall_clock: the wall clock schedules follow (default time.time).
    """

    def __init__(self, clock=None, wall_clock=None):
        self.time = clock or time.monotonic
        self.wall = wall_clock or time.time  # what schedules follow: it may jump (NTP, DST, a suspend)
        self.thread = None
        self._selector = self._wake_r = self._wake_w = None  # made by start()
        self._commands = collections.deque()  # (fn, args, future or None); deque ops are atomic
        self._timers = []
        self._seq = itertools.count()
        self._compact_at = 256
        self._accepting = False
        self._stopping = False
        self.longest_turn = 0.0  # seconds of the longest turn's work (not its wait) since /metrics read it
        self.started = None      # when start() ran (its clock): the manager's uptime

    def __repr__(self):
        return "<Loop %s timers=%d>" % ("running" if self._accepting else "idle", len(self._timers))

    # -- any thread

    def in_loop_thread(self):
        """True when called on the loop thread."""
        return threading.current_thread() is self.thread

    def wakeup(self):
        """Make the loop's select return now."""
        try:
            self._wake_w.send(b"\0")
        except (AttributeError, OSError):
            pass  # not started, closed, or full (a wake-up is pending already)

    def take_longest_turn(self):
        """The longest turn's work since the last call (/metrics), which starts the next count (loop thread)."""
        longest, self.longest_turn = self.longest_turn, 0.0
        return longest

    def call_soon_threadsafe(self, fn, *args):
        """Run fn(*args) on the loop thread soon, without waiting for it."""
        self._commands.append((fn, args, None))
        self.wakeup()

    def submit(self, fn, *args):
        """Run fn(*args) on the loop thread; return a Future of its result.

        Raises:
            RuntimeError: the loop is not running, or this is the loop thread (waiting
                there for the Future would wait forever: use call()).
        """
        if not self._accepting:
            raise RuntimeError("manager is not running")
        if self.in_loop_thread():
            raise RuntimeError("submit() on the loop thread would wait for itself; use call() or call_soon_threadsafe()")
        future = Future()
        self._commands.append((fn, args, future))
        self.wakeup()
        # The loop may have closed after the check above and drained the queue
        # without this command; whoever moves the future first decides.
        if not self._accepting and future.cancel():
            raise RuntimeError("manager is not running")
        return future

    def post(self, fn, *args):
        """Run fn on the loop thread later, without waiting; a failure is logged.  False if the loop is gone."""
        if self.in_loop_thread():
            self.call_soon_threadsafe(fn, *args)  # after the event being delivered, not inside it
            return True
        try:
            future = self.submit(fn, *args)
        except RuntimeError:
            return False
        future.add_done_callback(lambda f: f.cancelled() or f.exception() is None or _log.error(
            "%s failed", fn.__name__, exc_info=f.exception()))
        return True

    def call(self, fn, *args):
        """Run fn(*args) on the loop thread and return its result (inline on the loop thread).

        Raises:
            RuntimeError: the loop is not running.
            Exception: whatever fn raised, re-raised in the caller.
        """
        if self.in_loop_thread():
            return fn(*args)
        return self.submit(fn, *args).result()

    # -- loop thread

    def call_at(self, when, fn, *args):
        """Run fn(*args) on the loop thread at `when` (the loop's clock); return a cancellable timer."""
        if len(self._timers) >= self._compact_at:
            self._timers = [t for t in self._timers if not t.cancelled]
            heapq.heapify(self._timers)
            self._compact_at = max(256, 2 * len(self._timers))
        timer = _Timer(when, next(self._seq), fn, args)
        heapq.heappush(self._timers, timer)
        return timer

    def call_later(self, delay, fn, *args):
        """Run fn(*args) on the loop thread after `delay` seconds; return a cancellable timer."""
        return self.call_at(self.time() + delay, fn, *args)

    def set_events(self, fileobj, events, callback=None):
        """Call ``callback(mask)`` when fileobj is ready for `events` (EVENT_READ|EVENT_WRITE); 0 forgets it."""
        try:
            key = self._selector.get_key(fileobj)
        except KeyError:
            if events:
                self._selector.register(fileobj, events, _Watch(callback))
            return
        if events:
            key.data.callback = callback
            if key.events != events:
                self._selector.modify(fileobj, events, key.data)
        else:
            # A callback later in this select batch may still hold this key: the flag tells it,
            # even if fileobj is closed by then and could no longer be looked up.
            key.data.callback = None
            self._selector.unregister(fileobj)

    def stop(self):
        """End the loop after the current iteration."""
        self._stopping = True

    def start(self, on_close, name="gaffer-loop"):
        """Run the loop on a new daemon thread; on_close() runs on it when the loop ends."""
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _Watch(self._on_wake))
        self._accepting = True
        self.started = self.time()
        self.thread = threading.Thread(target=self._run, args=(on_close,), name=name, daemon=True)
        self.thread.start()

    def _run(self, on_close):
        try:
            while not self._stopping:
                self._run_once()
        except BaseException:
            _log.critical("gaffer loop crashed", exc_info=True)
        finally:
            self._accepting = False
            self._run_commands(closing=True)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
            on_close()

    def _run_once(self):
        timeout = None
        if self._commands:
            timeout = 0
        elif self._timers:
            timeout = min(max(0.0, self._timers[0].when - self.time()), _MAX_SELECT)
        events = self._selector.select(timeout)
        began = time.perf_counter()
        for key, mask in events:
            callback = key.data.callback
            if callback is None:
                continue  # forgotten by an earlier callback of this batch
            try:
                callback(mask)
            except Exception:
                _log.exception("callback for %r failed", key.fileobj)
        self._run_commands()
        self._run_timers()
        self.longest_turn = max(self.longest_turn, time.perf_counter() - began)

    def _on_wake(self, mask):
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run_commands(self, closing=False):
        # Only what was queued before this turn (asyncio's ntodo): a command that posts another cannot
        # hold off the timers and the descriptors; the new one runs next turn, after a select of 0.
        # At close, everything: no turn follows.
        commands = self._commands
        for _ in itertools.count() if closing else range(len(commands)):
            if not commands:
                break
            fn, args, future = commands.popleft()
            if future is None:
                if closing:
                    continue
                try:
                    fn(*args)
                except Exception:
                    _log.exception("command %r failed", fn)
            elif future.set_running_or_notify_cancel():
                if closing:
                    future.set_exception(RuntimeError("manager is not running"))
                    continue
                try:
                    result = fn(*args)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    if isinstance(result, Future):  # finished on a later turn: the caller waits till then
                        result.add_done_callback(functools.partial(_pass_on, future))
                    else:
                        future.set_result(result)

    def _run_timers(self):
        timers, now = self._timers, self.time()
        while timers and timers[0].when <= now:
            timer = heapq.heappop(timers)
            if timer.cancelled:
                continue
            try:
                timer.fn(*timer.args)
            except Exception:
                _log.exception("timer %r failed", timer.fn)


class _Worker:
    """Work done off the loop, in order, on one thread that runs while there is work and ends when there
    is none (so an idle manager holds no thread of it).  submit() from any thread; handle() on its own."""

    name = "gaffer worker"

    def __init__(self):
        self._lock = threading.Lock()
        self._todo = collections.deque()
        self._thread = None

    def submit(self, *item):
        with self._lock:
            self._todo.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def _run(self):
        while True:
            with self._lock:
                if not self._todo:
                    self._thread = None
                    return
                item = self._todo.popleft()
            try:
                self.handle(*item)
            except Exception:  # one item that fails leaves the rest to do
                _log.exception("%s failed on %r", self.name, item)

    def handle(self, *item):
        raise NotImplementedError

    def join(self, timeout):
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


# -- Reaper backends: the one child watcher --------------------------------------------------------
# How the loop learns that a child exited.  Both reap only the pids they were
# given (Popen.poll, never waitpid(-1)) and call on_exit() on the loop thread.

def _some_child_exited():
    """Whether any child of this process awaits reaping: one peek (WNOWAIT reaps nothing),
    so an idle poll costs one call whatever the number of children."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False
    except (AttributeError, OSError):  # no waitid here: look at each child
        return True


class _PollReaper:
    """The one child watcher: the Popens the manager spawned and the children it adopted (_Adopted),
    each reaped alone (poll(): waitpid(pid, WNOHANG)), never waitpid(-1).  This one polls, fast after
    a spawn or a signal, then backing off."""

    def __init__(self, loop):
        self._loop = loop
        self._children = {}  # Popen -> on_exit
        self._timer = None
        self._delay = _POLL_MIN

    def watch(self, popen, on_exit):
        """Call on_exit() on the loop thread once popen has exited and is reaped."""
        self._children[popen] = on_exit
        self.expect_exit()

    def forget(self, popen):
        """Stop watching popen (its owner reaps it some other way)."""
        self._children.pop(popen, None)

    def close(self):
        """The loop ended: forget every child (the selector is closed by then)."""
        self._children.clear()

    def expect_exit(self):
        """Something may exit soon (it was just started or signalled): poll at the shortest delay."""
        self._delay = _POLL_MIN
        if self._children and (self._timer is None or self._timer.when > self._loop.time() + _POLL_MIN):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_later(_POLL_MIN, self._poll)

    def _poll(self):
        self._timer = None
        if _some_child_exited():
            for popen, on_exit in list(self._children.items()):
                # An exit handled just before may have made its owner forget another child (the guardian).
                if popen in self._children and popen.poll() is not None:
                    del self._children[popen]
                    on_exit()
        if self._children and self._timer is None:
            self._delay = min(self._delay * 2, _POLL_MAX)
            self._timer = self._loop.call_later(self._delay, self._poll)


class _Adopted:
    """A child the manager did not spawn but adopted as a subreaper: watched and reaped as a Popen is."""

    __slots__ = ("pid", "returncode")

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped meanwhile
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status) if status else 0
        return self.returncode


class _PidfdReaper(_PollReaper):
    """Registers a pidfd per child in the loop's selector: readable means exited, no polling.  It owns
    those descriptors (asyncio's PidfdChildWatcher is the model): forget() and close() close them."""

    def __init__(self, loop):
        super().__init__(loop)
        self._pidfds = {}  # Popen -> its pidfd, in the selector

    def watch(self, popen, on_exit):
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError as exc:  # out of descriptors, say: this child is polled instead
            _log.warning("pidfd_open(%d) failed (%s); polling that child", popen.pid, exc)
            super().watch(popen, on_exit)
            return
        self._pidfds[popen] = pidfd
        self._loop.set_events(pidfd, selectors.EVENT_READ, functools.partial(self._exited, popen, on_exit))

    def _exited(self, popen, on_exit, mask):
        if popen.poll() is not None:
            self.forget(popen)
            on_exit()

    def forget(self, popen):
        pidfd = self._pidfds.pop(popen, None)
        if pidfd is not None:
            self._loop.set_events(pidfd, 0)
            os.close(pidfd)
        super().forget(popen)

    def close(self):
        for pidfd in self._pidfds.values():
            os.close(pidfd)
        self._pidfds.clear()
        super().close()


# -- Cgroups (_Cgroups, _Mover): a cgroup per slot where the system lets us -------------------------
# Everything a process starts stays in its cgroup, setsid() or not, so a stop can end with
# cgroup.kill.  Where no cgroup can be made, the process group and /proc do the work.  Loop thread
# (the mover has a thread of its own).

def _cgroup2_dir():
    """This process's cgroup v2 directory (a hybrid layout's "unified" mount too), or None."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line[3:].strip() for line in f if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    for fields in mounts:
        if path is not None and "-" in fields and fields[fields.index("-") + 1] == "cgroup2":
            root, mount = fields[3], fields[4].replace("\\040", " ")
            relative = path[len(root):] if root != "/" and path.startswith(root) else path
            return os.path.join(mount, relative.lstrip("/"))
    return None


def _write_file(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _cgroup_members(path):
    """The pids in a cgroup (zombies are not): [] once it is empty or gone, or for no cgroup (None)."""
    if not path:
        return []
    try:  # raw reads: a third of open()'s cost, and a manager stop reads each slot's once
        fd = os.open(os.path.join(path, "cgroup.procs"), os.O_RDONLY)
    except OSError:
        return []
    try:
        data = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return [int(pid) for pid in data.split()]
            data += chunk
    except (OSError, ValueError):
        return []
    finally:
        os.close(fd)


_CGROUP_FILES = (  # file -> what /metrics takes of it: (key, its field or None for the whole file, scale)
    ("memory.current", [("memory", None, 1)]), ("pids.current", [("pids", None, 1)]),
    ("memory.events", [("oom_kills", b"oom_kill", 1)]),
    ("cpu.stat", [("cpu_seconds", b"usage_usec", 1e-6), ("throttled_seconds", b"throttled_usec", 1e-6)]))


def _cgroup_stats(path):
    """What /metrics says of a cgroup, from the files it has (its controllers' may be absent): memory
    (bytes), oom_kills, pids, cpu_seconds and throttled_seconds."""
    stats = {}
    if not path:
        return stats
    for name, wanted in _CGROUP_FILES:
        try:
            fd = os.open(os.path.join(path, name), os.O_RDONLY)
        except OSError:
            continue  # no such controller here
        try:
            words = os.read(fd, 4096).split()
        except OSError:
            continue
        finally:
            os.close(fd)
        for key, field, scale in wanted:
            try:
                value = int(words[0]) if field is None else int(words[words.index(field) + 1])
            except (ValueError, IndexError):
                continue
            stats[key] = round(value * scale, 6) if scale != 1 else value
    return stats


def _cgroup_populated(path):
    """Whether a cgroup holds a live process (cgroup.events; a third of the cost of reading its pids)."""
    try:
        fd = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY)
    except OSError:  # gone
        return False
    try:
        return b"populated 1" in os.read(fd, 256)
    except OSError:
        return False
    finally:
        os.close(fd)


def _cgroup_kill(path):
    """SIGKILL everything in a cgroup: cgroup.kill (Linux 5.14+), else freeze, kill each and thaw."""
    try:
        _write_file(os.path.join(path, "cgroup.kill"), "1")
        return
    except FileNotFoundError:
        pass
    except OSError:
        return
    freeze = os.path.join(path, "cgroup.freeze")
    try:
        _write_file(freeze, "1")  # none of them can fork while they are killed
    except OSError:
        pass
    for pid in _cgroup_members(path):
        _send_signal(pid, signal.SIGKILL, group=False)
    try:
        _write_file(freeze, "0")
    except OSError:
        pass


_LIMIT_FILES = {  # setting -> (controller, file)
    "memory_max": ("memory", "memory.max"), "cpu_max": ("cpu", "cpu.max"), "pids_max": ("pids", "pids.max"),
}


class _Cgroups:
    """The manager's cgroup, made under the host's: a directory per job, in it one per slot (reused by the
    slot's processes; a second one while two share a slot, or what the last left is still there)."""

    def __init__(self, base):
        self.base = base

    @classmethod
    def create(cls, setting, token):
        """The manager's cgroup, or None (with setting "auto", when none can be made; the reason is logged)."""
        if setting is False or (setting == "auto" and os.environ.get("GAFFER_NO_CGROUP", "") not in ("", "0")):
            return None
        parent = _cgroup2_dir()
        base = os.path.join(parent or "/sys/fs/cgroup", "gaffer-" + token)
        try:
            if parent is None:
                raise FileNotFoundError("no cgroup2 mount in /proc/self/mountinfo")
            if not os.access(_LAUNCHER, os.X_OK):  # it moves each process into its cgroup
                raise FileNotFoundError("no %s to enter a cgroup with" % _LAUNCHER)
            os.mkdir(base)
        except OSError as exc:
            if setting is True:
                raise RuntimeError("cgroups=True, but the cgroup %s cannot be made: %s" % (base, exc)) from None
            _log.debug("no cgroup containment (%s: %s); process groups instead", base, exc)
            return None
        return cls(base)

    def job_dir(self, job):
        return os.path.join(self.base, job.name)

    def set_limits(self, job, config):
        """Make the job's cgroup and write its limits; ValueError naming the limit the system cannot enforce."""
        path = self.job_dir(job)
        if all(getattr(config, setting) is None for setting in _LIMIT_FILES) and not os.path.isdir(path):
            return  # made by its first process
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(self.base, "cgroup.controllers")) as f:
            offered = f.read().split()
        for setting, (controller, filename) in _LIMIT_FILES.items():
            value = getattr(config, setting)
            if value is None:
                if os.path.exists(os.path.join(path, filename)):  # a limit that an update removed
                    _write_file(os.path.join(path, filename), "max")
                continue
            if controller not in offered:
                raise ValueError("%s needs the cgroup %s controller, which %s does not offer (it has: %s)"
                                 % (setting, controller, self.base, " ".join(offered) or "none"))
            try:
                _write_file(os.path.join(self.base, "cgroup.subtree_control"), "+" + controller)
                text = "%d 100000" % (value * 100000) if setting == "cpu_max" else str(value)
                _write_file(os.path.join(path, filename), text)
            except OSError as exc:
                raise ValueError("%s cannot be set in %s: %s" % (setting, path, exc)) from None

    def make(self, job, name):
        """A new cgroup in the job's; OSError (FileExistsError if it is there) when it cannot be made."""
        path = os.path.join(self.job_dir(job), name)
        try:
            os.mkdir(path)
        except FileNotFoundError:  # the job's first process
            os.makedirs(path)
        return path

    @staticmethod
    def release(path):
        """Remove an empty cgroup; False if it is not (yet) empty."""
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True

    def remove(self):
        """At the manager's end: every cgroup left, deepest first, killing what they still hold."""
        for parent, dirs, _ in sorted(os.walk(self.base), key=lambda entry: -entry[0].count("/")):
            if _cgroup_members(parent):
                _cgroup_kill(parent)
            if not self.release(parent):
                _log.warning("cannot remove the cgroup %s: it still holds %s", parent, _cgroup_members(parent))


# A process enters its cgroup itself, before its program runs.  Moving a task is a cgroup v2 migration:
# it takes the kernel's cgroup_threadgroup_rwsem for writing and, unless the mount has favordynmods,
# waits out an RCU grace period (5 ms at p50 here, 13 at p90).  So the loop never moves one: the
# launcher, /bin/sh between the fork and the program, writes its own pid into its cgroup and execs
# the program, which never runs outside it, nor forks before.  A child that runs as another user
# cannot move itself (the cgroups' common ancestor is the manager's): it stops itself, and the mover,
# a thread of the manager's while it has work, moves it and lets it go on.  Exit status 219 (systemd's
# for the same failure) says that a process could not enter its cgroup, and did not run.
_ENTER_CGROUP = ('{ echo $$ >"$1"; } 2>/dev/null || { echo "gaffer: cannot enter the cgroup ${1%/*}" >&2; exit 219; }; '
                 'shift; exec "$@"')
_WAIT_FOR_CGROUP = 'kill -STOP $$; shift; exec "$@"'
_LAUNCHER = "/bin/sh"


def _check_program(program, env, cwd):
    """Raise what Popen would if `program` cannot be executed, as the launcher's exec would only print it."""
    if cwd is not None and not os.path.isdir(cwd):
        return  # Popen's chdir raises, naming the cwd
    if "/" in program:
        candidates = [program if cwd is None else os.path.join(cwd, program)]
    else:
        candidates = [os.path.join(folder, program) for folder in os.get_exec_path(env)]
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return
    code = errno.EACCES if any(os.path.exists(path) for path in candidates) else errno.ENOENT
    raise OSError(code, os.strerror(code), program)


class _Mover(_Worker):
    """Moves the stopped launchers of other users' processes into their cgroups, off the loop, then lets
    them go on (SIGCONT); one that cannot be moved is killed.  Any thread."""

    name = "gaffer cgroup mover"

    def move(self, pid, procs):
        try:
            pidfd = os.pidfd_open(pid)  # not yet reaped: ours; the mover waits on it, never on a reused pid
        except (AttributeError, OSError):
            pidfd = None
        self.submit(pid, pidfd, procs)

    def handle(self, pid, pidfd, procs):
        try:
            self._move_one(pid, pidfd, procs)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    @staticmethod
    def _move_one(pid, pidfd, procs):
        flags = os.WSTOPPED | os.WEXITED | os.WNOWAIT  # left for the reaper to reap
        try:
            stopped = os.waitid(os.P_PIDFD, pidfd, flags) if pidfd is not None else os.waitid(os.P_PID, pid, flags)
        except ChildProcessError:  # exited, and reaped already
            return
        if stopped is None or stopped.si_code != os.CLD_STOPPED:
            return  # killed before it stopped
        try:
            _write_file(procs, str(pid))
        except OSError as exc:
            _log.warning("process %d cannot be moved into the cgroup %s (%s): it is killed, not run outside it",
                         pid, os.path.dirname(procs), exc)
            _send_signal(pid, signal.SIGKILL, group=False)
            return
        _send_signal(pid, signal.SIGCONT, group=False)


def _set_subreaper():
    """Make orphaned descendants reparent to this process (Linux prctl PR_SET_CHILD_SUBREAPER); raise OSError."""
    if not sys.platform.startswith("linux"):
        raise OSError("PR_SET_CHILD_SUBREAPER is Linux only")
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError) as exc:
        raise OSError("no ctypes to call prctl: %s" % exc) from None
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        errno = ctypes.get_errno()
        raise OSError(errno, "prctl(PR_SET_CHILD_SUBREAPER): %s" % os.strerror(errno))


# -- Held sockets (_Sockets): bound once, handed to every process ----------------------------------
# The manager binds a listening socket once and passes it to each process of the jobs that name it,
# so the port stays open while processes come and go (systemd's and circus's way).  A process finds
# its sockets at descriptors 3, 4, ... with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID, as
# sd_listen_fds(3) says.  LISTEN_PID is the program's pid, which only the child knows, and /bin/sh
# cannot move a descriptor numbered past 9: a job with sockets starts through this launcher, a
# Python of its own (-I -S), which also enters the process's cgroup and then drops to the job's
# user, groups and umask (an interpreter the manager can run, the user perhaps not).  Loop thread.

_SOCKET_LAUNCHER = r"""
import fcntl, os, signal, sys
procs, mode, uid, gid, groups, umask, limits, count = sys.argv[1:8] + [int(sys.argv[8])]
fds, argv, first = [int(fd) for fd in sys.argv[9:9 + count]], sys.argv[9 + count:], 3 + count
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, first) for fd in fds]
for key, value in list(os.environ.items()):  # a custom stream where a socket goes moves past them
    if key.startswith("GAFFER_STREAM_") and value.isdigit() and int(value) < first:
        os.environ[key] = str(fcntl.fcntl(int(value), fcntl.F_DUPFD, first))
        fds.append(int(value))
for fd in fds:
    os.close(fd)
for number, fd in enumerate(moved, 3):
    os.dup2(fd, number)
    os.close(fd)
if count:
    os.environ["LISTEN_PID"] = str(os.getpid())
if mode == "enter":
    try:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    except OSError as exc:
        sys.stderr.write("gaffer: cannot enter the cgroup %s: %s\n" % (os.path.dirname(procs), exc))
        os._exit(219)
if limits:  # as root, before the user is dropped: a hard limit may be raised
    import resource
    for item in limits.split(","):
        name, soft, hard = item.split(":")
        try:
            resource.setrlimit(getattr(resource, "RLIMIT_" + name.upper()), (int(soft), int(hard)))
        except (OSError, ValueError) as exc:
            sys.stderr.write("gaffer: cannot set the %s limit to %s:%s: %s\n" % (name, soft, hard, exc))
            os._exit(126)
if groups:  # as Popen drops them: supplementary groups, group, user
    os.setgroups([int(g) for g in groups.split(",")])
if gid:
    os.setgid(int(gid))
if uid:
    os.setuid(int(uid))
if umask:
    os.umask(int(umask))
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    sys.stderr.write("gaffer: %s: %s\n" % (argv[0], exc.strerror))
    os._exit(127)
"""


def _launch_argv(argv, procs, mode, fds, credentials=(None, None, None, None), rlimits=None):
    """The command line Popen runs: argv itself, or through the launcher that enters the cgroup (mode
    "enter", or "wait" for the mover) and, for sockets or rlimits, puts `fds` at 3, 4, ..., sets the
    limits and takes on the credentials (uid, gid, groups, umask; None: the manager's), which Popen
    then leaves alone."""
    if fds or rlimits:
        uid, gid, groups, umask = ("" if value is None else value for value in credentials)
        limits = ",".join("%s:%d:%d" % (name, soft, hard) for name, (soft, hard) in sorted((rlimits or {}).items()))
        return [sys.executable, "-I", "-S", "-c", _SOCKET_LAUNCHER, procs, mode, str(uid), str(gid),
                ",".join(map(str, groups or ())), str(umask), limits, str(len(fds)), *map(str, fds)] + argv
    if not mode:
        return argv
    return [_LAUNCHER, "-c", _WAIT_FOR_CGROUP if mode == "wait" else _ENTER_CGROUP, "gaffer", procs] + argv


def _socket_env(names):
    """What a process of a job with sockets finds in its environment (LISTEN_PID: the launcher's)."""
    if not names:
        return {}
    env = {"LISTEN_FDS": str(len(names)), "LISTEN_FDNAMES": ":".join(names)}
    env.update(("GAFFER_SOCKET_" + name.upper(), str(number)) for number, name in enumerate(names, 3))
    return env


def _socket_name(name):
    """A socket's name: it becomes $GAFFER_SOCKET_<NAME> and a LISTEN_FDNAMES entry."""
    _valid_name("socket name", name)
    if not name.isidentifier():
        raise ValueError("a socket name is a name such as 'web', got %r" % (name,))
    return name


def _socket_address(address):
    """(family, what bind() takes) of "tcp://HOST:PORT" ([::] and [::1] for IPv6) or "unix:PATH"."""
    text = address if isinstance(address, str) else ""  # anything else is refused below, as it is
    if text.startswith("unix:") and len(text) > 5:
        return socket.AF_UNIX, text[5:]
    match = re.fullmatch(r"tcp://(\[([0-9A-Fa-f:.]+)\]|([^\[\]:/]+)):(\d{1,5})", text)
    if match is None or int(match.group(4)) > 65535:
        raise ValueError("a socket address is tcp://HOST:PORT ([::]:PORT for IPv6) or unix:PATH, got %r"
                         % (address,))
    if match.group(2) is not None:
        return socket.AF_INET6, (match.group(2), int(match.group(4)))
    return socket.AF_INET, (match.group(3), int(match.group(4)))


def _bind(address, backlog, reuseport, mode, owner):
    """A listening socket bound to `address`, and the unix socket file it made (or None); OSError."""
    family, where = _socket_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    made = None
    try:
        if family == socket.AF_UNIX:
            _remove_stale_socket(where)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as systemd: a restart rebinds at once
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(where)
        if family == socket.AF_UNIX:
            made = where
            _own_socket_file(where, mode, owner)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        if made is not None:
            os.unlink(made)
        raise
    return sock, made


def _own_socket_file(path, mode, owner):
    """The mode and owner of the socket file bind() made, set on it: never on a file that another user,
    who can write in its directory, put there meanwhile (a symlink to /etc/shadow, say)."""
    if owner is not None:
        os.lchown(path, *owner)
    if mode is None:
        return
    if hasattr(os, "lchmod"):  # macOS, the BSDs
        os.lchmod(path, mode)
        return
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)  # Linux: the file itself, whatever it is
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.EEXIST, "replaced by another file before its mode was set", path)
        os.chmod("/proc/self/fd/%d" % fd, mode)
    finally:
        os.close(fd)


def _remove_stale_socket(path):
    """A unix socket file nothing listens on any more is replaced; one in use, or another file, is not."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, "it exists and is not a socket", path)
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except OSError:
            return  # bind() says what is wrong
    raise OSError(errno.EADDRINUSE, "a process listens on it", path)


def _check_port(check, config):
    """The port a tcp: or http(s): check connects to, as the job's first slot expands it; None if none."""
    env = {**config.env, **_socket_env(config.sockets)}
    if config.port is not None:
        env["PORT"] = str(config.port)
    target = _expand(check, env)
    if target.startswith("tcp:"):
        port = target.rpartition(":")[2]
        return int(port) if port.isdigit() else None
    if target.startswith(("http://", "https://")):
        import urllib.parse
        try:
            url = urllib.parse.urlsplit(target)
            return url.port or (443 if url.scheme == "https" else 80)
        except ValueError:
            return None
    return None


class _HeldSocket:
    __slots__ = ("name", "address", "sock", "made")

    def __init__(self, name, address, sock, made):
        self.name, self.address, self.sock, self.made = name, address, sock, made

    @property
    def bound(self):
        """The address as bound: the real port where 0 was asked for."""
        if self.sock.family == socket.AF_UNIX:
            return self.address
        host, port = self.sock.getsockname()[:2]
        return "tcp://%s:%d" % ("[%s]" % host if self.sock.family == socket.AF_INET6 else host, port)


class _Sockets:
    """The listening sockets the manager holds: bound by add_socket, kept across every restart, reload,
    rollout and backoff of the jobs that use them, closed by remove_socket or at the manager's end."""

    def __init__(self, manager):
        self._manager = manager
        self._held = {}  # name -> _HeldSocket
        self._listening = {}  # name -> [on_demand jobs that a connection on it starts], while it is watched
        self._woken = set()  # on_demand jobs started by a connection, until they stop

    def add(self, name, address, backlog=None, reuseport=False, mode=None, owner=None):
        """Bind now: ValueError for a bad name or address, ProcessConflict for a name in use, ProcessError
        naming the address and the OS error when it cannot be bound (nothing is left bound)."""
        _socket_name(name)
        _socket_address(address)
        backlog = socket.SOMAXCONN if backlog is None else _int_setting("backlog", backlog, 1, 1 << 16)
        _bool_setting("reuseport", reuseport)
        mode = None if mode is None else _umask_setting(mode)
        if owner is not None:
            owner = (_account("owner", owner, lambda n: pwd.getpwnam(n).pw_uid), -1)
        if name in self._held:
            raise ProcessConflict("socket %r is held already (%s)" % (name, self._held[name].bound))
        try:
            sock, made = _bind(address, backlog, reuseport, mode, owner)
        except OSError as exc:
            raise ProcessError(400, "cannot bind socket %r to %s: %s" % (name, address, exc)) from None
        held = self._held[name] = _HeldSocket(name, address, sock, made)
        self._manager._publish({"name": name, "address": held.bound}, "socket_bound")
        return self._describe(held)

    def remove(self, name):
        held = self._get(name)
        users = self.users(name)
        if users:
            raise ProcessConflict("socket %r is in use by %s: unload them first" % (name, ", ".join(users)))
        del self._held[name]
        self._close(held)

    def _get(self, name):
        try:
            return self._held[name]
        except KeyError:
            raise ProcessNotFound("socket %r not found" % (name,)) from None

    def users(self, name):
        return [job.name for job in self._manager._all_jobs() if name in job.config.sockets]

    def check(self, config):
        """A job's config names held sockets only, and no readiness or health check a held socket
        answers whoever accepts: ValueError that says what to use instead."""
        for name in config.sockets:
            if name not in self._held:
                raise ValueError("job %r uses the socket %r, which the manager does not hold (add_socket first)"
                                 % (config.name, name))
        if config.sockets and not sys.executable:
            raise ValueError("job %r has sockets, which need a Python interpreter (sys.executable) to hand "
                             "them over" % (config.name,))
        ports = {self._held[name].sock.getsockname()[1] for name in config.sockets
                 if self._held[name].sock.family != socket.AF_UNIX}
        for setting in ("ready", "health"):
            check = getattr(config, setting)
            port = _check_port(check, config) if isinstance(check, str) else None
            if port in ports:
                raise ValueError("%s %r checks port %d, which the manager's socket holds: the kernel answers it "
                                 "whichever process accepts.  Use notify, output: or a port of the process's "
                                 "own" % (setting, check, port))

    def fds(self, names):
        return [self._held[name].sock.fileno() for name in names]

    def defer(self, job):
        """An on_demand job being started spawns nothing yet: it listens (the loop watches its sockets)
        until a first connection, which waits in the backlog for a process that it starts.  Its state
        (LISTENING), or None: start it as any job."""
        if not job.config.on_demand or job in self._woken:
            return None
        for name in job.config.sockets:
            jobs = self._listening.setdefault(name, [])
            if job not in jobs:
                jobs.append(job)
            self._manager.loop.set_events(self._held[name].sock, selectors.EVENT_READ,
                                          functools.partial(self._on_connection, name))
        return _JobState.LISTENING

    def undefer(self, job):
        """The job stopped: a start makes it listen again."""
        self._woken.discard(job)
        for name in job.config.sockets:
            jobs = self._listening.get(name, [])
            if job in jobs:
                jobs.remove(job)
            if not jobs and self._listening.pop(name, None) is not None and name in self._held:
                self._manager.loop.set_events(self._held[name].sock, 0)

    def _on_connection(self, name, mask):
        """A first connection: every job that listens on the socket starts, at its count."""
        jobs = self._listening.pop(name, [])
        self._manager.loop.set_events(self._held[name].sock, 0)
        for job in jobs:
            if job.state is not _JobState.LISTENING or not self._manager._loaded(job):
                continue
            self._woken.add(job)
            for other in job.config.sockets:  # its other sockets stop waiting for it
                if job in self._listening.get(other, []):
                    self._listening[other].remove(job)
            try:
                self._manager._start_job(job)
            except ProcessError as exc:
                _log.error("%s", exc.reason)
            self._manager._deps.wake()

    def count(self):
        return len(self._held)

    def describe(self):
        listeners = _tcp_listeners() or {}
        return [self._describe(held, listeners) for held in list(self._held.values())]

    def _describe(self, held, listeners=None):
        info = {"name": held.name, "address": held.bound, "jobs": self.users(held.name)}
        if listeners is not None and held.sock.family != socket.AF_UNIX:
            entry = listeners.get(os.fstat(held.sock.fileno()).st_ino)
            info["waiting"] = entry[1] if entry is not None else None
        return info

    def _close(self, held):
        if self._listening.pop(held.name, None) is not None:
            self._manager.loop.set_events(held.sock, 0)
        held.sock.close()
        if held.made is not None:
            try:
                os.unlink(held.made)
            except OSError:
                pass
        self._manager._publish({"name": held.name, "address": held.address}, "socket_closed")

    def close_all(self):
        """The manager's end (its selector closed already): every socket closed, its unix socket file removed."""
        self._listening.clear()
        for held in list(self._held.values()):
            self._close(held)
        self._held.clear()


# -- Log files (_LogFiles) -------------------------------------------------------------------------
# A job's output written to files: opened once per path however many processes share it, rotated by
# size or by the clock (and gzipped on a thread of its own), reopened on request (logrotate); or sent
# line by line to the syslog or the journal.  Loop thread (the compressor: its own thread).

def _shift_backups(path, backups):
    """Make room for a new .1: .1 becomes .2 (and .1.gz .2.gz)... and what is past `backups`, of either
    kind, goes.  One file per number: a plain one and a gzipped one of the same number never stay both."""
    for index in range(backups, 0, -1):
        for ext in ("", ".gz"):
            source, target = "%s.%d%s" % (path, index, ext), "%s.%d%s" % (path, index + 1, ext)
            if os.path.exists(source):
                os.replace(source, target)
                other = "%s.%d%s" % (path, index + 1, ".gz" if not ext else "")
                if os.path.exists(other):
                    os.unlink(other)
    for ext in ("", ".gz"):
        if os.path.exists("%s.%d%s" % (path, backups + 1, ext)):
            os.unlink("%s.%d%s" % (path, backups + 1, ext))


def _next_boundary(rotate, now):
    """When an hourly or daily log file rotates next (epoch seconds, the local clock's), or None."""
    if rotate == "size":
        return None
    import datetime
    local = datetime.datetime.fromtimestamp(now)
    if rotate == "hourly":
        return _local_epoch(local.replace(minute=0, second=0, microsecond=0) + datetime.timedelta(hours=1))
    return _local_epoch(datetime.datetime.combine(local.date() + datetime.timedelta(days=1), datetime.time()))


class _Compressor(_Worker):
    """Rotated files to gzip, one after the other: the loop only renames the file aside (submit(path,
    aside, backups)), and this worker makes it .1.gz, shifting the older ones first."""

    name = "gaffer-compress"

    def handle(self, path, aside, backups):
        try:
            if backups:
                _shift_backups(path, backups)
                os.replace(self._gzipped(path, aside), path + ".1.gz")
            os.unlink(aside)
        except OSError as exc:
            _log.error("cannot compress the rotated log file %s: %s", path, exc.strerror or exc)

    @staticmethod
    def _gzipped(path, aside):
        """A gzipped copy of `aside` beside path, in a file made exclusively under an unpredictable name
        (mkstemp: O_EXCL, O_NOFOLLOW), so that nobody who may write in that directory can steer it."""
        import gzip
        import shutil
        import tempfile
        fd, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".gz.tmp",
                                         dir=os.path.dirname(path) or ".")
        try:
            os.fchmod(fd, 0o644)  # as the log file itself
            with os.fdopen(fd, "wb") as raw, open(aside, "rb") as source, \
                    gzip.GzipFile(os.path.basename(path) + ".1", "wb", fileobj=raw) as target:
                shutil.copyfileobj(source, target, 1 << 20)
        except BaseException:
            os.unlink(temporary)
            raise
        return temporary

class _LogFile:
    """A log file that processes share: complete lines appended, renamed .1 (.1 to .2...) past
    max_bytes, reopened on demand.  A write that fails (a full disk) drops its lines and counts
    them: the loop never waits on a disk for longer than a write to the page cache."""

    def __init__(self, path, max_bytes, backups, rotate="size", compressor=None, wall=time.time):
        self.path = path
        self.limit = max_bytes if path != "-" and rotate == "size" else 0  # as configured
        self.max_bytes = self.limit  # what rotates this file: 0 for one that is not a regular file
        self.backups = backups
        self.rotate = rotate if path != "-" else "size"
        self.compressor = compressor  # gzips what rotates, or None
        self.boundary = None  # an hourly or daily file's next rotation (on the `wall` clock)
        self._wall = wall
        self.users = 0    # processes writing to it: closed when none is left
        self.fd = None
        self.size = 0
        self.failing = False  # the last write failed: warned once
        self._open()

    def _open(self):
        if self.path == "-":
            self.fd = 1  # the process's stdout, whatever sys.stdout was replaced with
            return
        if os.path.dirname(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # Non-blocking: a FIFO without a reader is an error at once, and a full one drops lines
        # (counted) instead of stopping the loop; a regular file never blocks either way.
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        info = os.fstat(self.fd)
        self.size = info.st_size
        # A FIFO, /dev/null, a terminal: written, never renamed (bpo-45401).
        regular = stat.S_ISREG(info.st_mode)
        self.max_bytes = self.limit if regular else 0
        self.boundary = _next_boundary(self.rotate, self._wall()) if regular else None

    def write(self, data, proc=None, label=None):
        """Append data (complete lines); return how many lines were dropped.  Past max_bytes the
        file is rotated between two lines: no file is larger, unless one line is; an hourly or daily
        one, before the first line past its hour or midnight."""
        dropped = 0
        if self.boundary is not None and self._wall() >= self.boundary:
            self.reopen(rotate=True)
        while self.max_bytes and self.size + len(data) > self.max_bytes:
            room = self.max_bytes - self.size  # may be negative: a long line went past it
            fit = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
            if not fit and not self.size:  # a line longer than a whole file gets one of its own
                fit = data.find(b"\n") + 1
            dropped += self._append(data[:fit])
            data = data[fit:]
            if not data:
                return dropped
            self.reopen(rotate=True)
        return dropped + self._append(data)

    def _append(self, data):
        view = memoryview(data)
        try:
            if self.fd is None:
                raise OSError("the file is not open")
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self.size += written
        except OSError as exc:
            if not self.failing:
                _log.error("cannot write to log file %s (%s): dropping lines until it works again", self.path,
                           exc.strerror or exc)
            self.failing = True
            return bytes(view).count(b"\n")
        self.failing = False
        return 0

    def reopen(self, rotate=False):
        """Open the file again (after an outside logrotate moved it), renaming it first if rotate."""
        if self.path == "-":
            return
        self.close()
        try:
            if rotate and (self.max_bytes or self.boundary is not None):
                if self.compressor is not None:  # renamed aside now, gzipped as .1.gz on its thread
                    aside = "%s.%d.%s.rotating" % (self.path, os.getpid(), os.urandom(4).hex())
                    os.replace(self.path, aside)
                    self.compressor.submit(self.path, aside, self.backups)
                elif self.backups:
                    _shift_backups(self.path, self.backups)
                    os.replace(self.path, self.path + ".1")
                else:
                    os.unlink(self.path)
            self._open()
        except OSError as exc:
            _log.error("cannot reopen log file %s: %s", self.path, exc.strerror or exc)

    def close(self):
        if self.fd is not None and self.path != "-":
            os.close(self.fd)
        self.fd, self.size = None, 0


class _LogSocket:
    """The syslog or the journal, as a log file: each line one datagram to its socket, tagged with the
    process's job and slot, its priority from its output (stderr: err, else info).  A datagram the
    socket cannot take now (full, or no daemon) is dropped and counted: the loop never waits."""

    def __init__(self, kind, address):
        self.path = "%s:%s" % (kind, address)
        self.kind, self.address = kind, address
        self.users = 0
        self.failing = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def write(self, data, proc, label):
        lines = data[:-1].split(b"\n")
        priority = 3 if label != "out" and label == proc.config.redirect_output[-1] and \
            len(set(proc.config.redirect_output)) == 2 else 6  # stderr's own label: err; stdout or both: info
        tag = "%s.%s" % (proc.config.name, proc.slot)
        if self.kind == "syslog":  # RFC 3164, as glibc's syslog(3) sends it: facility daemon (3)
            head = ("<%d>%s %s[%d]: " % (3 * 8 + priority, time.strftime("%b %e %H:%M:%S"), tag, proc.os_pid)).encode()
            datagrams = [head + line for line in lines]
        else:  # journald's native protocol: KEY=value lines (a line holds no newline)
            fields = ("PRIORITY=%d\nSYSLOG_IDENTIFIER=%s\nSYSLOG_PID=%d\nGAFFER_JOB=%s\nGAFFER_SLOT=%d\n"
                      "GAFFER_STREAM=%s\n" % (priority, tag, proc.os_pid, proc.name, proc.slot, label)).encode()
            datagrams = [fields + b"MESSAGE=" + line + b"\n" for line in lines]
        dropped = 0
        for datagram in datagrams:
            try:
                self.sock.sendto(datagram, self.address)
                self.failing = False
            except OSError as exc:
                if not self.failing and not isinstance(exc, BlockingIOError):
                    _log.error("cannot send to the %s at %s (%s): dropping lines until it works again", self.kind,
                               self.address, exc.strerror or exc)
                self.failing = True
                dropped += 1
        return dropped

    def reopen(self, rotate=False):
        pass  # a datagram socket: nothing to reopen

    def close(self):
        self.sock.close()


class _LogFiles:
    """The log files of the manager's processes, by path: the processes whose log_file names the same
    file share it, and the last one out closes it.  Loop thread only."""

    def __init__(self, wall=time.time):
        self._files = {}  # path -> _LogFile
        self._compressor = None  # made when a log_compress file first rotates
        self._wall = wall  # the clock an hourly or daily file rotates by (the loop's wall clock)

    def open(self, proc):
        """{label: _LogFile} of a new process, opened (or shared) now; OSError names the file."""
        config, logs = proc.config, {}
        if config.log_file is None:
            return logs
        try:
            for label in dict.fromkeys(config.redirect_output):
                path, socket_sink = config.log_file, _log_socket(config.log_file)
                if socket_sink is not None:
                    path = "%s:%s" % socket_sink
                elif path != "-":
                    path = os.path.abspath(path.format(session=proc._job.session, name=config.name, slot=proc.slot,
                                                       pid=proc.pid, label=label))
                log = self._files.get(path)
                if log is None:
                    try:
                        log = self._files[path] = _LogSocket(*socket_sink) if socket_sink else _LogFile(
                            path, config.log_max_bytes, config.log_backups, config.log_rotate,
                            self._compressor_for(config), self._wall)
                    except OSError as exc:
                        raise OSError("cannot open log file %s: %s" % (path, exc.strerror or exc)) from None
                log.users += 1
                logs[label] = log
        except OSError:
            self.release(logs)
            raise
        return logs

    def _compressor_for(self, config):
        if not config.log_compress:
            return None
        if self._compressor is None:
            self._compressor = _Compressor()
        return self._compressor

    def release(self, logs):
        """A process is done with its {label: _LogFile}."""
        for log in logs.values():
            log.users -= 1
            if not log.users:
                log.close()
                del self._files[log.path]

    def reopen(self):
        """Open every file again, as after a logrotate that moved them away."""
        for log in list(self._files.values()):
            log.reopen()


# -- Process ---------------------------------------------------------------------------------------
# One OS child and its descriptors.  The loop thread changes it; other threads
# read its fixed attributes or go through the manager.

class _State(enum.Enum):
    NEW = "new"             # made, not spawned yet
    STARTING = "starting"   # spawned; its readiness check has not passed yet
    READY = "ready"
    STOPPING = "stopping"
    EXITED = "exited"


_TRANSITIONS = {
    _State.NEW: {_State.STARTING},                                    # spawn
    _State.STARTING: {_State.READY, _State.STOPPING, _State.EXITED},  # ready, stop_process or reap, exit
    _State.READY: {_State.STOPPING, _State.EXITED},
    _State.STOPPING: {_State.EXITED},
    _State.EXITED: set(),
}
_ALIVE = frozenset({_State.STARTING, _State.READY})  # counted, signalled, listed
# The event of each move, and the topics it goes out on ({job}: session.name, {pid}: the manager's id).
_MOVE_EVENTS = {
    "spawn": ("spawn", "job.{job}.spawn", "proc.{pid}.spawn"),
    "ready": ("ready", "job.{job}.ready", "proc.{pid}.ready"),
    "stop_process": ("stop_process", "proc.{pid}.stop"),
    "reap": ("reap", "job.{job}.reap", "proc.{pid}.reap"),
    "exit": ("exit", "job.{job}.exit", "proc.{pid}.exit"),
}


class _Output:
    """One output label of a process, cut into complete lines once, here.  The lines go on to the log
    file, the readiness regex and the job's LOGS channels; the last `limit` bytes of them stay in
    memory (the tail), also after the exit.  A line still unfinished after _LINE_MAX bytes is cut there."""

    __slots__ = ("label", "limit", "partial", "tail", "size")

    def __init__(self, label, limit):
        self.label = label
        self.limit = limit
        self.partial = b""
        self.tail = None  # deque of (time, complete lines), made when output first arrives
        self.size = 0

    def feed(self, data, now, whole=True):
        """The complete lines that data ends (as one bytes, each with its newline), or b"".  Unless
        whole, nobody reads them now: only what the tail keeps is cut (a flood costs no copy)."""
        cut = data.rfind(b"\n") + 1
        if cut:
            block, rest = self.partial + data[:cut], data[cut:]
        else:
            block, rest = b"", self.partial + data
        if len(rest) > _LINE_MAX:  # a child that never writes a newline costs bounded memory
            end = len(rest) - len(rest) % _LINE_MAX
            first = 0 if whole else max(0, end - _LINE_MAX * (self.limit // _LINE_MAX + 1))
            block += b"".join(rest[at:at + _LINE_MAX] + b"\n" for at in range(first, end, _LINE_MAX))
            rest = rest[end:]
        self.partial = rest
        if block and self.limit:
            self._keep(block, now)
        return block if whole else b""

    def close(self, now):
        """The stream ended: its unfinished last line, as a complete one (or b"")."""
        block, self.partial = (self.partial + b"\n" if self.partial else b""), b""
        if block and self.limit:
            self._keep(block, now)
        return block

    def _keep(self, block, now):
        if len(block) > self.limit:  # a big read: only its last lines that fit (or the end of its last line)
            start = block.find(b"\n", len(block) - self.limit - 1) + 1
            block = block[start:] if start < len(block) else block[-self.limit:]
        if self.tail is None:
            self.tail = collections.deque()
        self.tail.append((now, block))
        self.size += len(block)
        while self.size - len(self.tail[0][1]) >= self.limit:
            self.size -= len(self.tail.popleft()[1])

    def lines(self):
        """[(time, line without its newline)] of the tail, oldest first, with an unfinished line last."""
        kept = [(when, line) for when, block in (self.tail or ()) for line in block[:-1].split(b"\n")]
        return kept + ([(time.time(), self.partial)] if self.partial else [])


def _by_slot(proc):
    """The order processes are listed in: web.1, web.2..., then those commit() started (slot 0)."""
    return (not proc.slot, proc.slot, proc.pid)


def _last_lines(procs, count=None, label=None):
    """The last `count` lines (all, for None) kept of these processes' outputs (or of one label),
    oldest first: [(time, process, label, line)].  Loop thread."""
    rows = [(when, proc, name, line) for proc in procs for name, output in proc._outputs.items()
            if label in (None, name) for when, line in output.lines()]
    rows.sort(key=lambda row: row[0])  # stable: a process's lines keep their order
    return rows if count is None else rows[len(rows) - count:] if count else []


class _Pipe:
    """One non-blocking descriptor of a process in the selector: a pipe, or a socketpair end.

    Reads are passed to on_read(label, data) while `label` is set; writes are
    queued and flushed whenever the descriptor is writable, so no caller and no
    slow reader ever blocks the loop.  Loop thread only.
    """

    def __init__(self, loop, fileobj, label=None, on_read=None):
        self.file = fileobj
        self.fd = fileobj.fileno()
        self.label = label
        self.closed = False
        self.dropped = 0  # bytes queued for writing and thrown away at close
        self._loop = loop
        self._on_read = on_read
        self._pending = collections.deque()
        self._pending_bytes = 0
        self._mask = 0
        self._read_size = _READ_MIN
        os.set_blocking(self.fd, False)
        self._watch()

    def _watch(self):
        mask = (selectors.EVENT_READ if self.label else 0) | (selectors.EVENT_WRITE if self._pending else 0)
        if mask != self._mask:
            self._loop.set_events(self.fd, mask, self._ready)
            self._mask = mask

    def _ready(self, mask):
        if mask & selectors.EVENT_READ and self.label:
            self._read()
        if mask & selectors.EVENT_WRITE and not self.closed:
            self._flush()

    def _read(self):
        """Read once and pass the bytes on: return them, b"" at end of file (then closed), None if none."""
        try:
            data = os.read(self.fd, self._read_size)
        except BlockingIOError:
            return None
        except OSError:  # ECONNRESET on a socket the child dropped
            data = b""
        if not data:
            self.close()
            return data
        if len(data) == self._read_size < _READ_MAX:
            self._grow()
        self._on_read(self.label, data)
        return data

    def _grow(self):
        # A full read means a busy writer: take more per read, and let the pipe hold as much
        # (a pipe grows only once busy, since every pipe counts against a per-user limit).
        self._read_size = _READ_MAX
        if _F_SETPIPE_SZ is not None:
            try:
                fcntl.fcntl(self.fd, _F_SETPIPE_SZ, _READ_MAX)
            except OSError:  # a socket, or over the limit: reads are larger all the same
                pass

    def drain(self):
        """Read what is buffered now (bounded, since a leftover writer may go on)."""
        budget = _DRAIN_LIMIT
        while self.label and budget > 0:
            data = self._read()
            if not data:
                return
            budget -= len(data)

    def write(self, data):
        if self.closed:  # the child closed its end earlier in this send: dropped, as on EPIPE
            self.dropped += len(data)
            return
        self._pending.append(memoryview(data))
        self._pending_bytes += len(data)
        self._flush()

    def _flush(self):
        pending = self._pending
        while pending:
            chunk = pending[0]
            try:
                written = os.write(self.fd, chunk)
            except BlockingIOError:
                break
            except OSError as exc:  # EPIPE: the child closed its end
                _log.warning("write to fd %d failed (%s); %d bytes dropped", self.fd, exc, self._pending_bytes)
                self.close()
                return
            self._pending_bytes -= written
            if written == len(chunk):
                pending.popleft()
            else:
                pending[0] = chunk[written:]
        self._watch()

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.label = None
        self._pending.clear()
        self.dropped += self._pending_bytes
        self._pending_bytes = 0
        self._loop.set_events(self.fd, 0)
        self.file.close()


class Stream:
    """A custom stream of a process (ProcessConfig.custom_streams), from any thread.

    The child inherited the other end of a socketpair; it finds the descriptor's
    number in ``$GAFFER_STREAM_<LABEL>``.  write() queues bytes for the child;
    monitor(listener) receives what it writes as ``listener(label, msg)``.
    """

    def __init__(self, process, label):
        self.process = process
        self.label = label

    def __repr__(self):
        return "<Stream %r of %r>" % (self.label, self.process)

    def write(self, data):
        """Queue str (UTF-8) or bytes for the child."""
        self.process.write(data, self.label)

    def writelines(self, lines):
        """Queue each of `lines` (str or bytes), in order."""
        self.process.writelines(lines, self.label)

    def monitor(self, listener):
        """Call ``listener(label, msg)`` with each chunk the child writes; msg has name, pid, data."""
        self.process.monitor_io(self.label, listener)

    def unmonitor(self, listener):
        """Stop a monitor() listener."""
        self.process.unmonitor_io(self.label, listener)


class Process:
    """One OS child of a job.

    Fixed at spawn, readable from any thread: ``pid`` (the manager's id),
    ``os_pid``, ``name`` ("session.job"), ``slot`` (1 to numprocesses, unique
    among the job's running processes; 0 for commit()), ``cmd``, ``args``,
    ``once`` (started by commit()), ``create_time`` (wall clock).  The methods and the ``info``,
    ``status`` and ``active`` properties may be called from any thread.
    """

    def __init__(self, manager, pid, job, once=False, env=None, graceful_timeout=None, slot=0):
        config = job.config
        self.pid = pid
        self.name = job.name
        self.slot = slot
        self.config = config
        self.once = once
        self.graceful_timeout = config.graceful_timeout if graceful_timeout is None else graceful_timeout
        if config.port is not None and slot:
            if config.port + slot - 1 > 65535:
                raise ProcessError(400, "job %r cannot start a process in slot %d: its $PORT would be %d, past 65535"
                                   % (job.name, slot, config.port + slot - 1))
            env = {"PORT": str(config.port + slot - 1), **(env or {})}
        try:
            self.env = _child_env(config, {**(env or {}), **_socket_env(config.sockets)})
        except ValueError as exc:  # an env file gone or broken since the job was loaded
            raise ProcessError(400, "job %r cannot start: %s" % (job.name, exc)) from None
        self._own_env = {**config.env, **(env or {})}  # what info shows: never the inherited environment
        self.argv = _command_line(config, self.env)
        self.cmd = config.cmd
        self.args = self.argv[1:] if not config.shell else list(config.args)
        self.os_pid = None
        self.create_time = None
        self.streams = {label: Stream(self, label) for label in config.custom_streams}
        self._manager = manager
        self._job = job
        self._state = _State.NEW
        self._spawned_at = None    # loop time of the spawn
        self._outputs = {}         # label -> _Output of each output label
        self._logs = {}            # label -> _LogFile, where the job has a log_file
        self._signalled = False    # the manager sent it a signal (kill, killall): not a failure
        self._popen = None
        self._pipes = []
        self._stdin = None
        self._io = EventEmitter()
        self._streams = {}        # label -> _Pipe of each custom stream

    def __repr__(self):
        return "<Process %r pid=%s os_pid=%s %s>" % (self.name, self.pid, self.os_pid, self._state.name)

    @property
    def label(self):
        """How the command line shows it: its job's name and slot (web.1); a commit's has its job's name."""
        return _slot_label(self.config.name, self.slot)

    def _spawn(self, loop, prepare):
        """Start the OS process (Popen raises in the parent if exec or cwd fails); prepare(process, env,
        uid) first adds what its checks need (_Checks.prepare)."""
        config = self.config
        labels = config.redirect_output
        stderr = subprocess.DEVNULL
        if len(labels) == 2:
            stderr = subprocess.STDOUT if labels[0] == labels[1] else subprocess.PIPE
        user, group, groups = _credentials(config)
        env = dict(self.env)
        # Inherited by its descendants, so that they can be found even once they left its group.
        env.update(GAFFER_JOB=self.name, GAFFER_PROCESS=self._manager._containment.mark(self),
                   GAFFER_PROCESS_NAME=self.label)  # web.1, as honcho's HONCHO_PROCESS_NAME
        ours, theirs = {}, []
        self._outputs = {label: _Output(label, config.tail_bytes) for label in labels}
        try:
            prepare(self, env, user)
            self._logs = self._manager._log_files.open(self)
            for label in config.custom_streams:
                parent_end, child_end = socket.socketpair()
                ours[label] = parent_end
                theirs.append(child_end)
                env["GAFFER_STREAM_" + label.upper()] = str(child_end.fileno())
            fds, umask = self._manager._sockets.fds(config.sockets), config.umask
            entry = self._manager._containment.entry(self, None if fds or config.rlimits else user)  # root: see below
            argv = _launch_argv(self.argv, *entry, fds, (user, group, groups, umask), config.rlimits)
            if argv is not self.argv:  # the launcher execs the program, and could only print why it cannot
                _check_program(self.argv[0], env, config.cwd)
            if fds or config.rlimits:  # the Python launcher, root, enters the cgroup and drops to the user itself
                user = group = groups = umask = None
            self._popen = subprocess.Popen(
                argv, cwd=config.cwd, env=env, close_fds=True, start_new_session=True,
                pass_fds=[s.fileno() for s in theirs] + fds, user=user, group=group, extra_groups=groups,
                umask=-1 if umask is None else umask,
                stdin=subprocess.PIPE if config.redirect_input else subprocess.DEVNULL,
                stdout=subprocess.PIPE if labels else subprocess.DEVNULL, stderr=stderr)
        except BaseException:
            for sock in ours.values():
                sock.close()
            self._manager._log_files.release(self._logs)
            self._logs = {}
            raise
        finally:
            for sock in theirs:
                sock.close()
        self.os_pid = self._popen.pid
        self.create_time = time.time()
        self._spawned_at = loop.time()
        on_read = self._on_output
        popen = self._popen
        if popen.stdout is not None:
            self._pipes.append(_Pipe(loop, popen.stdout, labels[0], on_read))
        if popen.stderr is not None:
            self._pipes.append(_Pipe(loop, popen.stderr, labels[1], on_read))
        if popen.stdin is not None:
            self._stdin = _Pipe(loop, popen.stdin)
            self._pipes.append(self._stdin)
        for label, sock in ours.items():
            self._streams[label] = _Pipe(loop, sock, label, on_read)
            self._pipes.append(self._streams[label])

    def _set_state(self, new):
        if new not in _TRANSITIONS[self._state]:
            raise RuntimeError("%r cannot go from %s to %s" % (self, self._state.name, new.name))
        self._state = new

    def _on_output(self, label, data):
        self._io.publish(label, {"name": self.name, "pid": self.pid, "data": data})
        output = self._outputs.get(label)  # None for a custom stream: raw bytes only
        if output is not None:
            now = time.time()
            block = output.feed(data, now, bool(self._logs or self._job.followers or
                                                self._manager._checks.wants_lines(self)))
            if block:
                self._on_lines(label, block, now)

    def _on_lines(self, label, block, now):
        """Complete lines of an output (block: each ends with a newline) to whatever reads lines."""
        log = self._logs.get(label)
        if log is not None:
            prefix = b""
            if self.config.log_timestamps and isinstance(log, _LogFile):  # the syslog and journal stamp lines
                import datetime
                stamp = datetime.datetime.fromtimestamp(now).astimezone()
                prefix = stamp.isoformat("T", "milliseconds").encode() + b" "
            if log.path == "-":
                prefix += ("%s | " % self.label).encode()
            written = prefix + block[:-1].replace(b"\n", b"\n" + prefix) + b"\n" if prefix else block
            self._job.log_dropped += log.write(written, self, label)
        checks = self._manager._checks
        followers, awaits = self._job.followers, checks.wants_lines(self)
        if not followers and not awaits:
            return
        lines = [line.decode("utf-8", "replace") for line in block[:-1].split(b"\n")]
        for channel, only in tuple(followers.items()):  # a listener may close its channel inline
            if only not in (None, self.pid):
                continue
            for line in lines:
                channel._put("line", {"time": now, "pid": self.pid, "slot": self.slot, "label": label,
                                      "line": line})
        if awaits:
            checks.saw_lines(self, lines)

    @property
    def _reaped(self):
        """The child exited and was reaped: its pid may be another process's by now."""
        return self._popen is not None and self._popen.returncode is not None

    def _wants_respawn(self, exit_status, term_signal):
        """Its restart policy, as it exited unasked: always, never, or on a failure (a bad status, or a
        signal the manager did not send)."""
        restart = self.config.restart
        if restart != "on-failure":  # a scheduled run ends with its process: "always" reads as "never"
            return restart == "always" and not _scheduled(self.config)
        if term_signal:
            return not self._signalled
        return exit_status not in self.config.success_codes

    def _finish(self):
        """The child was reaped: deliver its last output, close its descriptors, forget its timers.  Its
        move to EXITED, with the exit event, comes after (Manager._move)."""
        for pipe in self._pipes:
            pipe.drain()
        now = time.time()
        for label, output in self._outputs.items():  # an unfinished last line is a line all the same
            rest = output.close(now)
            if rest:
                self._on_lines(label, rest, now)
        self._manager._log_files.release(self._logs)
        self._logs = {}
        dropped = 0
        for pipe in self._pipes:
            pipe.close()
            dropped += pipe.dropped
        if dropped:
            _log.warning("%r exited with %d bytes of input still queued; dropped", self, dropped)
        return dropped

    def _info(self):
        return {
            "pid": self.pid, "name": self.name, "slot": self.slot, "cmd": self.cmd, "args": list(self.args),
            "env": dict(self._own_env), "os_pid": self.os_pid, "create_time": self.create_time,
            "committed": self.once, "commited": self.once,  # the original gaffer's spelling, kept for its readers
            "redirect_output": list(self.config.redirect_output),
            "redirect_input": self.config.redirect_input,
            "custom_streams": list(self.config.custom_streams), "active": self.active,
            "status": self.status, "ready": self.ready, **self._manager._checks.report(self),
        }

    # -- any thread

    @property
    def active(self):
        """True until the process has exited and been reaped."""
        return self._state is not _State.EXITED

    @property
    def status(self):
        """"starting" (its readiness check has not passed yet), "ready", "stopping" or "exited"."""
        return self._state.value

    @property
    def ready(self):
        """True once the readiness check (ProcessConfig.ready) passed, until the process stops."""
        return self._state is _State.READY

    @property
    def info(self):
        """A dict describing the process (DESIGN.md "Manager API")."""
        return self._manager._call(self._info)

    @property
    def stats(self):
        """Resource use: pid, os_pid, cpu %, mem %, rss, vms, mem_info1/2, ctime, num_threads ("N/A" off Linux)."""
        return self._manager._call(self._manager._sampler.sample, self)

    def _send(self, chunks, stream):
        """Queue chunks for its stdin, or a custom stream (loop thread); ProcessError if it has none open."""
        if stream is None:
            pipe = self._stdin
            if pipe is None:
                raise ProcessError(400, "process %d of %r has no stdin pipe (redirect_input is off)"
                                   % (self.pid, self.name))
        else:
            pipe = self._streams.get(stream)
            if pipe is None:
                raise ProcessError(404, "process %d of %r has no stream %r" % (self.pid, self.name, stream))
        if pipe.closed:
            raise ProcessError(400, "the %s of process %d is closed" % (stream or "stdin", self.pid))
        for chunk in chunks:
            pipe.write(chunk)

    def _recent(self, count):
        """{label: the last `count` lines of that output, as bytes} (loop thread): what a STREAM starts with."""
        recent = {}
        for label, output in self._outputs.items():
            lines = [line + b"\n" for _, line in output.lines()][-count:]
            if lines and output.partial:  # the rest of that line comes as it is written
                lines[-1] = lines[-1][:-1]
            if lines:
                recent[label] = b"".join(lines)
        return recent

    def tail(self, label=None, lines=None):
        """The last `lines` lines (all that are kept: ProcessConfig.tail_bytes) of an output label, or of
        every one in time order, as str; also once the process has exited."""
        lines = None if lines is None else _int_setting("lines", lines, 0)
        return self._manager._call(lambda: [line.decode("utf-8", "replace")
                                            for _, _, _, line in _last_lines([self], lines, label)])

    def monitor(self, listener):
        """Call ``listener("stat", stats)`` every Manager.stats_interval seconds until unmonitor() or exit."""
        self._manager._call(self._manager._sampler.watch, self, listener)

    def unmonitor(self, listener):
        """Stop a monitor() listener."""
        self._manager._call(self._manager._sampler.unwatch, self, listener)

    def kill(self, sig):
        """Send a signal (number or name) to the process."""
        self._manager.kill(self.pid, sig)

    def stop(self):
        """Stop the process gracefully; its job replaces it unless it was committed."""
        self._manager.stop_process(self.pid)

    def write(self, data, stream=None):
        """Queue str (UTF-8) or bytes for the process's stdin, or for a custom stream."""
        self._manager.send(self.pid, data, stream)

    def writelines(self, lines, stream=None):
        """Queue each of `lines` (str or bytes) as write() does, in order."""
        self._manager.send(self.pid, list(lines), stream)

    def monitor_io(self, label, listener):
        """Call ``listener(label, msg)`` with each chunk of output read under label ("." for all)."""
        self._io.subscribe(label, listener)

    def unmonitor_io(self, label, listener):
        """Stop a monitor_io listener."""
        self._io.unsubscribe(label, listener)


# -- Lifecycles, slots and jobs (_Slot, _Job) ------------------------------------------------------
# The manager's lifecycle, each job's (an enum that one method changes), its slots, and what the
# manager knows of each loaded job.  Loop thread only.

class _Lifecycle(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _JobState(enum.Enum):
    STOPPED = "stopped"     # not running, as asked (or not started yet)
    STARTING = "starting"   # running: a slot has no ready process yet, or it waits for a dependency
    RUNNING = "running"     # running: every slot has a ready process
    BACKOFF = "backoff"     # running: a slot's respawn waits out its backoff
    RETRYING = "retrying"   # flapping stopped it; it starts again after flapping.retry_in
    FATAL = "fatal"         # flapping stopped it for good, until it is started by hand
    LISTENING = "listening"  # on_demand: started, it spawns at the first connection on its sockets
    BLOCKED = "blocked"     # started, nothing running: a dependency can no longer meet its condition
    SCHEDULED = "scheduled"  # started, with a schedule: it waits for its next run (_Schedules)
    COMPLETED = "completed"  # every slot's process exited and its restart policy left it empty: success
    FAILED = "failed"       # the same, and an exit of this run was no success (not in success_codes)

    @property
    def shown(self):
        """What status(), ps and the dashboard say: a flapping retry is a backoff too."""
        return "backoff" if self is _JobState.RETRYING else self.value


_ACTIVE_JOB = frozenset({_JobState.STARTING, _JobState.RUNNING, _JobState.BACKOFF,
                         _JobState.BLOCKED})  # exits are replaced
_DONE_JOB = frozenset({_JobState.COMPLETED, _JobState.FAILED})  # a one-shot job's run ended


class _Slot:
    """One of a job's numprocesses places, which outlives its processes: its number (the process's
    slot and $PORT), its processes (the newest last: two while one replaces the other), its quick-exit
    streak, and either the timer of a respawn waiting out its backoff, or whether the restart policy
    retired it.  Only the job (_Job) and its slot engine (Manager) change it."""

    __slots__ = ("number", "procs", "streak", "timer", "retired", "last_exit")

    def __init__(self, number):
        self.number = number
        self.last_exit = None  # the exit code of its last process (-N: killed by signal N)
        self.procs = []
        self.streak = 0      # quick exits in a row of the processes in this slot
        self.timer = None    # the respawn after a backoff
        self.retired = False

    @property
    def idle(self):
        """No process, no respawn due, not retired: a spawn may take it."""
        return not self.procs and self.timer is None and not self.retired

    @property
    def state(self):
        """running (it has a process), backoff, exited (retired) or idle."""
        return ("running" if self.procs else "backoff" if self.timer is not None else
                "exited" if self.retired else "idle")

    def __repr__(self):
        return "<Slot %d %s streak=%d>" % (self.number, self.state, self.streak)


class _Job:
    """What the manager knows of a loaded job: its config, its count and slots, its lifecycle, its
    processes, and what they left (history, restarts, last exit).  Loop thread only."""

    def __init__(self, session, config, numprocesses):
        self.session = session
        self.config = config
        self.state = _JobState.STOPPED  # the lifecycle (Manager._job_to changes it, and nothing else)
        self.starting = 0             # processes of the job in STARTING (Manager._move counts them)
        self.ready = 0                # counted processes in READY
        self.running = {}             # pid -> Process counted against numprocesses, oldest first
        self.running_out = {}         # pid -> Process started by commit(), never restarted
        self.stopping = {}            # pid -> Process asked to stop and not yet reaped
        self.slots = {}               # number -> _Slot, for 1..numprocesses and above while one is busy
        self.idle = []                # numbers of idle slots, lowest first (a heap; some may be busy since)
        self.backoff = set()          # slots whose respawn waits out a backoff
        self.retired = set()          # slots the restart policy left empty, until start_job, reload or scale
        self.spawn_timer = None       # the next batch of a large spawn, on the next loop turn
        self.spawning = None          # what a call that waits spawned in earlier batches: a failure stops them
        self.restarts = 0             # respawns after an exit nobody asked for
        self.last_exit = None         # how its last process ended: "exit 3", "signal 9", or None
        self.last_error = None        # why its last spawn failed (a binary or cwd missing), until one succeeds
        self.last_run = None          # {start, end, exit_status, term_signal}: from a spawn into an empty job
        self.run_failed = False       # an exit of the current run was no success (FAILED once it ends)
        self.rollout = None           # a rolling replacement under way (_Rollout)
        self.history = collections.deque(maxlen=_HISTORY)  # the last exited processes with output in their tail
        self.followers = {}           # LOGS channel -> the pid it follows (None: every process): each new line
        self.log_dropped = 0          # lines a log file could not take (a full disk)
        self._count = 0
        self.numprocesses = numprocesses

    @property
    def name(self):
        return _job_name(self.session, self.config.name)

    @property
    def active(self):
        """Exits are replaced: it runs (starting, running or backing off)."""
        return self.state in _ACTIVE_JOB

    @property
    def numprocesses(self):
        """The processes kept alive (scale changes it; reload goes back to config.numprocesses)."""
        return self._count

    @numprocesses.setter
    def numprocesses(self, count):
        self._count = count
        for number in range(1, count + 1):  # the new slots, idle
            if number not in self.slots:
                self.slots[number] = _Slot(number)
                heapq.heappush(self.idle, number)
        for number in [n for n in self.slots if n > count and self.slots[n].idle]:  # those past it go
            del self.slots[number]

    def check_count(self, target):
        """ProcessError (nothing changed) for a count past the job's max_processes."""
        if target > self.config.max_processes:
            raise ProcessError(400, "job %r may run at most %d processes (max_processes), asked for %d"
                               % (self.name, self.config.max_processes, target))

    def count_move(self, proc, was, state):
        """Keep the counts of starting and ready processes as a process moves (Manager._move)."""
        self.starting += (state is _State.STARTING) - (was is _State.STARTING)
        if state is _State.READY and proc.pid in self.running:
            self.ready += 1

    def take(self, number=None):
        """A slot for a new process: `number` (a respawn refills the slot that emptied, a replacement
        takes its old process's), else the lowest idle slot, in O(log n)."""
        if number is None:
            while self.idle and not (self.idle[0] in self.slots and self.slots[self.idle[0]].idle):
                heapq.heappop(self.idle)
            number = self.idle[0] if self.idle else next(n for n in itertools.count(1) if n not in self.slots)
        slot = self.slots.get(number)
        if slot is None:  # past numprocesses (a rollout's process in a slot that is going), or a new one
            slot = self.slots[number] = _Slot(number)
        return slot

    def enter(self, proc):
        """A new process counts, in its slot; into an empty job, it begins a run (last_run)."""
        if not self.running:  # (a process of the last run may still be stopping: it ends with that run)
            self.last_run = {"start": proc.create_time, "end": None, "exit_status": None, "term_signal": None}
            self.run_failed = False
        self.running[proc.pid] = proc
        self.slots[proc.slot].procs.append(proc)

    def ended(self, proc, exit_status, term_signal, asked):
        """A process exited: the job's last exit; for a counted one, its run fails on a status that is no
        success (unless it was asked to stop), and the last one ends the run."""
        self.last_exit = "signal %d" % term_signal if term_signal else "exit %d" % exit_status
        if proc.slot in self.slots:
            self.slots[proc.slot].last_exit = -term_signal if term_signal else exit_status
        if proc.once or self.last_run is None:
            return
        self.run_failed |= not asked and (bool(term_signal) or exit_status not in proc.config.success_codes)
        if not self.running:
            self.last_run.update(end=time.time(), exit_status=exit_status, term_signal=term_signal)

    def announcement(self, state):
        """The event a move into or out of running says: start; completed or failed for a one-shot job or a
        scheduled run that ended; else stop."""
        if state in _ACTIVE_JOB:
            return "start"
        if state in _DONE_JOB or state is _JobState.SCHEDULED:
            return "failed" if self.run_failed else "completed"
        return "stop"

    def lifecycle(self, blocked):
        """The active state its slots and processes say (Manager._job_to), or COMPLETED or FAILED once the
        restart policy left every slot empty; `blocked`: a dependency can no longer meet its condition."""
        if self.backoff:
            return _JobState.BACKOFF
        if not self.running and self._count and len(self.retired) >= self._count and all(
                number in self.slots and self.slots[number].retired for number in range(1, self._count + 1)):
            return (_JobState.SCHEDULED if _scheduled(self.config) else  # a run ended: it waits for the next
                    _JobState.FAILED if self.run_failed else _JobState.COMPLETED)
        if blocked and not self.running:
            return _JobState.BLOCKED
        if self.starting or len(self.running) < self._count:
            return _JobState.STARTING
        return _JobState.RUNNING

    def leave(self, proc):
        """The process no longer counts (it stops or exited): its slot may be idle again."""
        self.stopping.pop(proc.pid, None)
        if proc._state is _State.READY and proc.pid in self.running:
            self.ready -= 1
        if self.running.pop(proc.pid, None) is None:
            self.running_out.pop(proc.pid, None)
            return
        slot = self.slots[proc.slot]
        slot.procs.remove(proc)
        self.settle(slot)

    def settle(self, slot):
        """A slot that may have become idle: offered to the next spawn, or gone if past numprocesses."""
        if slot.idle:
            if slot.number > self._count:
                self.slots.pop(slot.number, None)
            else:
                heapq.heappush(self.idle, slot.number)
                if len(self.idle) > 2 * len(self.slots) + 64:  # stale entries (busy again since): drop them
                    self.idle = sorted(n for n, s in self.slots.items() if s.idle)

    def back_off(self, slot, timer):
        slot.timer = timer
        self.backoff.add(slot)

    def due(self, slot):
        """A slot's backoff ended (its respawn is due, or it was cancelled)."""
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        self.backoff.discard(slot)
        self.settle(slot)

    def retire(self, slot):
        slot.retired = True
        self.retired.add(slot)

    def unretire(self, slot):
        slot.retired = False
        self.retired.discard(slot)
        self.settle(slot)

    def excess(self):
        """Past its count (a scale-down): the retired and backing-off slots above it are freed, and the
        processes to stop returned, the highest slots first (the oldest first among equals: web.1 and its
        $PORT stay); a rollout's new process, counted beyond the count until ready, is kept."""
        for slots, free in ((self.retired, self.unretire), (self.backoff, self.due)):
            for slot in sorted(slots, key=lambda slot: -slot.number):
                if self.taken() <= self._count:
                    break
                free(slot)
        surge = self.rollout.surge if self.rollout is not None and self.rollout.surge in self.running else None
        excess = len(self.running) - self._count - (surge is not None)
        if excess <= 0:
            return []
        return sorted((p for p in self.running.values() if p.pid != surge), key=lambda p: (-p.slot, p.pid))[:excess]

    def taken(self):
        """Counted processes, respawns waiting out a backoff, and slots the restart policy left empty."""
        return len(self.running) + len(self.backoff) + len(self.retired)

    def processes(self):
        return list(self.running.values()) + list(self.running_out.values())

    def status(self, sample, now, waiting, blocked):
        """What status() says of it; sample(proc) gives a process's use, `waiting` the dependencies missing,
        `blocked` why one of them cannot meet its condition (or None)."""
        rows = []
        for proc in sorted(self.processes(), key=_by_slot):
            stats = sample(proc)
            rows.append({"pid": proc.pid, "os_pid": proc.os_pid, "slot": proc.slot, "status": proc.status,
                         "create_time": proc.create_time, "cpu": stats["cpu"], "mem": stats["mem"]})
        return {"name": self.name, "state": self.state.shown, "cmd": " ".join([self.config.cmd] + self.config.args),
                "running": len(rows), "ready": self.ready, "target": self.numprocesses,
                "restarts": self.restarts, "last_exit": self.last_exit, "last_error": self.last_error,
                "blocked": blocked if self.active else None, "last_run": self.last_run,
                "processes": rows, "slots": self.empty_slots(now, waiting),
                "outputs": list(dict.fromkeys(self.config.redirect_output)), "sockets": list(self.config.sockets)}

    def empty_slots(self, now, waiting):
        """Its slots that no process holds now, each with why: [{slot, state, delay}], state "backoff"
        (delay: the seconds until its respawn), "exited" (its restart policy left it empty), "waiting"
        (for a dependency), "blocked" (by one that can no longer meet its condition) or "starting"."""
        if not self.active:
            return []
        idle = "blocked" if self.state is _JobState.BLOCKED else "waiting" if waiting else "starting"
        return [{"slot": slot.number, "state": idle if slot.idle else slot.state,
                 "delay": round(max(0.0, slot.timer.when - now), 3) if slot.timer else None}
                for number, slot in sorted(self.slots.items()) if not slot.procs and number <= self._count]

    def info(self, now, waiting, blocked):
        """What info() says of it (the seed's keys first)."""
        return {
            "name": self.name, "active": self.active, "running": len(self.running) + len(self.running_out),
            "running_out": len(self.running_out), "max_processes": self._count,
            "processes": [p.pid for p in sorted(self.processes(), key=_by_slot)], "config": self.config.to_dict(),
            "ready": self.ready, "numprocesses": self._count, "waiting_for": waiting if self.active else [],
            "blocked": blocked if self.active else None, "state": self.state.shown, "last_run": self.last_run,
            "restarts": self.restarts, "last_exit": self.last_exit, "last_error": self.last_error,
            "backoff": sorted(round(max(0.0, slot.timer.when - now), 3) for slot in self.backoff),
            "log_dropped": self.log_dropped, "sockets": list(self.config.sockets),
        }

    def stats(self, sample):
        """What stats() says of it: each process's use, their sums and extremes ("N/A" without processes)."""
        stats = [sample(proc) for proc in self.processes()]
        result = {"name": self.name, "stats": stats, "restarts": self.restarts}
        for key in ("cpu", "mem"):
            values = [s[key] for s in stats if s[key] != "N/A"]
            result[key] = round(sum(values), 2) if values else "N/A"
            result["max_" + key] = max(values) if values else "N/A"
            result["min_" + key] = min(values) if values else "N/A"
        return result

    def lines(self, count, pid=None):
        """The last `count` lines of its processes' outputs (or of process `pid`), exited ones included:
        [{time, pid, slot, label, line}], oldest first."""
        procs = self.processes() + list(self.stopping.values()) + list(self.history)
        if pid is not None:
            procs = [proc for proc in procs if proc.pid == pid]
        return [{"time": when, "pid": proc.pid, "slot": proc.slot, "label": label,
                 "line": line.decode("utf-8", "replace")} for when, proc, label, line in _last_lines(procs, count)]

    def __repr__(self):
        return "<Job %r %s running=%d/%d>" % (self.name, self.state.name, len(self.running), self.numprocesses)


# -- Guardian --------------------------------------------------------------------------------------
# A small process of its own session that outlives a killed manager: it learns of each
# process group on its stdin, and when that pipe ends without "bye" (the manager died,
# even by SIGKILL), it stops every group it knows, then kills what is left and exits.

_GUARDIAN_BOOT = "import os; exec(os.environ['GAFFER_GUARDIAN'])"
_GUARDIAN = r"""
import os, signal, sys, time
targets = {}  # -pgid (a process group) or pid -> (stop signal, graceful timeout, its cgroup or "-")
for line in sys.stdin:  # until the manager's end of the pipe closes, however the manager ended
    words = line.split(" ")
    if words == ["bye\n"]:  # the manager stopped its jobs itself
        sys.exit()
    if len(words) == 5 and words[0] == "+":
        targets[int(words[1])] = (int(words[2]), float(words[3]), words[4].rstrip("\n"))
    elif len(words) == 2 and words[0] == "-":
        targets.pop(int(words[1]), None)

def members(cgroup):
    try:
        with open(cgroup + "/cgroup.procs") as f:
            return [int(pid) for pid in f.read().split()]
    except (OSError, ValueError):
        return []

def send(target, sig, cgroup):
    alive = False
    for pid in [target] + members(cgroup):
        try:
            os.kill(pid, sig)
            alive = True
        except ProcessLookupError:
            pass
        except OSError:
            alive = True
    return alive

mark = ("GAFFER_PROCESS=%s/" % sys.argv[2]).encode()  # what left its group and its cgroup, if any
longest = max([timeout for _, timeout, _ in targets.values()] + [0])
for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
    try:
        with open("/proc/%s/environ" % entry, "rb") as f:
            pgid = os.getpgid(int(entry)) if mark in f.read() else None
    except (OSError, ValueError):
        continue
    if pgid is not None and -pgid not in targets:
        targets[-pgid] = (signal.SIGTERM, longest, "-")
started = time.monotonic()
targets = {target: (timeout, cgroup) for target, (sig, timeout, cgroup) in targets.items()
           if send(target, sig, cgroup)}
while targets:  # the manager is gone: there is nothing to wait on but the groups emptying
    time.sleep(0.01)
    elapsed = time.monotonic() - started
    for target, (timeout, cgroup) in list(targets.items()):
        if not send(target, signal.SIGKILL if elapsed >= timeout else 0, cgroup) or elapsed >= timeout + 5:
            del targets[target]  # gone, or zombies that nobody reaps after SIGKILL
for base in sys.argv[3:]:  # the manager's cgroups, deepest first
    for path, _, _ in sorted(os.walk(base), key=lambda entry: -entry[0].count("/")):
        try:
            os.rmdir(path)
        except OSError:
            pass
"""


# -- Containment (_Containment) --------------------------------------------------------------------
# Whatever a process starts stops with it: its process group, its cgroup, what left both (found
# through /proc), the groups it leaves behind, the guardian, and the orphans a subreaper adopts.

class _Held:
    """What _Containment knows of one process: its cgroup, and the SIGKILL due at its graceful_timeout."""

    __slots__ = ("cgroup", "kill_timer")

    def __init__(self, cgroup):
        self.cgroup = cgroup
        self.kill_timer = None


_serials = itertools.count(1)  # of the managers of this process: "<os pid>-<serial>" names one on the machine


class _Containment:
    """Every stop path goes through here: stop(proc) sends the stop signal where it goes (the group,
    and what left it but not the cgroup) and SIGKILLs at graceful_timeout; signal(proc, sig) for
    kill and killall; exited(proc) follows what a process left (its group or cgroup, kept until empty
    or SIGKILLed at the same deadline, and what left both).  The guardian is told of every group and
    cgroup; a subreaper reaps what it adopts.  It builds the GAFFER_PROCESS mark.  Loop thread only."""

    def __init__(self, manager, cgroups, subreaper, guardian):
        self.cgroups_setting = cgroups  # "auto", True or False (Manager(cgroups=...))
        self.subreaper = subreaper
        self.guardian_wanted = guardian
        self.cgroups = None             # _Cgroups, made at start where the system allows
        # Names the manager on the machine (GAFFER_PROCESS, its cgroup): PID 1 is in every container.
        self.token = "%d-%d-%s" % (os.getpid(), next(_serials), os.urandom(3).hex())
        self._manager = manager
        self._loop = manager.loop
        self._reaper = manager._reaper
        self._held = {}                 # Process -> _Held, from its spawn to its exit
        self._orphans = {}              # pgid -> (deadline, killed) of a group whose leader exited first
        self._orphan_cgroups = {}       # pgid of such a group -> (the cgroup of its exited leader, its job)
        self._orphan_timer = None
        self._orphan_delay = _ORPHAN_POLL_MIN
        self._sweeps = []               # processes stopped or ended since the last sweep
        self._sweep_timer = None
        self._sweep_next = 0.0          # loop time before which no sweep starts: spaced by what the last cost
        self._led = collections.OrderedDict()  # os pids of recent processes (each led a session): the subreaper's
        self._adopted = set()           # os pids of adopted children watched until they exit
        self._adoption_timer = None
        self._guardian = None           # (Popen, _Pipe to its stdin)
        self._guarded = {}              # target (-pgid, or a pid) -> the line that told the guardian of it
        self._guardian_since = 0.0
        self._guardian_timer = None     # the start of a guardian after one died
        self._to_guardian = []          # lines for the guardian, written at the end of the turn
        self._guardian_flush = None
        self._unloaded = set()          # jobs unloaded while processes of theirs were in cgroups
        self._job_cgroups = collections.Counter()  # job -> its processes' cgroups not yet forgotten
        self._entering = {}             # Process -> (its cgroup, whether the mover moves it), until held
        self._spares = {}               # job -> {slot number: the empty cgroup its next process enters}
        self._mover = _Mover()

    @property
    def kind(self):
        return "group" if self.cgroups is None else "cgroup"

    @property
    def idle(self):
        """No group left behind to wait for, and no look for one due: a manager stop may finish."""
        return not self._orphans and self._sweep_timer is None

    def start(self):
        """At the manager's start: a subreaper if asked, and the manager's cgroup where it can be made."""
        if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:
            _log.warning("SIGCHLD is ignored: the kernel reaps children itself and exit codes will read 0")
        if self.subreaper:
            try:
                _set_subreaper()
            except OSError as exc:
                if os.getpid() != 1:  # PID 1 adopts orphans anyway
                    raise RuntimeError("subreaper=%r: %s" % (self.subreaper, exc)) from None
        self.cgroups = _Cgroups.create(self.cgroups_setting, self.token)

    def mark(self, proc):
        """The GAFFER_PROCESS value a process and its descendants carry: which process of which manager."""
        return "%s/%d" % (self.token, proc.pid)

    def set_limits(self, job, config):
        """Write the job's cgroup limits; ValueError (nothing changed) if this system cannot enforce them."""
        limits = [name for name in _LIMIT_FILES if getattr(config, name) is not None]
        if self.cgroups is not None:
            self.cgroups.set_limits(job, config)
        elif limits:
            raise ValueError("%s needs cgroup containment, which this manager does not have (cgroups=%r%s)"
                             % (limits[0], self.cgroups_setting, ", GAFFER_NO_CGROUP is set"
                                if os.environ.get("GAFFER_NO_CGROUP", "") not in ("", "0") else ""))

    def entry(self, proc, user):
        """How proc's program gets into its slot's cgroup (made, or its spare reused): (its cgroup.procs,
        "enter": the launcher moves itself; "wait": as another user, it stops until the mover moved it),
        or ("", "") without cgroups."""
        if self.cgroups is None:
            return "", ""
        path = self._spares.get(proc._job, {}).pop(proc.slot, None) if proc.slot else None
        try:
            if path is None:
                try:
                    path = self.cgroups.make(proc._job, str(proc.slot))
                except FileExistsError:  # its slot's is in use: a rollout's new process, an old one's leftovers
                    path = self.cgroups.make(proc._job, "%d.%d" % (proc.slot, proc.pid))
        except OSError as exc:
            _log.warning("%r stays out of a cgroup (%s): its process group contains it", proc, exc)
            return "", ""
        moved = user is not None and user != os.geteuid()
        self._entering[proc] = (path, moved)
        return os.path.join(path, "cgroup.procs"), "wait" if moved else "enter"

    def spawn_failed(self, proc):
        """Popen raised: the cgroup made for the process waits for the slot's next one."""
        path, _ = self._entering.pop(proc, (None, False))
        if path is not None:
            self._keep_or_release(path, proc._job, proc.slot)

    def held(self, proc):
        """A new process, in its cgroup (where the manager has them; the mover moves another user's), and
        told to the guardian."""
        cgroup, moved = self._entering.pop(proc, (None, False))
        if moved:
            self._mover.move(proc.os_pid, os.path.join(cgroup, "cgroup.procs"))
        if cgroup is not None:
            self._job_cgroups[proc._job] += 1
        self._held[proc] = _Held(cgroup)
        if self.subreaper:  # its session, which its descendants keep unless they setsid(): how a zombie is known
            self._led[proc.os_pid] = None
            if len(self._led) > _LED_SESSIONS:
                self._led.popitem(last=False)
            if self._adoption_timer is None:
                self._adoption_timer = self._loop.call_later(1.0, self.reap_adopted)
        self._guard(proc)

    def cgroup(self, proc):
        held = self._held.get(proc)
        return held.cgroup if held is not None else None

    # -- the stop paths: one signal, one kill, one question of what is left

    def stop(self, proc):
        """The stop signal to where it goes, SIGKILL at graceful_timeout, and a look for what left its group."""
        self.signal(proc, proc.config.stop_signal, proc.config.stop_children)
        held = self._held[proc]
        held.kill_timer = self._loop.call_later(proc.graceful_timeout, self.kill, proc)
        if proc.config.stop_children and held.cgroup is None:  # in a cgroup, nothing leaves it
            self._sweep_later(proc)

    def signal(self, proc, signum, group):
        """Send a signal to a process, or its group and what left the group but not its cgroup."""
        if not proc._reaped:  # only then is the pid surely still ours
            _send_signal(proc.os_pid, signum, group)
            cgroup = self.cgroup(proc)
            if group and cgroup is not None:
                self._signal_escaped(cgroup, proc.os_pid, signum)
            self._reaper.expect_exit()

    def kill(self, proc):
        """A stopping process outlived graceful_timeout: SIGKILL (its group and cgroup too, with stop_children)."""
        held = self._held.get(proc)
        if held is None:
            return
        held.kill_timer = None
        if not proc._reaped:
            _send_signal(proc.os_pid, signal.SIGKILL, proc.config.stop_children)
            if proc.config.stop_children and held.cgroup is not None:
                _cgroup_kill(held.cgroup)
            self._reaper.expect_exit()

    def forward(self, signum):
        """Init mode: a signal sent to gaffer goes on to every process it runs, where its stop signal goes
        (its group, with stop_children: a Procfile's shell and the program it runs)."""
        for proc in list(self._held):
            self.signal(proc, signum, proc.config.stop_children)

    def kill_everything(self):
        """SIGKILL every process and every group left behind now (a second Ctrl-C)."""
        for proc in list(self._held):
            self.signal(proc, signal.SIGKILL, proc.config.stop_children)
        for pgid in list(self._orphans):
            self._orphans[pgid] = (0.0, False)  # due now
        self._watch_orphans()

    def exited(self, proc, asked):
        """A process was reaped: what is left of its group or cgroup is asked too (unless it was asked
        with it) and SIGKILLed at the same deadline; what left both is looked for."""
        held = self._held.pop(proc)
        kill_timer, cgroup = held.kill_timer, held.cgroup
        if kill_timer is not None:
            kill_timer.cancel()
        if proc.config.stop_children and self.alive({proc.os_pid: cgroup}):
            if kill_timer is None:
                _send_signal(proc.os_pid, proc.config.stop_signal, group=True)
                if cgroup is not None:
                    self._signal_escaped(cgroup, proc.os_pid, proc.config.stop_signal)
            deadline = kill_timer.when if kill_timer is not None else self._loop.time() + proc.graceful_timeout
            self._orphans[proc.os_pid] = (deadline, False)
            if cgroup is not None:
                self._orphan_cgroups[proc.os_pid] = (cgroup, proc._job)
            self._watch_orphans()
        else:
            self._forget_group(proc.os_pid, self._target(proc), cgroup, proc._job, proc.slot,
                               empty=proc.config.stop_children)  # as alive() just found
        if proc.config.stop_children and cgroup is None:  # asked or not (a daemon may fork after the stop's
            self._sweep_later(proc)   # look): what left its group ends with it; in a cgroup, nothing leaves it
        if self.subreaper:  # its orphans are ours now: one look for the exits of the next moments
            due = self._loop.time() + _SWEEP_SPACING
            if self._adoption_timer is None or self._adoption_timer.when > due:
                if self._adoption_timer is not None:
                    self._adoption_timer.cancel()
                self._adoption_timer = self._loop.call_at(due, self.reap_adopted)

    def unloaded(self, job):
        """The job was unloaded: its cgroup goes, now or with the last of its processes."""
        if self.cgroups is None:
            return
        for path in self._spares.pop(job, {}).values():
            self.cgroups.release(path)
        if self._job_cgroups[job]:
            self._unloaded.add(job)
        else:
            self.cgroups.release(self.cgroups.job_dir(job))

    def trim(self, job):
        """The job stopped or shrank: the spare cgroups of its slots that went (or of all, stopped) go too."""
        spares = self._spares.get(job)
        for number in [n for n in spares or () if not job.active or n not in job.slots]:
            self.cgroups.release(spares.pop(number))

    def _keep_or_release(self, path, job, slot, empty=False):
        """An emptied cgroup: kept for the slot's next process while the slot stays, else removed."""
        spares = self._spares.get(job, {})
        stays = slot and job.active and slot in job.slots and slot <= job.numprocesses and job not in self._unloaded
        if not stays and slot in spares:
            self.cgroups.release(spares.pop(slot))
        if stays and slot not in spares and (empty or not _cgroup_populated(path)):
            self._spares.setdefault(job, spares)[slot] = path
        else:
            self.cgroups.release(path)

    @staticmethod
    def _signal_escaped(cgroup, pgid, signum):
        """Signal what left the process group (setsid) but not the cgroup; the group had it already."""
        for pid in _cgroup_members(cgroup):
            try:
                if os.getpgid(pid) != pgid:
                    os.kill(pid, signum)
            except OSError:  # exited meanwhile
                pass

    @staticmethod
    def alive(groups):
        """The groups among {pgid: its cgroup or None} that still hold a live process: the one question
        each containment layer answers, the cgroup through cgroup.procs (its group is in it: the program
        started inside), a group alone through kill(0) and /proc."""
        live = {pgid for pgid, cgroup in groups.items() if cgroup is not None and _cgroup_populated(cgroup)}
        live.update(_live_groups([pgid for pgid, cgroup in groups.items() if cgroup is None]))
        return live

    def _forget_group(self, pgid, target, cgroup, job=None, slot=0, empty=False):
        """A process's group and cgroup are empty (or given up on): the guardian forgets them, the cgroup
        waits for the slot's next process or goes."""
        self._unguard(target)
        if cgroup is not None:
            self._orphan_cgroups.pop(pgid, None)
            self._keep_or_release(cgroup, job, slot, empty)
            self._job_cgroups[job] -= 1
            if not self._job_cgroups[job]:
                del self._job_cgroups[job]
                if job in self._unloaded:
                    self._unloaded.discard(job)
                    self.cgroups.release(self.cgroups.job_dir(job))  # the last one out of an unloaded job

    def _watch_orphans(self):
        """Recheck the groups left behind soon, then less and less often: no descriptor tells when one empties."""
        self._orphan_delay = _ORPHAN_POLL_MIN
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
        self._orphan_timer = self._loop.call_later(_ORPHAN_POLL_MIN, self._on_orphan_check)

    def _on_orphan_check(self):
        """Forget the groups that emptied, SIGKILL those past their deadline, give up on those SIGKILL left."""
        self._orphan_timer = None
        now = self._loop.time()
        live = self.alive({pgid: self._orphan_cgroups.get(pgid, (None,))[0] for pgid in self._orphans})
        for pgid, (deadline, killed) in list(self._orphans.items()):
            cgroup, job = self._orphan_cgroups.get(pgid, (None, None))
            if pgid not in live:
                del self._orphans[pgid]
                self._forget_group(pgid, -pgid, cgroup, job)
            elif now < deadline:
                continue
            elif not killed:
                _send_signal(pgid, signal.SIGKILL, group=True)
                if cgroup is not None:
                    _cgroup_kill(cgroup)
                self._orphans[pgid] = (now + _ORPHAN_GIVE_UP, True)
            else:  # zombies that no one reaps (a PID namespace without init, say): a stop must still finish
                _log.warning("process group %d is still there %gs after SIGKILL; no longer waiting for it",
                             pgid, _ORPHAN_GIVE_UP)
                del self._orphans[pgid]
                self._forget_group(pgid, -pgid, cgroup, job)
        if self._orphans:
            self._orphan_delay = min(self._orphan_delay * 2, _ORPHAN_POLL_MAX)
            due = min(deadline for deadline, _ in self._orphans.values())
            self._orphan_timer = self._loop.call_at(min(now + self._orphan_delay, max(due, now)), self._on_orphan_check)
        self._manager._stop_if_done()

    # -- what left the group: found through /proc, one look for many stops and exits

    def _sweep_later(self, proc):
        """Look for what left proc's group soon: one look through /proc for all that stopped or ended
        meanwhile (the looks spaced by their cost)."""
        if not sys.platform.startswith("linux"):
            return
        self._sweeps.append(proc)
        now = self._loop.time()
        due = max(now, self._sweep_next) if self._held else now  # the last one out: nothing more to batch
        if self._sweep_timer is not None and self._sweep_timer.when > due:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        if self._sweep_timer is None:
            self._sweep_timer = self._loop.call_at(due, self._sweep)

    def _sweep(self):
        """Stop what left the groups (setsid) of processes without a cgroup, found through /proc."""
        self._sweep_timer = None
        procs, self._sweeps = {p.os_pid: p for p in self._sweeps}, []
        marks = {("GAFFER_PROCESS=%s\0" % self.mark(p)).encode(): p.os_pid for p in procs.values()}
        started = time.monotonic()
        try:
            escaped = _escaped({os_pid: p._state is not _State.EXITED for os_pid, p in procs.items()}, marks,
                               {p.os_pid for p in self._held if p.config.stop_children})
        except OSError as exc:  # no /proc
            _log.debug("cannot look for escaped descendants: %s", exc)
            escaped = {}
        # A look costs what /proc holds: at most a tenth of the loop's time goes to it.
        self._sweep_next = self._loop.time() + max(_SWEEP_SPACING, 10 * (time.monotonic() - started))
        for pgid, leader in escaped.items():
            proc = procs[leader]
            if pgid in self._orphans:
                continue
            _send_signal(pgid, proc.config.stop_signal, group=True)
            held = self._held.get(proc)
            timer = held.kill_timer if held is not None else None
            deadline = timer.when if timer is not None else self._loop.time() + proc.graceful_timeout
            self._orphans[pgid] = (deadline, False)  # killed at the same deadline as their leader
            self._guard(proc, -pgid)
        if escaped:
            self._watch_orphans()
        self._manager._stop_if_done()  # a manager stop waits for this look

    # -- the subreaper: adopted orphans reaped

    def reap_adopted(self):
        """As a subreaper: reap the orphans that reparented to this process.

        With subreaper="init" (PID 1, the command line's --init), every child the manager did
        not spawn.  Otherwise only the descendants of its processes: a pid that the host
        program's own subprocess calls own is never touched.  An adopted process still running
        is watched by the child watcher and reaped when it exits.
        """
        if self._adoption_timer is not None:
            self._adoption_timer.cancel()
            self._adoption_timer = None
        try:
            children = _own_children()
        except OSError:
            return
        ours = {proc.os_pid for proc in self._held} | self._adopted
        if self._guardian is not None:
            ours.add(self._guardian[0].pid)
        for pid in children - ours:
            if self.subreaper != "init" and not self._descends(pid):
                continue
            adopted = _Adopted(pid)
            if adopted.poll() is None:
                self._adopted.add(pid)
                self._reaper.watch(adopted, functools.partial(self._adopted.discard, pid))
        # No descriptor tells that an orphan was adopted, and SIGCHLD is the main thread's (run()'s):
        # a host that never calls run() still has its adopted zombies reaped within a second.
        if self._held or self._adopted:
            self._adoption_timer = self._loop.call_later(1.0, self.reap_adopted)

    def _descends(self, pid):
        """Whether an adopted child descends from a process of this manager: it is in a session one of them
        led (what a zombie still shows), carries the GAFFER_PROCESS mark (a live one) or sits in its cgroup."""
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                sid = int(f.read().rpartition(b")")[2].split()[3])
        except (OSError, ValueError, IndexError):
            return False
        if sid != pid and sid in self._led:  # not the leader itself: a pid reused by a leader of the host's
            return True
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                if ("GAFFER_PROCESS=%s/" % self.token).encode() in f.read():
                    return True
            with open("/proc/%d/cgroup" % pid) as f:  # the manager's cgroup is named by its token
                return self.cgroups is not None and "/gaffer-%s/" % self.token in f.read()
        except OSError:
            return False

    # -- the guardian: told of each group, so that it can stop them if the manager dies

    @staticmethod
    def _target(proc):
        """What the stop signal goes to: the process group (-pgid), or the process alone."""
        return -proc.os_pid if proc.config.stop_children else proc.os_pid

    def _guard(self, proc, target=None):
        """Tell the guardian of a process group to stop if the manager dies: the process's own (with its
        cgroup), or `target`, a group (-pgid) that left it.  What it is told is also kept here, so that
        a guardian started after one that died learns every group and cgroup."""
        cgroup = self.cgroup(proc) if target is None else None
        target = self._target(proc) if target is None else target
        line = ("+ %d %d %r %s\n" % (target, proc.config.stop_signal, proc.graceful_timeout, cgroup or "-")).encode()
        self._guarded[target] = line
        if self._guardian is not None:
            self._tell_guardian(line)
        else:
            self._start_guardian()  # told everything, this line too

    def _unguard(self, target):
        if self._guarded.pop(target, None) is not None and self._guardian is not None:
            self._tell_guardian(b"- %d\n" % target)

    def _tell_guardian(self, line):
        """Lines for the guardian go in one write at the end of the loop's turn: a respawn's exit and spawn,
        a start's hundreds of spawns wake it once."""
        self._to_guardian.append(line)
        if self._guardian_flush is None:
            self._guardian_flush = self._loop.call_later(0, self._flush_guardian)

    def _flush_guardian(self):
        self._guardian_flush = None
        lines, self._to_guardian = self._to_guardian, []
        if self._guardian is not None and lines:
            self._guardian[1].write(b"".join(lines))

    def _start_guardian(self):
        if not self.guardian_wanted or not sys.executable or self._guardian_timer is not None:
            return  # an embedded interpreter may not know its own program; a restart may be due
        bases = [self.cgroups.base] if self.cgroups is not None else []
        try:  # its code in its environment: ps shows a short line that says what it is
            popen = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _GUARDIAN_BOOT, "gaffer guardian of pid %d" % os.getpid(),
                 self.token, *bases], env={"GAFFER_GUARDIAN": _GUARDIAN}, stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # out of reach of a kill of the host's group
        except (OSError, subprocess.SubprocessError) as exc:
            _log.warning("cannot start the guardian (%s); processes are not guarded", exc)
            return
        self._guardian = (popen, _Pipe(self._loop, popen.stdin))
        self._guardian_since = self._loop.time()
        self._reaper.watch(popen, functools.partial(self._on_guardian_exit, popen))
        self._to_guardian = []  # it is told everything at once instead
        self._guardian[1].write(b"".join(self._guarded.values()))

    def _on_guardian_exit(self, popen):
        """The guardian died (the OOM killer, a stray kill -9): another one now, at most one a second."""
        if self._guardian is None or self._guardian[0] is not popen:
            return  # dismissed
        _log.warning("the guardian (pid %d) exited with status %s; another is started", popen.pid, popen.returncode)
        self._guardian[1].close()
        self._guardian = None
        delay = max(0.0, self._guardian_since + 1.0 - self._loop.time())
        self._guardian_timer = self._loop.call_later(delay, self._revive_guardian)

    def _revive_guardian(self):
        self._guardian_timer = None
        if self._guardian is None and self._guarded and self._manager.started:
            self._start_guardian()

    def dismiss(self, loop_closed=False):
        """The manager stopped its jobs itself: the guardian exits without a signal sent."""
        if self._guardian_flush is not None:  # its lines are moot: it exits on "bye" without a signal
            self._guardian_flush.cancel()
            self._guardian_flush, self._to_guardian = None, []
        guardian, self._guardian = self._guardian, None
        if self._guardian_timer is not None:
            self._guardian_timer.cancel()
            self._guardian_timer = None
        self._guarded.clear()
        if guardian is not None:
            popen, pipe = guardian
            if not loop_closed:  # after a crash the selector is gone: the reaper's close() has its pidfd
                self._reaper.forget(popen)
            try:
                os.set_blocking(pipe.fd, True)  # after what is queued, if anything is: it reads on
                os.write(pipe.fd, b"".join(pipe._pending) + b"bye\n")
            except OSError:  # it is gone: the reaper saw it or will
                pass
            if loop_closed:
                pipe.file.close()
            else:
                pipe.close()
            try:
                popen.wait(5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()

    def close(self, procs):
        """The loop ended: normally nothing is left; after a crash, kill what is, then wait for all of it
        against one deadline (not a wait per process in turn)."""
        for proc in procs:
            _send_signal(proc.os_pid, signal.SIGKILL, proc.config.stop_children)
        for pgid in list(self._orphans):
            _send_signal(pgid, signal.SIGKILL, group=True)
        deadline = time.monotonic() + 1.0
        for proc in procs:
            try:
                proc._popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._mover.join(1.0)  # its waits end with the processes killed above
        if self.cgroups is not None:
            self.cgroups.remove()  # what is still in one (after a crash) is killed
        if self._guardian is not None:
            self.dismiss(loop_closed=True)


# -- Checks (_Checks): readiness and health --------------------------------------------------------
# When a process moves to READY, and whether it stays healthy: the checks, their bounded pool of
# workers, a record of each process's checks, and the notify sockets.  Loop thread.

def _allow_sender(path, uid):
    """Let a process that runs as `uid` (None: as the manager) send to the notify socket at path, and
    nobody else: the socket is its user's, mode 0600, in a directory that others may pass but not list."""
    os.chmod(path, 0o600)
    if uid is not None and uid != os.geteuid():
        os.chown(path, uid, -1)


def _answered_by(owner, port):
    """True, unless `owner` is given and /proc says that no socket of it or its descendants listens on port."""
    if owner is not None and _listens(owner, port) is False:
        raise ValueError("port %d answers, but not from process %d or its children: another process of the job "
                         "(the one it replaces) listens there" % (port, owner))
    return True


def _probe_once(check, process, timeout, owner=None):
    """One try of a tcp, http or callable check (on a worker thread): True if it passed.

    A tcp or http try ends within `timeout`, whatever the server does: accepting and
    never answering, or answering a byte at a time.  With `owner` (an os pid), an answer
    counts only if that process or one of its descendants listens on the port (Linux):
    during a rollout the process being replaced may still answer on the same one.
    """
    if callable(check):
        return bool(check(process))
    deadline = time.monotonic() + timeout

    def left():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer within %gs" % timeout)
        return remaining

    target = _expand(check, process.env)
    try:
        if target.startswith("tcp:"):
            host, _, port = target[4:].rpartition(":")
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
            return _answered_by(owner, int(port))
        import urllib.parse
        url = urllib.parse.urlsplit(target)
        port = url.port or (443 if url.scheme == "https" else 80)
        sock = socket.create_connection((url.hostname, port), left())
        try:
            if url.scheme == "https":  # as Kubernetes probes do: the certificate is not checked
                import ssl
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                sock.settimeout(left())
                sock = context.wrap_socket(sock, server_hostname=url.hostname)
            path = (url.path or "/") + ("?" + url.query if url.query else "")
            sock.settimeout(left())
            sock.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path, url.netloc)).encode())
            head = b""
            while b"\n" not in head and len(head) < 4096:  # the status line is all a check needs
                sock.settimeout(left())
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
            status = head.split(b"\n", 1)[0].split()
            if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
                raise ValueError("not an HTTP answer: %r" % head[:80])
            if int(status[1]) >= 400:
                raise ValueError("HTTP %s" % status[1].decode())
            return _answered_by(owner, port)
        finally:
            sock.close()
    except socket.timeout:  # a connect or read that reached the deadline: said the same way as left() says it
        raise TimeoutError("no answer within %gs" % timeout) from None


class _CheckRecord:
    """What _Checks knows of one process's checks."""

    __slots__ = ("ready_timer", "timer", "delay", "attempt", "pending", "busy", "passed", "failures", "notify",
                 "status", "reads", "probe")

    def __init__(self):
        self.ready_timer = None  # ready_timeout
        self.timer = None        # the next try, the delay: check, the timeout of a health check, or the watchdog's
        self.delay = 0.0         # between readiness tries: short at first, then longer
        self.attempt = 0         # counts the tries sent to a worker: a late answer is not the current one
        self.pending = False     # the current try has neither answered nor timed out
        self.busy = False        # a worker still runs this process's last try
        self.passed = 0          # health checks passed (WATCHDOG=1 pings in notify mode)
        self.failures = 0        # failed health checks in a row
        self.notify = None       # the datagram socket of a notify check
        self.status = None       # the last STATUS= it sent there
        self.reads = False       # its readiness check reads its output (output:REGEX)
        self.probe = None        # the exec: check running now (_Probe)


class _Probe:
    """An exec: check running: its Popen, the first bytes it wrote (its reason if it fails), the timer
    that kills its process group at the check's timeout."""

    __slots__ = ("popen", "output", "timer", "timed_out")

    def __init__(self, popen):
        self.popen = popen
        self.output = bytearray()
        self.timer = None
        self.timed_out = None  # the timeout, once it passed and the probe was killed

    def kill(self):
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # its own group: what a shell command started goes too
        except OSError:
            pass  # exited already


class _Checks:
    """Readiness and health checks.  tcp, http and callable tries run on a bounded pool of worker
    threads (none may block the loop), each answer or timeout posted back as a command; delay: is a
    timer; output: reads the process's lines; notify reads a datagram socket of the process's own.
    A ready process's health is checked every health_interval.  The manager is told when to move a
    process (ready); one not ready in time, or unhealthy, is replaced here (stopped, then its slot
    filled by the manager's slot engine)."""

    def __init__(self, manager):
        self._manager = manager
        self._loop = manager.loop
        self._records = {}      # Process -> _CheckRecord, from its spawn to its exit
        self._pool = None       # the worker threads, made on first use
        self._notify_dir = None  # where notify sockets are bound, made on first use

    def prepare(self, proc, env, uid):
        """Before its spawn: the process's record, and its notify socket (NOTIFY_SOCKET, WATCHDOG_USEC in env),
        which the process's user (uid) may send to and nobody else."""
        record = self._records[proc] = _CheckRecord()
        config = proc.config
        record.reads = isinstance(config.ready, str) and config.ready.startswith("output:")
        if "notify" in (config.ready, config.health):  # a socket of its own: what arrives there is from it
            record.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            record.notify.bind(self._notify_path(proc.pid))
            _allow_sender(record.notify.getsockname(), uid)
            env["NOTIFY_SOCKET"] = record.notify.getsockname()
            if config.health == "notify":  # as systemd sets it: sd_watchdog_enabled() reads it
                env["WATCHDOG_USEC"] = str(int(config.health_interval * 1e6))

    def start(self, proc):
        """Spawned: arm what will move it to READY, and the ready_timeout that bounds the wait."""
        record, check = self._records[proc], proc.config.ready
        if record.notify is not None:
            record.notify.setblocking(False)
            self._loop.set_events(record.notify, selectors.EVENT_READ, functools.partial(self._on_notify, proc))
        if check is None:
            self._manager._mark_ready(proc)
            return
        record.ready_timer = self._loop.call_later(proc.config.ready_timeout, self._on_ready_timeout, proc)
        if isinstance(check, str) and check.startswith("delay:"):
            record.timer = self._loop.call_later(float(check[6:]), self._manager._mark_ready, proc)
        elif callable(check) or check.startswith(("tcp:", "http", "exec:")):
            record.delay = _CHECK_DELAY_MIN
            self._run(proc)
        # output: and notify: the process's own lines and datagrams move it (saw_lines, _on_notify)

    def wants_lines(self, proc):
        """Its readiness check reads its output, and has not passed yet."""
        record = self._records.get(proc)
        return record is not None and record.reads and proc._state is _State.STARTING and not proc._reaped

    def saw_lines(self, proc, lines):
        if self.wants_lines(proc) and any(re.search(proc.config.ready[7:], line) for line in lines):
            self._manager._mark_ready(proc)

    def ready(self, proc):
        """It moved to READY: the readiness check ends, its health checks begin."""
        record = self._records[proc]
        self._cancel(record)
        if proc.config.health is not None and proc._state is _State.READY:  # (a listener may have stopped it)
            self._arm_health(proc, record)

    def report(self, proc):
        """What the process's info says of its checks."""
        record = self._records.get(proc) or _CheckRecord()
        return {"notify_status": record.status, "health_passed": record.passed, "health_failures": record.failures}

    def finish(self, proc):
        """It exited (or never spawned): its last datagrams read, its timers and socket gone."""
        record = self._records.pop(proc, None)
        if record is None:
            return
        self._cancel(record)
        self._end_probe(record)
        if record.notify is not None:
            if proc._popen is not None:
                self._read_notify(proc, record)  # a STATUS= sent just before exiting
                self._loop.set_events(record.notify, 0)
            path = record.notify.getsockname()
            record.notify.close()
            try:
                os.unlink(path)
            except OSError:
                pass

    def close(self, loop_closed=False):
        """The loop ended: the workers go (a try in progress ends within its timeout), and the sockets'
        directory (with what processes killed after a crash left in it)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        for record in self._records.values():
            self._end_probe(record)
            if record.notify is not None:
                record.notify.close()
        if self._notify_dir is not None:
            try:
                for entry in os.listdir(self._notify_dir):
                    os.unlink(os.path.join(self._notify_dir, entry))
                os.rmdir(self._notify_dir)
            except OSError as exc:  # removed by a /tmp cleaner, say: run() must still return
                _log.warning("cannot remove %s: %s", self._notify_dir, exc)

    @staticmethod
    def _cancel(record):
        for timer in (record.ready_timer, record.timer):
            if timer is not None:
                timer.cancel()
        record.ready_timer = record.timer = None
        record.pending = False

    def _notify_path(self, pid):
        """Where a notify process's socket is bound: a directory of the manager's own, made on first use."""
        if self._notify_dir is None or not os.path.isdir(self._notify_dir):  # a /tmp cleaner may take it
            import tempfile
            self._notify_dir = tempfile.mkdtemp(prefix="gaffer-notify-")
            os.chmod(self._notify_dir, 0o711)  # a process dropped to another user reaches its own socket
        return os.path.join(self._notify_dir, "%d.sock" % pid)

    def _on_notify(self, proc, mask):
        record = self._records.get(proc)
        if record is not None:
            self._read_notify(proc, record)

    def _read_notify(self, proc, record):
        """sd_notify datagrams: READY=1 makes it ready, WATCHDOG=1 says it is alive, STATUS=... is kept."""
        for _ in range(64):  # a child that sends without pause must not hold the loop: the rest waits
            try:
                data = record.notify.recv(4096)
            except OSError:  # BlockingIOError: all read
                return
            for line in data.decode("utf-8", "replace").split("\n"):
                key, _, value = line.partition("=")
                if key == "STATUS":
                    record.status = value
                elif line == "READY=1" and proc._state is _State.STARTING and proc.config.ready == "notify":
                    self._manager._mark_ready(proc)
                elif line == "WATCHDOG=1" and proc._state is _State.READY and proc.config.health == "notify":
                    self._on_health(proc, True, None)

    def _run(self, proc):
        """One try of a tcp, http or callable check, readiness or health, on a worker thread.  Its
        answer, or its timeout first, comes back to _on_answer."""
        record = self._records.get(proc)
        if record is None:
            return
        record.timer = None
        if proc._state is _State.STARTING:
            check, timeout = proc.config.ready, _CHECK_TIMEOUT
        elif proc._state is _State.READY:
            check, timeout = proc.config.health, proc.config.health_timeout
        else:
            return
        record.attempt += 1
        record.pending = True
        attempt = record.attempt
        if isinstance(check, str) and check.startswith("exec:"):
            self._exec(proc, record, attempt, check[5:], timeout)
            return
        if record.busy:  # a callable that has not returned yet: it gets no second thread
            self._on_answer(proc, attempt, False, "the previous check is still running")
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(_CHECK_WORKERS, thread_name_prefix="gaffer-check")
        record.busy = True
        owner = proc.os_pid if isinstance(check, str) and self._shares_port(proc, check) else None
        future = self._pool.submit(_probe_once, check, proc, timeout, owner)
        future.add_done_callback(lambda f: self._loop.call_soon_threadsafe(self._on_done, proc, attempt, f))
        if proc._state is _State.READY:  # a readiness check has ready_timeout for a bound
            record.timer = self._loop.call_later(timeout, self._on_answer, proc, attempt, False,
                                                 "no answer within %gs" % timeout)

    def _exec(self, proc, record, attempt, command, timeout):
        """One try of an exec: check: the command, a child the loop watches like any other (counted in no
        job), in the process's environment, cwd and user and a process group of its own, killed at
        `timeout`.  Exit 0 passes; its exit answers _on_answer, with what it wrote as the reason."""
        if record.probe is not None:
            self._on_answer(proc, attempt, False, "the previous check is still running")
            return
        config = proc.config
        user, group, groups = _credentials(config)
        try:
            popen = subprocess.Popen(shlex.split(_expand(command, proc.env)), cwd=config.cwd, env=proc.env,
                                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, user=user, group=group, extra_groups=groups,
                                     umask=-1 if config.umask is None else config.umask)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self._on_answer(proc, attempt, False, "exec:%s cannot start: %s" % (command, exc))
            return
        probe = record.probe = _Probe(popen)
        os.set_blocking(popen.stdout.fileno(), False)
        self._loop.set_events(popen.stdout, selectors.EVENT_READ, lambda mask: self._read_probe(probe))
        probe.timer = self._loop.call_later(timeout, self._probe_timeout, probe, timeout)
        self._manager._reaper.watch(popen, functools.partial(self._probe_exited, proc, record, attempt, probe,
                                                             command))

    @staticmethod
    def _probe_timeout(probe, timeout):
        probe.timer, probe.timed_out = None, timeout
        probe.kill()

    def _read_probe(self, probe, drain=False):
        """What an exec: check writes: the first _PROBE_OUTPUT bytes are kept, the rest read and dropped."""
        for _ in range(64 if drain else 1):
            try:
                data = os.read(probe.popen.stdout.fileno(), 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # its end, and of what it started
                self._loop.set_events(probe.popen.stdout, 0)
                return
            probe.output += data[:max(0, _PROBE_OUTPUT - len(probe.output))]

    def _probe_exited(self, proc, record, attempt, probe, command):
        """An exec: check was reaped: its output read, its descriptors closed, and its answer given."""
        if probe.timer is not None:
            probe.timer.cancel()
            probe.timer = None
        self._read_probe(probe, drain=True)
        self._loop.set_events(probe.popen.stdout, 0)
        probe.popen.stdout.close()
        if record.probe is not probe:
            return  # its process is gone, and the check with it
        record.probe = None
        said = probe.output.decode("utf-8", "replace").strip()
        status = probe.popen.returncode
        if probe.timed_out is not None:
            reason = "exec:%s did not end within %gs (killed)" % (command, probe.timed_out)
        else:
            reason = "exec:%s %s" % (command, "exited with %d" % status if status >= 0 else "killed by signal %d" % -status)
        self._on_answer(proc, attempt, status == 0 and probe.timed_out is None, reason + (": " + said if said else ""))

    def _end_probe(self, record):
        """Its process is gone: an exec: check still running is killed and reaped now (a SIGKILLed child
        goes within milliseconds), so that a manager that stops leaves none behind."""
        probe, record.probe = record.probe, None
        if probe is None:
            return
        probe.kill()
        try:
            probe.popen.wait(1.0)
        except subprocess.TimeoutExpired:
            return  # the reaper still watches it: its exit is handled when it comes
        self._manager._reaper.forget(probe.popen)
        self._probe_exited(None, record, None, probe, "")

    @staticmethod
    def _shares_port(proc, check):
        """Whether another live process of the job answers the same check (its slot's old process in a
        rollout or reload, on the same $PORT): then only a listener of proc's own counts."""
        target = _expand(check, proc.env)
        return any(other is not proc and other._state is not _State.EXITED and _expand(check, other.env) == target
                   for other in proc._job.processes() + list(proc._job.stopping.values()))

    def _on_done(self, proc, attempt, future):
        record = self._records.get(proc)
        if record is None:
            return
        record.busy = False
        try:
            passed, reason = future.result(), "the check returned False"
        except Exception as exc:  # refused, unreachable, an error status, or the callable raised
            passed, reason = False, str(exc) or type(exc).__name__
        self._on_answer(proc, attempt, bool(passed), reason)

    def _on_answer(self, proc, attempt, passed, reason):
        """The current try answered or timed out: a starting process is ready or not yet, a ready one
        healthy or not."""
        record = self._records.get(proc)
        if record is None or attempt != record.attempt or not record.pending:
            return  # it answered after its timeout, or the process moved on
        record.pending = False
        if record.timer is not None:
            record.timer.cancel()
            record.timer = None
        if proc._state is _State.READY:
            self._on_health(proc, passed, reason)
        elif proc._state is not _State.STARTING:
            return
        elif passed:
            self._manager._mark_ready(proc)
        else:  # not ready yet: try again quickly at first, then about every _CHECK_DELAY_MAX
            _log.debug("readiness check of %r: %s", proc, reason)
            record.delay = min(record.delay * 2, _CHECK_DELAY_MAX)
            record.timer = self._loop.call_later(record.delay, self._run, proc)

    def _arm_health(self, proc, record):
        """The next health check in health_interval; in notify mode, the deadline of the next WATCHDOG=1."""
        interval = proc.config.health_interval
        if proc.config.health == "notify":
            record.timer = self._loop.call_later(interval, self._on_health, proc, False,
                                                 "no WATCHDOG=1 within %gs" % interval)
        else:
            record.timer = self._loop.call_later(interval, self._run, proc)

    def _on_health(self, proc, passed, reason):
        """A health check passed or failed: health_retries failures in a row, and the manager replaces it."""
        record = self._records.get(proc)
        if record is None or proc._state is not _State.READY:
            return
        if record.timer is not None:
            record.timer.cancel()
            record.timer = None
        was_healthy = self.healthy(proc)
        record.passed += passed
        record.failures = 0 if passed else record.failures + 1
        if self.healthy(proc) and not was_healthy:
            self._manager._deps.release()  # a job that waits for it to be healthy may start
        if record.failures < proc.config.health_retries:
            self._arm_health(proc, record)
            return
        _log.warning("%r failed %d health checks in a row (%s): replaced", proc, record.failures, reason)
        m, job = self._manager, proc._job
        m._publish_job(job, "unhealthy", pid=proc.pid, reason=reason)
        counted = proc.pid in job.running
        m._stop(proc, "stop_process")
        if counted and job.active:
            job.restarts += 1
            m._manage(job)

    def healthy(self, proc):
        """Ready, and its last health check passed (without a health check: ready)."""
        record = self._records.get(proc)
        return proc.config.health is None or (record is not None and record.passed > 0 and not record.failures)

    def _on_ready_timeout(self, proc):
        record = self._records.get(proc)
        if record is None or proc._state is not _State.STARTING:
            return
        record.ready_timer = None
        _log.warning("%r was not ready within %gs: replaced", proc, proc.config.ready_timeout)
        m, job = self._manager, proc._job  # stopped and respawned, or its rollout fails
        m._publish_job(job, "ready_timeout", pid=proc.pid)
        if not m._rollouts.lost(job, proc, "new process %d was not ready within %gs"
                                % (proc.pid, proc.config.ready_timeout)):
            m._stop(proc, "stop_process")
            m._manage(job)


# -- Dependencies (_Dependencies) ------------------------------------------------------------------
# Who waits for whom to be ready: depends_on between jobs, and the wait_ready() callers.  Loop thread.

def _dep_names(session, config):
    """"session.job" of each job that config depends on: a bare name is in its own session."""
    return [_job_name(*_split_name(dep, session)) for dep in config.depends_on]


def _refuse_cycle(graph, session, config):
    """ValueError ("depends_on makes a cycle: a -> b -> a") if adding config to graph {name: [deps]} closes one."""
    start = _job_name(session, config.name)
    graph = dict(graph, **{start: _dep_names(session, config)})
    path, todo, seen = [start], [iter(graph[start])], set()
    while todo:  # depth first, without recursion: a chain of any length is fine
        dep = next(todo[-1], None)
        if dep is None:
            todo.pop()
            path.pop()
        elif dep == start:
            raise ValueError("depends_on makes a cycle: %s" % " -> ".join(path + [start]))
        elif dep not in seen:  # each job is walked once: linear in the graph
            seen.add(dep)
            path.append(dep)
            todo.append(iter(graph.get(dep, ())))


class _ReadyWaiter:
    """A wait_ready() caller, in its own thread: the loop sets `error` (or not), then `done`."""

    def __init__(self):
        self.job = None
        self.error = None
        self.done = threading.Event()

    def wait(self, manager, name, timeout):
        """Wait (not on the loop thread) until the job is ready, or raise what stopped it or TimeoutError."""
        if manager.loop.in_loop_thread():
            raise RuntimeError("wait_ready() on the loop thread (in a listener or callback) would wait for itself")
        if timeout is not None:
            timeout = _float_setting("timeout", timeout, 0)
        manager._call(lambda: manager._deps.wait(manager._job(name), self))
        if not self.done.wait(timeout):
            try:
                progress = manager._call(manager._deps.forget, self)
            except RuntimeError:
                progress = "the manager stopped"
            if not self.done.is_set():
                raise TimeoutError("job %r is not ready after %gs: %s" % (self.job.name, timeout, progress))
        if self.error is not None:
            raise self.error


class _Dependencies:
    """depends_on between the manager's jobs: what a job waits for (each dependency's condition), which
    dependency can no longer meet its condition (the dependent is blocked), which jobs to fill or restart
    once one changes, the cycles refused, and the order of a manager stop (dependents first); and the
    callers of wait_ready(), woken when their job is ready, stopped or gone."""

    def __init__(self, manager):
        self._manager = manager
        self._waiters = []   # _ReadyWaiter of wait_ready() callers
        self._restarts = set()  # dependents to replace once what they follow meets their condition again

    @staticmethod
    def of(job):
        """[(session, name)] of what the job depends on: a bare name is in the job's own session."""
        return [_split_name(dep, job.session) for dep in job.config.depends_on]

    @staticmethod
    def condition(job, dep):
        """{condition, restart} of the job's depends_on entry `dep` (as written in its config)."""
        spec = job.config.depends_on
        return spec[dep] if isinstance(spec, dict) else {"condition": "ready", "restart": False}

    def _unmet(self, job):
        """[(name, reason)] of the dependencies that do not meet their condition now; reason None: it may
        yet (not loaded, stopped, starting), else why it cannot until it is started again."""
        unmet, sessions = [], self._manager._sessions
        for dep, (session, name) in zip(job.config.depends_on, self.of(job)):
            other, condition = sessions.get(session, {}).get(name), self.condition(job, dep)["condition"]
            full = _job_name(session, name)
            if other is None or other.state is _JobState.STOPPED:
                unmet.append((full, None))
            elif other.state is _JobState.FATAL:
                unmet.append((full, "%s is fatal (it was flapping)" % full))
            elif other.state in _DONE_JOB or (other.state is _JobState.SCHEDULED and other.last_run
                                               and other.last_run["end"] is not None):  # its last run counts
                failed = other.state is _JobState.FAILED or other.state is _JobState.SCHEDULED and other.run_failed
                if condition in ("completed", "started") or (condition == "completed_successfully" and not failed):
                    continue
                unmet.append((full, "%s %s with %s" % (full, "failed" if failed else "completed", other.last_exit)))
            elif not self._meets(other, condition):
                unmet.append((full, None))
        return unmet

    def _meets(self, other, condition):
        """Whether a running (active) dependency meets a condition that its running can meet."""
        if not other.active:
            return False
        if condition == "started":
            return len(other.running) >= other.numprocesses
        if condition in ("ready", "healthy") and other.ready >= other.numprocesses:
            return condition == "ready" or all(self._manager._checks.healthy(proc) for proc in other.running.values())
        return False

    def waiting_for(self, job):
        """Names of the jobs this one depends on whose condition is not met (blocked ones included)."""
        return [name for name, _ in self._unmet(job)] if job.config.depends_on else []

    def blocked(self, job):
        """Why the job cannot start (a dependency that can no longer meet its condition), or None."""
        if not job.config.depends_on:
            return None
        return next((reason for _, reason in self._unmet(job) if reason is not None), None)

    def progress(self, job):
        """(waiting_for, blocked) of the job, as info() and status() give them."""
        return self.waiting_for(job), self.blocked(job)

    def changed(self, job, was):
        """A job's state changed (Manager._job_to): a dependent that became blocked says why (blocked
        event), and the states of the jobs that depend on this one follow (blocked or not).  What they
        spawn waits for release(), after the event of the move that changed it; a one-shot job or a
        scheduled run that ended releases at once (its exit event is out)."""
        m = self._manager
        if job.state is _JobState.BLOCKED:
            m._publish_job(job, "blocked", reason=self.blocked(job))
        for dependent in self.dependents(job):
            if dependent.active:
                if job.active and was not in _ACTIVE_JOB and dependent.running:
                    self.replaced(job, dependent)  # started again: its restart: true dependents follow
                m._refresh(dependent)
        if job.state in _DONE_JOB or job.state is _JobState.SCHEDULED:  # a run ended
            self.release()

    def dependents(self, job):
        """The jobs that depend on this one (a walk of the jobs, not of their processes)."""
        return [other for other in self._manager._all_jobs()
                if other.config.depends_on and job.name in _dep_names(other.session, other.config)]

    def replaced(self, job, dependent=None):
        """The job was replaced (a reload, update, restart) or started again: each of its dependents with
        restart: true for it (or only `dependent`) is replaced in turn, once the job meets its condition."""
        for other in [dependent] if dependent is not None else self.dependents(job):
            dep = next((dep for dep, (session, name) in zip(other.config.depends_on, self.of(other))
                        if _job_name(session, name) == job.name), None)
            if dep is not None and self.condition(other, dep)["restart"] and other.running:
                self._restarts.add(other)
                self._restart(other)

    def _restart(self, dependent):
        """Replace a dependent, rolling and gated as a reload, once what it follows meets its conditions."""
        if dependent not in self._restarts or dependent.active and self.waiting_for(dependent):
            return
        self._restarts.discard(dependent)  # a dependent stopped, unloaded or being replaced already: nothing to do
        if dependent.active and self._manager._loaded(dependent) and dependent.rollout is None:
            try:
                self._manager._rollouts.replace(dependent)
            except ProcessError as exc:
                _log.error("%s was not restarted with its dependency: %s", dependent.name, exc.reason)

    def release(self):
        """A job became ready, healthy, started, ended or changed its count: fill what waited for it, and
        replace the dependents that follow a replaced job, now that it may meet their condition."""
        for job in self._manager._all_jobs():
            if job.config.depends_on and job.active and len(job.running) < job.numprocesses:
                self._manager._manage(job)
        for dependent in list(self._restarts):
            self._restart(dependent)

    def refuse_cycle(self, session, config):
        """ValueError naming the cycle if loading `config` in `session` would close one."""
        graph = {job.name: _dep_names(job.session, job.config) for job in self._manager._all_jobs()}
        _refuse_cycle(graph, session, config)

    def next_to_stop(self, pending, live):
        """Of the jobs a manager stop has yet to stop, those no other job (pending, or with a process
        left) depends on: dependents first."""
        if not any(job.config.depends_on for job in pending):
            return list(pending)
        others = pending + list(live)
        return [job for job in pending if not any((job.session, job.config.name) in self.of(other)
                                                  for other in others if other is not job)]

    def wait(self, job, waiter):
        """A wait_ready() caller: woken once the job is ready (or stopped, or gone)."""
        if not job.active:
            raise ProcessError(409, "job %r is %s" % (job.name, job.state.shown))
        waiter.job = job
        self._waiters.append(waiter)
        self.wake()

    def forget(self, waiter):
        """A wait_ready() timed out: stop waking it; return how far the job got."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        job = waiter.job
        waiting = self.waiting_for(job)
        return "%d of %d processes ready%s" % (job.ready, job.numprocesses,
                                               "; waiting for %s" % ", ".join(waiting) if waiting else "")

    def wake(self):
        """Wake the wait_ready() callers whose job is ready, gone, stopped, or whose manager stopped."""
        m = self._manager
        for waiter in list(self._waiters):
            job = waiter.job
            if not m.active:
                waiter.error = RuntimeError("manager is not running")
            elif not m._loaded(job):
                waiter.error = ProcessNotFound("job %r was unloaded" % job.name)
            elif not job.active:
                waiter.error = ProcessError(409, "job %r is %s" % (job.name, job.state.shown))
            elif job.ready < job.numprocesses:
                continue
            self._waiters.remove(waiter)
            waiter.done.set()


# -- The sampler (_Sampler) ------------------------------------------------------------------------
# One timer reads /proc for everything that needs it, and only while something does.  Loop thread.

class _Sampler:
    """Monitors, STATS channels, max_rss and max_age all read the processes' use through here: one
    timer, running only while something needs it, and one reading of each process per tick.  Only a
    tick moves a process's cpu baseline: an on-demand sample (status, stats) computes without writing,
    so it never changes what a monitor sees next."""

    def __init__(self, loop, interval, jobs, on_limit, cgroup_of):
        self.interval = interval
        self._loop = loop
        self._jobs = jobs          # jobs() -> every loaded job
        self._on_limit = on_limit  # on_limit(proc, reason): it passed its max_rss or max_age
        self._cgroup_of = cgroup_of  # cgroup_of(proc) -> its cgroup's path, or None
        self._timer = None
        self._monitors = {}        # _Job or Process -> its listeners
        self._baselines = {}       # Process -> (cpu seconds, monotonic time) at its last tick
        self._deadlines = {}       # Process -> its max_age, plus its share of max_age_variance
        self._wanted_until = 0.0   # /metrics or the dashboard read the samples: every process is read each tick
        self._last = {}            # Process -> its last tick's reading (and its cgroup's), while wanted
        self._history = {}         # _Job -> deque of [wall time, cpu %, rss bytes] of its processes, per tick

    def want(self, seconds):
        """/metrics or the dashboard reads the samples: every process is read at each tick for that long
        (the first read finds what the ticks before it kept, maybe nothing)."""
        self._wanted_until = max(self._wanted_until, self._loop.time() + seconds)
        self._arm()

    def last(self, proc):
        """A process's reading at the last tick, with its cgroup's ("cgroup": {...}), or None."""
        return self._last.get(proc)

    def history(self, job):
        """[[wall time, cpu %, rss bytes]] of the job's processes over the last ticks (_SAMPLE_HISTORY)."""
        return [list(point) for point in self._history.get(job, ())]

    def watch(self, target, listener):
        """Call listener("stat", msg) each tick, for a process or every process of a job."""
        if not callable(listener):
            raise TypeError("listener must be callable, got %r" % (listener,))
        self._monitors.setdefault(target, []).append(listener)
        self._arm()

    def unwatch(self, target, listener):
        listeners = self._monitors.get(target, [])
        if listener in listeners:
            listeners.remove(listener)
        if not listeners:
            self._monitors.pop(target, None)
            self._idle()

    def track(self, proc):
        """A new process: its max_age deadline, and the timer if its job has limits."""
        config = proc.config
        if config.max_age is not None:
            import random
            self._deadlines[proc] = config.max_age + random.uniform(0, config.max_age_variance)
        if config.max_rss or config.max_age:
            self._arm()

    def forget(self, target):
        """A process exited or a job was unloaded: its monitors, baseline, deadline and samples go."""
        self._baselines.pop(target, None)
        self._deadlines.pop(target, None)
        self._last.pop(target, None)
        self._history.pop(target, None)
        if self._monitors.pop(target, None) is not None:
            self._idle()

    def sample(self, proc, tick=False):
        """Resource use now: cpu % since the process's last tick (before its first: since its start),
        memory and threads; "N/A" where the platform cannot tell."""
        stats = {"pid": proc.pid, "os_pid": proc.os_pid}
        raw = _proc_stat(proc.os_pid)
        if raw is None:
            stats.update(dict.fromkeys(_STAT_KEYS, "N/A"))
            return stats
        cpu_seconds, threads, vms, rss, age = raw
        now, last = time.monotonic(), self._baselines.get(proc)
        if last is None:
            cpu = cpu_seconds / age if age > 0 else 0.0
        else:
            elapsed = now - last[1]
            cpu = (cpu_seconds - last[0]) / elapsed if elapsed > 0 else 0.0
        if tick:
            self._baselines[proc] = (cpu_seconds, now)
        stats.update(cpu=round(cpu * 100, 1), mem=round(rss * 100 / _mem_total(), 2), rss=rss, vms=vms,
                     mem_info1=_human(rss), mem_info2=_human(vms),
                     ctime="%d:%05.2f" % divmod(cpu_seconds, 60), num_threads=threads)
        return stats

    def _needed(self):
        return bool(self._monitors) or self._loop.time() < self._wanted_until or bool(self._limited())

    def _limited(self):
        """The jobs with a max_rss or max_age and processes to hold to it."""
        return [job for job in self._jobs() if (job.config.max_rss or job.config.max_age) and job.running]

    def _arm(self):
        if self._timer is None:
            self._timer = self._loop.call_later(self.interval, self._tick)

    def _idle(self):
        if self._timer is not None and not self._needed():
            self._timer.cancel()
            self._timer = None

    def _tick(self):
        self._timer = None
        samples = {}  # one reading of each process per tick, whoever needs it (its job, itself, a limit)

        def reading(proc):
            if proc not in samples:
                samples[proc] = dict(self.sample(proc, tick=True), name=proc.name)
            return samples[proc]
        now = self._loop.time()
        for job in self._limited():  # one process of a job past its limits is replaced at a time
            for proc in list(job.running.values()):
                reason = self._over(proc, now, reading) if proc._state is _State.READY else None
                if reason is not None:
                    self._on_limit(proc, reason)
                    break
        for target, listeners in list(self._monitors.items()):
            for proc in (target.processes() if isinstance(target, _Job) else [target]):
                msg = reading(proc)
                for listener in list(listeners):
                    try:
                        listener("stat", msg)
                    except Exception:
                        _log.exception("stats listener %r failed", listener)
        if self._loop.time() < self._wanted_until:
            self._keep(reading)
        else:
            self._last.clear()
        if self._needed():
            self._arm()

    def _keep(self, reading):
        """/metrics and the dashboard's charts: every process's reading and its cgroup's kept, and each
        job's sums added to its history."""
        now = self._loop.wall()
        for job in self._jobs():
            cpu = rss = 0
            for proc in job.processes():
                sample = self._last[proc] = dict(reading(proc), cgroup=_cgroup_stats(self._cgroup_of(proc)),
                                                 cpu_seconds=self._baselines.get(proc, (None,))[0])
                cpu += sample["cpu"] if isinstance(sample["cpu"], float) else 0
                rss += sample["rss"] if isinstance(sample["rss"], int) else 0
            history = self._history.get(job)
            if history is None:
                history = self._history[job] = collections.deque(maxlen=_SAMPLE_HISTORY)
            history.append((round(now, 1), round(cpu, 1), rss))

    def _over(self, proc, now, reading):
        """Why a process passed its max_age or max_rss, or None."""
        deadline, age = self._deadlines.get(proc), now - proc._spawned_at
        if deadline is not None and age > deadline:
            return "age %.1fs > %gs" % (age, deadline)
        rss = reading(proc)["rss"] if proc.config.max_rss else None
        if isinstance(rss, int) and rss > proc.config.max_rss:
            return "rss %s > %s" % (_human(rss), _human(proc.config.max_rss))
        return None


# -- Metrics: the Prometheus text exposition (GET /metrics) ----------------------------------------
# What the loop holds and what the sampler's last tick read, in Prometheus's text format 0.0.4.  A
# scrape reads no /proc of its own: it keeps the sampler reading every process for _METRICS_KEEP
# seconds, and a process the sampler has not read yet has no cpu or memory series.  Loop thread.

_METRICS = [  # name, type, help
    ("gaffer_job_state", "gauge", "The job's state: 1 for its current one, 0 for the others."),
    ("gaffer_job_processes", "gauge", "The job's processes: running, ready, and its target count."),
    ("gaffer_job_restarts_total", "counter", "Respawns after exits nobody asked for."),
    ("gaffer_process_start_time_seconds", "gauge", "When the slot's process started (epoch seconds)."),
    ("gaffer_process_cpu_seconds_total", "counter", "CPU seconds the slot's process used (user and system)."),
    ("gaffer_process_resident_memory_bytes", "gauge", "The slot's process's resident memory."),
    ("gaffer_process_ready", "gauge", "1 when the slot's process is ready."),
    ("gaffer_process_last_exit_code", "gauge", "How the slot's last process ended: its status, or -N for signal N."),
    ("gaffer_cgroup_memory_bytes", "gauge", "memory.current of the slot's cgroup."),
    ("gaffer_cgroup_oom_kills_total", "counter", "OOM kills in the slot's cgroup (memory.events)."),
    ("gaffer_cgroup_pids", "gauge", "pids.current of the slot's cgroup."),
    ("gaffer_cgroup_cpu_seconds_total", "counter", "CPU seconds of the slot's cgroup (cpu.stat usage_usec)."),
    ("gaffer_cgroup_cpu_throttled_seconds_total", "counter", "Seconds the slot's cgroup was throttled (cpu.stat)."),
    ("gaffer_socket_waiting_connections", "gauge", "Connections a held socket has that no process accepted yet."),
    ("gaffer_manager_uptime_seconds", "gauge", "Seconds since the manager started."),
    ("gaffer_manager_loop_turn_max_seconds", "gauge", "The longest loop turn's work since the last scrape."),
]
_CGROUP_METRICS = [("memory", "gaffer_cgroup_memory_bytes"), ("oom_kills", "gaffer_cgroup_oom_kills_total"),
                   ("pids", "gaffer_cgroup_pids"), ("cpu_seconds", "gaffer_cgroup_cpu_seconds_total"),
                   ("throttled_seconds", "gaffer_cgroup_cpu_throttled_seconds_total")]
_SHOWN_STATES = list(dict.fromkeys(state.shown for state in _JobState))


def _label_value(value):
    return '"%s"' % str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric_value(value):
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def _exposition(manager):
    """GET /metrics: every job, slot, cgroup, held socket and the manager, as Prometheus reads them."""
    sampler, loop = manager._sampler, manager.loop
    sampler.want(_METRICS_KEEP)
    series = {name: [] for name, _, _ in _METRICS}

    def add(name, labels, value):
        if value is not None:
            series[name].append((labels, value))
    for job in manager._all_jobs():
        labels = {"session": job.session, "job": job.config.name}
        for state in _SHOWN_STATES:
            add("gaffer_job_state", dict(labels, state=state), int(job.state.shown == state))
        for kind, count in (("running", len(job.running)), ("ready", job.ready), ("target", job.numprocesses)):
            add("gaffer_job_processes", dict(labels, kind=kind), count)
        add("gaffer_job_restarts_total", labels, job.restarts)
        for number, slot in sorted(job.slots.items()):
            slotted = dict(labels, slot=str(number))
            add("gaffer_process_last_exit_code", slotted, slot.last_exit)
            if not slot.procs:
                continue
            proc = slot.procs[-1]  # the newest: in a replacement, the one that takes over the slot
            sample = sampler.last(proc) or {}
            add("gaffer_process_start_time_seconds", slotted, proc.create_time)
            add("gaffer_process_ready", slotted, int(proc._state is _State.READY))
            add("gaffer_process_cpu_seconds_total", slotted, sample.get("cpu_seconds"))
            add("gaffer_process_resident_memory_bytes", slotted,
                sample.get("rss") if isinstance(sample.get("rss"), int) else None)
            for key, name in _CGROUP_METRICS:
                add(name, slotted, sample.get("cgroup", {}).get(key))
    for held in manager._sockets.describe() if manager._sockets.count() else ():
        add("gaffer_socket_waiting_connections", {"socket": held["name"]}, held.get("waiting"))
    add("gaffer_manager_uptime_seconds", {}, round(loop.time() - loop.started, 3))
    add("gaffer_manager_loop_turn_max_seconds", {}, round(loop.take_longest_turn(), 6))
    lines = []
    for name, kind, text in _METRICS:
        if series[name]:
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
            lines += ["%s%s %s" % (name, "{%s}" % ",".join("%s=%s" % (key, _label_value(value)) for key, value
                                                           in labels.items()) if labels else "", _metric_value(value))
                      for labels, value in series[name]]
    return "\n".join(lines) + "\n"


# -- Pub/sub channels (_Topics) --------------------------------------------------------------------
# A channel is fed on the loop thread and read from any thread: by callbacks bound to it, or by
# get() and iteration, with a bounded buffer in between.  _Topics (loop thread) makes them, hooked
# to what feeds them, and closes them when their owner ends.

_CHANNEL_MAX_BYTES = 8 << 20
_MESSAGE_COST = 256  # what a message counts for in a channel's buffer, besides its data


class _StatsCallbacks(EventEmitter):
    """STATS channels call their callbacks with the message alone."""

    @staticmethod
    def _invoke(listener, evtype, msg):
        listener(msg)


class Channel:
    """A subscription to one topic of a manager (Manager.subscribe).

    Messages go to the callbacks bound to them, on the loop thread:
    ``bind(event, cb)`` / ``bind_all(cb)`` call ``cb(evtype, msg)`` (STATS
    channels: ``bind(cb)``, ``cb(msg)``; STREAM channels: the event is the
    output label).  A message no callback takes is kept for ``get()`` and
    iteration, from any thread, up to `max_bytes` (8 MiB by default; each
    message counts as its data plus 256 bytes).  Past that, messages are
    dropped and counted in ``dropped``; the reader then gets an
    ``("overflow", {"dropped": n, "topic": ...})`` message where the gap is.
    A channel closes when its process exits, its job is unloaded, the manager
    stops, or on close(); iteration then ends and get() raises EOFError.
    """

    def __init__(self, loop, topic, owner, hook, release, max_bytes=_CHANNEL_MAX_BYTES, msg_only=False):
        self.topic = topic
        self.max_bytes = max_bytes
        self.dropped = 0
        self.closed = False
        self.owner = owner        # what feeds it, whose end closes it: a job, a process, or None (the manager)
        self._loop = loop
        self._release = release   # release(channel) on the loop thread, once closed: _Topics forgets it
        self._callbacks = _StatsCallbacks() if msg_only else EventEmitter()
        # _cond guards _queue, _queued_bytes, _lost and closed: the loop puts, readers take.
        self._cond = threading.Condition()
        self._queue = collections.deque()  # (evtype, msg, cost)
        self._queued_bytes = 0
        self._lost = 0  # dropped since the reader last heard of it
        self.unhook = hook(self)  # hooked to what feeds it as it is made; unhook() undoes it

    def __repr__(self):
        return "<Channel %r%s queued=%d dropped=%d>" % (self.topic, " closed" if self.closed else "",
                                                        len(self._queue), self.dropped)

    def bind(self, event, callback=None):
        """Call ``callback(evtype, msg)`` for messages of `event` (a prefix works); ``bind(cb)`` binds all."""
        if callback is None:
            event, callback = ".", event
        self._callbacks.subscribe(event, callback)

    def bind_all(self, callback):
        """Call ``callback(evtype, msg)`` for every message."""
        self._callbacks.subscribe(".", callback)

    def unbind(self, event, callback=None):
        """Undo a bind() or bind_all()."""
        if callback is None:
            event, callback = ".", event
        self._callbacks.unsubscribe(event, callback)

    def get(self, timeout=None):
        """Return the next ``(evtype, msg)`` not taken by a callback.

        Raises:
            queue.Empty: nothing came within `timeout` seconds.
            EOFError: the channel is closed and everything was read.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue or self.closed, timeout):
                raise queue.Empty
            if not self._queue:
                raise EOFError("channel %r is closed" % self.topic)
            evtype, msg, cost = self._queue.popleft()
            self._queued_bytes -= cost
            return evtype, msg

    def __iter__(self):
        while True:
            try:
                yield self.get()
            except EOFError:
                return

    def close(self):
        """Stop the channel (any thread); what was queued can still be read."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self._note_loss()
            self._cond.notify_all()
        if self._loop.in_loop_thread():
            self._release(self)
        else:
            self._loop.call_soon_threadsafe(self._release, self)

    def _put(self, evtype, msg):
        """Deliver a message (loop thread): to the callbacks, else to the queue."""
        if self.closed or self._callbacks.publish(evtype, msg):
            return
        cost = _MESSAGE_COST + len(msg.get("data", b"")) + len(msg.get("line", ""))  # what it holds
        with self._cond:
            if self._queued_bytes + cost > self.max_bytes:
                if not self._lost:
                    _log.warning("channel %r is full (%d bytes unread): dropping messages", self.topic,
                                 self._queued_bytes)
                self._lost += 1
                self.dropped += 1
                return
            self._note_loss()
            self._queue.append((evtype, dict(msg, event=evtype), cost))
            self._queued_bytes += cost
            self._cond.notify()

    def _note_loss(self):
        """Tell the reader, where the gap is, how many messages it lost.  Caller holds _cond."""
        if self._lost:
            msg = {"event": "overflow", "topic": self.topic, "dropped": self._lost}
            self._queue.append(("overflow", msg, _MESSAGE_COST))
            self._queued_bytes += _MESSAGE_COST
            self._lost = 0


class _Topics:
    """The manager's pub/sub channels (Manager.subscribe): each hooked, as it is made, to what feeds
    it (the events, a process's output, the sampler, a job's lines), and closed when its owner ends.
    Loop thread only."""

    SOURCES = "EVENTS, JOB, PROCESS, STATS, STREAM or LOGS"

    def __init__(self, manager):
        self._manager = manager
        self._channels = {}  # owner (a _Job, a Process, or None: the manager) -> its open channels

    def __len__(self):
        return sum(map(len, self._channels.values()))

    def subscribe(self, topic, max_bytes, tail):
        """A channel on `topic`, first given the last `tail` lines (LOGS, STREAM) in this same loop turn."""
        m = self._manager
        if not isinstance(topic, str):
            raise ProcessError(400, "a topic is a str such as 'EVENTS' or 'JOB:default.web', got %r" % (topic,))
        source, _, target = topic.partition(":")
        source = source.upper()
        if source == "EVENTS":
            owner, hook = None, self._events_hook(m.events, target or ".", "")
        elif source == "JOB":
            owner = m._job(target)
            hook = self._events_hook(m.events, "job." + owner.name, "job.%s." % owner.name)
        elif source in ("PROCESS", "STREAM"):
            if not _is_number(target):
                raise ProcessError(400, "%s needs a process id, got %r" % (source, target))
            owner = m._process(int(target))
            hook = (self._events_hook(m.events, "proc.%d" % owner.pid, "proc.%d." % owner.pid) if source == "PROCESS"
                    else self._events_hook(owner._io, ".", ""))
        elif source in ("STATS", "LOGS"):
            owner = m._process(int(target)) if _is_number(target) else m._job(target)
            hook = self._lines_hook(owner) if source == "LOGS" else self._stats_hook(owner)
        else:
            raise ProcessError(400, "unknown topic source %r in %r: use %s" % (source, topic, self.SOURCES))
        channel = Channel(m.loop, topic, owner, hook, self.release, max_bytes, msg_only=source == "STATS")
        if tail and source == "LOGS":  # history first, then what comes: both on this turn of the loop
            job = owner if isinstance(owner, _Job) else owner._job
            for row in job.lines(tail, None if owner is job else owner.pid):
                channel._put("line", row)
        elif tail and source == "STREAM":
            for label, data in owner._recent(tail).items():
                channel._put(label, {"name": owner.name, "pid": owner.pid, "data": data})
        self._channels.setdefault(owner, set()).add(channel)
        return channel

    @staticmethod
    def _events_hook(emitter, pattern, strip):
        def hook(channel):
            listener = (lambda evtype, msg: channel._put(evtype[len(strip):], msg)) if strip else channel._put
            emitter.subscribe(pattern, listener)
            return lambda: emitter.unsubscribe(pattern, listener)
        return hook

    @staticmethod
    def _lines_hook(owner):
        """LOGS: a job's lines, or one process's (its job's, filtered)."""
        job, only = (owner, None) if isinstance(owner, _Job) else (owner._job, owner.pid)

        def hook(channel):
            job.followers[channel] = only
            return lambda: job.followers.pop(channel, None)
        return hook

    def _stats_hook(self, owner):
        sampler = self._manager._sampler

        def hook(channel):  # STATS: fed by the sampler
            sampler.watch(owner, channel._put)
            return lambda: sampler.unwatch(owner, channel._put)
        return hook

    def release(self, channel):
        """Unhook a channel that closed from what feeds it."""
        channels = self._channels.get(channel.owner, set())
        if channel in channels:
            channels.discard(channel)
            if not channels:
                del self._channels[channel.owner]
            channel.unhook()

    def close(self, owner):
        """Its owner ended (a process exited, a job was unloaded): its channels close."""
        for channel in list(self._channels.get(owner, ())):
            channel.close()

    def close_all(self):
        for owner in list(self._channels):
            self.close(owner)


# -- Restart policy, backoff and flapping (_Respawns) ----------------------------------------------
# When a slot whose process exited on its own is refilled: at once, after a backoff that grows
# with the slot's quick-exit streak, never (the restart policy retires the slot), or when a
# flapping job is retried.  Loop thread only.

def _backoff_delay(streak, backoff_max):
    """Nothing after one quick exit; then 0.1 s, doubling up to backoff_max, each +-20 % at random."""
    if streak <= 1:
        return 0.0
    import random  # only a crash loop needs it
    delay = min(_BACKOFF_FIRST * 2.0 ** min(streak - 2, 64), backoff_max)
    return delay * random.uniform(1 - _BACKOFF_JITTER, 1 + _BACKOFF_JITTER)


class _Flaps:
    """A flapping job's record: its recent unasked-for exits, the retries used, the retry's timer."""
    __slots__ = ("exits", "retries", "timer")

    def __init__(self):
        self.exits = collections.deque()  # loop times, within flapping.window
        self.retries = 0                  # since the job was last started by hand
        self.timer = None


class _Respawns:
    """The restart decisions of every job: each slot's streak and backoff, each job's flapping."""

    def __init__(self, manager):
        self._manager = manager
        self._loop = manager.loop
        self._flaps = {}  # _Job -> _Flaps, once it exited unasked with flapping set

    def decide(self, proc, exit_status, term_signal, unasked):
        """A process exited (unasked: nobody stopped it, its job runs): (its slot, respawn, delay).  A quick
        exit (before min_uptime) adds to its slot's streak, which says how long the respawn waits."""
        slot = proc._job.slots.get(proc.slot) if not proc.once else None  # None: a slot scaled away
        if not (unasked and slot is not None and proc._wants_respawn(exit_status, term_signal)):
            return slot, False, None
        quick = self._loop.time() - proc._spawned_at < proc.config.min_uptime
        slot.streak = slot.streak + 1 if quick else 0
        return slot, True, _backoff_delay(slot.streak, proc.config.backoff_max)

    def refill(self, job, slot, unasked, respawn, delay):
        """After the exit event: the slot respawns (now or after its backoff) unless the job flaps, or the
        restart policy leaves it empty until start_job, reload or scale."""
        if unasked and not respawn and slot is not None and slot.idle:
            job.retire(slot)
            self._manager._refresh(job)
        elif respawn and job.active and not self._flapped(job):
            job.restarts += 1
            if slot.streak <= 1:
                self._manager._respawn(job, slot)
            else:
                self.back_off(job, slot, delay)

    def spawn_failed(self, job, exc, slot):
        """A spawn the OS refused (a binary gone, say) is a quick exit of its slot, on the same schedule;
        never retried at once, so it waits 0.1 s at least."""
        self._manager._spawn_error(job, exc)
        _log.error("%s", exc.reason)
        if job.active and not self._flapped(job):
            slot.streak = max(slot.streak + 1, 2)
            self.back_off(job, slot)

    def back_off(self, job, slot, delay=None):
        """Hold a slot for its respawn after the backoff of its streak, and publish backoff (name, delay)."""
        delay = _backoff_delay(slot.streak, job.config.backoff_max) if delay is None else delay
        job.back_off(slot, self._loop.call_later(delay, self._due, job, slot))
        self._manager._refresh(job)
        self._manager._publish_job(job, "backoff", delay=round(delay, 3))

    def _due(self, job, slot):
        slot.timer = None  # fired: due() has nothing to cancel
        job.due(slot)
        if self._manager._loaded(job):
            self._manager._respawn(job, slot)
        self._manager._refresh(job)

    def _flapped(self, job):
        """Count an unasked-for exit; if the job is flapping (flapping.attempts within window), stop it,
        publish flap, and retry it after retry_in, max_retry times at most."""
        flapping = job.config.flapping
        if flapping is None:
            return False
        flaps, now = self._flaps.setdefault(job, _Flaps()), self._loop.time()
        flaps.exits.append(now)
        while now - flaps.exits[0] > flapping.window:
            flaps.exits.popleft()
        if len(flaps.exits) < flapping.attempts:
            return False
        flaps.exits.clear()
        self._manager._publish_job(job, "flap")
        retry = flaps.retries < flapping.max_retry
        self._manager._stop_job(job, _JobState.RETRYING if retry else _JobState.FATAL)
        self._manager._deps.wake()
        if retry:
            flaps.retries += 1
            flaps.timer = self._loop.call_later(flapping.retry_in, self._retry, job)
        else:
            _log.error("%s is flapping; stopped after %d retries", job.name, flaps.retries)
        return True

    def _retry(self, job):
        self._flaps[job].timer = None
        manager = self._manager
        if manager._state is not _Lifecycle.RUNNING or not manager._loaded(job):
            return
        manager._job_to(job, _JobState.RUNNING)  # RETRYING -> running
        manager._manage(job)

    def cancel(self, job):
        """The job stops: its flapping retry and its backoffs are cancelled, its retired slots emptied."""
        flaps = self._flaps.get(job)
        if flaps is not None and flaps.timer is not None:
            flaps.timer.cancel()
            flaps.timer = None
        for slot in list(job.backoff):
            job.due(slot)
        for slot in list(job.retired):
            job.unretire(slot)

    def reset(self, job):
        """The job is started by hand, or unloaded: that and its flapping history are forgotten too."""
        self.cancel(job)
        self._flaps.pop(job, None)


# -- Schedules (_Schedules) ------------------------------------------------------------------------
# A job with a schedule (cron) or every waits, started, for its next run: a timer on the loop's
# monotonic clock towards a time of the wall clock, which may jump (NTP, DST, a suspend).  So the timer
# sleeps a minute at most, and each wake-up works the next run out again from the wall clock.  Each run
# is the job started (its processes spawned), and it ends once its processes exited.  Loop thread.

_SCHEDULE_RECHECK = 60.0  # the longest a schedule's timer sleeps before it reads the wall clock again


class _Schedule:
    """A started scheduled job's next run: the time it matches (base), that time moved by its jitter
    (when, what next_run shows), the timer towards it, the anchor of an `every`, and a queued run."""

    __slots__ = ("base", "when", "timer", "anchor", "queued")

    def __init__(self, anchor):
        self.base = self.when = self.timer = None
        self.anchor = anchor  # an every's first run (wall clock): its runs are anchor + k * every
        self.queued = False   # concurrency "queue": a run came due while the last one ran


class _Schedules:
    """The jobs that run on a schedule: each started one's next run and its timer, the overlap policy
    (concurrency) when a run comes due while the last one still runs, and what a start by hand does."""

    def __init__(self, manager):
        self._manager = manager
        self._loop = manager.loop
        self._jobs = {}  # _Job -> _Schedule, while it is started (SCHEDULED, or running a run)

    def defer(self, job):
        """A scheduled job being started: it waits for its next run (SCHEDULED), except an every, whose
        first run is at start.  A job that is already waiting runs now (start_job).  None: start it now,
        as any job."""
        if not _scheduled(job.config):
            return None
        if job in self._jobs:
            return None  # it waits (SCHEDULED): start_job runs it now
        record = self._jobs[job] = _Schedule(self._loop.wall())
        self._arm(job, record)
        return None if job.config.every is not None else _JobState.SCHEDULED  # an every's first run is now

    def catch_up(self, job, last_run):
        """serve --state knows the job's last run (epoch seconds): with catch_up, a run the schedule had
        due since then (while no manager ran) runs once, now."""
        record = self._jobs.get(job)
        if record is None or not job.config.catch_up or last_run is None or job.state is not _JobState.SCHEDULED:
            return
        missed = self._base_after(job, record, last_run)
        if missed is not None and missed <= self._loop.wall():
            self._run(job)

    def next_run(self, job):
        """When the job runs next (epoch seconds, its jitter included), or None."""
        record = self._jobs.get(job)
        return None if record is None or record.when is None else round(record.when, 3)

    def cancel(self, job):
        """The job stopped (or is unloaded): no run is due any more."""
        record = self._jobs.pop(job, None)
        if record is not None and record.timer is not None:
            record.timer.cancel()

    def updated(self, job, previous):
        """The job has a new config: a new schedule is worked out again from now; a job that no longer has
        one and was waiting starts as any job."""
        record = self._jobs.get(job)
        if record is None or (job.config.schedule, job.config.every, job.config.jitter) == (
                previous.schedule, previous.every, previous.jitter):
            return
        waiting = job.state is _JobState.SCHEDULED
        self.cancel(job)
        if _scheduled(job.config):
            self._jobs[job] = record = _Schedule(self._loop.wall())
            self._arm(job, record)
        elif waiting:
            self._manager._activate(job)  # as any started job now: the update's spawn fills it

    def changed(self, job):
        """The job's state changed: a run that ended starts the one queued meanwhile (on the next turn);
        one started without a timer (a flapping retry) waits for its next run again."""
        if job.state is not _JobState.SCHEDULED:
            return
        record = self._jobs.get(job)
        if record is None:
            record = self._jobs[job] = _Schedule(self._loop.wall())
            self._arm(job, record)
        elif record.queued:
            record.queued = False
            self._loop.call_soon_threadsafe(self._run, job)

    def _base_after(self, job, record, after):
        """The first time after `after` that the job's schedule matches (no jitter)."""
        every = job.config.every
        if every is None:
            return _Cron(job.config.schedule).next_after(after)
        return record.anchor + (int(max(0.0, after - record.anchor) // every) + 1) * every

    def _arm(self, job, record):
        """The timer towards the next run, from the wall clock now: a new base (the first, after a run,
        or after the clock jumped) draws a new jitter."""
        now = self._loop.wall()
        base = self._base_after(job, record, now)
        if base != record.base:
            import random
            record.base = base
            record.when = None if base is None else base + random.uniform(0, job.config.jitter)
        if record.timer is not None:
            record.timer.cancel()
        delay = _SCHEDULE_RECHECK if record.when is None else min(max(0.0, record.when - now), _SCHEDULE_RECHECK)
        record.timer = self._loop.call_later(delay, self._wake, job)

    def _wake(self, job):
        record = self._jobs.get(job)
        if record is None:
            return
        record.timer = None
        if record.when is not None and self._loop.wall() >= record.when and self._manager.active:
            record.base = None  # this one is taken: the next is worked out from now
            self._run(job)
        if job in self._jobs:  # a listener of the run's events may have stopped the job
            self._arm(job, record)

    def _run(self, job):
        """A run is due: the job starts (its processes spawn), unless one runs still; then its concurrency
        skips this one, queues it for when that one ends, or stops that one for this."""
        m = self._manager
        record = self._jobs.get(job)
        if record is None or not m._loaded(job) or not m.active:
            return
        if job.state is not _JobState.SCHEDULED:  # the last run goes on
            policy = job.config.concurrency
            _log.info("%s: a run is due while the last one runs: %s", job.name,
                      {"skip": "skipped", "queue": "queued", "replace": "that one is replaced"}[policy])
            if policy == "queue":
                record.queued = True
            elif policy == "replace" and job.active:
                for proc in job.processes():
                    m._stop(proc, "stop_process")
                m._manage(job)  # the same slots, filled by this run's processes
            return
        m._activate(job)  # SCHEDULED -> running (defer says: now)
        m._manage(job)


# -- Large spawns in batches (_Batches) ------------------------------------------------------------
# A call that spawns many processes spawns 20 ms of them a loop turn, reaping and other calls in
# between; the caller waits for a Future of the whole.  Loop thread.

class _Batches:
    """The spawns of a large load, scale or start_job: the slot engine spawns _SPAWN_SLICE seconds of
    them a loop turn; the call that asked gets a Future, done when the last batch is, or failed (after
    undo) if one fails, as if all had been spawned at once."""

    def __init__(self, manager):
        self._manager = manager
        self._waiters = []  # (job, Future, result, undo) of calls that return once a large spawn is done

    def more(self, job):
        """A batch ended before the job was full: the next one on the next loop turn."""
        if job.spawn_timer is None:
            job.spawn_timer = self._manager.loop.call_later(0, self.next, job)

    def next(self, job):
        """The next batch.  For a call that waits, a failure stops what the call spawned, undoes the call
        and raises in the caller."""
        m = self._manager
        if job.spawn_timer is not None:
            job.spawn_timer.cancel()
            job.spawn_timer = None
        waiters = [w for w in self._waiters if w[0] is job]
        try:
            if m._loaded(job):
                m._manage(job, strict=job.spawning is not None)
        except ProcessError as exc:
            for waiter in waiters:
                self._waiters.remove(waiter)
                waiter[1].set_exception(waiter[3](exc))
            return
        if job.spawn_timer is None:
            job.spawning = None
            for waiter in waiters:
                self._waiters.remove(waiter)
                waiter[1].set_result(waiter[2])

    def done(self, job, result, undo=lambda exc: exc):
        """`result` now, or, while the job's spawn goes on in batches, a Future of it for when it is done;
        if a later batch fails, undo(exc) puts the job back and returns the error to raise."""
        if job.spawn_timer is None:
            return result
        future = Future()
        future.set_running_or_notify_cancel()
        self._waiters.append((job, future, result, undo))
        return future

    def finish_all(self):
        """On the loop thread, a call cannot wait for later turns: every batch now."""
        while self._waiters:
            self.next(self._waiters[0][0])

    def close(self):
        for _, future, result, _ in self._waiters:  # their spawns ended with the manager
            future.set_result(result)
        self._waiters.clear()


# -- Rolling replacement (_Rollouts) ---------------------------------------------------------------
# A job's processes replaced while it serves: new ones first, then the old; with a readiness check,
# one at a time, each old one stopped once a new one is ready.  Loop thread.

class _Rollout:
    """A job's processes replaced one at a time: a new one, ready, then an old one stopped."""

    def __init__(self, old, previous, asked=True):
        self.old = old            # pids of the processes to replace, lowest slot first
        self.previous = previous  # the config they run: the job's again if the rollout fails
        self.surge = None         # the new process awaited, counted beyond numprocesses until ready
        self.asked = asked        # a reload, update or restart (not recycling): its dependents may follow


class _Rollouts:
    """reload, update, restart and recycling replace processes through here, with the manager's
    spawn and stop.  A rollout (job.rollout) that fails gives the job back the config it ran."""

    def __init__(self, manager):
        self._manager = manager
        self._waiters = []  # (pids, callback) of restart() calls: called once those are reaped

    def replace(self, job, previous=None):
        """Replace every counted process: spawn the new ones first, then stop the old.

        With a readiness check, one at a time (roll): each old process is stopped only once a new
        one is ready.  If a new one cannot be spawned, the new ones are stopped, the old kept, and
        ProcessError raised.
        """
        m = self._manager
        if job.rollout is not None:  # the newer one wins; a failure goes back to what ran before both
            config, previous = job.config, job.rollout.previous
            self.failed(job, "replaced by a newer rollout")
            job.config = config
        if job.config.ready is not None and job.running:
            job.rollout = _Rollout([p.pid for p in sorted(job.running.values(), key=lambda p: p.slot)],
                                   previous or job.config)
            self.roll(job)
            return
        old = sorted(job.running.values(), key=lambda p: p.slot)  # fewer new ones take the lowest slots
        new = []
        try:
            while len(new) < job.numprocesses:  # each new process takes an old one's slot, and its $PORT
                new.append(m._spawn(job, slot=old[len(new)].slot if len(new) < len(old) else None))
        except ProcessError as exc:
            m._spawn_error(job, exc)
            for proc in new:
                m._stop(proc, "stop_process")
            raise
        for proc in old:
            m._stop(proc, "stop_process")
        m._deps.replaced(job)

    def recycle(self, proc, reason):
        """The sampler found a ready process past its max_rss or max_age: a new one first, then it."""
        m, job = self._manager, proc._job
        if job.rollout is not None or not job.active or not m.active:
            return
        m._publish_job(job, "recycle", pid=proc.pid, reason=reason)
        job.rollout = _Rollout([proc.pid], job.config, asked=False)
        try:
            self.roll(job)
        except ProcessError:
            pass  # published as spawn_error and rollout_failed; the next tick tries again

    def roll(self, job):
        """The next step of a rollout: spawn one new process, or, with enough ready, stop the last old ones."""
        m, rollout = self._manager, job.rollout
        old = [pid for pid in rollout.old if pid in job.running]
        if len(job.running) - len(old) >= job.numprocesses:
            for pid in old:
                m._stop(job.running[pid], "stop_process")
            job.rollout = None
            m._publish_job(job, "rollout")
            if rollout.asked:
                m._deps.replaced(job)
            return
        try:  # the new process takes the slot of the old one that goes when it is ready
            surge = m._spawn(job, slot=job.running[old[0]].slot if old else None)
        except ProcessError as exc:
            m._spawn_error(job, exc)
            self.failed(job, exc.reason)
            raise
        rollout.surge = surge.pid
        if surge._state is _State.READY:  # no readiness check: ready as it spawned
            self.ready(job, surge)

    def ready(self, job, proc):
        """A process is ready: if it is the rollout's new one, one old one goes, then the next step."""
        if job.rollout is None or job.rollout.surge != proc.pid:
            return
        job.rollout.surge = None
        old = [pid for pid in job.rollout.old if pid in job.running]
        if old:
            self._manager._stop(job.running[old[0]], "stop_process")
        try:
            self.roll(job)
        except ProcessError:
            pass  # published as rollout_failed

    def lost(self, job, proc, reason):
        """A process exited or missed its ready_timeout: if it was the rollout's new one, the rollout fails."""
        if job.rollout is not None and job.rollout.surge == proc.pid:
            self.failed(job, reason)
            return True
        return False

    def restart(self, callback):
        """Manager.restart(): every running job's processes replaced; callback once the old are reaped."""
        m, old = self._manager, set()
        for job in m._all_jobs():
            if job.active and m._loaded(job) and m.active:
                old.update(job.running)
                try:
                    self.replace(job)
                except ProcessError as exc:
                    _log.error("restart of %s kept its old processes: %s", job.name, exc)
                    old.difference_update(job.running)
        if callback is not None:
            self._waiters.append(({pid for pid in old if pid in m._procs}, lambda: callback(m)))
            self.reaped(None)

    def reaped(self, pid):
        """A process was reaped (None: none, look again): the restart() callbacks that waited for it run."""
        for waiting, callback in list(self._waiters):
            waiting.discard(pid)
            if not waiting:
                self._waiters.remove((waiting, callback))
                _run_callback(callback)

    def failed(self, job, reason):
        """The new process did not become ready: it goes, the old ones keep serving."""
        m = self._manager
        rollout, job.rollout = job.rollout, None
        job.config = rollout.previous  # what the old processes run, and what replaces them if they exit
        surge = job.running.get(rollout.surge)
        if surge is not None:
            m._stop(surge, "stop_process")
        _log.error("rollout of %s stopped: %s", job.name, reason)
        m._publish_job(job, "rollout_failed", reason=reason)
        for waiting, _ in self._waiters:  # a restart() waits for these no longer
            waiting.difference_update(rollout.old)
        self.reaped(None)


# -- Apps and stop callbacks (_Apps) ---------------------------------------------------------------
# What runs beside the jobs (the HTTP controller is an app) and what waits for a stop.  start()
# runs in the thread of Manager.start(); everything else on the loop thread, where a failing app
# or callback is logged, never raised into the loop.

class _Apps:
    """The manager's apps (each started after the loop, restarted by restart(), stopped last, in reverse)
    and the callbacks of stop(), called once everything has stopped."""

    def __init__(self):
        self._apps = []
        self._stop_callbacks = []

    def start(self, apps, loop, manager):
        """Each app's start(loop, manager), in order; the first failure is raised."""
        for app in apps:
            app.start(loop, manager)
            self._apps.append(app)

    def restart(self):
        for app in self._apps:
            try:
                app.restart()
            except Exception:
                _log.exception("app %r failed to restart", app)

    def on_stop(self, callback):
        self._stop_callbacks.append(callback)

    def stopped(self, manager):
        """The manager has stopped: the apps stop, then the stop() callbacks see it stopped."""
        for app in reversed(self._apps):
            try:
                app.stop()
            except Exception:
                _log.exception("app %r failed to stop", app)
        callbacks, self._stop_callbacks = self._stop_callbacks, []
        for callback in callbacks:
            _run_callback(lambda: callback(manager))


# -- Manager ---------------------------------------------------------------------------------------
# The public API first (any thread), then the _do_* bodies and the _on_*
# handlers, which run on the loop thread and own all the state.

_SCALE = r"\s*([=+-]?)\s*([0-9]+)\s*"


def _scale_change(n):
    """scale()'s `n` as (op, amount): an int adds (> 0) or removes; "3", "+3", "-3", "=3"."""
    if isinstance(n, int) and not isinstance(n, bool):
        return ("-" if n < 0 else "+"), abs(n)
    match = re.fullmatch(_SCALE, n) if isinstance(n, str) else None
    if match is None:
        raise ValueError("scale must be an int or a str like '3', '+3', '-3' or '=3', got %r" % (n,))
    return match.group(1) or "+", int(match.group(2))


def _send_chunks(lines):
    """send()'s `lines` as a list of bytes: str (UTF-8), bytes or a list of them."""
    if isinstance(lines, (str, bytes, bytearray, memoryview)):
        lines = [lines]
    elif not isinstance(lines, (list, tuple)):
        raise TypeError("send takes str, bytes or a list of them, got %r" % (lines,))
    chunks = []
    for line in lines:
        if isinstance(line, str):
            line = line.encode("utf-8")
        if not isinstance(line, (bytes, bytearray, memoryview)):
            raise TypeError("send takes str, bytes or a list of them, got %r" % (line,))
        chunks.append(bytes(line))
    return chunks


def _config_with_env(config, env):
    """load()'s and update()'s config (a ProcessConfig or a dict) as a new ProcessConfig, `env` laid over its own."""
    if isinstance(config, dict):
        config = ProcessConfig.from_dict(config)
    if not isinstance(config, ProcessConfig):
        raise TypeError("config must be a ProcessConfig or a dict, got %r" % (config,))
    data = config.to_dict()
    data["env"] = {**data["env"], **(env or {})}
    return ProcessConfig.from_dict(data)
_managers = weakref.WeakSet()  # started and not yet stopped, for the atexit hook


def _wait_in_main_thread(manager, on_start):
    """Manager.run() in the main thread: SIGINT and SIGTERM become stop() (a second one kills), and as a
    subreaper SIGCHLD reaps adopted children, until the manager has stopped.  The kernel may hand a
    signal to any thread; Python runs handlers in the main thread only, and only once it wakes.  So the
    main thread sleeps on the signal wakeup fd, which the loop also writes to when it ends."""
    previous, signals = {}, []

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) == 1:
            manager.stop()
        else:
            manager.loop.call_soon_threadsafe(manager._containment.kill_everything)

    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    manager._run_wakeups.append(wake_w)
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, on_signal)
    if manager.subreaper:  # an orphan that exits is a child of ours: reap it now
        reap = manager._containment.reap_adopted
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD,
                                                 lambda signum, frame: manager.loop.call_soon_threadsafe(reap))
    try:
        if on_start is not None:
            on_start()
        while not manager._stopped.is_set():
            wake_r.recv(512)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(old_fd)
        manager._run_wakeups.remove(wake_w)
        wake_r.close()
        wake_w.close()


def _check_manager_settings(loop, clock, cgroups, subreaper):
    if loop is not None and clock is not None:
        raise ValueError("give a loop or a clock, not both")
    if cgroups not in ("auto", True, False):
        raise ValueError("cgroups must be 'auto', True or False, got %r" % (cgroups,))
    if subreaper not in (False, True, "init"):
        raise ValueError("subreaper must be False, True or 'init', got %r" % (subreaper,))


class Manager:
    """Keeps jobs of processes alive; every method may be called from any thread.

    Args:
        loop: a Loop to run on (default: a new one).
        clock: the monotonic clock of a new loop (tests); not with `loop`.
        wall_clock: its wall clock, which schedules follow (default time.time; tests move it).
        stats_interval: seconds between two samples for monitor() and STATS channels.
        guardian: start a guardian process that stops every process if this program dies (SIGKILL too).
        cgroups: "auto" puts each process in a cgroup of its own where the system allows; True
            requires it (RuntimeError at start() otherwise); False uses process groups only.
        subreaper: True adopts and reaps the orphaned descendants of its processes (Linux);
            "init" reaps every child it did not spawn (a container's PID 1).

    All calls but stop() and restart() are synchronous: when load() returns, its
    processes are spawned; when stop_job() returns, its processes are signalled
    (their exit comes later as ``exit`` events).  Calls on a manager that is not
    running raise RuntimeError("manager is not running").
    """

    def __init__(self, loop=None, clock=None, stats_interval=1.0, guardian=True, cgroups="auto", subreaper=False,
                 wall_clock=None):
        _check_manager_settings(loop, clock, cgroups, subreaper)
        self.cgroups = cgroups
        self.subreaper = subreaper
        self.guardian = _bool_setting("guardian", guardian)
        self.loop = loop or Loop(clock, wall_clock)
        self.events = EventEmitter()
        self.use_pidfd = _HAVE_PIDFD and os.environ.get("GAFFER_NO_PIDFD", "") in ("", "0")
        # The parts, each owning its state (DESIGN.md, "Growing the core"):
        self._reaper = (_PidfdReaper if self.use_pidfd else _PollReaper)(self.loop)  # the child watcher
        self._containment = _Containment(self, cgroups, subreaper, self.guardian)
        self._checks = _Checks(self)  # readiness and health
        self._sampler = _Sampler(self.loop, _float_setting("stats_interval", stats_interval, 0.001), self._all_jobs,
                                 lambda proc, reason: self._rollouts.recycle(proc, reason), self._containment.cgroup)
        self._topics = _Topics(self)  # the pub/sub channels
        self._deps = _Dependencies(self)  # depends_on, and the wait_ready() callers
        self._rollouts = _Rollouts(self)  # reload, update and restart, one at a time with a check
        self._batches = _Batches(self)  # large spawns, 20 ms of them a loop turn
        self._respawns = _Respawns(self)  # restart policy, backoff, flapping
        self._sockets = _Sockets(self)  # the listening sockets it holds for its jobs
        self._schedules = _Schedules(self)  # the next run of each job with a schedule
        self._state = _Lifecycle.NEW
        self._sessions = {}       # session -> {job name -> _Job}, in load order
        self._procs = {}          # pid -> Process not yet reaped
        self._log_files = _LogFiles(self.loop.wall)
        self._stop_pending = []   # jobs a manager stop has yet to stop, after their dependents
        self._pids = itertools.count(1)
        self._apps = _Apps()      # the HTTP controller and other apps, and the stop() callbacks
        self._stopped = threading.Event()
        self._run_wakeups = []    # sockets that run() sleeps on, written to when the loop ends

    def __repr__(self):
        # Any thread: each list() copies a loop-owned dict in one step, never iterating it live.
        return "<Manager %s jobs=%d processes=%d>" % (
            self._state.value, sum(map(len, list(self._sessions.values()))), len(self._procs))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()
        self.run()

    # -- lifecycle (any thread)

    def start(self, apps=()):
        """Start the loop thread, then each app's ``start(loop, manager)``.

        Raises:
            RuntimeError: the manager was started before.
            Exception: an app failed to start; the manager is then stopped again.
        """
        if self._state is not _Lifecycle.NEW:
            raise RuntimeError("manager was already started")
        self._containment.start()
        self._state = _Lifecycle.RUNNING
        _managers.add(self)
        self.loop.start(self._on_loop_closed)
        try:
            self._apps.start(apps, self.loop, self)
        except BaseException:
            self.stop()
            self.run()
            raise

    def stop(self, callback=None):
        """Stop every job gracefully, then the apps, then call ``callback(manager)``; return at once.

        Safe from any thread, from a listener and from a signal handler.  A manager
        that is not running calls the callback at once.  The callback sees
        ``manager.started == False``.
        """
        if self._state is _Lifecycle.STOPPED or not self.loop.post(self._do_stop, callback):
            if callback is not None:
                callback(self)

    def restart(self, callback=None):
        """Restart the apps and replace every running process (new ones first); return at once.

        ``callback(manager)`` runs on the loop thread once the old processes are reaped.

        Raises:
            RuntimeError: the manager is not running.
        """
        if not self.loop.post(self._do_restart, callback):
            raise RuntimeError("manager is not running")

    def run(self, on_start=None):
        """Block until the manager has fully stopped (children gone, apps stopped, callbacks called).

        In the main thread, SIGINT and SIGTERM become stop() meanwhile, and a
        second one kills every process at once.  on_start(), if given, is called
        once those handlers are in place (load jobs there, so that a Ctrl-C
        during the loads stops them too).

        Raises:
            RuntimeError: the manager was never started, or this is the loop thread
                (a listener or callback), which would wait for itself.
        """
        if self._state is _Lifecycle.NEW:
            raise RuntimeError("manager was never started")
        if self.loop.in_loop_thread():
            raise RuntimeError("run() on the loop thread (in a listener or callback) would wait for itself")
        if threading.current_thread() is threading.main_thread():
            _wait_in_main_thread(self, on_start)
        else:
            if on_start is not None:
                on_start()
            self._stopped.wait()
        self.loop.thread.join(5)  # with Manager(): returns once the loop thread has ended

    @property
    def stats_interval(self):
        """Seconds between two samples of the processes, for monitor(), STATS channels and the limits."""
        return self._sampler.interval

    @stats_interval.setter
    def stats_interval(self, seconds):
        self._sampler.interval = _float_setting("stats_interval", seconds, 0.001)

    @property
    def active(self):
        """True while the manager runs and accepts calls."""
        return self._state is _Lifecycle.RUNNING

    @property
    def started(self):
        """True from start() until the manager has fully stopped."""
        return self._state in (_Lifecycle.RUNNING, _Lifecycle.STOPPING)

    def wakeup(self):
        """Wake the loop thread (a no-op when it is not running)."""
        self.loop.wakeup()

    # -- jobs (any thread)

    @property
    def sessions(self):
        """Session ids, in creation order."""
        return self._call(lambda: list(self._sessions))

    def jobs(self, sessionid=None):
        """Return ``"session.name"`` of every job (of one session), in load order.

        Raises:
            ProcessNotFound: unknown session.
        """
        return self._call(self._do_jobs, sessionid)

    def jobs_walk(self, callback, sessionid=None):
        """Call ``callback(manager, "session.name")`` for each job, in the caller's thread."""
        for name in self.jobs(sessionid):
            callback(self, name)

    def load(self, config, sessionid=None, env=None, start=True, wait=False, retry=False, last_run=None):
        """Add a job and (by default) start its processes.

        Args:
            config: a ProcessConfig (or a dict for ProcessConfig.from_dict).
            sessionid: the session (default "default").
            env: variables laid over the config's env.
            start: spawn the processes now.
            wait: then wait_ready() for them: True, or the seconds to wait at most.
            retry: if a process cannot be spawned (its binary or cwd missing), keep the job
                loaded and retry it on its backoff schedule, with the reason in
                ``info(name)["last_error"]``, instead of raising (serve does so for the jobs
                of its config file: a missing mount or binary often appears later).
            last_run: when the job last ran under an earlier manager (epoch seconds, as serve --state
                keeps it): a catch_up job whose schedule had a run due since then runs once, now.

        Raises:
            ProcessConflict: a job of that name exists in the session.
            ProcessError: a process could not be spawned (and not `retry`); nothing is
                loaded (the processes spawned before the failure are stopped).
        """
        config = _config_with_env(config, env)
        session = _valid_name("sessionid", sessionid or _DEFAULT_SESSION)
        self._call(self._do_load, config, session, start, _bool_setting("retry", retry))
        if last_run is not None:
            last_run = _float_setting("last_run", last_run, 0, 1e11)
            self._call(lambda: self._schedules.catch_up(self._job((session, config.name)), last_run))
        if start and wait is not False and wait is not None:
            self.wait_ready(_job_name(session, config.name), None if wait is True else wait)

    def add_socket(self, name, address, backlog=None, reuseport=False, mode=None, owner=None):
        """Bind a listening socket now, held for the jobs that name it in ``sockets`` (README: "Held sockets");
        return {name, address, jobs}.  ValueError, ProcessConflict or ProcessError says why not."""
        return self._call(self._sockets.add, name, address, backlog, reuseport, mode, owner)

    def remove_socket(self, name):
        """Close a held socket; ProcessConflict while a loaded job names it."""
        self._call(self._sockets.remove, name)

    def sockets(self):
        """The held sockets: [{name, address (its real port), jobs, waiting (Linux: not yet accepted)}]."""
        return self._call(self._sockets.describe)

    def wait_ready(self, name, timeout=None):
        """Return once every one of the job's counted processes is ready (see ProcessConfig.ready).

        Raises:
            TimeoutError: not ready within `timeout` seconds; the message says how far it got.
            ProcessNotFound: the job is unknown, or was unloaded meanwhile.
            ProcessError: the job is stopped, or was stopped meanwhile (409).
            RuntimeError: called on the loop thread (it would wait for itself), or the manager stopped.
        """
        _ReadyWaiter().wait(self, name, timeout)

    def metrics(self):
        """The Prometheus text exposition (format 0.0.4) of the jobs, slots, cgroups, held sockets and the
        manager (GET /metrics; README: "Metrics").  It keeps the sampler reading every process for the
        next five minutes: a process it has not read yet has no cpu or memory series."""
        return self._call(_exposition, self)

    def not_ready(self):
        """Return the active jobs (``"session.name"``) whose counted processes are not all ready."""
        return self._call(lambda: [job.name for job in self._all_jobs()
                                   if job.active and job.ready < job.numprocesses])

    def unload(self, name_or_config, sessionid=None):
        """Remove a job, stopping its processes.

        Raises:
            ProcessNotFound: unknown job.
        """
        name = name_or_config.name if isinstance(name_or_config, ProcessConfig) else name_or_config
        name = _split_name(name, sessionid)
        self._call(lambda: self._unload(self._job(name)))

    def reload(self, name, sessionid=None):
        """Start the job at its config's count, replacing every process (new ones first)."""
        self._call(self._do_reload, _split_name(name, sessionid))

    def update(self, config, sessionid=None, env=None, start=False):
        """Give a job a new config; its processes are replaced unless the job is stopped.

        The count becomes max(new config's, current); ``start=True`` also starts a stopped job.
        If a new process cannot be spawned the job keeps its old config and processes.
        """
        config = _config_with_env(config, env)
        self._call(self._do_update, config, _split_name(config.name, sessionid), start)

    def get(self, name):
        """Return a copy of the job's ProcessConfig."""
        return self._call(lambda: ProcessConfig.from_dict(self._job(name).config.to_dict()))

    def start_job(self, name):
        """Run the job again at its count: the config's, or the last scale's (no-op if it runs).

        Raises:
            ProcessError: a process could not be spawned; the job is left stopped.
        """
        self._call(self._do_start_job, name)

    def stop_job(self, name):
        """Stop every process of the job; none is restarted until start_job()."""
        self._call(self._do_stop_job, name)

    def commit(self, name, graceful_timeout=0, env=None):
        """Start one extra process of the job, never restarted; return its pid.

        `graceful_timeout` 0 means the job's; `env` is laid over the job's env.
        """
        graceful_timeout = _float_setting("graceful_timeout", graceful_timeout, 0)
        env = _env_setting("env", env or {})
        return self._call(self._do_commit, name, graceful_timeout or None, env)

    def scale(self, name, n):
        """Change the job's count and return the new one.

        `n`: an int adds (> 0) or removes (<= 0); "3" and "+3" add, "-3" removes,
        "=3" sets.  The count never goes below 0; the processes in the highest
        slots stop first (web.3 before web.1, whose $PORT stays in use).

        Raises:
            ValueError: `n` is none of those forms.
        """
        return self._call(self._do_scale, name, *_scale_change(n))

    def status(self, history=False):
        """Every job with its state and processes, in one call (what ``gaffer ps`` shows): ``[{name, state,
        cmd, running, ready, target, restarts, last_exit, processes: [{pid, os_pid, slot, status,
        create_time, cpu, mem}], ...}]``, the states as README's "Command line" lists them.  With history,
        each job's "history" too: [[time, cpu %, rss]] of the sampler's last ticks (the dashboard's charts),
        which it keeps reading for five minutes."""
        return self._call(self._do_status, _bool_setting("history", history))

    def info(self, name):
        """``{name, active, running, running_out, max_processes, processes, config}`` (the seed's), then its
        state, counts, waiting_for, blocked, last_run, next_run, restarts, last_exit, last_error..."""
        return self._call(self._do_info, name)

    def logs(self, name, lines=100, pid=None):
        """The last `lines` lines of output of the job's processes (or of its process `pid`), exited ones
        included (the last 10 of them), oldest first: ``[{time, pid, slot, label, line}]``."""
        lines = _int_setting("lines", lines, 0)
        return self._call(lambda: self._job(name).lines(lines, pid))

    def reopen_logs(self):
        """Open every log file again, as after a logrotate that moved them away (SIGUSR1 to serve)."""
        self._call(self._log_files.reopen)

    def stats(self, name):
        """Return ``{name, stats: [per process], cpu, max_cpu, min_cpu, mem, max_mem, min_mem}``.

        cpu and mem are sums of percentages; they and the extremes are "N/A" without processes.
        """
        return self._call(lambda: self._job(name).stats(self._sampler.sample))

    def manage(self, name):
        """Bring the job back to its count now."""
        self._call(lambda: self._manage(self._job(name)))

    # -- processes (any thread)

    def get_process(self, pid):
        """Return the Process of a manager pid.

        Raises:
            ProcessNotFound: no such live process.
        """
        return self._call(self._process, pid)

    def get_process_id(self):
        """Allocate and return a fresh process id."""
        return next(self._pids)

    def stop_process(self, pid):
        """Stop one process gracefully; its job replaces it (unless committed)."""
        self._call(self._do_stop_process, pid)

    def stopall(self, name):
        """Stop every process of the job gracefully; the job replaces them."""
        self._call(self._do_stopall, name)

    def kill(self, pid, sig):
        """Send a signal (number or name) to one process."""
        self._call(self._do_kill, pid, _signum(sig))

    def killall(self, name, sig):
        """Send a signal (number or name) to every process of the job."""
        self._call(self._do_killall, name, _signum(sig))

    def send(self, pid, lines, stream=None):
        """Queue str (UTF-8), bytes or a list of them for a process's stdin or custom stream."""
        chunks = _send_chunks(lines)
        self._call(lambda: self._running_process(pid)._send(chunks, stream))

    def walk(self, callback, name=None):
        """Call ``callback(manager, process)`` for each running process (of a job), in the caller's thread."""
        for process in self.list(name):
            callback(self, process)

    def list(self, name=None):
        """Return the running Process objects (of a job), oldest first."""
        return self._call(self._do_list, name)

    def pids(self, name=None):
        """Return the pids of the running processes (of a job), oldest first."""
        return [p.pid for p in self.list(name)]

    def monitor(self, listener, name):
        """Call ``listener("stat", msg)`` for every process of the job, every stats_interval seconds.

        Processes spawned later are included; msg is the process stats plus name.
        """
        self._call(lambda: self._sampler.watch(self._job(name), listener))

    def unmonitor(self, listener, name):
        """Stop a monitor() listener."""
        self._call(lambda: self._sampler.unwatch(self._job(name), listener))

    def subscribe(self, topic, max_bytes=None, tail=0):
        """Open a pub/sub channel on a topic; see Channel.

        Topics: ``EVENTS`` or ``EVENTS:<pattern>``, ``JOB:<session.job>``,
        ``PROCESS:<pid>``, ``STATS:<pid>`` or ``STATS:<session.job>``, ``STREAM:<pid>``,
        ``LOGS:<session.job>`` or ``LOGS:<pid>`` (a ``line`` message, as logs() gives them, for each line of
        output of the job's processes).  With `tail`, a STREAM or LOGS channel starts with
        the last `tail` lines already read, then goes on with the new ones: nothing is
        missed or repeated in between.

        Raises:
            ProcessError: an unknown source or a malformed pid (400).
            ProcessNotFound: an unknown job or pid.
        """
        tail = _int_setting("tail", tail, 0)
        return self._call(self._topics.subscribe, topic, max_bytes or _CHANNEL_MAX_BYTES, tail)

    def unsubscribe(self, topic, channel):
        """Close a channel opened by subscribe(topic)."""
        if channel.topic != topic:
            raise ValueError("channel %r is not subscribed to %r" % (channel, topic))
        channel.close()

    # -- plumbing

    def _call(self, fn, *args):
        """Run a change on the loop thread; only while running, except from the loop itself."""
        if not self.loop.in_loop_thread():
            if self._state is not _Lifecycle.RUNNING:
                raise RuntimeError("manager is not running")
            return self.loop.call(fn, *args)
        result = fn(*args)
        if isinstance(result, Future):  # a large spawn, from a listener: finished now, the loop is ours anyway
            self._batches.finish_all()
            return result.result()
        return result

    def _job(self, name, sessionid=None):
        session, job = name if isinstance(name, tuple) else _split_name(name, sessionid)
        try:
            return self._sessions[session][job]
        except KeyError:
            if session not in self._sessions:
                raise ProcessNotFound("session %r not found" % session) from None
            raise ProcessNotFound("job %r not found" % _job_name(session, job)) from None

    def _process(self, pid):
        try:
            return self._procs[pid]
        except (KeyError, TypeError):
            raise ProcessNotFound("process %r not found" % (pid,)) from None

    def _publish(self, msg, *evtypes):
        for evtype in evtypes:
            self.events.publish(evtype, msg)

    def _publish_job(self, job, event, **fields):
        self._publish({"name": job.name, **fields}, event, "job.%s.%s" % (job.name, event))

    def _move(self, proc, state, event, **fields):
        """The one place a process changes state: the move (checked against _TRANSITIONS), the job's
        counts and state, then the event of that move (_MOVE_EVENTS) with the process's fields."""
        was = proc._state
        proc._set_state(state)
        proc._job.count_move(proc, was, state)
        self._refresh(proc._job)
        msg = {"name": proc.name, "pid": proc.pid, "os_pid": proc.os_pid, "slot": proc.slot, **fields}
        if event == "stop_process":  # as the seed sent it
            del msg["os_pid"]
        self._publish(msg, *[topic.format(job=proc.name, pid=proc.pid) for topic in _MOVE_EVENTS[event]])

    def _job_to(self, job, state, announce=True):
        """The one place a job's state changes.  An active state is worked out from the job's slots and
        processes (RUNNING, STARTING or BACKOFF); start and stop go out when it starts or stops running
        (unless announce is off: the caller says it, after what it does)."""
        if state in _ACTIVE_JOB:
            state = job.lifecycle(self._deps.blocked(job))
        was, job.state = job.state, state
        if was in _ACTIVE_JOB and state not in _ACTIVE_JOB:
            self._containment.trim(job)  # its slots' spare cgroups
        if announce and (was in _ACTIVE_JOB) != (state in _ACTIVE_JOB):
            self._publish_job(job, job.announcement(state))
        if was is not state:
            self._deps.changed(job, was)
            self._schedules.changed(job)

    def _refresh(self, job):
        """A running job's processes or slots changed: its state follows."""
        if job.state in _ACTIVE_JOB:
            self._job_to(job, _JobState.RUNNING)

    # -- _do_* bodies (loop thread)

    def _all_jobs(self):
        """Every loaded job, as a snapshot: listeners may load and unload while a caller walks it."""
        return [job for jobs in list(self._sessions.values()) for job in list(jobs.values())]

    def _loaded(self, job):
        return self._sessions.get(job.session, {}).get(job.config.name) is job

    def _do_jobs(self, sessionid):
        if sessionid is None:
            return [job.name for job in self._all_jobs()]
        if sessionid not in self._sessions:
            raise ProcessNotFound("session %r not found" % (sessionid,))
        return [job.name for job in self._sessions[sessionid].values()]

    def _do_load(self, config, session, start, retry=False):
        jobs = self._sessions.get(session, {})
        if config.name in jobs:
            raise ProcessConflict("job %r is already loaded" % _job_name(session, config.name))
        self._deps.refuse_cycle(session, config)
        self._sockets.check(config)
        job = _Job(session, config, config.numprocesses)
        self._containment.set_limits(job, config)
        self._sessions.setdefault(session, jobs)[config.name] = job
        self._publish(dict(name=job.name), "load")
        if start and retry:  # what cannot spawn backs off and is tried again, as a respawn is
            self._activate(job)
            self._manage(job)
            self._deps.release()
        elif start:
            def undo(exc):
                if self._loaded(job):  # a listener may have unloaded it already
                    self._unload(job)
                return ProcessError(exc.errno, "%s; the job was not loaded" % exc.reason)

            try:
                self._start_job(job)
            except ProcessError as exc:
                raise undo(exc) from exc
            return self._batches.done(job, None, undo)

    def _unload(self, job):
        self._stop_job(job)
        self._respawns.reset(job)
        jobs = self._sessions[job.session]
        del jobs[job.config.name]
        if not jobs:
            del self._sessions[job.session]
        self._containment.unloaded(job)
        self._publish({"name": job.name}, "unload")
        self._forget(job)
        self._deps.wake()

    def _do_reload(self, name):
        job = self._job(name)
        job.numprocesses = job.config.numprocesses
        self._activate(job)
        self._rollouts.replace(job)

    def _do_update(self, config, name, start):
        job = self._job(name)
        self._deps.refuse_cycle(job.session, config)
        self._sockets.check(config)
        self._containment.set_limits(job, config)
        old = (job.config, job.numprocesses, job.state)
        respawn = any(getattr(job.config, key) != getattr(config, key) for key in _SPAWN_SETTINGS)

        def undo(exc):  # the old config and count, and the state that went with them
            job.config, job.numprocesses = old[:2]
            self._job_to(job, old[2])
            return exc

        job.config = config
        job.numprocesses = max(config.numprocesses, job.numprocesses)
        self._schedules.updated(job, old[0])
        if start and not job.active and job.state is not _JobState.SCHEDULED:  # started, it waits: no run
            self._activate(job)
        if job.active:
            try:
                if respawn:
                    self._rollouts.replace(job, previous=old[0])
                else:  # read after spawn only (timeouts, signals, flapping...): applied in place
                    for proc in job.running.values():
                        proc.config, proc.graceful_timeout = config, config.graceful_timeout
                    self._manage(job, strict=True)
            except ProcessError as exc:
                raise undo(exc) from None
        self._publish({"name": job.name}, "update")
        return self._batches.done(job, None, undo)

    def _do_start_job(self, name):
        job = self._job(name)
        was_active = job.active

        def undo(exc):
            if not was_active:
                self._stop_job(job)
                self._deps.wake()
            return exc

        if not job.active:  # at the count it had: a scale is not undone by a stop and a start
            self._start_job(job)
        elif job.retired:  # running: fill what the restart policy left empty
            for slot in list(job.retired):
                job.unretire(slot)
            self._manage(job, strict=True)
        return self._batches.done(job, None, undo)

    def _do_stop_job(self, name):
        self._stop_job(self._job(name))
        self._deps.wake()

    def _do_commit(self, name, graceful_timeout, env):
        job = self._job(name)
        try:
            proc = self._spawn(job, once=True, env=env, graceful_timeout=graceful_timeout)
        except ProcessError as exc:
            self._spawn_error(job, exc)
            raise
        return proc.pid

    def _do_scale(self, name, op, amount):
        job = self._job(name)
        before = job.numprocesses
        target = amount if op == "=" else before + amount if op == "+" else before - amount
        job.check_count(target)
        job.numprocesses = max(0, target)
        for slot in list(job.retired):  # scale fills the slots the restart policy left empty
            job.unretire(slot)
        was_active = job.active
        if not job.active and job.numprocesses > before:
            self._activate(job)  # scaling up asks for processes: a stopped job starts, as in the seed

        def undo(exc):  # as it was: the old count, the old processes, stopped if it was
            job.numprocesses = before
            if not was_active:
                self._stop_job(job)
            return exc

        if job.active:
            try:
                self._manage(job, strict=True)
            except ProcessError as exc:
                raise undo(exc) from None
        self._containment.trim(job)  # the spare cgroups of the slots a scale-down freed
        self._publish({"name": job.name}, "update")
        self._deps.wake()
        self._deps.release()
        return self._batches.done(job, job.numprocesses, undo)

    def _do_status(self, history=False):
        if history:
            self._sampler.want(_METRICS_KEEP)
        return [dict(job.status(self._sampler.sample, self.loop.time(), *self._deps.progress(job)),
                     next_run=self._schedules.next_run(job), **({"history": self._sampler.history(job)} if history
                                                                else {})) for job in self._all_jobs()]

    def _do_info(self, name):
        job = self._job(name)
        return dict(job.info(self.loop.time(), *self._deps.progress(job)), containment=self._containment.kind,
                    next_run=self._schedules.next_run(job))

    def _do_stop_process(self, pid):
        proc = self._running_process(pid)
        self._stop(proc, "stop_process")
        self._manage(proc._job)

    def _do_stopall(self, name):
        job = self._job(name)
        for proc in job.processes():
            self._stop(proc, "stop_process")
        self._manage(job)

    def _do_kill(self, pid, signum, job_too=True):
        proc = self._running_process(pid)
        proc._signalled = True  # not a failure for the restart policy
        self._containment.signal(proc, signum, group=False)
        self._publish({"name": proc.name, "pid": proc.pid, "signum": signum},
                      *(["job.%s.kill" % proc.name] if job_too else []), "proc.%d.kill" % proc.pid)

    def _do_killall(self, name, signum):
        job = self._job(name)
        for proc in job.processes():
            self._do_kill(proc.pid, signum, job_too=False)
        self._publish({"name": job.name, "signum": signum}, "job.%s.kill" % job.name)

    def _do_list(self, name):
        if name is None:
            return [p for p in self._procs.values() if p._state in _ALIVE]
        return self._job(name).processes()

    def _forget(self, owner):
        """A process exited or a job was unloaded: its monitors end and its channels close."""
        self._sampler.forget(owner)
        self._topics.close(owner)

    def _running_process(self, pid):
        proc = self._process(pid)
        if proc._state not in _ALIVE:
            raise ProcessNotFound("process %r is stopping" % (pid,))
        return proc

    def _do_stop(self, callback):
        if self._state is _Lifecycle.STOPPED:  # posted by a stop callback, after the others ran
            if callback is not None:
                _run_callback(lambda: callback(self))
            return
        if callback is not None:
            self._apps.on_stop(callback)
        if self._state is not _Lifecycle.RUNNING:
            return
        self._state = _Lifecycle.STOPPING
        self._stop_pending = [job for job in self._all_jobs() if job.active or job.processes()]
        self._stop_next()
        self._stop_if_done()

    def _stop_next(self):
        """Manager stop: stop each job once no job that depends on it has a process left (dependents first)."""
        for job in self._deps.next_to_stop(self._stop_pending, {proc._job for proc in self._procs.values()}):
            self._stop_pending.remove(job)
            self._stop_job(job)

    def _do_restart(self, callback):
        if self._state is not _Lifecycle.RUNNING:
            return
        self._apps.restart()
        self._rollouts.restart(callback)

    # -- the machinery (loop thread)

    def _spawn(self, job, once=False, env=None, graceful_timeout=None, slot=None):
        """Start one process of the job and watch it; ProcessError if the OS refuses.

        It fills `slot`, by default the lowest one no running process of the job holds."""
        if self._state is not _Lifecycle.RUNNING:
            raise RuntimeError("manager is not running")
        if once:
            slot = 0
        elif slot is None:
            slot = job.take().number
        proc = Process(self, next(self._pids), job, once, env, graceful_timeout, slot)
        try:
            proc._spawn(self.loop, self._checks.prepare)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self._checks.finish(proc)
            self._containment.spawn_failed(proc)
            raise ProcessError(400, "job %r cannot start %r: %s" % (job.name, job.config.cmd, exc)) from exc
        self._procs[proc.pid] = proc
        job.last_error = None
        if once:
            job.running_out[proc.pid] = proc
        else:
            job.take(slot)
            job.enter(proc)
        self._containment.held(proc)
        self._reaper.watch(proc._popen, functools.partial(self._on_exit, proc))
        self._sampler.track(proc)
        self._move(proc, _State.STARTING, "spawn")  # NEW -> STARTING
        self._checks.start(proc)
        return proc

    def _mark_ready(self, proc):
        """Its readiness check passed (_Checks): STARTING -> READY, and what waited for it goes on."""
        if proc._state is not _State.STARTING or proc._reaped:
            return
        self._move(proc, _State.READY, "ready", elapsed=round(self.loop.time() - proc._spawned_at, 6))
        self._checks.ready(proc)
        self._rollouts.ready(proc._job, proc)
        self._deps.wake()
        self._deps.release()

    def _activate(self, job):
        """Mark a job started by hand: flapping history, backoffs and retired slots are forgotten."""
        self._respawns.reset(job)
        if not job.active:  # STOPPED, RETRYING or FATAL -> running (on_demand: listening, which spawns nothing)
            self._job_to(job, self._sockets.defer(job) or self._schedules.defer(job) or _JobState.RUNNING)

    def _start_job(self, job):
        self._activate(job)
        try:
            self._manage(job, strict=True)
        except ProcessError:
            self._stop_job(job)
            self._deps.wake()
            raise
        self._deps.release()  # a job of 0 processes is ready at once

    def _stop_job(self, job, state=_JobState.STOPPED):
        """Stop every process of the job, none replaced: STOPPED, or RETRYING or FATAL after a flap."""
        job.rollout = None
        self._respawns.cancel(job)
        self._sockets.undefer(job)
        self._schedules.cancel(job)
        was_active = job.active
        self._job_to(job, state, announce=False)
        for proc in job.processes():
            self._stop(proc, "stop_process")
        if was_active:  # after the stop_process events, as it always was
            self._publish_job(job, "stop")

    def _manage(self, job, strict=False):
        """Bring the job's running count to its target (see _fill); the job's state follows."""
        try:
            self._fill(job, strict)
        finally:
            self._refresh(job)

    def _fill(self, job, strict=False):
        """Bring the job's running count to its target.

        strict (a caller waits): a spawn failure stops what this call spawned and raises,
        so the job is left as it was.  Otherwise it publishes spawn_error, counts
        toward flapping and retries later.
        """
        if not job.active or self._state is not _Lifecycle.RUNNING:
            return
        for proc in job.excess():
            self._stop(proc, "reap")
        if self._deps.waiting_for(job):
            return  # filled once every job it depends on is ready (_Dependencies.release)
        spawned = job.spawning if strict and job.spawning is not None else []
        job.spawning, count, started = None, 0, time.monotonic()
        while job.active and job.taken() < job.numprocesses:
            if count and time.monotonic() - started > _SPAWN_SLICE:  # the rest on the next turns
                self._batches.more(job)
                if strict:
                    job.spawning = spawned
                return
            slot = job.take()
            try:
                spawned.append(self._spawn(job, slot=slot.number))
                count += 1
            except ProcessError as exc:
                if strict:
                    self._spawn_error(job, exc)
                    for proc in spawned:
                        self._stop(proc, "stop_process")
                    raise
                self._respawns.spawn_failed(job, exc, slot)
                return

    def _respawn(self, job, slot):
        """Refill a slot whose process exited, now: its $PORT and quick-exit streak are the slot's."""
        if (not job.active or self._state is not _Lifecycle.RUNNING or slot.number > job.numprocesses
                or not slot.idle or job.taken() >= job.numprocesses or self._deps.waiting_for(job)):
            return
        try:
            self._spawn(job, slot=slot.number)
        except ProcessError as exc:
            self._respawns.spawn_failed(job, exc, slot)

    def _spawn_error(self, job, exc):
        """A process of the job could not be spawned: the reason is kept (info's last_error) and published."""
        job.last_error = exc.reason
        self._publish_job(job, "spawn_error", reason=exc.reason)

    def _stop(self, proc, event):
        """Ask a process to stop (STARTING|READY -> STOPPING) and arm its SIGKILL; event is stop_process or reap."""
        if proc._state not in _ALIVE or proc._reaped:  # reaped: its exit is being finished (a listener
            return                                      # of its last lines may stop its job)
        job = proc._job
        job.leave(proc)
        job.stopping[proc.pid] = proc
        self._containment.stop(proc)
        self._move(proc, _State.STOPPING, event)  # STARTING|READY -> STOPPING

    def _stop_if_done(self):
        if (self._state is _Lifecycle.STOPPING and not self._procs and self._containment.idle
                and not self._stop_pending):
            self._state = _Lifecycle.STOPPED  # what the apps and callbacks see: no longer started
            self._deps.wake()
            self._apps.stopped(self)
            self._topics.close_all()
            self._containment.dismiss()
            self.loop.stop()

    # -- _on_* handlers (loop thread)

    def _on_exit(self, proc):
        """The reaper saw the process exit: finish it, publish exit, replace it if its job runs."""
        asked = proc._state is _State.STOPPING
        self._containment.exited(proc, asked)  # what it left in its group or cgroup
        self._checks.finish(proc)  # its last STATUS=, its timers and socket
        dropped = proc._finish()
        del self._procs[proc.pid]
        job = proc._job
        job.leave(proc)
        if any(output.tail for output in proc._outputs.values()):
            job.history.append(proc)  # its last words stay readable (logs) after it is gone
        self._rollouts.lost(job, proc, "new process %d exited before it was ready" % proc.pid)
        exit_status, term_signal = _exit_status(proc._popen.returncode)
        unasked = not asked and not proc.once and job.active
        slot, respawn, delay = self._respawns.decide(proc, exit_status, term_signal, unasked)
        job.ended(proc, exit_status, term_signal, asked)  # its last_exit, and the end of a run
        self._move(proc, _State.EXITED, "exit", exit_status=exit_status, term_signal=term_signal, once=proc.once,
                   dropped_input=dropped, respawn=respawn, delay=None if delay is None else round(delay, 3))
        self._forget(proc)
        self._rollouts.reaped(proc.pid)
        self._respawns.refill(job, slot, unasked, respawn, delay)
        if self._stop_pending:
            self._stop_next()
        self._stop_if_done()

    def _on_loop_closed(self):
        """Last words of the loop thread: normally nothing is left; after a crash, kill what is."""
        self._state = _Lifecycle.STOPPED
        _managers.discard(self)
        self._containment.close(list(self._procs.values()))
        self._sockets.close_all()
        self._batches.close()
        self._reaper.close()  # the pidfds of what it watched (after a crash, children it killed)
        self._checks.close()
        self._stopped.set()
        _wake_all(self._run_wakeups)


def _wake_all(wakeups):
    """The loop ended: each run() sleeping on one of these sockets wakes up."""
    for wake in list(wakeups):
        try:
            wake.send(b"\0")
        except OSError:
            pass


@atexit.register
def _stop_at_exit():
    """A host program that exits without stop() still leaves no child behind."""
    for manager in list(_managers):
        manager.stop()
    for manager in list(_managers):
        longest = max([p.graceful_timeout for p in list(manager._procs.values())] + [0])
        manager._stopped.wait(longest + 5)


# -- HTTP controller: addresses, tokens, JSON ------------------------------------------------------
# An app is any object with start(loop, manager), stop() and restart().  The HTTP
# app accepts connections on the loop's selector (no polling thread) and serves
# each on a thread of its own; handlers use only the public, thread-safe API.
# These helpers parse its addresses, check its tokens and write its JSON.  Any thread.

_SSE_KEEPALIVE = 15.0  # seconds between comments on an idle event stream (they also find dead clients)


def _parse_address(address):
    """(family, address) for "host:port", ":port", 5000, "[::1]:5000", "unix:/path", or an http:// URL of
    one (as serve prints it); the host defaults to loopback."""
    if isinstance(address, str) and address.startswith("http://"):
        address = address[7:].rstrip("/")
    if isinstance(address, str) and address.startswith("unix:"):
        if not address[5:]:
            raise ValueError("address %r names no socket path" % address)
        return socket.AF_UNIX, address[5:]
    if isinstance(address, int) and not isinstance(address, bool):
        host, port = "127.0.0.1", str(address)
    elif isinstance(address, str) and ":" in address:
        host, _, port = address.strip().rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
    elif isinstance(address, str):
        host, port = "127.0.0.1", address.strip()
    else:
        raise ValueError("address must be 'host:port', ':port', a port or 'unix:/path', got %r" % (address,))
    if not _is_number(port) or int(port) > 65535:
        raise ValueError("address %r: the port must be a number from 0 to 65535" % (address,))
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def _json_text(value, **options):
    import json  # imported when first needed: a Manager alone never loads it
    return json.dumps(value, default=str, **options)


def _json_value(text):
    import json
    return json.loads(text)


def _is_loopback(host):
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token_problem(token, tcp):
    """Why a bearer token cannot be used, or None.  It must be visible ASCII (33 to 126: what a header
    carries as it is) and, where anyone on the network may guess, 16 characters at least.  The message
    never shows the token itself."""
    if not isinstance(token, str):
        return "must be a str, got %s" % type(token).__name__
    bad = next((at for at, char in enumerate(token) if not 33 <= ord(char) <= 126), None)
    if bad is not None:
        return ("must be visible ASCII characters (33 to 126), but character %d is U+%04X"
                % (bad + 1, ord(token[bad])))
    if tcp and len(token) < 16:
        return "must be at least 16 characters when served over TCP, got %d" % len(token)
    return None


def _strings(setting, values):
    if isinstance(values, str) or not all(isinstance(v, str) and v for v in values):
        raise ValueError("%s must be a list of non-empty str, got %r" % (setting, values))
    return list(values)


def _is_ip(text):
    import ipaddress
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- HTTP server and connections: bounded in number and in time, answered in JSON ------------------
# The listening socket on the loop's selector, a thread per connection, a deadline per request.

class _Server:
    """The listening half of the HTTP app, mixed into http.server.HTTPServer by _http_classes()."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # the listen backlog: a burst of clients waits there, not in threads

    def __init__(self, family, address, app):
        self.address_family = family
        self.app = app
        super().__init__(address, _http_classes()[1])

    def server_bind(self):
        import socketserver
        if self.address_family == socket.AF_UNIX and os.path.exists(self.server_address):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(self.server_address)
            except OSError:
                os.unlink(self.server_address)  # a stale socket left by a crash
            else:
                raise OSError(98, "address in use: %s" % self.server_address)
            finally:
                probe.close()
        # HTTPServer.server_bind would look up the host's FQDN, which can hang on DNS.
        socketserver.TCPServer.server_bind(self)
        if self.address_family == socket.AF_UNIX:
            os.chmod(self.server_address, 0o600)  # before listen(): no one else ever connects
        self.server_name, self.server_port = "localhost", 0

    def process_request(self, request, client_address):
        """Serve one connection on a thread of its own (loop thread; the accept cap counts it)."""
        with self.app._lock:
            self.app._serving += 1
        try:
            threading.Thread(target=self._serve, args=(request, client_address), name="gaffer-http",
                             daemon=True).start()
        except RuntimeError:  # no thread to be had: drop the client, not the loop
            self._closed()
            self.shutdown_request(request)

    def _serve(self, request, client_address):
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._closed()

    def _closed(self):
        app = self.app
        with app._lock:
            app._serving -= 1
            paused = app._paused
        if paused:  # only then has the loop anything to do
            app._loop.call_soon_threadsafe(app._on_connection_closed)

    def handle_error(self, request, client_address):
        """A client that went away is a debug line; anything else is logged once, never printed raw."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            _log.debug("HTTP client %s went away: %s", client_address, exc)
        else:
            _log.error("HTTP connection from %s failed", client_address, exc_info=True)


_ROUTES = []  # (method, path regex, body's content type or None, function(request, manager, *groups))
_JSON, _RAW = "application/json", "application/octet-stream"


def _route(method, pattern, body=None):
    """Register a route; `body` is the one Content-Type its request body may have (_JSON or _RAW).

    Neither is one a web page can send cross-site without a CORS preflight, which is never granted.
    """
    def register(fn):
        _ROUTES.append((method, pattern + "/?", body, fn))  # compiled on first use, by re's cache
        return fn
    return register


class _MethodNotAllowed(ProcessError):
    def __init__(self, allowed):
        super().__init__(405, "method not allowed; use %s" % ", ".join(allowed))
        self.allowed = allowed


def _find_route(method, path):
    """(function, path groups, content type of its body or None) of a request."""
    allowed = []
    for route_method, regex, body, fn in _ROUTES:
        match = re.fullmatch(regex, path, re.ASCII)
        if match:
            if route_method == method:
                return fn, match.groups(), body
            allowed.append(route_method)
    if allowed:
        raise _MethodNotAllowed(allowed)
    raise ProcessNotFound("no route for %s %s" % (method, path))


# Exceptions -> HTTP status, in one place: what the manager refuses keeps its errno.
_HTTP_ERRORS = ((ProcessError, None), (ValueError, 400), (TypeError, 400), (RecursionError, 400),
                (RuntimeError, 503))


def _http_error(exc):
    for kind, status in _HTTP_ERRORS:
        if isinstance(exc, kind):
            return (status or exc.errno), str(exc)
    return 500, "internal error: %s" % exc


class _ClientGone(Exception):
    """The client went away or was too slow while sending its request: close without an answer."""


class _DeadlineReader(io.RawIOBase):
    """Reads a connection's socket so that the whole request must arrive before the handler's deadline.

    A per-read timeout alone would let a client send one byte every few seconds forever.
    """

    def __init__(self, handler):
        self._handler = handler
        self._sock = handler.connection

    def readable(self):
        return True

    def readinto(self, buffer):
        deadline = self._handler.deadline
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the request did not arrive within request_timeout")
            self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _RequestHandler:
    """One HTTP connection, mixed into http.server.BaseHTTPRequestHandler by _http_classes()."""

    protocol_version = "HTTP/1.1"
    server_version = "gaffer/" + __version__
    streaming = False
    deadline = None  # monotonic time by which the request being read must be complete

    def setup(self):
        super().setup()
        self.rfile.close()  # the plain socket file: its reference would keep the socket open
        self.rfile = io.BufferedReader(_DeadlineReader(self))
        with self.server.app._lock:
            self.server.app._connections.add(self)

    def finish(self):
        with self.server.app._lock:
            self.server.app._connections.discard(self)
        super().finish()

    def handle_one_request(self):
        # The next request (after an idle keep-alive wait, if any) must arrive within request_timeout.
        self.deadline = time.monotonic() + self.server.app.request_timeout
        super().handle_one_request()

    def address_string(self):
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def send_response(self, code, message=None):
        super().send_response(code, message)
        self.send_header("Gaffer-Version", __version__)  # what says "gaffer" through a proxy that rewrites Server

    def log_message(self, fmt, *args):
        _log.debug("%s %s", self.address_string(), fmt % args)

    def log_error(self, fmt, *args):  # timeouts and malformed requests: the client's problem
        _log.debug("%s %s", self.address_string(), fmt % args)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad request line, 414, 431, 501...) answer in JSON too."""
        self.close_connection = True
        reason = message or self.responses.get(code, ("error",))[0]
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # a request too broken to parse: still a status line and headers
        try:
            self._send_json(code, {"error": reason, "errno": code})
        except OSError:
            pass

    def _dispatch(self):
        """Every request, whatever its method: framing, Host, Origin, token, route, body, answer."""
        import hmac
        import urllib.parse
        app = self.server.app
        path, _, query = self.path.partition("?")
        self.query = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
        self.body = None
        try:
            self._refuse_bad_framing()
            host = self.headers.get("Host")
            if not app._host_allowed(host):
                raise ProcessError(403, "Host %r is not this server; to allow it, add it to allowed_hosts "
                                        "(--allow-host)" % host)
            origin = self.headers.get("Origin")
            if origin is not None and not app._origin_allowed(origin, host):
                raise ProcessError(403, "cross-origin request from %r refused; to allow it, add it to "
                                        "allowed_origins" % origin)
            if app._auth and not hmac.compare_digest(self.headers.get("Authorization", "").encode(), app._auth) \
                    and not (path == "/" and self.wants_page()):  # the page has no secret; it asks for the token
                raise ProcessError(401, "missing or wrong bearer token")
            fn, groups, content_type = _find_route(self.command, urllib.parse.unquote(path))
            given = self.headers.get("Content-Type", "").partition(";")[0].strip().lower()
            bodyless = "Content-Type" not in self.headers and self.headers.get("Content-Length", "0") == "0"
            if content_type is not None and given != content_type and not bodyless:  # curl -X POST needs none
                raise ProcessError(415, "%s %s takes a Content-Type: %s body, got %r"
                                   % (self.command, path, content_type, given or None))
            self.body = self._read_body(app.max_body)
            self.deadline = None
            self.connection.settimeout(app.request_timeout)  # for sending the answer to a slow reader
            result = fn(self, app.manager, *groups)
        except _ClientGone as exc:
            _log.debug("%s %s: %s", self.address_string(), self.requestline, exc)
            self.close_connection = True
            return
        except Exception as exc:
            status, reason = _http_error(exc)
            if status == 500:  # a bug of ours, not a refusal (501) or a stopped manager (503)
                _log.exception("%s %s failed", self.command, self.path)
            if self.streaming:
                return
            if self.body is None:
                self.close_connection = True  # the body, if any, was not read
            headers = {"Allow": ", ".join(exc.allowed)} if isinstance(exc, _MethodNotAllowed) else {}
            self._send_json(status, {"error": reason, "errno": status}, headers)
            return
        if app.on_change is not None and self.command != "GET":  # recorded before the client hears "done"
            try:
                app.on_change(self.command, urllib.parse.unquote(path), self.body)
            except Exception:
                _log.exception("on_change(%s %s) failed", self.command, path)
        if result is not None:
            self._send_json(*result)

    # Every method goes through the routes: an unknown one is a JSON 405 (or 404), never a CORS grant.
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _refuse_bad_framing(self):
        """Where the request ends must be beyond doubt, or a proxy in front and this server could disagree
        on it (request smuggling): one Content-Length or none, no Transfer-Encoding, no malformed or folded
        header line.  A refusal closes the connection (the body is not read)."""
        import email.errors  # loaded by http.server already
        headers = self.headers
        if any(isinstance(defect, email.errors.MissingHeaderBodySeparatorDefect) for defect in headers.defects):
            # a line that is no "Name: value", such as "Name : value": what follows it was not read as headers
            raise ProcessError(400, "malformed header line: each is a name, a colon, then the value")
        if any("\n" in value or "\r" in value for value in headers.values()):
            raise ProcessError(400, "folded header lines are not accepted")
        if "Transfer-Encoding" in headers:
            raise ProcessError(501, "Transfer-Encoding is not supported (%r); send the body with one "
                                    "Content-Length" % headers["Transfer-Encoding"])
        lengths = headers.get_all("Content-Length", [])
        if len(lengths) > 1:
            raise ProcessError(400, "%d Content-Length headers; send one" % len(lengths))

    def _read_body(self, limit):
        length = self.headers.get("Content-Length", "0")
        if not _is_number(length):
            raise ProcessError(400, "bad Content-Length %r" % length)
        if int(length) > limit:
            raise ProcessError(413, "request body of %s bytes is over the limit of %d" % (length, limit))
        try:
            body = self.rfile.read(int(length))
        except OSError as exc:  # too slow (the deadline) or gone
            raise _ClientGone("body not received: %s" % exc) from None
        if len(body) < int(length):
            raise _ClientGone("the client closed after %d of %s bytes of body" % (len(body), length))
        return body

    def json(self, required=True):
        """The request body as a JSON object ({} when empty and not required)."""
        if not self.body and not required:
            return {}
        try:
            value = _json_value(self.body or b"null")
        except ValueError as exc:
            raise ProcessError(400, "the body is not valid JSON: %s" % exc) from None
        except RecursionError:
            raise ProcessError(400, "the body is JSON nested too deep") from None
        if not isinstance(value, dict):
            raise ProcessError(400, "the body must be a JSON object, got %s" % type(value).__name__)
        return value

    def field(self, key, kinds=None):
        """A required field of the JSON body, optionally of the given types."""
        body = self.json()
        if key not in body:
            raise ProcessError(400, "the body needs %r" % key)
        if kinds and not isinstance(body[key], kinds):
            raise ProcessError(400, "%r has the wrong type: %r" % (key, body[key]))
        return body[key]

    def wants_page(self):
        """A browser asks for GET / (Accept: text/html): the dashboard; curl and clients get JSON."""
        return self.command == "GET" and "text/html" in self.headers.get("Accept", "")

    def send_page(self):
        data, policy = _dashboard()
        self.send_text(data, "text/html; charset=utf-8", {"Content-Security-Policy": policy,
                                                          "Referrer-Policy": "no-referrer"})

    def send_text(self, data, content_type, headers=None):
        """A 200 answer that is not JSON (the dashboard, /metrics)."""
        self.send_response(200)
        for key, value in (("Content-Type", content_type), ("Content-Length", str(len(data))),
                           ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"),
                           *(headers or {}).items()):
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, status, body, headers=None):
        data = _json_text(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def stream(self, channel, frame):
        """Send a channel's messages as Server-Sent Events until it closes or the client leaves."""
        app = self.server.app
        with app._lock:
            app._streams.add(channel)
        self.streaming = True
        self.close_connection = True
        self.connection.settimeout(2 * _SSE_KEEPALIVE)  # a client that stops reading is dropped
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            while True:
                try:
                    evtype, msg = channel.get(_SSE_KEEPALIVE)
                except queue.Empty:
                    self.wfile.write(b": keepalive\n\n")
                except EOFError:
                    break
                else:
                    data = frame(evtype, msg)
                    if data is None:
                        continue
                    # Split where an SSE reader splits (CR LF, CR or LF): output cannot make an event of its own.
                    lines = "".join("data: %s\n" % line for line in re.split(r"\r\n|\r|\n", data))
                    self.wfile.write(("event: %s\n%s\n" % (evtype, lines)).encode())
                self.wfile.flush()
        except OSError:  # the client went away
            pass
        finally:
            channel.close()
            with app._lock:
                app._streams.discard(channel)


@functools.lru_cache(maxsize=None)
def _http_classes():
    """(server class, request handler class), built on first use: embedders who never serve HTTP
    never import http.server, socketserver and email."""
    import http.server
    import socketserver

    class HttpServer(_Server, socketserver.ThreadingMixIn, http.server.HTTPServer):
        pass

    class HttpRequestHandler(_RequestHandler, http.server.BaseHTTPRequestHandler):
        pass

    return HttpServer, HttpRequestHandler


# -- HTTP app (HttpHandler) ------------------------------------------------------------------------
# What an embedder starts: the address, the token, the allowed hosts; it runs the server above on
# the manager's loop.

class HttpHandler:
    """The app that serves a manager over HTTP/1.1 with JSON bodies (the old gafferd's routes).

    Args:
        address: "host:port", ":port", a port number or "unix:/path"; port 0 picks
            a free port, then found in ``port``.  The host defaults to 127.0.0.1.
        token: when set, every request needs ``Authorization: Bearer <token>``.
            Serving an address other than loopback without a token is refused.  A
            token is visible ASCII (33 to 126), at least 16 characters over TCP.
        max_body: largest request body in bytes (413 past it).
        allowed_hosts: host names accepted in the ``Host`` header besides the bound
            address, ``localhost`` and loopback IPs (any other name is a DNS-rebinding
            attempt: 403).  A unix socket accepts any Host.
        allowed_origins: origins (``"https://ops.example"``) whose browser requests are
            accepted; a request with any other ``Origin`` than the server's own is 403.
        max_connections: connections served at once; more wait in the listen backlog.
        request_timeout: seconds a client has to send a request (line, headers and
            body), and the longest a keep-alive connection may stay idle.
        on_change: called as ``on_change(method, path, body)`` on the request's thread
            after each request that changed something succeeded, before its answer (``serve --state``).

    Use: ``manager.start(apps=[HttpHandler("127.0.0.1:4999")])``.

    Raises:
        ValueError: a bad address, token or limit, or a public address without a token.
    """

    def __init__(self, address=_DEFAULT_HTTP, token=None, max_body=1 << 20, allowed_hosts=(),
                 allowed_origins=(), max_connections=64, request_timeout=10.0, on_change=None):
        self.family, self.address = _parse_address(address)
        problem = None if token is None else _token_problem(token, self.family != socket.AF_UNIX)
        if problem is not None:
            raise ValueError("token %s" % problem)
        if self.family != socket.AF_UNIX and not _is_loopback(self.address[0]) and not token:
            raise ValueError("refusing to serve %r without a token: anyone who reaches it could run commands; "
                             "give token=... or bind 127.0.0.1" % (address,))
        self.token = token
        self.max_body = _int_setting("max_body", max_body, 0)
        self.allowed_hosts = frozenset(h.lower().rstrip(".") for h in _strings("allowed_hosts", allowed_hosts))
        self.allowed_origins = frozenset(o.lower().rstrip("/") for o in _strings("allowed_origins", allowed_origins))
        self.max_connections = _int_setting("max_connections", max_connections, 1, 10000)
        self.request_timeout = _float_setting("request_timeout", request_timeout, 0.001)
        self.on_change = on_change
        self.port = None
        self.manager = None
        self._auth = ("Bearer %s" % token).encode() if token else None
        self._server = None
        self._loop = None
        # _lock guards _serving, _connections and _streams: handler threads change them, stop() reads them.
        self._lock = threading.Lock()
        self._serving = 0           # connections being served (a thread each)
        self._connections = set()   # their request handlers
        self._streams = set()
        self._paused = False  # loop thread: not accepting while max_connections are served

    def __repr__(self):
        return "<HttpHandler %s%s>" % (self.url, "" if self._server else " stopped")

    @property
    def url(self):
        """The base URL to reach the server (``unix:/path`` for a unix socket)."""
        if self.family == socket.AF_UNIX:
            return "unix:" + self.address
        host = self.address[0]
        return "http://%s:%s" % ("[%s]" % host if ":" in host else host, self.port or self.address[1])

    def start(self, loop, manager):
        """Bind the address (errors raise here) and accept on the loop."""
        self.manager, self._loop = manager, loop
        server = _http_classes()[0](self.family, self.address, self)
        server.socket.setblocking(False)
        self._server = server
        if self.family != socket.AF_UNIX:
            self.port = server.server_address[1]
        loop.call(loop.set_events, server.socket, selectors.EVENT_READ, self._on_accept)
        _log.info("serving HTTP on %s", self.url)

    def stop(self):
        """Stop accepting, end every event stream and close every connection (loop thread)."""
        server, self._server = self._server, None
        if server is None:
            return
        if not self._paused:
            self._loop.set_events(server.socket, 0)
        server.server_close()
        if self.family == socket.AF_UNIX:
            try:
                os.unlink(self.address)
            except OSError:
                pass
        with self._lock:
            streams, connections = list(self._streams), list(self._connections)
        for channel in streams:
            channel.close()  # the stream sends what was queued, then ends
        for handler in connections:
            if not handler.streaming:  # wake a keep-alive connection waiting for its next request
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def restart(self):
        """Nothing to do: the routes read the manager afresh on every request."""

    def _on_accept(self, mask):
        """Accept what waits, up to max_connections served at once; past that, leave them in the backlog."""
        while self._server is not None:
            with self._lock:
                if self._serving >= self.max_connections:
                    self._loop.set_events(self._server.socket, 0)
                    self._paused = True
                    return
            try:
                request, client = self._server.get_request()
            except OSError:  # nothing more waits, or the client left between select and accept
                return
            request.setblocking(True)
            self._server.process_request(request, client)

    def _on_connection_closed(self):
        """A handler thread ended (loop thread): accept again if the cap had stopped it."""
        if self._paused and self._server is not None:
            self._paused = False
            self._loop.set_events(self._server.socket, selectors.EVENT_READ, self._on_accept)
            self._on_accept(selectors.EVENT_READ)

    def _host_allowed(self, host):
        """Whether a Host header names this server, not a name rebound to it by someone's DNS."""
        if self.family == socket.AF_UNIX or host is None:  # HTTP/1.0 clients send none; browsers always do
            return True
        host = host.strip().lower()
        name = host[1:host.find("]")] if host.startswith("[") else host.rpartition(":")[0] if ":" in host else host
        name = name.rstrip(".")
        if name in self.allowed_hosts or name == self.address[0].lower() or _is_loopback(name):
            return True
        # Bound to every address: an IP literal is one of ours (rebinding always goes through a name).
        return self.address[0] in ("0.0.0.0", "::", "") and _is_ip(name)

    def _origin_allowed(self, origin, host):
        """Whether a browser's Origin is the server's own page or one the user allows."""
        origin = origin.strip().lower().rstrip("/")
        return origin in self.allowed_origins or (host is not None and origin == "http://" + host.strip().lower())


# -- HTTP routes: each calls the public, thread-safe Manager API -----------------------------------
# One function per method and path, in a table; each runs on its connection's thread.

@_route("GET", "/")
def _http_index(req, m):
    if req.wants_page():
        req.send_page()
        return None
    return 200, {"name": "gaffer", "version": __version__}


@_route("GET", "/version")
def _http_version(req, m):
    return 200, {"name": "gaffer", "version": __version__}


@_route("GET", "/ping")
def _http_ping(req, m):
    return 200, {"ok": True}


@_route("POST", "/shutdown")
def _http_shutdown(req, m):
    req.close_connection = True
    req._send_json(202, {"ok": True, "stopping": True})
    req.wfile.flush()  # answered before the stop closes the server and its connections
    m.stop()


@_route("GET", "/ready")
def _http_ready(req, m):
    """For Kubernetes and load-balancer probes: 200 when every active job is ready, else 503."""
    waiting = m.not_ready()
    if not waiting:
        return 200, {"ready": True}
    return 503, {"ready": False, "waiting": waiting, "error": "not ready: %s" % ", ".join(waiting), "errno": 503}


@_route("GET", "/metrics")
def _http_metrics(req, m):
    """Prometheus scrapes it, with Authorization: Bearer where the server has a token."""
    req.send_text(m.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
    return None


@_route("GET", "/sessions")
def _http_sessions(req, m):
    return 200, {"sessions": m.sessions}


@_route("GET", "/jobs")
def _http_jobs(req, m):
    return 200, {"jobs": m.jobs()}


@_route("GET", "/status")
def _http_status(req, m):
    return 200, {"jobs": m.status(history=req.query.get("history") == "1")}


@_route("GET", "/sockets")
def _http_sockets(req, m):
    return 200, {"sockets": m.sockets()}


@_route("GET", "/jobs/([^/]+)")
def _http_session_jobs(req, m, session):
    return 200, {"sessionid": session, "jobs": m.jobs(session)}


@_route("POST", "/jobs/([^/]+)", _JSON)
def _http_load(req, m, session):
    body = req.json()
    start = body.pop("start", True)
    m.load(ProcessConfig.from_dict(body), sessionid=session, start=_bool_setting("start", start))
    return 201, {"ok": True}


@_route("GET", "/jobs/([^/]+/[^/]+)")
def _http_info(req, m, job):
    return 200, m.info(job)


@_route("PUT", "/jobs/([^/]+/[^/]+)", _JSON)
def _http_update(req, m, job):
    session, name = _split_name(job)
    body = req.json()
    start = body.pop("start", False)
    if body.setdefault("name", name) != name:
        raise ProcessError(400, "the body names job %r, the path %r" % (body["name"], name))
    m.update(ProcessConfig.from_dict(body), sessionid=session, start=_bool_setting("start", start))
    return 201, {"ok": True}


@_route("DELETE", "/jobs/([^/]+/[^/]+)")
def _http_unload(req, m, job):
    m.unload(job)
    return 200, {"ok": True}


@_route("GET", "/jobs/([^/]+/[^/]+)/stats")
def _http_job_stats(req, m, job):
    return 200, m.stats(job)


def _query_count(req, key, default):
    """A count from the query string (?lines=100), bounded."""
    text = req.query.get(key, str(default))
    if not text.isdigit() or int(text) > 1 << 20:
        raise ProcessError(400, "%s must be a count from 0 to %d, got %r" % (key, 1 << 20, text))
    return int(text)


@_route("GET", "/jobs/([^/]+/[^/]+)/logs")
def _http_job_logs(req, m, job):
    """The job's lines (?pid=P: one process's), ?lines=N of them; &follow=1 then goes on with new ones."""
    lines, pid = _query_count(req, "lines", 100), req.query.get("pid")
    if pid is not None:
        if not _is_number(pid) or m.get_process(int(pid)).name != job.replace("/", ".", 1):
            raise ProcessNotFound("job %s has no process %s" % (job.replace("/", ".", 1), pid))
        pid = int(pid)
    if req.query.get("follow", "0") in ("", "0", "false"):
        return 200, {"lines": m.logs(job, lines, pid)}
    topic = "LOGS:%s" % (pid if pid is not None else job.replace("/", ".", 1))
    req.stream(m.subscribe(topic, tail=lines), lambda evtype, msg: _json_text(msg))


@_route("GET", "/jobs/([^/]+/[^/]+)/numprocesses")
def _http_numprocesses(req, m, job):
    return 200, {"numprocesses": m.info(job)["max_processes"]}


@_route("POST", "/jobs/([^/]+/[^/]+)/numprocesses", _JSON)
def _http_scale(req, m, job):
    return 200, {"numprocesses": m.scale(job, req.field("scale", (int, str)))}


@_route("POST", "/jobs/([^/]+/[^/]+)/signal", _JSON)
def _http_job_signal(req, m, job):
    m.killall(job, req.field("signal", (int, str)))
    return 202, {"ok": True}


@_route("GET", "/jobs/([^/]+/[^/]+)/state")
def _http_state(req, m, job):
    return 200, {"active": m.info(job)["active"]}


@_route("POST", "/jobs/([^/]+/[^/]+)/state", _JSON)
def _http_set_state(req, m, job):
    actions = {"start": m.start_job, "stop": m.stop_job, "reload": m.reload}
    state = req.field("state", str)
    if state not in actions:
        raise ProcessError(400, "state must be 'start', 'stop' or 'reload', got %r" % state)
    actions[state](job)
    return 202, {"ok": True}


@_route("GET", "/jobs/([^/]+/[^/]+)/pids")
def _http_job_pids(req, m, job):
    return 200, {"pids": m.pids(job)}


@_route("POST", "/jobs/([^/]+/[^/]+)/commit", _JSON)
def _http_commit(req, m, job):
    body = req.json(required=False)
    pid = m.commit(job, body.get("graceful_timeout", 0), body.get("env"))
    return 200, {"pid": pid}


@_route("GET", "/pids")
def _http_pids(req, m):
    return 200, {"pids": m.pids()}


@_route("GET", r"/(\d+)")
def _http_process(req, m, pid):
    return 200, m.get_process(int(pid)).info


@_route("DELETE", r"/(\d+)")
def _http_stop_process(req, m, pid):
    m.stop_process(int(pid))
    return 200, {"ok": True}


@_route("POST", r"/(\d+)/signal", _JSON)
def _http_signal(req, m, pid):
    m.kill(int(pid), req.field("signal", (int, str)))
    return 202, {"ok": True}


@_route("GET", r"/(\d+)/stats")
def _http_process_stats(req, m, pid):
    return 200, m.get_process(int(pid)).stats


@_route("POST", r"/(\d+)/stdin", _RAW)
def _http_stdin(req, m, pid):
    m.send(int(pid), req.body)
    return 202, {"ok": True}


@_route("POST", r"/(\d+)/streams/([^/]+)", _RAW)
def _http_write_stream(req, m, pid, label):
    m.send(int(pid), req.body, stream=label)
    return 202, {"ok": True}


@_route("GET", "/watch")
def _http_watch(req, m):
    channel = m.subscribe("EVENTS:" + req.query.get("pattern", "."))
    req.stream(channel, lambda evtype, msg: _json_text(msg))


@_route("GET", r"/(\d+)/streams/([^/]+)")
def _http_read_stream(req, m, pid, label):
    encoding = req.query.get("encoding", "utf-8")
    if encoding not in ("utf-8", "base64"):
        raise ProcessError(400, "encoding must be 'utf-8' or 'base64', got %r" % encoding)
    process = m.get_process(int(pid))
    if label not in process.config.redirect_output + process.config.custom_streams:
        raise ProcessNotFound("process %s has no output or stream labelled %r" % (pid, label))
    import base64
    decode = ((lambda data: base64.b64encode(data).decode()) if encoding == "base64"
              else (lambda data: data.decode("utf-8", "replace")))
    req.stream(m.subscribe("STREAM:%s" % pid, tail=_query_count(req, "tail", 0)),
               lambda evtype, msg: decode(msg["data"]) if evtype == label else None)


@_route("GET", r"/(\d+)/logs")
def _http_process_logs(req, m, pid):
    process = m.get_process(int(pid))
    label = req.query.get("label")
    if label is not None and label not in process.config.redirect_output:
        raise ProcessNotFound("process %s has no output labelled %r" % (pid, label))
    return 200, {"lines": process.tail(label, _query_count(req, "lines", 100))}


# -- Webhooks (WebhooksApp) ------------------------------------------------------------------------
# The app that posts events to URLs as the old gaffer's webhooks app did.  Each URL has its own queue
# and thread: the loop only queues (a listener never waits), and a URL that hangs holds up its own
# posts only.  A post that fails is retried with backoff for a bounded time; what a full queue or a
# post that never went through loses is counted.

_WEBHOOK_BACKOFF = (0.5, 10.0)  # the first wait before a retry, doubling up to the second


class _Hook:
    """One URL: its queue of bodies, its worker thread, and what it sent, failed and dropped."""

    def __init__(self, url, max_queue):
        from urllib.parse import urlsplit
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("a webhook URL is http:// or https:// with a host, got %r" % (url,))
        try:
            parts.port
        except ValueError as exc:
            raise ValueError("webhook URL %r: %s" % (url, exc)) from None
        self.url, self.parts = url, parts
        self.queue = queue.Queue(max_queue)
        self.sent = self.failed = self.dropped = 0
        self.thread = None

    def stats(self):
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped, "queued": self.queue.qsize()}


class WebhooksApp:
    """An app that posts the manager's events to URLs as JSON, as the old gaffer's webhooks app did.

    Args:
        hooks: {pattern: URL or [URLs]}: each pattern is an ``events.subscribe`` pattern (``"exit"``,
            ``"job.default.web"``, ``"."`` for every event); each matching event is posted to its URLs,
            its message as the JSON body, with ``"event"`` set to the event's full name.
        timeout: seconds one post may take (connect, send, answer).
        retry_for: seconds a failed post (no answer, or a status that is not 2xx) is tried again, after
            0.5 s, then twice as long each time up to 10 s; then it is counted as failed.
        max_queue: posts that may wait for each URL; past it a new one is dropped and counted.

    Use: ``manager.start(apps=[WebhooksApp({"exit": "http://127.0.0.1:9000/hook"})])``; ``stats()``
    gives {url: {sent, failed, dropped, queued}}.

    Raises:
        ValueError: a pattern that is not a string, a URL that is not http(s), or a bad bound.
    """

    def __init__(self, hooks, timeout=5.0, retry_for=60.0, max_queue=1000):
        if not isinstance(hooks, dict):
            raise ValueError("hooks must be a dict of event patterns to URLs, got %r" % (hooks,))
        self.timeout = _float_setting("timeout", timeout, 0.001)
        self.retry_for = _float_setting("retry_for", retry_for, 0)
        max_queue = _int_setting("max_queue", max_queue, 1, 1 << 20)
        self._hooks = {}      # url -> _Hook
        self._patterns = []   # (pattern, [_Hook])
        for pattern, urls in hooks.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError("a webhook's event pattern is a string such as 'exit', got %r" % (pattern,))
            urls = [urls] if isinstance(urls, str) else urls
            if not isinstance(urls, (list, tuple)) or not urls or not all(isinstance(url, str) for url in urls):
                raise ValueError("webhook %r: give a URL or a list of URLs, got %r" % (pattern, urls))
            self._patterns.append((pattern, [self._hooks.get(url) or self._hooks.setdefault(url, _Hook(url, max_queue))
                                             for url in dict.fromkeys(urls)]))  # a URL named twice: once
        self._manager = None
        self._listeners = []
        self._closing = threading.Event()

    def __repr__(self):
        return "<WebhooksApp %s>" % ", ".join(self._hooks)

    def start(self, loop, manager):
        self._manager = manager
        for hook in self._hooks.values():
            hook.thread = threading.Thread(target=self._work, args=(hook,), name="gaffer-webhook", daemon=True)
            hook.thread.start()
        for pattern, hooks in self._patterns:
            listener = functools.partial(self._on_event, hooks)
            manager.events.subscribe(pattern, listener)
            self._listeners.append((pattern, listener))

    def restart(self):
        pass  # nothing it holds changes

    def stop(self):
        """On the loop thread, as the manager stops: no more events; what is queued is still posted, each
        tried once, for about `timeout` at most, then the workers end."""
        for pattern, listener in self._listeners:
            self._manager.events.unsubscribe(pattern, listener)
        self._listeners = []
        self._closing.set()
        for hook in self._hooks.values():
            try:
                hook.queue.put_nowait(None)  # wakes a worker that waits for work
            except queue.Full:
                pass

    def stats(self):
        """{url: {sent, failed, dropped, queued}} (any thread)."""
        return {url: hook.stats() for url, hook in self._hooks.items()}

    def _on_event(self, hooks, evtype, msg=None, *args, **kwargs):
        body = dict(msg) if isinstance(msg, dict) else {"args": [msg, *args], **kwargs}
        body["event"] = evtype
        data = _json_text(body).encode()
        for hook in hooks:
            try:
                hook.queue.put_nowait(data)
            except queue.Full:
                hook.dropped += 1

    def _work(self, hook):
        ends = None  # once closing: when the worker gives up on what is left
        while True:
            if self._closing.is_set() and ends is None:
                ends = time.monotonic() + self.timeout
            try:
                data = hook.queue.get(timeout=None if ends is None else max(0.0, ends - time.monotonic()))
            except queue.Empty:
                return
            if data is None:
                if self._closing.is_set() and hook.queue.empty():
                    return
                continue
            if ends is not None and time.monotonic() > ends:  # never went through (the loop alone counts dropped)
                hook.failed += 1 + hook.queue.qsize()
                return
            self._post_with_retries(hook, data)

    def _post_with_retries(self, hook, data):
        deadline, delay = time.monotonic() + self.retry_for, _WEBHOOK_BACKOFF[0]
        while True:
            problem = self._post(hook, data)
            if problem is None:
                hook.sent += 1
                return
            if self._closing.is_set() or time.monotonic() + delay > deadline:
                hook.failed += 1
                _log.warning("webhook %s: %s; the event is dropped", hook.url, problem)
                return
            if self._closing.wait(delay):  # a stop ends the retries at once
                hook.failed += 1
                return
            delay = min(delay * 2, _WEBHOOK_BACKOFF[1])

    def _post(self, hook, data):
        """One POST; None if it answered 2xx, else what went wrong."""
        import http.client
        parts = hook.parts
        try:
            if parts.scheme == "https":
                import ssl
                conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=self.timeout,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)
            try:
                conn.request("POST", (parts.path or "/") + ("?" + parts.query if parts.query else ""), body=data,
                             headers={"Content-Type": "application/json", "User-Agent": "gaffer/" + __version__})
                resp = conn.getresponse()
                resp.read(65536)
            finally:
                conn.close()
        except (OSError, http.client.HTTPException) as exc:
            return "%s: %s" % (type(exc).__name__, exc)
        return None if 200 <= resp.status < 300 else "HTTP %d" % resp.status


# -- Procfile and the foreground runner (start, run) -----------------------------------------------
# Procfile and .env parsing, the token and manager of a command, and the foreground
# runner (start, run).  This and every command-line section: main thread only.

class _UsageError(Exception):
    """Bad input from the user: a file, a flag, a value.  Printed as one line; exit code 2."""


class _Failure(Exception):
    """A failure at run time: the server unreachable, a request refused, an address in use.
    Printed as one line; exit code 1."""


def _int_text(setting, text):
    """An int from the command line or an INI file: one line that says so where it is none."""
    if not _is_number(text.strip().lstrip("+-")) or text.strip()[:1] == "+":
        raise ValueError("%s must be an integer, got %r" % (setting, text))
    return int(text)


def _port_text(text):
    return _int_setting("port", _int_text("port", text), 1, 65535)


def _copies_text(text):
    return _int_setting("copies", _int_text("copies", text), 1, 1000)


def _lines_text(text):
    return _int_setting("lines", _int_text("lines", text), 0, 1 << 20)


def _seconds_text(text):
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError("seconds must be a number, got %r" % text) from None
    return _float_setting("seconds", seconds, 0)


def _address_text(text):
    _parse_address(text)
    return text


_PROCFILE_LINE = r"([A-Za-z0-9_-]+)\s*:\s*(.*\S)\s*"
_COLORS = ("36", "33", "32", "35", "34", "96", "93", "92", "95", "94")


def _read_text(path, what):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise _UsageError("cannot read %s %s: %s" % (what, path, exc.strerror)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _UsageError("%s:%d: the %s is not UTF-8 (byte 0x%02x)" % (
            path, data.count(b"\n", 0, exc.start) + 1, what, data[exc.start])) from None


def _parse_procfile(path):
    """Return [(name, command)] in file order; _UsageError("path:line: reason") on a bad line."""
    entries, seen = [], {}
    for lineno, line in enumerate(_read_text(path, "Procfile").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(_PROCFILE_LINE, line)
        if match is None:
            raise _UsageError("%s:%d: expected 'name: command' (name of letters, digits, - and _), got %r"
                              % (path, lineno, line))
        name, command = match.groups()
        if name in seen:
            raise _UsageError("%s:%d: process %r is already defined at line %d" % (path, lineno, name, seen[name]))
        seen[name] = lineno
        entries.append((name, command))
    if not entries:
        raise _UsageError("%s: no process defined" % path)
    return entries


def _parse_dotenv(path):
    """The variables of a .env file (_dotenv_text's rules); _UsageError("path:line: reason") on a bad line."""
    try:
        return _dotenv_text(_read_text(path, "env file"), path)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _parse_concurrency(text, names):
    """{"web": 2} from "web=2,worker=1"; every name must be in the Procfile."""
    counts = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, count = item.partition("=")
        if not sep or not _is_number(count.strip()):
            raise _UsageError("-c: expected name=count, got %r" % item)
        if name.strip() not in names:
            raise _UsageError("-c: no process named %r in the Procfile (it has %s)" % (name.strip(), ", ".join(names)))
        counts[name.strip()] = int(count)
    return counts


def _exec_form(command):
    """A Procfile command as a shell runs it: "exec CMD" where it is one simple command (the program then
    replaces the shell, so signals reach it), else as it is."""
    first = command.split()[0]
    if re.fullmatch(r"[^;&|<>()`\n]*", command) and "=" not in first and first != "exec":
        return "exec " + command
    return command


def _shown_name(msg):
    """How the command line names what an event is about: web.1 (a process in slot 1 of the default
    session's job web), batch.worker.2, a commit's process by its pid, or a job."""
    name = msg["name"]
    name = name[len(_DEFAULT_SESSION) + 1:] if name.startswith(_DEFAULT_SESSION + ".") else name
    if msg.get("slot"):
        return _slot_label(name, msg["slot"])
    return "%s (pid %d)" % (name, msg["pid"]) if "pid" in msg else name


def _event_line(evtype, msg):
    """An event as a line for people, as supervisord says it: "web.1 exited with code 1, respawn in 0.4 s"."""
    who = _shown_name(msg)
    if evtype == "spawn":
        return "%s started with pid %d" % (who, msg["os_pid"])
    if evtype == "exit":
        how = ("killed by signal %d" % msg["term_signal"] if msg["term_signal"]
               else "exited with code %d" % msg["exit_status"])
        return "%s %s%s" % (who, how, ", respawn in %.1f s" % msg["delay"] if msg.get("delay") else "")
    if evtype in ("stop_process", "reap"):
        return "%s stopping" % who
    if evtype == "flap":
        return "%s is flapping: stopped" % who
    return msg.get("reason") or "%s: %s" % (who, evtype)


def _exit_code(msg):
    return msg["exit_status"] or (128 + msg["term_signal"] if msg["term_signal"] else 0)


class _Printer:
    """Writes output and gaffer's messages as "HH:MM:SS name.N | text", a colour per process on a tty."""

    def __init__(self, stream, color, names, on_broken, prefix=True):
        self.stream = stream
        self.color = color
        self.prefix = prefix  # --no-prefix: each line as it was written
        self.on_broken = on_broken  # called once if the reader of the stream goes away
        self.width = max(len(n) for n in list(names) + ["system"])
        self.colors = {"system": "0"}  # name -> colour: the next one for each new name, scaled-up ones too

    def line(self, name, text):
        prefix = "%s %s |" % (time.strftime("%H:%M:%S"), name.ljust(self.width))
        if self.color:
            color = self.colors.setdefault(name, _COLORS[(len(self.colors) - 1) % len(_COLORS)])
            prefix = "\033[%sm%s\033[0m" % (color, prefix)
        if self.on_broken is None:
            return
        try:
            self.stream.write("%s %s\n" % (prefix, text) if self.prefix else text + "\n")
            self.stream.flush()
        except BrokenPipeError:  # e.g. piped into head: stop quietly, as a shell pipeline would
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            on_broken, self.on_broken = self.on_broken, None
            on_broken()


_warned = set()  # what this command has warned about on stderr already


def _warn_once(text):
    if text not in _warned:
        _warned.add(text)
        print("gaffer: warning: %s" % text, file=sys.stderr)


def _read_token_file(path, what):
    """The token a file holds, without its one trailing newline; a file others can read is warned about."""
    try:
        with open(path, "rb") as f:
            data = f.read()
            mode = os.fstat(f.fileno()).st_mode
    except OSError as exc:
        raise _UsageError("%s %s: %s" % (what, path, exc.strerror or exc)) from None
    text = data.decode("utf-8", "replace")
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not text:
        raise _UsageError("%s %s is empty" % (what, path))
    if mode & 0o044:
        _warn_once("token file %s can be read by other users (mode %04o); chmod 600 it" % (path, mode & 0o7777))
    return text


def _cli_token(args, configured=None):
    """The bearer token of a command: --token-file, --token (which every local user can read in ps:
    warned about once), the config's token or token_file, then $GAFFER_TOKEN; None for no token."""
    if args.token_file is not None and args.token is not None:
        raise _UsageError("give --token or --token-file, not both")
    if args.token_file is not None:
        return _read_token_file(args.token_file, "--token-file")
    if args.token is not None:
        _warn_once("--token is visible to every user of this machine (ps, /proc/PID/cmdline); "
                   "give --token-file FILE or $GAFFER_TOKEN instead")
        return args.token
    return configured or os.environ.get("GAFFER_TOKEN") or None


def _http_app(args, address=None, token=None):
    """The HTTP app of a serving command: its --http, token and --allow-host over the config's.  The
    server keeps the token; $GAFFER_TOKEN leaves the environment, so nothing started from here has it."""
    token = _cli_token(args, token)
    os.environ.pop("GAFFER_TOKEN", None)
    try:
        return HttpHandler(args.http or address or _DEFAULT_HTTP, token, allowed_hosts=args.allow_host or ())
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _cli_manager(args):
    """The commands' manager: guarded, and in init mode (--init, or as PID 1) a subreaper of everything."""
    return Manager(subreaper="init" if args.init or os.getpid() == 1 else False)


def _forward_signals(manager, signals):
    """SIGUSR1 reopens the log files (after a logrotate); in init mode, these signals, sent to gaffer,
    also go on to every process it runs."""
    def on_signal(signum, frame):
        if signum == signal.SIGUSR1:
            manager.loop.call_soon_threadsafe(manager.reopen_logs)
        if manager.subreaper == "init":
            manager.loop.call_soon_threadsafe(manager._containment.forward, signum)
    for signum in signals:
        if manager.subreaper == "init" or signum == signal.SIGUSR1:
            signal.signal(signum, on_signal)


def _start(manager, app, more=()):
    """Start the manager, with the HTTP app if any (and `more` apps); an address in use is one line, not
    a traceback."""
    try:
        manager.start(([app] if app else []) + list(more))
    except OSError as exc:
        raise _Failure("cannot serve on %s: %s" % (app.url, exc.strerror or exc)) from None


def _quiet_names(text, names):
    """The names -q lists (comma-separated), whose output is hidden; each must be one of names."""
    quiet = {name.strip() for name in (text or "").split(",") if name.strip()}
    unknown = sorted(quiet.difference(names))
    if unknown:
        raise _UsageError("-q: no process named %r (there are %s)" % (unknown[0], ", ".join(names)))
    return quiet


def _run_foreground(configs, args, keep_alive, sockets=()):
    """Run jobs in the foreground with prefixed output until Ctrl-C (or, unless keep_alive, a first exit).

    configs: [(session, ProcessConfig)]; each process shows as job.slot (web.1).
    Returns the exit code: 0 when stopped on request, else the first process's that exited on its own.
    """
    names = [_slot_label(config.name, n) for _, config in configs for n in range(1, config.numprocesses + 1)]
    manager = _cli_manager(args)
    asked, first_exit = set(), []

    def stop_all(code):
        """Record the exit code and stop every job now (inline: nothing is replaced meanwhile)."""
        first_exit.append(code)
        for job in manager.jobs():
            manager.stop_job(job)
        manager.stop()

    printer = _Printer(sys.stdout, sys.stdout.isatty() and not args.no_color, names, lambda: stop_all(1),
                       prefix=not args.no_prefix)
    quiet = _quiet_names(args.quiet, [config.name for _, config in configs])

    def on_exit(evtype, msg):
        printer.line("system", _event_line(evtype, msg))
        if msg["pid"] not in asked and not keep_alive and not first_exit:
            stop_all(_exit_code(msg))

    def on_stop_process(evtype, msg):
        asked.add(msg["pid"])
        printer.line("system", _event_line(evtype, msg))

    manager.events.subscribe("spawn", lambda evtype, msg: printer.line("system", _event_line(evtype, msg)))
    manager.events.subscribe("exit", on_exit)
    manager.events.subscribe("stop_process", on_stop_process)
    manager.events.subscribe("reap", on_stop_process)  # scaled down
    loading = [True]  # a spawn error while loading is the load's error, printed once, below
    manager.events.subscribe("spawn_error", lambda e, msg: loading[0] or printer.line("system", msg["reason"]))
    _start(manager, args.http and _http_app(args))
    _forward_signals(manager, (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT))

    def load_all():  # inside run(): a Ctrl-C while the first processes start already stops them
        try:
            _add_sockets(manager, [(name, {"address": address}) for name, address in sockets])
            for session, config in configs:
                name = _job_name(session, config.name)
                manager.load(config, sessionid=session, start=False)
                if config.name not in quiet:
                    channel = manager.subscribe("LOGS:" + name)  # its lines, from the very first
                    channel.bind("line", lambda evtype, msg, job=config.name: printer.line(
                        _slot_label(job, msg["slot"]), msg["line"]))
                manager.start_job(name)
        except ProcessError as exc:
            printer.line("system", str(exc))
            first_exit.append(1)
            manager.stop()
        except RuntimeError:  # stopped by a signal while loading
            pass
        loading[0] = False

    manager.run(on_start=load_all)
    return first_exit[0] if first_exit else 0


def _dotenv_paths(args):
    """The .env files a command reads: -e (several with commas), else ./.env when present."""
    return [path.strip() for path in (args.env or ".env").split(",") if args.env or os.path.exists(path.strip())]


def _dotenv(args):
    """The variables of the .env files (_dotenv_paths), the later winning."""
    env = {}
    for env_file in _dotenv_paths(args):
        env.update(_parse_dotenv(env_file))
    return env


def _procfile_path(args, env):
    """The Procfile, as honcho finds it: -f, else PROCFILE from the .env files, else from the environment."""
    return args.procfile or env.get("PROCFILE") or os.environ.get("PROCFILE") or "Procfile"


def _base_port(args, env):
    """The first $PORT, as honcho takes it: -p, else PORT from the .env files, else from the environment,
    else 5000."""
    if args.port is not None:
        return args.port
    for where, value in (("the .env file", env.get("PORT")), ("the environment", os.environ.get("PORT"))):
        if value is not None:
            if not _is_number(value.strip()) or not 1 <= int(value) <= 65535:
                raise _UsageError("PORT in %s must be a port from 1 to 65535, got %r" % (where, value))
            return int(value)
    return 5000


def _read_procfile(args):
    """What start and export read: the Procfile's directory, its .env (-e, several with commas), and its
    types as [(name, command, count, first $PORT)], numbered as honcho does: 5000, 5001 for web, 5100 for
    the next type."""
    env = _dotenv(args)
    procfile = os.path.abspath(_procfile_path(args, env))
    entries = _parse_procfile(procfile)
    counts = _parse_concurrency(args.concurrency, [name for name, _ in entries])
    base = _base_port(args, env)
    types = []
    for index, (name, command) in enumerate(entries):
        count, port = counts.get(name, 1), base + 100 * index
        last = max(count, 1)
        if port + last - 1 > 65535:
            raise _UsageError("%s %d: %s.%d would get $PORT %d, past 65535" % (
                "-p" if args.port is not None else "PORT", base, name, last, port + last - 1))
        types.append((name, command, count, port))
    return os.path.dirname(procfile), env, types


def _procfile_configs(args):
    """[(session, ProcessConfig)] for the Procfile's processes that `start` runs: a job per type, whose
    process in slot N is shown as web.N and gets $PORT port + N - 1, scaled or not."""
    cwd, env, types = _read_procfile(args)
    names = [name for name, _, _, _ in types]
    for name in args.processes:
        if name not in names:
            raise _UsageError("no process named %r in %s (it has %s)" % (name, _procfile_path(args, env),
                                                                          ", ".join(names)))
    configs = []
    for name, command, count, port in types:
        if args.processes and name not in args.processes or not count:
            continue
        configs.append((_DEFAULT_SESSION, ProcessConfig(  # a simple command replaces its shell (exec)
            name, _exec_form(command), shell=True, cwd=cwd, env={"PYTHONUNBUFFERED": "1", **env}, port=port, numprocesses=count,
            redirect_output=["out", "out"], graceful_timeout=args.graceful_timeout)))
    return configs


def _cmd_start(args):
    # The rule (in --help): JOBs with --http and no -f ask that server, Procfile or not; JOBs with
    # neither --http nor a Procfile here ask the default server; anything else runs the Procfile.
    if args.processes and args.procfile is None and (args.http or
                                                     not os.path.exists(_procfile_path(args, _dotenv(args)))):
        return _client_state(args, "start")
    configs = _procfile_configs(args)
    if not configs and not args.http:  # -c web=0: nothing to run, as honcho says nothing and returns
        return 0
    return _run_foreground(configs, args, args.keep_alive)


def _run_name(command):
    """What run calls its processes: the program, or what an interpreter runs (python3 worker.py: worker,
    python3 -m http.server: http_server), never "python3", which reads like a version once numbered."""
    name = os.path.basename(command[0])
    if re.fullmatch(r"(python|pypy|node|ruby|perl|php|bash|sh|zsh)[\d.]*", name):
        words = iter(command[1:])
        for word in words:
            if word == "-m":
                name = next(words, name)
                break
            if word == "-c":
                break
            if not word.startswith("-"):
                name = os.path.splitext(os.path.basename(word))[0]
                break
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:128] or "run"


def _cmd_run(args):
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise _UsageError("run: give the command after --, e.g. run -- python3 -m http.server")
    try:
        config = ProcessConfig(args.name or _run_name(command), shlex.quote(command[0]), args=command[1:],
                               numprocesses=args.n, redirect_output=["out", "out"],
                               graceful_timeout=args.graceful_timeout, env={"PYTHONUNBUFFERED": "1"},
                               sockets=[name for name, _ in args.socket])
    except ValueError as exc:
        raise _UsageError("run: %s" % exc) from None
    return _run_foreground([(_DEFAULT_SESSION, config)], args, keep_alive=True, sockets=args.socket)


def _socket_text(text):
    """--socket NAME=ADDRESS, as add_socket() takes them."""
    name, _, address = text.partition("=")
    if not name.isidentifier() or not address:
        raise ValueError("give NAME=ADDRESS (web=tcp://127.0.0.1:8000), got %r" % (text,))
    _socket_address(address)
    return name, address


# -- serve: a daemon from a config file ------------------------------------------------------------
# Its config file (INI or JSON), its state file, its pidfile, the daemon itself, and check -c.

_CONFIG_TYPES = {f.name: f.type for f in dataclasses.fields(ProcessConfig)}


def _ini_value(key, text):
    """Convert an INI setting to what ProcessConfig takes."""
    import configparser
    kind = _CONFIG_TYPES.get(key, "str").replace(" | None", "")
    if key in ("max_rss", "memory_max", "log_max_bytes", "tail_bytes") and not _is_number(text):
        return text  # a size such as 200M
    if key in ("uid", "gid") and not _is_number(text):
        return text  # a user or group name, as supervisord's user= takes it
    if key == "umask":
        return text  # octal, as supervisord's umask= reads it: 027 is 0o027
    if key == "success_codes":
        return [int(code) for code in re.split(r"[\s,]+", text) if code]
    if key in ("redirect_output", "custom_streams", "sockets", "env_file"):
        return [label for label in re.split(r"[\s,]+", text) if label]
    if key == "env":
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in shlex.split(text.replace(",", " ")))
    if key == "rlimits":  # nofile=65536 core=0 nproc=512:1024
        limits = {}
        for item in filter(None, re.split(r"[\s,]+", text)):
            name, sep, value = item.partition("=")
            if not sep or value.count(":") > 1:
                raise ValueError("give NAME=LIMIT or NAME=SOFT:HARD (nofile=65536 nproc=512:1024), got %r" % item)
            parts = [part if part in ("infinity", "unlimited") else _int_text("rlimits: " + name, part)
                     for part in value.split(":")]
            limits[name] = parts if len(parts) == 2 else parts[0]
        return limits
    if key == "flapping":
        values = [v for v in re.split(r"[\s,]+", text) if v]
        if len(values) > 4:
            raise ValueError("give attempts, window, retry_in, max_retry")
        types = (int, float, float, int)
        return dict(zip(("attempts", "window", "retry_in", "max_retry"), (t(v) for t, v in zip(types, values))))
    if kind == "bool":
        if text.lower() not in configparser.ConfigParser.BOOLEAN_STATES:
            raise ValueError("expected true or false, got %r" % text)
        return configparser.ConfigParser.BOOLEAN_STATES[text.lower()]
    if kind == "int":
        return _int_text(key, text)
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError("%s must be a number, got %r" % (key, text)) from None
    return text


def _config_token(path, token, token_file):
    """A config's token: given as it is, or read from token_file (relative to the config's directory)."""
    if token is not None and token_file is not None:
        raise _UsageError("%s: give token or token_file, not both" % path)
    if token_file is None:
        if token is not None and not isinstance(token, str):
            raise _UsageError("%s: token must be a str" % path)
        return token
    if not isinstance(token_file, str) or not token_file:
        raise _UsageError("%s: token_file must be a path" % path)
    return _read_token_file(os.path.join(os.path.dirname(path), token_file), "%s: token_file" % path)


def _json_job(job, where):
    """(session, ProcessConfig) of a JSON job: a ProcessConfig object with an optional "session"."""
    try:
        if not isinstance(job, dict):
            raise ValueError("a job must be a JSON object, got %r" % (job,))
        job = dict(job)
        session = _valid_name("session", job.pop("session", _DEFAULT_SESSION))
        return session, ProcessConfig.from_dict(job)
    except (TypeError, ValueError) as exc:
        raise _UsageError("%s: %s" % (where, exc)) from None


def _read_json_config(path, text):
    try:
        data = _json_value(text)
    except ValueError as exc:
        raise _UsageError("%s: not valid JSON: %s" % (path, exc)) from None
    if not isinstance(data, dict):
        raise _UsageError("%s: the config must be a JSON object with 'jobs'" % path)
    unknown = set(data) - {"jobs", "http", "token", "token_file", "include", "sockets", "webhooks"}
    if unknown:
        raise _UsageError("%s: unknown key %r (the keys are jobs, sockets, webhooks, http, token, token_file, "
                          "include)" % (path, sorted(unknown)[0]))
    sockets = data.get("sockets", {})
    if not isinstance(sockets, dict):
        raise _UsageError("%s: sockets: must be an object of name: address (or {address, ...})" % path)
    sockets = {name: _config_socket("%s: sockets.%s" % (path, name), name, settings if isinstance(settings, dict)
                                    else {"address": settings}) for name, settings in sockets.items()}
    include = data.get("include", [])
    if not isinstance(include, list) or not all(isinstance(item, str) for item in include):
        raise _UsageError("%s: include: must be a list of file names or patterns" % path)
    jobs = data.get("jobs", [])
    if not isinstance(jobs, list):
        raise _UsageError("%s: jobs: must be a list of process configs" % path)
    configs = []
    for index, job in enumerate(jobs):
        where = "jobs[%d] (%s)" % (index, job.get("name", "?")) if isinstance(job, dict) else "jobs[%d]" % index
        if isinstance(job, dict) and "env_file" in job:
            job = dict(job, env_file=_config_env_files(path, job["env_file"]))
        configs.append(_json_job(job, "%s: %s" % (path, where)))
    token = _config_token(path, data.get("token"), data.get("token_file"))
    return configs, data.get("http"), token, include, sockets, _config_webhooks(path, data.get("webhooks", {}))


def _read_ini_config(path, text):
    import configparser
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # environment variables keep their case
    try:
        parser.read_string(text, path)
    except configparser.Error as exc:
        raise _UsageError("%s: %s" % (path, str(exc).replace("\n", " "))) from None
    http, token, include = None, None, []
    for name in parser.sections():  # a typo in a section name is an error, never a job silently left out
        if name not in ("gaffer", "webhooks") and name.partition(":")[0] not in ("job", "process", "env", "endpoint",
                                                                                   "socket"):
            raise _UsageError("%s: unknown section [%s] (the sections are [gaffer], [webhooks], [job:NAME], [env:NAME], "
                              "[socket:NAME] and [endpoint:NAME])" % (path, name))
    sockets = {name[7:]: _config_socket("%s: [%s]" % (path, name), name[7:], dict(parser[name]))
               for name in parser.sections() if name.startswith("socket:")}
    if parser.has_section("gaffer"):
        section = parser["gaffer"]
        unknown = set(section) - {"token", "token_file", "http", "http_endpoints", "include"}
        if unknown:
            raise _UsageError("%s: [gaffer]: unknown setting %r (the settings are http, http_endpoints, include, "
                              "token, token_file)" % (path, sorted(unknown)[0]))
        include = [item for item in re.split(r"[\s,]+", section.get("include", "")) if item]
        token = _config_token(path, section.get("token"), section.get("token_file"))
        http = section.get("http")
        endpoint = section.get("http_endpoints", "").split(",")[0].strip()
        if endpoint:
            if not parser.has_section("endpoint:" + endpoint):
                raise _UsageError("%s: [gaffer]: http_endpoints names %r, but there is no [endpoint:%s] section"
                                  % (path, endpoint, endpoint))
            http = parser.get("endpoint:" + endpoint, "bind", fallback=None)
            if http is None:
                raise _UsageError("%s: [endpoint:%s]: give its address as bind = HOST:PORT" % (path, endpoint))
    configs = []
    for name in parser.sections():
        kind, _, job = name.partition(":")
        if kind not in ("job", "process"):
            continue
        session, job = _split_name(job) if job else (_DEFAULT_SESSION, job)
        settings = {}
        for key, value in parser[name].items():
            try:
                settings[key] = _ini_value(key, value)
            except ValueError as exc:
                raise _UsageError("%s: %s/%s: %s" % (path, name, key, exc)) from None
        if parser.has_section("env:" + job):
            settings["env"] = {**settings.get("env", {}), **dict(parser["env:" + job])}
        if "env_file" in settings:
            settings["env_file"] = _config_env_files(path, settings["env_file"])
        try:
            configs.append((session, ProcessConfig(job, settings.pop("cmd", None), **settings)))
        except (TypeError, ValueError) as exc:
            raise _UsageError("%s: %s: %s" % (path, name, exc)) from None
    webhooks = {pattern: urls.split() for pattern, urls in parser["webhooks"].items()} \
        if parser.has_section("webhooks") else {}
    return configs, http, token, include, sockets, _config_webhooks(path, webhooks)


def _config_env_files(path, value):
    """A config file's env_file: each relative path is relative to the file's directory ("-" kept in front)."""
    base = os.path.dirname(os.path.abspath(path))
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list):
        return value  # ProcessConfig says what is wrong with it
    return [(item[:1] == "-") * "-" + os.path.join(base, item[1:] if item[:1] == "-" else item)
            if isinstance(item, str) and item.lstrip("-") else item for item in value]


def _config_socket(where, name, settings):
    """A socket a config file declares, as add_socket() takes it: {address, backlog, reuseport, mode, owner}."""
    unknown = set(settings) - {"address", "backlog", "reuseport", "mode", "owner"}
    if unknown:
        raise _UsageError("%s: unknown setting %r (the settings are address, backlog, reuseport, mode, owner)"
                          % (where, sorted(unknown)[0]))
    try:
        _socket_name(name)
        _socket_address(settings.get("address"))
        socket_settings = dict(settings)
        if isinstance(socket_settings.get("backlog"), str):
            socket_settings["backlog"] = _int_text("backlog", socket_settings["backlog"])
        if isinstance(socket_settings.get("reuseport"), str):  # an INI file's yes or no
            socket_settings["reuseport"] = socket_settings["reuseport"].lower() in ("1", "yes", "true", "on")
        return socket_settings
    except ValueError as exc:
        raise _UsageError("%s: %s" % (where, exc)) from None


def _read_jobs(path, including):
    """([(session, ProcessConfig, file)], http, token, {socket name: its settings}, webhooks) of a config file
    and of those it includes: its `include` globs (a JSON list, or a line in [gaffer]) are relative to its
    directory; http, token and webhooks are the file's own."""
    text = _read_text(path, "config file")
    if path.endswith(".json") or text.lstrip().startswith("{"):
        configs, http, token, include, sockets, webhooks = _read_json_config(path, text)
    else:
        configs, http, token, include, sockets, webhooks = _read_ini_config(path, text)
    jobs = [(session, config, path) for session, config in configs]
    for pattern in include:
        import glob
        found = sorted(glob.glob(os.path.join(os.path.dirname(path), pattern)))
        if not found and not re.search(r"[*?[]", pattern):  # a file named outright must be there
            raise _UsageError("%s: include: cannot read %s" % (path, pattern))
        for other in found:
            if os.path.realpath(other) in including + (os.path.realpath(path),):
                raise _UsageError("%s: include: %s includes %s again" % (path, other, path))
            more = _read_jobs(other, including + (os.path.realpath(path),))
            jobs += more[0]
            for name in set(sockets) & set(more[3]):
                raise _UsageError("%s: socket %s is declared twice (in %s too)" % (path, name, other))
            sockets.update(more[3])
    return jobs, http, token, sockets, webhooks


def _validate_config(path, jobs, http, sockets=()):
    """A config (with what it includes) names each job once, each depends_on one of them, with no cycle,
    and only sockets it declares.  jobs: [(session, ProcessConfig, file)]; returns [(session, ProcessConfig)]."""
    if http is not None:
        try:
            _parse_address(http)
        except ValueError as exc:
            raise _UsageError("%s: http: %s" % (path, exc)) from None
    graph, files = {}, {}
    for session, config, origin in jobs:
        name = _job_name(session, config.name)
        if name in graph:
            again = "" if origin == files[name] else " (in %s and %s)" % (files[name], origin)
            raise _UsageError("%s: job %s is defined twice%s" % (path, name, again))
        graph[name], files[name] = _dep_names(session, config), origin
    configs = [(session, config) for session, config, _ in jobs]
    for session, config in configs:
        for name in config.sockets:
            if name not in sockets:
                raise _UsageError("%s: %s.%s: sockets names %r, which the file does not declare"
                                  % (path, session, config.name, name))
        for dep, name in zip(config.depends_on, _dep_names(session, config)):
            if name not in graph:
                raise _UsageError("%s: %s.%s: depends_on names %r, which the file does not define"
                                  % (path, session, config.name, dep))
        try:
            _refuse_cycle(graph, session, config)
        except ValueError as exc:
            raise _UsageError("%s: %s" % (path, exc)) from None
    return configs


def _config_webhooks(path, hooks):
    """A config file's webhooks, {pattern: URL or [URLs]}: INI's [webhooks] section of PATTERN = URL [URL...],
    the old gafferd's shape, or JSON's "webhooks" object; checked as WebhooksApp checks them."""
    if not isinstance(hooks, dict):
        raise _UsageError("%s: webhooks: must be an object of event pattern: URL (or [URLs])" % path)
    try:
        WebhooksApp(hooks)
    except ValueError as exc:
        raise _UsageError("%s: webhooks: %s" % (path, exc)) from None
    return hooks


def _read_config(path):
    """Read a JSON or INI daemon config: ([(session, ProcessConfig)], http address or None, token or None,
    {socket name: add_socket()'s settings}, {webhook pattern: URLs}).

    Errors are _UsageError("path: where: reason").
    """
    jobs, http, token, sockets, webhooks = _read_jobs(path, ())
    return _validate_config(path, jobs, http, sockets), http, token, sockets, webhooks


def _cannot_start(config):
    """Why a job's processes cannot start here now (a missing cwd or program), or None: what check -c warns of.
    The program is looked up as Popen looks it up: relative to cwd, or in the PATH of the process's environment."""
    if config.cwd is not None and not os.path.isdir(config.cwd):
        return "its cwd %s is not a directory" % config.cwd
    program = "/bin/sh" if config.shell else shlex.split(config.cmd)[0]
    if "$" in program:
        return None  # known at spawn only
    try:
        _check_program(program, _child_env(config), config.cwd)
    except OSError:
        return "its program %s is not found%s" % (program, "" if "/" in program else " in its PATH")
    return None


def _cmd_check(args):
    if args.config:
        configs, _, _, sockets, webhooks = _read_config(args.config)
        print("valid config %s: %d job%s" % (args.config, len(configs), "s" if len(configs) != 1 else ""))
        for name, settings in sockets.items():
            print("  socket %s: %s" % (name, settings["address"]))
        for pattern, urls in webhooks.items():
            print("  webhook %s: %s" % (pattern, " ".join([urls] if isinstance(urls, str) else urls)))
        for session, config in configs:
            after = " (after %s)" % ", ".join(config.depends_on) if config.depends_on else ""
            print("  %s.%s: %s%s" % (session, config.name, config.cmd, after))
            problem = _cannot_start(config)
            if problem is not None:  # a warning: a mount or a binary may be there when it runs
                print("gaffer: warning: %s.%s cannot start here now: %s" % (session, config.name, problem),
                      file=sys.stderr)
        return 0
    procfile = _procfile_path(args, _dotenv(args))
    entries = _parse_procfile(procfile)
    print("valid Procfile %s: %d process type%s" % (procfile, len(entries), "s" if len(entries) > 1 else ""))
    for name, command in entries:
        print("  %s: %s" % (name, command))
    return 0


def _apply_config(manager, configs, path):
    """Bring the manager to a config (SIGHUP): load new jobs, unload gone ones, update changed ones, leave
    the rest; then one line that counts and names each kind.  A job that fails is one error line."""
    wanted = {_job_name(session, config.name): (session, config) for session, config in configs}
    done = {"loaded": [], "updated": [], "unloaded": []}
    for name in manager.jobs():
        if name not in wanted:
            manager.unload(name)
            done["unloaded"].append(name)
    for name, (session, config) in wanted.items():
        try:
            try:
                current = manager.get(name)
            except ProcessNotFound:
                manager.load(config, sessionid=session, retry=True)
                done["loaded"].append(name)
                continue
            if current != config:
                manager.update(config, sessionid=session, start=True)
                done["updated"].append(name)
        except (ProcessError, ValueError, TypeError) as exc:
            _log.error("reload of %s: %s: %s", path, name, exc)
    _log.info("reloaded %s: %s", path, ", ".join(
        "%d %s%s" % (len(names), kind, " (%s)" % ", ".join(names) if names else "") for kind, names in done.items()))


def _add_sockets(manager, sockets):
    """Bind [(name, add_socket()'s settings)] in turn; the first that fails raises."""
    for name, settings in sockets:
        manager.add_socket(name, **settings)


def _serve_sockets(manager, sockets, path):
    """serve binds its config's sockets before any job: one that cannot be bound stops it, in one line."""
    try:
        _add_sockets(manager, sockets.items())
    except (ProcessError, ValueError) as exc:
        manager.stop()
        manager.run()
        raise _Failure("%s: %s" % (path, exc)) from None


def _apply_sockets(manager, held, wanted, path):
    """SIGHUP: bind the sockets the config file declares now (one whose settings changed stays as it was
    while it is held: its port cannot close under the processes that use it)."""
    for name, settings in wanted.items():
        if name in held and held[name] != settings:
            _log.error("reload of %s: socket %s changed, but it stays as it was until remove_socket or a restart",
                       path, name)
        elif name not in held:
            try:
                manager.add_socket(name, **settings)
                held[name] = settings
            except (ProcessError, ValueError) as exc:
                _log.error("reload of %s: %s", path, exc)


def _close_sockets(manager, held, wanted, path):
    """SIGHUP, after the jobs: the sockets gone from the file close, now that no job of the file names them."""
    for name in [name for name in held if name not in wanted]:
        try:
            manager.remove_socket(name)
            del held[name]
        except ProcessError as exc:
            _log.error("reload of %s: %s", path, exc)


def _temporary_file(path, mode, data):
    """A new file beside path holding data (synced): (fd, its path).  Its name is unpredictable and it is
    created exclusively, never through a symlink (mkstemp: O_EXCL, O_NOFOLLOW), so nobody else can plant
    or steer it; then it gets `mode`."""
    import tempfile
    fd, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                     dir=os.path.dirname(path) or ".")
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    return fd, temporary


def _replace_file(path, data, mode):
    """Write data to path atomically (a temporary file, then a rename): a reader never sees half of it."""
    fd, temporary = _temporary_file(path, mode, data)
    os.close(fd)
    try:
        os.replace(temporary, path)
    except OSError:
        os.unlink(temporary)
        raise


def _same_file(fd, path):
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class _StateFile:
    """serve --state: what the API changed (loads, unloads, scales, stops, starts), kept in a file so that
    a restarted serve comes back as it was.  {"jobs": {"session.job": {"config", "numprocesses",
    "active"} or {"unloaded": true}}}, only for jobs the API touched: the config file rules the rest."""

    def __init__(self, path):
        self.path = path
        self.jobs = {}
        self.runs = {}  # "session.job" -> when a catch_up job last started a run (epoch seconds)
        self.problems = []  # what could not be restored, one line each: serve --daemon says it on the terminal
        self._lock = threading.Lock()  # requests come on their own threads

    def read(self):
        """The recorded jobs: {name: (session, ProcessConfig, numprocesses, active), or None if it was
        unloaded}.  An entry that cannot be read is one error line and is left out; a file that is not a
        JSON object of jobs is set aside as FILE.corrupt (one line) and nothing is restored."""
        try:
            with open(self.path, "rb") as f:
                data = _json_value(f.read())
            if not isinstance(data, dict) or not isinstance(data.get("jobs"), dict):
                raise ValueError("not an object with 'jobs'")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:
            self.problems.append("state file %s is corrupt (%s: %s); set aside as %s.corrupt, starting from the "
                                 "config alone" % (self.path, type(exc).__name__, exc, self.path))
            _log.error("%s", self.problems[-1])
            try:
                os.replace(self.path, self.path + ".corrupt")
            except OSError as move:
                _log.error("cannot set %s aside: %s", self.path, move.strerror)
            return {}
        self.jobs = data["jobs"]  # kept whole: an entry this start cannot use is written back as it was
        runs = data.get("runs", {})
        self.runs = {name: when for name, when in runs.items() if isinstance(when, (int, float))
                     and not isinstance(when, bool)} if isinstance(runs, dict) else {}
        recorded = {}
        for name, entry in self.jobs.items():
            try:
                recorded[name] = self._entry(name, entry)
            except Exception as exc:  # whatever a hostile or outdated file holds: that job only
                self.refused(name, exc)
        return recorded

    def refused(self, name, exc):
        self.problems.append("state file %s: %s is not restored: %s" % (self.path, name, exc))
        _log.error("%s", self.problems[-1])

    @staticmethod
    def _entry(name, entry):
        session, job = _split_name(name)
        _valid_name("session", session)
        if not isinstance(entry, dict):
            raise ValueError("its entry must be an object, got %r" % (entry,))
        if entry.get("unloaded") is True:
            return None
        count, active = entry.get("numprocesses"), entry.get("active")
        _int_setting("numprocesses", count, 0)
        _bool_setting("active", active)
        config = ProcessConfig.from_dict(dict(entry.get("config"), numprocesses=count))
        if config.name != job:
            raise ValueError("its config names job %r" % config.name)
        return session, config, count, active

    def plan(self, configs):
        """What serve loads at start, before anything spawns: the config file's jobs that nothing was
        recorded of, then the recorded ones (at their recorded count, stopped if they were), each with
        the config file's version to fall back on if it cannot be loaded (a cycle against the current
        config, say): [(session, config, start, recorded, fallback or None)]."""
        recorded = self.read()
        from_file = {_job_name(session, config.name): (session, config) for session, config in configs}
        plan = [(session, config, True, False, None) for name, (session, config) in from_file.items()
                if name not in recorded]
        for name, entry in recorded.items():
            if entry is not None:
                fallback = from_file.get(name)
                plan.append((entry[0], entry[1], entry[3], True, fallback and fallback[1]))
        return plan

    def record(self, manager, method, path, body):
        """HttpHandler's on_change: note the job a request changed, and write the file."""
        match = re.fullmatch(r"/jobs/([^/]+)(?:/([^/]+)(/numprocesses|/state)?)?/?", path)
        if match is None or match.group(2) is None and method != "POST":
            return  # signals, stdin, commits, shutdown: nothing to restore
        session, job = match.group(1), match.group(2)
        if job is None:
            try:
                job = _json_value(body)["name"]
            except (ValueError, KeyError, TypeError):
                return
        name = _job_name(session, job)
        with self._lock:
            try:
                info = manager.info(name)
                self.jobs[name] = {"config": manager.get(name).to_dict(), "numprocesses": info["max_processes"],
                                   "active": info["active"]}
            except ProcessNotFound:
                self.jobs[name] = {"unloaded": True}
            self._write()

    def ran(self, name, when):
        """A catch_up job started a run (on a thread of its own, not the loop's): a restarted serve knows
        whether a run was missed meanwhile."""
        with self._lock:
            self.runs[name] = when
            self._write()

    def _write(self):
        try:  # private: it holds the jobs' environments
            _replace_file(self.path, _json_text({"jobs": self.jobs, "runs": self.runs}, indent=1,
                                                sort_keys=True).encode(), 0o600)
        except OSError as exc:
            _log.error("cannot write state file %s: %s", self.path, exc.strerror or exc)


class _Pidfile:
    """serve --pidfile: this process's pid, written atomically and held with flock() while it runs.  A
    running serve is known by its lock, never by the pid alone: a stale file whose pid now belongs to
    another program does not stop the next start."""

    def __init__(self, path):
        self.path = path
        self.fd = None  # the pidfile, open and locked, while this process holds it

    def acquire(self):
        """Write and lock the pidfile; _Failure if a live serve holds it, _UsageError if it cannot be written."""
        try:
            fd, temporary = _temporary_file(self.path, 0o644, b"%d\n" % os.getpid())
        except OSError as exc:
            raise _UsageError("--pidfile %s: %s" % (self.path, exc.strerror or exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file of its own: nobody else holds it
            while not self._put(temporary):
                pass
        except OSError as exc:
            os.close(fd)
            raise _UsageError("--pidfile %s: %s" % (self.path, exc.strerror or exc)) from None
        except BaseException:
            os.close(fd)
            raise
        finally:
            if os.path.exists(temporary):  # linked, or not moved
                os.unlink(temporary)
        self.fd = fd

    def _put(self, temporary):
        """Move the locked temporary file to the pidfile's path unless a live serve holds the file there:
        True once done, False to look again (another start changed the file meanwhile)."""
        try:
            old = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                os.link(temporary, self.path)  # fails if another start made the file meanwhile
            except FileExistsError:
                return False
            return True
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            os.replace(temporary, self.path)  # a symlink: replaced, never followed
            return True
        try:
            try:
                fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(old, 32).decode("ascii", "replace").strip()
                raise _Failure("%s: gaffer is already running as pid %s" % (self.path, pid or "?")) from None
            if not _same_file(old, self.path):  # replaced while we locked the old one
                return False
            os.replace(temporary, self.path)  # while the old file is locked: no other start can take it
            return True
        finally:
            os.close(old)

    def release(self):
        """At exit: remove the pidfile if it is still this process's, and unlock it."""
        if self.fd is None:
            return
        if _same_file(self.fd, self.path):
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = None


def _daemonize(log_fd):
    """Detach as classic daemons do: fork, setsid, fork again; stdin from /dev/null, stdout and stderr to
    log_fd (or /dev/null).  The working directory stays, so relative paths in the config keep their meaning.

    The command that was run exits (SystemExit) once the daemon said how its start went, with the
    daemon's error, if any, on its stderr.  The daemon gets tell(code, error) to say it.
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(write_end)
        os.waitpid(child, 0)  # the middle process exits at once: no zombie of ours
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read().decode("utf-8", "replace")  # ends when the daemon told, or died
        code, _, error = report.partition(" ")
        if not code.isdigit():
            code, error = "1", "the daemon exited before it was serving (see its --log-file)"
        for line in error.strip().splitlines():  # its error, or what it could not start or restore
            print("gaffer: %s" % line, file=sys.stderr)
        raise SystemExit(int(code))
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    for fd in (1, 2):
        os.dup2(devnull if log_fd is None else log_fd, fd)
    for fd in {devnull, log_fd} - {None}:
        os.close(fd)

    def tell(code, error=""):
        nonlocal write_end
        if write_end is not None:
            os.write(write_end, ("%d %s" % (code, error)).encode())
            os.close(write_end)
            write_end = None
    return tell


def _serve(args, configs, app, state, on_ready, sockets, webhooks):
    manager = _cli_manager(args)
    for event in ("spawn", "exit", "flap", "spawn_error", "stop_process", "reap"):  # as supervisord says them
        manager.events.subscribe(event, lambda evtype, msg: _log.info("%s", _event_line(evtype, msg)))
    _start(manager, app, [WebhooksApp(webhooks)] if webhooks else [])
    _serve_sockets(manager, sockets, args.config)
    held = dict(sockets)

    def reload_config():
        try:
            configs, _, _, sockets, _ = _read_config(args.config)
        except _UsageError as exc:
            _log.error("reload of %s failed: %s", args.config, exc)
            return
        _apply_sockets(manager, held, sockets, args.config)
        _apply_config(manager, configs, args.config)
        _close_sockets(manager, held, sockets, args.config)

    _forward_signals(manager, (signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT))  # SIGHUP reloads the config
    previous = signal.signal(signal.SIGHUP, lambda *_: manager.loop.call_soon_threadsafe(reload_config))

    def load(session, config, start):
        last_run = state.runs.get(_job_name(session, config.name)) if state and config.catch_up else None
        try:  # a job of the file that cannot spawn stays, retried on its backoff: never lost in silence
            manager.load(config, sessionid=session, start=start, retry=True, last_run=last_run)
        except (ProcessError, ValueError, TypeError) as exc:  # a cycle, a limit this machine lacks...
            return exc
        return None

    if state:
        _record_runs(manager, state)

    def load_all():  # inside run(): SIGTERM while loading stops what is loaded
        # The recorded state goes in before the first spawn: a job stopped over the API never runs.
        plan = state.plan(configs) if state else [(s, c, True, False, None) for s, c in configs]
        try:
            for session, config, start, recorded, fallback in plan:
                error = load(session, config, start)
                name = _job_name(session, config.name)
                if error is not None and recorded:
                    state.refused(name, error)  # the recorded entry is skipped: the config file's job, if any
                    error = fallback and load(session, fallback, True)
                if error is not None:
                    problems.append("cannot load %s: %s" % (name, error))
                    _log.error("%s", problems[-1])
        except RuntimeError:  # stopped by a signal while loading
            return
        _log.info("ready: %d jobs from %s%s", len(configs), args.config,
                  " and %d recorded in %s" % (len(state.jobs), state.path) if state else "")
        problems.extend("%s could not start, and is retried: %s" % (job["name"], job["last_error"])
                        for job in manager.status() if job["last_error"])
        on_ready(problems + (state.problems if state else []))

    problems = []

    try:
        manager.run(on_start=load_all)
    finally:
        signal.signal(signal.SIGHUP, previous)
    return 0


def _record_runs(manager, state):
    """serve --state: each run of a catch_up job is noted in the state file (written on a thread of its
    own, never the loop's), so that a restarted serve knows whether it missed one."""
    def on_start(evtype, msg):
        try:
            config = manager.get(msg["name"])  # on the loop thread: answered inline
        except ProcessNotFound:
            return
        if config.catch_up:
            threading.Thread(target=state.ran, args=(msg["name"], manager.loop.wall()), daemon=True).start()

    manager.events.subscribe("start", on_start)


def _cmd_serve(args):
    configs, http, token, sockets, webhooks = _read_config(args.config)
    app = _http_app(args, http, token)
    state = args.state and _StateFile(os.path.abspath(args.state))
    if state and not os.access(os.path.dirname(state.path), os.W_OK):
        raise _UsageError("--state %s: cannot write in %s" % (args.state, os.path.dirname(state.path)))
    if state:
        app.on_change = lambda method, path, body: state.record(app.manager, method, path, body)
    pidfile = args.pidfile and _Pidfile(os.path.abspath(args.pidfile))
    log_fd = None
    if args.log_file:
        try:
            log_fd = os.open(args.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise _UsageError("--log-file %s: %s" % (args.log_file, exc.strerror)) from None
    stream = sys.stderr
    if args.daemon:
        tell = _daemonize(log_fd)  # from here on, in the daemon, whose stderr is the log
    else:
        tell = lambda code, error="": None  # noqa: E731
        if log_fd is not None:  # the log goes there; a failure to start is still said here
            stream = os.fdopen(log_fd, "a", encoding="utf-8")
    logging.basicConfig(stream=stream, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        try:
            if pidfile:
                pidfile.acquire()
            return _serve(args, configs, app, state, lambda problems: tell(0, "\n".join(problems)), sockets, webhooks)
        except (_UsageError, _Failure) as exc:
            tell(2 if isinstance(exc, _UsageError) else 1, str(exc))
            raise
    finally:
        tell(1, "the daemon stopped before it was serving (see its --log-file)")
        if pidfile:
            pidfile.release()


# -- Client commands: talk to a running gaffer over HTTP -------------------------------------------
# ps, status, wait, scale, kill, load, unload, watch and logs, as JSON requests and event streams.

class _Client:
    """A small HTTP client of the controller: JSON requests and Server-Sent Event streams."""

    def __init__(self, address, token):
        import http.client
        self.http = http.client
        self.text = address
        try:
            self.family, self.address = _parse_address(address)
        except ValueError as exc:
            raise _UsageError(str(exc)) from None
        problem = None if token is None else _token_problem(token, self.family != socket.AF_UNIX)
        if problem is not None:
            raise _UsageError("the token %s" % problem)
        self.token = token

    def _connection(self, timeout):
        if self.family == socket.AF_UNIX:
            connection = self.http.HTTPConnection("localhost", timeout=timeout)
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout)
            try:
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
            connection.sock = sock
            return connection
        return self.http.HTTPConnection(*self.address, timeout=timeout)

    def _open(self, method, path, body=None, timeout=30):
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        try:
            connection = self._connection(timeout)
            connection.request(method, path, body=None if body is None else _json_text(body), headers=headers)
            response = connection.getresponse()
        except (OSError, self.http.HTTPException) as exc:
            raise _Failure("cannot reach gaffer at %s: %s" % (self.text, getattr(exc, "strerror", None) or exc)) \
                from None
        server = response.getheader("Server") or ""
        if not response.getheader("Gaffer-Version") and not server.startswith("gaffer/"):  # another program there
            connection.close()
            raise _Failure("%s is not a gaffer server (it answered HTTP %d, Server: %s)"
                           % (self.text, response.status, server or "not given"))
        if response.status >= 400:
            try:
                reason = _json_value(response.read())["error"]
            except (ValueError, KeyError, TypeError):
                reason = response.reason
            connection.close()
            raise _Failure("gaffer at %s: %s (%d)" % (self.text, reason, response.status))
        return connection, response

    def request(self, method, path, body=None):
        connection, response = self._open(method, path, body)
        try:
            return _json_value(response.read())
        finally:
            connection.close()

    def events(self, path, timeout=None):
        """Open a Server-Sent Events stream now: an _EventStream of (event, data) until the server ends it."""
        connection, response = self._open("GET", path, timeout=timeout)
        if response.getheader("Content-Type") != "text/event-stream":
            connection.close()
            raise _Failure("gaffer at %s: %s is not an event stream (Content-Type: %s)"
                           % (self.text, path, response.getheader("Content-Type")))
        return _EventStream(connection, response)


class _EventStream:
    """An open event stream: iterate it for (event, data); close() ends it, read or not.  Its lines end
    as the SSE specification says, at CR LF, CR or LF; an event is its data lines, joined with LF."""

    def __init__(self, connection, response):
        self._connection = connection
        self._events = self._read(response)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._events)
        except StopIteration:
            self.close()
            raise

    def close(self):
        self._events.close()
        self._connection.close()

    def abort(self):
        """End it from another thread than the one reading it: that read sees the end and returns."""
        sock = self._connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _read(response):
        event, data = None, []
        for raw in response:  # each ends with LF (the last may not: a line cut short, dropped)
            for line in re.split(r"\r\n|\r|\n", raw.decode("utf-8", "replace"))[:-1]:
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif not line and event is not None:
                    yield event, "\n".join(data)
                    event, data = None, []


def _quote(text):
    import urllib.parse
    return urllib.parse.quote(text, safe="")


def _resolve_job(name, names):
    """The "session.job" that a user means by `name`: as given with a session; without one, the default
    session's job, else the one job of that name in any session (ambiguous: an error naming each)."""
    if "." in name or "/" in name:
        return name.replace("/", ".", 1)
    if _job_name(_DEFAULT_SESSION, name) in names:
        return _job_name(_DEFAULT_SESSION, name)
    matches = [full for full in names if full.partition(".")[2] == name]
    if len(matches) > 1:
        raise _UsageError("job %r is in %d sessions (%s); say which, as session.job"
                          % (name, len(matches), ", ".join(matches)))
    return matches[0] if matches else _job_name(_DEFAULT_SESSION, name)  # unknown: the server says so


def _client(args):
    return _Client(args.http or os.environ.get("GAFFER_HTTP") or _DEFAULT_HTTP, _cli_token(args))


def _job_path(name, args):
    """/jobs/SESSION/JOB of the job a user named (a bare name asks the server which session has it)."""
    try:
        _split_name(name)
        if "." not in name and "/" not in name:
            name = _resolve_job(name, _client(args).request("GET", "/jobs")["jobs"])
        elif re.fullmatch(r".+\.[0-9]+", name):  # web.1: a job of session web, or process 1 of job web?
            names = _client(args).request("GET", "/jobs")["jobs"]
            job, _, slot = name.rpartition(".")
            if name.replace("/", ".", 1) not in names and _resolve_job(job, names) in names:
                raise _UsageError("%s is process %s of job %s: this command takes the job (%s); kill and logs "
                                  "take a process" % (name, slot, _resolve_job(job, names), job))
        session, job = _split_name(name)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    return "/jobs/%s/%s" % (_quote(session), _quote(job))


def _names_process(target, args):
    """A pid, or JOB.N as start prints it (web.1) where no session JOB has a job N."""
    return _is_number(target) or bool(re.fullmatch(r".+\.[0-9]+", target)) and \
        target.replace("/", ".", 1) not in _client(args).request("GET", "/jobs")["jobs"]


def _process_pid(target, args):
    """The pid of the process a user named: its pid, or job.slot as start prints it (web.1, batch.web.2)."""
    if _is_number(target):
        return int(target)
    job, _, slot = target.rpartition(".")
    if not job or not _is_number(slot):
        raise _UsageError("%r names no process: give a pid or JOB.N, as in web.1" % target)
    jobs = {info["name"]: info for info in _client(args).request("GET", "/status")["jobs"]}
    name = _resolve_job(job, list(jobs))
    if name not in jobs:
        raise _Failure("%s: no job %s (404)" % (target, name))
    for process in jobs[name]["processes"]:
        if process["slot"] == int(slot):
            return process["pid"]
    raise _Failure("%s: %s has no process in slot %s now (it has %s)" % (
        target, name, slot, ", ".join(str(slot) for slot in sorted(p["slot"] for p in jobs[name]["processes"]
                                                                    if p["slot"])) or "none"))


def _print_json(value):
    print(_json_text(value, indent=2, sort_keys=True))


def _report(args, result, text):
    """Print the server's answer as JSON (--json) or as a line for people."""
    if args.json:
        _print_json(result)
    else:
        print(text)


def _one_line(text):
    """A command as one line of a table: its newlines and other control characters escaped (\\n)."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def _uptime(create_time):
    seconds = int(max(0, time.time() - create_time)) if isinstance(create_time, (int, float)) else 0
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


def _cmd_ps(args):
    rows = []  # one per slot (its process, or why it is empty), and one per job that has none (stopped...)
    jobs = _client(args).request("GET", "/status")["jobs"]
    for job in jobs:
        fields = {key: job[key] for key in ("restarts", "last_exit", "cmd")}
        nobody = dict(pid=None, os_pid=None, status=None, create_time=None, cpu=None, mem=None)
        slots = [dict(fields, job=job["name"], **proc, state="running" if proc["status"] == "ready" else
                      proc["status"]) for proc in job["processes"]]
        slots += [dict(fields, **nobody, job=job["name"], slot=empty["slot"], state=empty["state"])
                  for empty in job.get("slots", ())]
        rows += sorted(slots, key=lambda row: (not row["slot"], row["slot"]))
        if not slots:
            rows.append(dict(fields, **nobody, job=job["name"], slot=None, state=job["state"]))
    if args.json:
        _print_json(rows)
        return 0
    table = [("JOB", "STATE", "PID", "OS_PID", "UPTIME", "CPU%", "MEM%", "RESTARTS", "LAST EXIT", "COMMAND")]
    for r in rows:
        running = r["pid"] is not None
        name = _slot_label(r["job"], r["slot"])
        table.append((name, r["state"],
                      str(r["pid"]) if running else "-", str(r["os_pid"]) if running else "-",
                      _uptime(r["create_time"]) if running else "-", str(r["cpu"]) if running else "-",
                      str(r["mem"]) if running else "-", str(r["restarts"]), r["last_exit"] or "-", _one_line(r["cmd"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for job in jobs:  # why a job could not start, and the sockets it is handed: under the table, whole
        if job.get("last_error"):
            print("%s: %s" % (job["name"], job["last_error"]))
        if job.get("sockets"):
            print("%s: sockets %s" % (job["name"], ", ".join(job["sockets"])))
        if job.get("blocked"):
            print("%s: blocked: %s" % (job["name"], job["blocked"]))
        if job.get("next_run") or job["state"] in ("completed", "failed") and job.get("last_run"):
            print("%s: %s" % (job["name"], _runs_text(job)))
    return 0


def _runs_text(job):
    """A scheduled or one-shot job's runs, as ps says them: "next run 2026-12-04 18:30:00, last run
    2026-12-04 18:29:00 (exit 0 after 1.2s)"."""
    def when(epoch):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
    parts = ["next run %s" % when(job["next_run"])] if job.get("next_run") else []
    last = job.get("last_run")
    if last:
        ended = ("signal %d" % last["term_signal"] if last["term_signal"] else "exit %d" % last["exit_status"]
                 ) + " after %.1fs" % (last["end"] - last["start"]) if last["end"] is not None else "running"
        parts.append("last run %s (%s)" % (when(last["start"]), ended))
    return ", ".join(parts)


def _cmd_status(args):
    jobs = _client(args).request("GET", "/status")["jobs"]
    if args.job and _names_process(args.job, args):  # web.1, as kill and logs take it, or a pid
        pid = _process_pid(args.job, args)
        for job in jobs:
            for proc in job["processes"]:
                if proc["pid"] == pid:
                    if args.json:
                        _print_json(dict(proc, job=job["name"]))
                        return 0
                    print("%s.%s: %s, pid %d, os pid %d, up %s, cpu %s%%, mem %s%%: %s" % (
                        job["name"], proc["slot"] or "commit", proc["status"], pid, proc["os_pid"],
                        _uptime(proc["create_time"]), proc["cpu"], proc["mem"], _one_line(job["cmd"])))
                    return 0
        raise _Failure("process %s not found (404)" % args.job)
    if args.job:
        name = _resolve_job(args.job, [job["name"] for job in jobs])
        jobs = [job for job in jobs if job["name"] == name]
        if not jobs:
            raise _Failure("job %r not found (404)" % name)
    if args.json:
        _print_json(jobs)
        return 0
    for job in jobs:
        print("%s: %s, %d of %d running, %d ready, %d restarts, last exit %s, pids %s: %s%s" % (
            job["name"], job["state"], job["running"], job["target"], job["ready"], job["restarts"],
            job["last_exit"] or "-", " ".join(str(p["pid"]) for p in job["processes"]) or "-", _one_line(job["cmd"]),
            "; last error: %s" % job["last_error"] if job.get("last_error") else ""))
    return 0


def _process_ready(client, pid):
    try:
        info = client.request("GET", "/%d" % pid)
    except _Failure:  # it exited meanwhile
        return False
    return info["ready"] and not info["committed"]


def _cmd_wait(args):
    """Exit 0 once every counted process of the job is ready; 1 on timeout, or if the job stops or goes."""
    client, path = _client(args), _job_path(args.job, args)
    deadline = time.monotonic() + args.timeout
    delay = 0.01
    while True:
        info = client.request("GET", path)
        if not info["active"]:
            raise _Failure("%s is stopped" % info["name"])
        ready = sum(1 for pid in info["processes"] if _process_ready(client, pid))
        if ready >= info["max_processes"]:
            _report(args, info, "%s: ready (%d processes)" % (info["name"], ready))
            return 0
        if time.monotonic() >= deadline:
            raise _Failure("%s is not ready after %gs: %d of %d processes ready"
                           % (info["name"], args.timeout, ready, info["max_processes"]))
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.2)


def _cmd_scale(args):
    count = args.count.strip()
    if not re.fullmatch(r"[+=-]?[0-9]+", count):
        raise _UsageError("scale: N, =N, +N or -N expected, got %r" % args.count)
    result = _client(args).request("POST", _job_path(args.job, args) + "/numprocesses",
                                   {"scale": count if count[0] in "+-=" else "=" + count})
    _report(args, result, "%s: %d" % (args.job, result["numprocesses"]))
    return 0


def _client_state(args, state):
    jobs = getattr(args, "processes", None) or [args.job]
    for job in jobs:
        result = _client(args).request("POST", _job_path(job, args) + "/state", {"state": state})
        _report(args, result, "%s: %s" % (job, state))
    return 0


def _cmd_shutdown(args):
    result = _client(args).request("POST", "/shutdown")
    _report(args, result, "stopping: every process, then the server")
    return 0


def _cmd_kill(args):
    try:
        _signum(args.signal)  # bad input is said before the server is asked anything
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    target = args.target
    path = "/%d" % _process_pid(target, args) if _names_process(target, args) else _job_path(target, args)
    result = _client(args).request("POST", path + "/signal", {"signal": args.signal})
    _report(args, result, "%s: sent %s" % (args.target, args.signal))
    return 0


def _cmd_load(args):
    """Load the jobs of a daemon config (JSON or INI), or of a JSON file holding one ProcessConfig."""
    try:
        single = _json_value(_read_text(args.file, "config file"))
    except ValueError:
        single = None
    if isinstance(single, dict) and "jobs" not in single:
        configs = [_json_job(single, args.file)]
    else:
        configs = _read_config(args.file)[0]
    client = _client(args)
    for session, config in configs:
        result = client.request("POST", "/jobs/%s" % _quote(session), config.to_dict())
        _report(args, result, "loaded %s.%s" % (session, config.name))
    return 0


def _cmd_unload(args):
    result = _client(args).request("DELETE", _job_path(args.job, args))
    _report(args, result, "unloaded %s" % args.job)
    return 0


def _cmd_watch(args):
    path = "/watch" + ("?pattern=" + _quote(args.pattern) if args.pattern else "")
    for event, data in _client(args).events(path):
        print(data if args.json else "%s %s" % (event, data), flush=True)
    return 0


def _cmd_logs(args):
    """Like tail: the last -n lines of a job (every process, exited ones too) or of one process; -f follows.
    Every line as start prints it: "HH:MM:SS web.1 | text"."""
    client, target = _client(args), args.target
    pid = _process_pid(target, args) if _names_process(target, args) else None
    if pid is not None:
        job_path = "/jobs/%s/%s" % tuple(map(_quote, client.request("GET", "/%d" % pid)["name"].split(".", 1)))
    else:
        job_path = _job_path(target, args)
    info = client.request("GET", job_path)
    if not info["config"]["redirect_output"]:  # nothing would ever show: say why
        print("gaffer: %s captures no output (its redirect_output is empty): there are no lines to show"
              % info["name"], file=sys.stderr)
        return 0
    job = info["name"].split(".", 1)[1]
    path = "%s/logs?lines=%d" % (job_path, args.n) + ("&pid=%d" % pid if pid is not None else "")

    def show(row):
        if args.label is not None and row["label"] != args.label:
            return
        if args.json:
            print(_json_text(row), flush=True)
            return
        label = "" if row["label"] == "out" else ":" + row["label"]
        print("%s %s%s | %s" % (time.strftime("%H:%M:%S", time.localtime(row["time"])), _slot_label(job, row["slot"]),
                                label, row["line"]), flush=args.follow)
    if not args.follow:
        for row in client.request("GET", path)["lines"]:
            show(row)
        return 0
    for event, data in client.events(path + "&follow=1"):
        if event == "overflow":  # we read slower than the job writes: the gap is said, not hidden
            print("gaffer: %d lines dropped here (this reader was too slow)" % _json_value(data)["dropped"],
                  file=sys.stderr, flush=True)
        else:
            show(_json_value(data))
    return 0


# -- top: a live terminal view (curses) ------------------------------------------------------------
# Jobs, their slots and the selected job's last lines, read again from /status whenever /watch says
# something happened (and every few seconds, for cpu and uptime), with keys that act on the selected job.

_TOP_KEYS = "up/down move  s stop  S start  r restart  + - scale  l follow logs  q quit"
_TOP_ACTIONS = {"s": ("stop", "stopped"), "S": ("start", "started"), "r": ("reload", "restarting (rolling)")}


class _Top:
    """gaffer top's screen: what it shows, the selected job, the last action's message, and the threads
    that read /watch (and the logs it follows) and wake the screen through a pipe."""

    def __init__(self, client, screen):
        self.client, self.screen = client, screen
        self.jobs, self.selected, self.lines = [], 0, []
        self.message = _TOP_KEYS
        self.following = None  # (job name, _EventStream) while l follows its logs
        self.followed = collections.deque(maxlen=500)
        self.wake_r, self.wake_w = os.pipe()
        self.streams = []

    def run(self):
        import curses
        curses.curs_set(0)
        self.screen.nodelay(True)
        self.screen.keypad(True)
        watch = self.client.events("/watch")
        self.streams.append(watch)
        threading.Thread(target=self._pump, args=(watch, None), daemon=True).start()
        try:
            self.refresh()
            while True:
                self.draw()
                import select
                ready = select.select([sys.stdin, self.wake_r], [], [], 5.0)[0]
                if self.wake_r in ready:
                    os.read(self.wake_r, 4096)
                if sys.stdin in ready and not self.key():
                    return 0
                self.refresh()
        finally:
            for stream in self.streams:
                stream.abort()  # its thread, reading it, ends
            os.close(self.wake_r)
            os.close(self.wake_w)

    def _pump(self, stream, sink):
        """On its own thread: each event (or followed line) wakes the screen; the stream's end, or an error
        once it is closed, ends the thread."""
        try:
            for event, data in stream:
                if sink is not None:
                    sink.append(data)
                os.write(self.wake_w, b".")
        except (OSError, ValueError, _Failure):
            pass  # aborted (the screen closed its pipe too), or the server went away
        finally:
            stream.close()  # on the thread that read it

    def refresh(self):
        try:
            self.jobs = self.client.request("GET", "/status")["jobs"]
            self.selected = min(self.selected, max(0, len(self.jobs) - 1))
            if self.jobs and self.following is None:
                self.lines = [self._line(row) for row in self.client.request(
                    "GET", self._path() + "/logs?lines=50")["lines"]]
        except _Failure as exc:
            self.message = str(exc)

    def _path(self):
        session, _, name = self.jobs[self.selected]["name"].partition(".")
        return "/jobs/%s/%s" % (_quote(session), _quote(name))

    @staticmethod
    def _line(row):
        return "%s %s.%s | %s" % (time.strftime("%H:%M:%S", time.localtime(row["time"])), row["slot"], row["label"],
                                  row["line"])

    def key(self):
        """Act on each key waiting; False once q asks to quit."""
        import curses
        while True:
            key = self.screen.getch()
            if key == -1:
                return True
            char = chr(key) if 0 <= key < 256 else ""
            if char == "q":
                return False
            if key in (curses.KEY_UP, ord("k")):
                self.selected = max(0, self.selected - 1)
                self._unfollow()
            elif key in (curses.KEY_DOWN, ord("j")):
                self.selected = min(len(self.jobs) - 1, self.selected + 1) if self.jobs else 0
                self._unfollow()
            elif self.jobs and char in "sSr+-l":
                self.act(char)

    def act(self, char):
        name = self.jobs[self.selected]["name"]
        try:
            if char in _TOP_ACTIONS:
                state, said = _TOP_ACTIONS[char]
                self.client.request("POST", self._path() + "/state", {"state": state})
                self.message = "%s %s" % (said, name)
            elif char in "+-":
                count = self.client.request("POST", self._path() + "/numprocesses", {"scale": char + "1"})
                self.message = "scaled %s to %d" % (name, count["numprocesses"])
            elif self.following is not None:
                self._unfollow()
                self.message = "stopped following the logs of %s" % name
            else:
                stream = self.client.events(self._path() + "/logs?lines=50&follow=1")
                self.streams.append(stream)
                self.following, self.lines = (name, stream), []
                self.followed.clear()
                threading.Thread(target=self._pump, args=(stream, self.followed), daemon=True).start()
                self.message = "following the logs of %s (l again stops)" % name
        except _Failure as exc:
            self.message = str(exc)

    def _unfollow(self):
        if self.following is not None:
            self.following[1].abort()
            self.following = None

    def draw(self):
        import curses
        screen = self.screen
        height, width = screen.getmaxyx()
        screen.erase()
        if width < 40 or height < 10:
            self._put(0, "gaffer top needs 40x10 at least", 0)
            screen.refresh()
            return
        self._put(0, "gaffer top  %s  %d jobs  %s" % (self.client.text, len(self.jobs), time.strftime("%H:%M:%S")),
                  curses.A_BOLD)
        self._put(1, "%-24s %-10s %7s %8s %6s %6s %9s" % ("JOB", "STATE", "READY", "RESTARTS", "CPU%", "MEM%",
                                                            "UPTIME"), curses.A_UNDERLINE)
        rows = []
        for index, job in enumerate(self.jobs):
            procs = job["processes"]
            cpu = sum(p["cpu"] for p in procs if isinstance(p["cpu"], (int, float)))
            mem = sum(p["mem"] for p in procs if isinstance(p["mem"], (int, float)))
            oldest = min([p["create_time"] for p in procs if p["create_time"]] or [None], key=lambda t: t or 0)
            rows.append(("%-24s %-10s %3d/%-3d %8d %6.1f %6.2f %9s" % (
                job["name"][:24], job["state"], job["ready"], job["target"], job["restarts"], cpu, mem,
                _uptime(oldest) if oldest else "-"), curses.A_REVERSE if index == self.selected else 0))
            short = job["name"].partition(".")[2]
            for proc in procs:
                rows.append(("  %-22s %-10s %7s %8s %6s %6s %9s" % (
                    "%s.%s pid %s" % (short, proc["slot"] or "-", proc["pid"]), proc["status"], "", "", proc["cpu"],
                    proc["mem"], _uptime(proc["create_time"])), 0))
            rows += [("  %-22s %-10s" % ("%s.%s" % (short, slot["slot"]), slot["state"]), 0)
                     for slot in job.get("slots", ())]
        room = max(3, (height - 4) // 2)
        for y, (text, attr) in enumerate(rows[:room], 2):
            self._put(y, text, attr)
        top = 2 + min(len(rows), room)
        title = self.jobs[self.selected]["name"] if self.jobs else "-"
        self._put(top, "-- logs of %s %s" % (title, "(following) " if self.following else ""), curses.A_BOLD)
        lines = list(self.followed)[-(height - top - 2):] if self.following else self.lines[-(height - top - 2):]
        if self.following:
            lines = [self._line(json_row) for json_row in map(_json_value, lines)]
        for y, text in enumerate(lines, top + 1):
            self._put(y, text, 0)
        self._put(height - 1, self.message, curses.A_BOLD)
        screen.refresh()

    def _put(self, y, text, attr):
        import curses
        height, width = self.screen.getmaxyx()
        if 0 <= y < height:
            try:
                self.screen.addnstr(y, 0, text.replace("\n", " "), width - 1, attr)
            except curses.error:
                pass


def _cmd_top(args):
    if not (os.isatty(0) and os.isatty(1)):
        raise _UsageError("top: needs a terminal (stdin and stdout are not ttys); use ps or watch instead")
    size = os.get_terminal_size(1)
    if size.columns < 40 or size.lines < 10:
        raise _UsageError("top: the terminal is %dx%d; it needs 40x10 at least" % (size.columns, size.lines))
    client = _client(args)
    client.request("GET", "/status")  # an unreachable server, or one that is not gaffer: one line, before curses
    import curses
    return curses.wrapper(lambda screen: _Top(client, screen).run())


# -- export: unit files for a system manager -------------------------------------------------------
# One function per format, from the same instances; every value is escaped in that format's own way,
# or refused with one line that names it.  Each runs the program itself (exec), so that the system
# manager's stop signal reaches it, and what a shell command starts is stopped with it.

_Export = collections.namedtuple("_Export", "app cwd output user graceful_timeout fragment instances env_files")


def _carried(fmt, what, text, allowed=""):
    """text, unless it holds a character that `fmt` cannot carry (a control character not in allowed):
    then one line that names the value."""
    bad = next((char for char in text if (ord(char) < 32 or ord(char) == 127) and char not in allowed), None)
    if bad is not None:
        raise _UsageError("export %s: %s cannot be written for %s: it holds the control character %r"
                          % (fmt, what, fmt, bad))
    return text


def _systemd_quote(text, command=False):
    """A systemd.syntax(7) quoted word: C escapes for backslash, quotes and control characters (a newline
    is \n, never a line of its own), % specifiers escaped everywhere, $ expansion in Exec lines only."""
    out = []
    for char in text:
        if char in '\\"':
            out.append("\\" + char)
        elif char == "%":
            out.append("%%")
        elif char == "$" and command:
            out.append("$$")
        elif char in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[char])
        elif ord(char) < 32 or ord(char) == 127:
            out.append("\\x%02x" % ord(char))
        else:
            out.append(char)
    return '"%s"' % "".join(out)


def _systemd_path(what, text):
    """A value systemd takes as it is (WorkingDirectory=, paths): % specifiers escaped; nothing else can be."""
    if text != text.strip():
        raise _UsageError("export systemd: %s %r cannot be written for systemd: it starts or ends with a space"
                          % (what, text))
    return _carried("systemd", what, text).replace("%", "%%")


def _supervisor_quote(text):
    """A word of a supervisord command= (split as a POSIX shell does), with % doubled for its config parser."""
    text = _carried("supervisord", "the command %r" % text, text)
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")


def _supervisor_env(key, value):
    """KEY="value" for supervisord's environment=, whose parser (shlex, not POSIX) has no escapes: the
    value goes in the quotes it does not contain, and one it cannot carry is a one-line error."""
    _carried("supervisord", "the value of %s" % key, value)
    for quote in ('"', "'"):
        if quote not in value and not value.endswith(("'", '"')) and not value.startswith(("'", '"')):
            return "%s=%s%s%s" % (key, quote, value.replace("%", "%%"), quote)
    raise _UsageError("export supervisord: the value of %s cannot be written for supervisord (it has both "
                      "quote kinds, or starts or ends with one): %r" % (key, value))


def _export_systemd(ex):
    units = []
    for name, number, command, variables in ex.instances:
        unit = "%s-%s-%d.service" % (ex.app, name, number)
        units.append(unit)
        lines = ["[Unit]", "Description=%s %s.%d" % (ex.app, name, number), "PartOf=%s.target" % ex.app, "",
                 "[Service]", "WorkingDirectory=%s" % _systemd_path("the directory", ex.cwd)]
        lines += ["Environment=%s" % _systemd_quote("%s=%s" % item) for item in sorted(variables.items())]
        # the .env files too, which systemd reads at each start: an edit applies at the next restart
        lines += ["EnvironmentFile=%s" % _systemd_path("the env file", path) for path in ex.env_files]
        lines += ["ExecStart=/bin/sh -c %s" % _systemd_quote(_exec_form(command), command=True), "Restart=always",
                  "KillMode=control-group", "TimeoutStopSec=%g" % ex.graceful_timeout]
        if ex.user:
            lines.append("User=%s" % ex.user)
        lines += ["", "[Install]", "WantedBy=%s.target" % ex.app, ""]
        yield unit, "\n".join(lines), False
    yield "%s.target" % ex.app, "\n".join(["[Unit]", "Description=%s (exported by gaffer)" % ex.app,
                                           "Wants=%s" % " ".join(units), "", "[Install]",
                                           "WantedBy=multi-user.target", ""]), False


def _export_runit(ex):
    """A service directory each: APP-NAME-N/run, and log/run for svlogd.  A simple command is exec'd by the
    run script itself; a shell command runs in a process group of its own (chpst -P), which control/t
    (what runsv runs for sv down and sv term) signals whole."""
    for name, number, command, variables in ex.instances:
        service = "%s-%s-%d" % (ex.app, name, number)
        user = "chpst -u %s " % shlex.quote(ex.user) if ex.user else ""
        run = ["#!/bin/sh", "cd %s" % shlex.quote(ex.cwd)]
        run += ["export %s=%s" % (key, shlex.quote(value)) for key, value in sorted(variables.items())]
        run.append("exec 2>&1")
        simple = _exec_form(command)
        if simple != command:
            run += [simple.replace("exec ", "exec " + user, 1), ""]
        else:
            run += ["exec %schpst -P /bin/sh -c %s" % (user, shlex.quote(command)), ""]
            yield os.path.join(service, "control", "t"), "#!/bin/sh\nexec kill -TERM -- -\"$(cat supervise/pid)\"\n", True
        yield os.path.join(service, "run"), "\n".join(run), True
        yield os.path.join(service, "log", "run"), "#!/bin/sh\nmkdir -p ./main\nexec svlogd -tt ./main\n", True


def _export_launchd(ex):
    """A property list each, for ~/Library/LaunchAgents or /Library/LaunchDaemons.  launchd signals the
    program, and kills what is left in its process group once it exits (AbandonProcessGroup is false)."""
    import plistlib
    for name, number, command, variables in ex.instances:
        label = "%s.%s.%d" % (ex.app, name, number)
        for what, text in [("the directory", ex.cwd), ("the command", command)] + [
                ("the value of %s" % key, value) for key, value in variables.items()]:
            _carried("launchd", what, text, allowed="\t\n\r")  # what XML can hold
        plist = {"Label": label, "ProgramArguments": ["/bin/sh", "-c", _exec_form(command)],
                 "WorkingDirectory": ex.cwd, "EnvironmentVariables": dict(variables), "RunAtLoad": True,
                 "KeepAlive": True, "ExitTimeOut": int(ex.graceful_timeout + 0.999),
                 "StandardOutPath": os.path.join(ex.output, label + ".log"),
                 "StandardErrorPath": os.path.join(ex.output, label + ".log")}
        if ex.user:
            plist["UserName"] = ex.user
        yield label + ".plist", plistlib.dumps(plist).decode(), False


def _export_supervisord(ex):
    lines, programs = [], []
    for name, number, command, variables in ex.instances:
        program = "%s-%s-%d" % (ex.app, name, number)
        programs.append(program)
        lines += ["[program:%s]" % program, "command=/bin/sh -c %s" % _supervisor_quote(_exec_form(command)),
                  "directory=%s" % _carried("supervisord", "the directory", ex.cwd).replace("%", "%%"),
                  "environment=%s" % ",".join(_supervisor_env(k, v) for k, v in sorted(variables.items())),
                  "autostart=true", "autorestart=true", "stopasgroup=true", "killasgroup=true",
                  "stopwaitsecs=%g" % ex.graceful_timeout, "redirect_stderr=true"]
        if ex.user:
            lines.append("user=%s" % ex.user)
        lines.append("")
    lines += ["[group:%s]" % ex.app, "programs=%s" % ",".join(programs), ""]
    if not ex.fragment:  # a whole config that "supervisord -c FILE" starts as it is
        here = _carried("supervisord", "the output directory", ex.output).replace("%", "%%")
        lines = ["[supervisord]", "logfile=%s/supervisord.log" % here, "pidfile=%s/supervisord.pid" % here,
                 "childlogdir=%s" % here, "", "[unix_http_server]", "file=%s/supervisor.sock" % here, "",
                 "[rpcinterface:supervisor]",
                 "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
                 "[supervisorctl]", "serverurl=unix://%s/supervisor.sock" % here, ""] + lines
    yield "%s.conf" % ex.app, "\n".join(lines), False


_EXPORTERS = {"systemd": _export_systemd, "supervisord": _export_supervisord, "runit": _export_runit,
              "launchd": _export_launchd}


def _cmd_export(args):
    cwd, env, types = _read_procfile(args)
    app = args.app or re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(cwd)) or "app"
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", app):
        raise _UsageError("export: -a %r: an application name is letters, digits, '_' and '-'" % app)
    if args.user is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", args.user):
        raise _UsageError("export: -u %r is not a user name (letters, digits, '_', '.' and '-')" % args.user)
    # The exporting shell's PATH goes along, so that "python3" in the Procfile is the same program there.
    env = {"PATH": os.environ.get("PATH", os.defpath), **env}
    instances = [(name, number, command, {**env, "PORT": str(port + number - 1)})
                 for name, command, count, port in types for number in range(1, count + 1)]
    if bool(args.output) == bool(args.location):
        raise _UsageError("export: give the directory to write in, as -o DIR or after the format, once")
    output = os.path.abspath(args.output or args.location)
    env_files = [os.path.abspath(path) for path in _dotenv_paths(args)]
    export = _Export(app, cwd, output, args.user, args.graceful_timeout, args.fragment, instances, env_files)
    files = list(_EXPORTERS[args.format](export))  # every value checked before anything is written
    for filename, text, executable in files:
        path = os.path.join(output, filename)
        if args.dry_run:
            print("==> %s <==\n%s" % (path, text))
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        if executable:
            os.chmod(path, 0o755)
        print("wrote %s" % path)
    return 0


# -- main: the command line's parser ---------------------------------------------------------------
# Every command and option in two tables, with a help text each, then main().

def _cmd_version(args):
    print("gaffer.py %s" % __version__)
    return 0


def _cmd_stop(args):
    return _client_state(args, "stop")


def _cmd_reload(args):
    return _client_state(args, "reload")


_HERE = "(default $GAFFER_HTTP, else %s; unix:/path and http://HOST:PORT work)" % _DEFAULT_HTTP
_SUPPRESS = "==SUPPRESS=="  # argparse.SUPPRESS: an option left out keeps what was given before the command
# Option groups that several commands take: (flags, settings); a "type" raises ValueError with its message.
_ARGS = {
    "client": [
        (("--http",), dict(metavar="ADDR", type=_address_text, help="the server " + _HERE)),
        (("--token-file",), dict(metavar="FILE", help="the bearer token is in FILE (its one trailing newline is "
                                                      "ignored); default $GAFFER_TOKEN")),
        (("--token",), dict(metavar="T", help="the bearer token, on the command line, where every local user can "
                                              "read it: prefer --token-file")),
        (("--json",), dict(action="store_true", help="print raw JSON")),
    ],
    "server": [
        (("--token-file",), dict(metavar="FILE", help="the bearer token requests must carry is in FILE (its one "
                                                      "trailing newline is ignored); default $GAFFER_TOKEN")),
        (("--token",), dict(metavar="T", help="the bearer token requests must carry, on the command line, where "
                                              "every local user can read it: prefer --token-file")),
        (("--allow-host",), dict(action="append", metavar="NAME", help="also accept requests for this host name "
                                 "(the Host header); by default only the bound address, localhost and loopback IPs "
                                 "are served (repeatable)")),
        (("--init",), dict(action="store_true", help="act as a container's init (the default as PID 1): adopt and "
                           "reap orphans, forward SIGHUP (not to serve), SIGUSR1, SIGUSR2 and SIGQUIT to every "
                           "process")),
    ],
    "procfile": [  # also before the command, as honcho takes them: gaffer -f Procfile.dev start
        (("-f", "--procfile"), dict(default=_SUPPRESS, metavar="FILE", help="the Procfile (default $PROCFILE, from "
                                    "the .env files or the environment, else ./Procfile)")),
        (("-e", "--env"), dict(default=_SUPPRESS, metavar="FILE[,FILE...]", help="a .env file, or several "
                               "separated by commas, the later winning (default ./.env when present)")),
    ],
    "types": [
        (("-c", "--concurrency"), dict(metavar="web=2,worker=1", help="processes of each type (0 runs none)")),
        (("-p", "--port"), dict(type=_port_text, help="the first $PORT: web.1 gets it, web.2 the next, the next "
                                "type 100 more (default $PORT, from the .env files or the environment, else 5000)")),
        (("--graceful-timeout",), dict(type=_seconds_text, default=5.0, metavar="S",
                                       help="seconds between SIGTERM and SIGKILL (default 5)")),
    ],
    "output": [
        (("--no-color", "--no-colour"), dict(action="store_true", dest="no_color",
                                             help="no colours, even on a terminal")),
        (("--no-prefix",), dict(action="store_true", help="print each line as the process wrote it, without the "
                                "time and name in front")),
        (("-q", "--quiet"), dict(metavar="NAME[,NAME...]", help="hide the output of these processes (their starts "
                                 "and exits are still said)")),
    ],
}
_COMMANDS = [  # (name, function, help, option groups, its own options)
    ("start", _cmd_start, "run a Procfile in the foreground, like honcho. 'start JOB... --http ADDR' (without -f) "
     "asks that running gaffer to start the jobs instead, and so does 'start JOB...' where there is no Procfile; "
     "with -f, JOBs are the Procfile's processes to run", ("client", "procfile", "types", "output", "server"), [
         (("--keep-alive",), dict(action="store_true", help="restart processes that exit (default: stop all)")),
         (("processes",), dict(nargs="*", metavar="PROCESS", help="run only these"))]),
    ("run", _cmd_run, "supervise one command: kept alive, N copies, prefixed output", ("output", "server"), [
        (("-n",), dict(type=_copies_text, default=1, metavar="N", help="copies (default 1, at most 1000)")),
        (("--name",), dict(help="the name shown (default: the program's, or the script's it runs)")),
        (("--http",), dict(metavar="ADDR", type=_address_text, help="also serve the HTTP controller there")),
        (("--graceful-timeout",), dict(type=_seconds_text, default=5.0, metavar="S",
                                       help="seconds between SIGTERM and SIGKILL (default 5)")),
        (("--socket",), dict(type=_socket_text, action="append", default=[], metavar="NAME=ADDR",
                             help="hold a listening socket (tcp://HOST:PORT or unix:PATH) and hand it to the "
                                  "command at fd 3, 4, ... ($GAFFER_SOCKET_NAME, LISTEN_FDS); again for more")),
        (("command",), dict(nargs="...", metavar="-- CMD [ARGS...]", help="the command and its arguments"))]),
    ("check", _cmd_check, "validate a Procfile (or, with -c, a daemon config) and list its jobs", ("procfile",), [
        (("-c", "--config"), dict(metavar="FILE", help="a JSON or INI config, as serve takes"))]),
    ("serve", _cmd_serve, "run a daemon from a JSON or INI config, with the HTTP controller on", ("server",), [
        (("-c", "--config"), dict(required=True, metavar="FILE", help="the JSON or INI config (re-read on SIGHUP)")),
        (("--http",), dict(metavar="ADDR", type=_address_text,
                           help="the address to serve (default: the config's, else %s)" % _DEFAULT_HTTP)),
        (("--log-level",), dict(default="info", choices=["debug", "info", "warning", "error"], help="what serve "
                                "logs (default info: starts, exits, loads; debug adds HTTP requests)")),
        (("--log-file",), dict(metavar="FILE", help="append the log there instead of to stderr")),
        (("--pidfile",), dict(metavar="FILE", help="write serve's pid there, held with a lock while it runs (a "
                              "second serve is refused); removed at exit")),
        (("--state",), dict(metavar="FILE", help="record what the API changes (loads, unloads, scales, stops, "
                            "starts) there, and restore it at the next start, before anything spawns")),
        (("--daemon",), dict(action="store_true", help="detach (fork, setsid, fork); the command returns once "
                             "serve is ready, with exit code 1 and the reason if it could not start"))]),
    ("ps", _cmd_ps, "list every job and its processes, one row per slot", ("client",), []),
    ("shutdown", _cmd_shutdown, "stop a running serve (or start --http) gracefully", ("client",), []),
    ("status", _cmd_status, "show every job, or one, or one process (web.1), with its state", ("client",), [
        (("job",), dict(nargs="?", help="a job (web, in any session where only one has it, or batch.web), or a "
                        "process (web.1, or its pid)"))]),
    ("scale", _cmd_scale, "set (N) or change (+N, -N) a job's number of processes", ("client",), [
        (("job",), dict(help="the job")), (("count",), dict(metavar="N|+N|-N", help="the count, or the change"))]),
    ("stop", _cmd_stop, "stop a job", ("client",), [(("job",), dict(help="the job"))]),
    ("reload", _cmd_reload, "reload a job: new processes replace the old", ("client",), [
        (("job",), dict(help="the job"))]),
    ("restart", _cmd_reload, "restart a job (as reload: new processes replace the old)", ("client",), [
        (("job",), dict(help="the job"))]),
    ("kill", _cmd_kill, "send a signal to a job's processes or to one process", ("client",), [
        (("target",), dict(metavar="JOB|JOB.N|PID", help="a job (web), one of its processes (web.1), a pid")),
        (("signal",), dict(metavar="SIG", help="a signal: HUP, SIGUSR1, 15"))]),
    ("load", _cmd_load, "load the jobs of a JSON or INI file", ("client",), [
        (("file",), dict(help="a ProcessConfig as JSON, or a whole config file"))]),
    ("unload", _cmd_unload, "unload a job", ("client",), [(("job",), dict(help="the job"))]),
    ("wait", _cmd_wait, "wait until every process of a job is ready (exit 1 on timeout)", ("client",), [
        (("job",), dict(help="the job")),
        (("--timeout",), dict(type=_seconds_text, default=60.0, metavar="S", help="seconds (default 60)"))]),
    ("top", _cmd_top, "a live view of the jobs and their processes, with keys to act on them", ("client",), []),
    ("watch", _cmd_watch, "follow the events (optionally those under PATTERN)", ("client",), [
        (("pattern",), dict(nargs="?", help="an event pattern: job.default.web, exit..."))]),
    ("logs", _cmd_logs, "show the last lines of a job's output (exited processes too) or of one process's, "
     "like tail", ("client",), [
         (("target",), dict(metavar="JOB|JOB.N|PID", help="a job (web), one of its processes as start shows it "
                            "(web.1), or a pid")),
         (("label",), dict(nargs="?", help="one output label of a process (default: all)")),
         (("-n",), dict(type=_lines_text, default=10, metavar="N", help="lines (default 10)")),
         (("-f", "--follow"), dict(action="store_true", help="then print new lines as they come (Ctrl-C ends)"))]),
    ("export", _cmd_export, "write systemd units, a supervisord config, runit services or launchd property lists "
     "from a Procfile", ("procfile", "types"), [
         (("format",), dict(choices=sorted(_EXPORTERS), help="what to write: %s" % ", ".join(sorted(_EXPORTERS)))),
         (("location",), dict(nargs="?", metavar="DIR", help="the directory to write in (or -o DIR)")),
         (("-o", "--output"), dict(metavar="DIR", help="the directory to write in")),
         (("-a", "--app"), dict(help="application name (default: the Procfile's directory)")),
         (("-u", "--user"), dict(help="run the processes as this user")),
         (("--fragment",), dict(action="store_true", help="supervisord: only the programs and their group, for "
                                "an [include] (default: a whole config)")),
         (("--dry-run",), dict(action="store_true", help="print the files instead of writing them"))]),
    ("version", _cmd_version, "print gaffer's version", (), []),
]


def _parser():
    """The command line's parser, built from _COMMANDS and _ARGS."""
    import argparse  # here, not at the top: embedders of the Manager never pay for the command line

    class _ArgumentParser(argparse.ArgumentParser):
        def error(self, message):
            command = self.prog.partition(" ")[2]  # main() says "gaffer: " already
            raise _UsageError("%s: %s" % (command, message) if command else message)

    def checked(check):
        """An option's type from a check that raises ValueError: its message is the option's error."""
        def convert(text):
            try:
                return check(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return convert

    def add(parser, flags, settings):
        settings = dict(settings)
        if "type" in settings:
            settings["type"] = checked(settings["type"])
        if settings.get("nargs") == "...":
            settings["nargs"] = argparse.REMAINDER
        if settings.get("default") == _SUPPRESS:  # argparse tells it by identity
            settings["default"] = argparse.SUPPRESS
        parser.add_argument(*flags, **settings)

    parser = _ArgumentParser(prog="gaffer", description="Run and supervise processes (gaffer.py %s)." % __version__)
    parser.add_argument("--version", action="version", version="gaffer.py %s" % __version__)
    for flags, settings in _ARGS["procfile"]:
        add(parser, flags, dict(settings, default=None))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    for name, fn, text, groups, own in _COMMANDS:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(fn=fn)
        options = {flags: settings for group in groups for flags, settings in _ARGS[group]}
        options.update(own)  # a command's own --http or --graceful-timeout over a group's
        for flags, settings in options.items():
            add(sub, flags, settings)
    return parser


def main(argv=None):
    """The command line: ``python3 gaffer.py COMMAND ...``; returns the exit code.

    0 success, 1 a failure at run time (unreachable server, refused request),
    2 bad input (usage, Procfile, .env, config file); a runner returns the exit
    code of the first process that exited on its own.
    """
    parser, args = _parser(), None
    _warned.clear()  # once per command
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return args.fn(args)
    except (_UsageError, _Failure) as exc:
        code = 2 if isinstance(exc, _UsageError) else 1
        words = sys.argv[1:] if argv is None else list(argv)
        if getattr(args, "json", "--json" in (words[:words.index("--")] if "--" in words else words)):
            print(_json_text({"error": str(exc), "exit_code": code}))
        else:
            print("gaffer: %s" % exc, file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


# -- The dashboard: GET / from a browser -----------------------------------------------------------
# One page, no external asset, under a strict Content-Security-Policy (its script and style are
# allowed by their hashes).  It uses the same API as any other client.

_DASHBOARD = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gaffer</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
  h1 { font-size: 1.3em; margin: 0 0 .8em; }
  h1 small { color: #888; font-weight: normal; }
  table { border-collapse: collapse; width: 100%; background: #fff; }
  th, td { text-align: left; padding: .35em .6em; border-bottom: 1px solid #e4e4e4; white-space: nowrap; }
  th { font-weight: 600; color: #555; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  tr.job { cursor: pointer; }
  tr.job:hover, tr.chosen { background: #eef4ff; }
  .state { padding: .1em .5em; border-radius: 1em; font-size: .85em; }
  .running { background: #d9f5dd; } .starting, .backoff { background: #fff1c9; }
  .stopped { background: #e8e8e8; } .fatal, .failed, .blocked { background: #fbd5d5; }
  .listening, .scheduled { background: #dbe9ff; } .completed { background: #e3f0e5; }
  .sockets, .runs { color: #777; font-size: .85em; }
  td.command { max-width: 18em; overflow: hidden; text-overflow: ellipsis; font: 12px ui-monospace, monospace; }
  svg.chart { vertical-align: middle; } svg.chart polyline { fill: none; stroke-width: 1.2; }
  svg.chart .cpu { stroke: #2a8a3e; } svg.chart .mem { stroke: #3a6fd0; }
  button { font: inherit; margin-right: .2em; }
  input.count { width: 3.5em; font: inherit; }
  #logs { margin-top: 1.2em; }
  #logs pre { background: #1e1e1e; color: #ddd; padding: .8em; height: 22em; overflow: auto; margin: .4em 0 0;
              font: 12px/1.4 ui-monospace, monospace; white-space: pre-wrap; }
  #status { color: #888; margin-left: 1em; font-size: .9em; }
  #error, td.error { color: #b00; } td.error { white-space: normal; }
  #login { display: none; margin-bottom: 1em; }
  .pid { color: #36c; text-decoration: underline; cursor: pointer; }
</style>
</head>
<body>
<h1>gaffer <small id="version"></small><span id="status">connecting...</span></h1>
<form id="login">
  This server needs its token: <input id="token" type="password" autocomplete="off"> <button>Use it</button>
</form>
<p id="error"></p>
<table>
  <thead><tr><th>job</th><th>state</th><th class="num">ready</th><th class="num">running</th>
    <th class="num">target</th><th class="num">restarts</th><th class="num">uptime</th><th class="num">CPU %</th>
    <th class="num">MEM %</th><th>last minutes</th><th>processes</th><th>command</th><th>last exit</th><th></th>
  </tr></thead>
  <tbody id="jobs"></tbody>
</table>
<section id="logs" hidden>
  <strong id="logs-title"></strong> <button id="logs-close">close</button>
  <pre id="logs-text"></pre>
</section>
<script>
"use strict";
// The same API as every other client: /status for the table, /watch (Server-Sent Events) to know when
// to read it again, /jobs/S/J/... to act, /jobs/S/J/logs and /PID/streams/out for the logs. A token
// lives in this page's memory only: never in a URL, a cookie or storage.
let token = null;
let following = null;  // AbortController of the log stream shown
const $ = (id) => document.getElementById(id);

function headers(json) {
  const h = {};
  if (token) h["Authorization"] = "Bearer " + token;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(method, path, body) {
  const response = await fetch(path, {method, headers: headers(body !== undefined),
                                      body: body === undefined ? undefined : JSON.stringify(body)});
  if (response.status === 401) { askToken(); throw new Error("a token is needed"); }
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

// Server-Sent Events through fetch (EventSource cannot send an Authorization header).
async function events(path, onEvent, signal) {
  const response = await fetch(path, {headers: headers(false), signal});
  if (response.status === 401) { askToken(); return; }
  if (!response.ok) throw new Error((await response.json()).error);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (data.length) onEvent(event, data.join("\n"));
    }
  }
}

function askToken() {
  $("login").style.display = "block";
  $("status").textContent = "needs a token";
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value;
  $("token").value = "";
  $("login").style.display = "none";
  start();
});

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function button(td, label, action) {
  const b = document.createElement("button");
  b.textContent = label;
  b.addEventListener("click", (e) => { e.stopPropagation(); action().catch(showError); });
  td.appendChild(b);
}

function jobPath(name) {
  const dot = name.indexOf(".");
  return "/jobs/" + encodeURIComponent(name.slice(0, dot)) + "/" + encodeURIComponent(name.slice(dot + 1));
}

function showError(err) { $("error").textContent = String(err.message || err); }

function uptime(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return Math.floor(s / 3600) + ":" + String(Math.floor(s / 60) % 60).padStart(2, "0") + ":" +
    String(s % 60).padStart(2, "0");
}

// The job's cpu (green) and memory (blue) over the sampler's last ticks, each scaled to its own top.
function chart(points) {
  const ns = "http://www.w3.org/2000/svg", width = 120, height = 26;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("class", "chart");
  if (points.length < 2) return svg;
  const first = points[0][0], span = Math.max(points[points.length - 1][0] - first, 1);
  for (const [index, cls] of [[1, "cpu"], [2, "mem"]]) {
    const top = Math.max(...points.map((p) => p[index]), index === 1 ? 1 : 1 << 20);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("class", cls);
    line.setAttribute("points", points.map((p) => ((p[0] - first) / span * (width - 2) + 1).toFixed(1) + "," +
      (height - 2 - p[index] / top * (height - 4)).toFixed(1)).join(" "));
    svg.appendChild(line);
  }
  const last = points[points.length - 1];
  svg.appendChild(document.createElementNS(ns, "title")).textContent =
    "cpu " + last[1] + "% (top " + Math.max(...points.map((p) => p[1])) + "%), rss " +
    (last[2] / 1048576).toFixed(1) + " MiB, over " + Math.round(span) + " s";
  return svg;
}

function clock(epoch) {  // HH:MM:SS, local
  return new Date(epoch * 1000).toTimeString().slice(0, 8);
}

function render(jobs) {
  const body = $("jobs");
  body.replaceChildren();
  for (const job of jobs) {
    const row = document.createElement("tr");
    row.className = "job" + (following && following.job === job.name ? " chosen" : "");
    row.addEventListener("click", () => followJob(job.name, job.outputs));
    cell(row, job.name);
    const badge = document.createElement("span");
    badge.className = "state " + job.state;
    badge.textContent = job.state;
    cell(row, "").appendChild(badge);
    cell(row, job.ready, "num");
    cell(row, job.running, "num");
    cell(row, job.target, "num");
    cell(row, job.restarts, "num");
    const started = Math.min(...job.processes.map((p) => p.create_time || Infinity));
    cell(row, isFinite(started) ? uptime(Date.now() / 1000 - started) : "-", "num");
    const sum = (key) => job.processes.reduce((total, p) => total + (typeof p[key] === "number" ? p[key] : 0), 0);
    cell(row, sum("cpu").toFixed(1), "num");
    cell(row, sum("mem").toFixed(2), "num");
    cell(row, "").appendChild(chart(job.history || []));
    const pids = cell(row, "");
    for (const p of [...job.processes].sort((a, b) => (a.slot || 1e9) - (b.slot || 1e9) || a.pid - b.pid)) {
      const link = document.createElement("span");
      link.className = "pid";
      link.textContent = p.slot ? job.name.slice(job.name.indexOf(".") + 1) + "." + p.slot : String(p.pid);
      link.title = "pid " + p.pid + ", os pid " + p.os_pid + ", " + p.status;
      link.addEventListener("click", (e) => { e.stopPropagation(); followProcess(job.name, p, job.outputs); });
      pids.append(link, " ");
    }
    if (job.sockets && job.sockets.length) {  // the held sockets it is handed (listening: waiting on them)
      const held = document.createElement("span");
      held.className = "sockets";
      held.textContent = "on " + job.sockets.join(", ");
      pids.append(held);
    }
    const when = (epoch) => new Date(epoch * 1000).toLocaleString();
    if (job.next_run || (job.last_run && job.last_run.end)) {  // a schedule's next run, a one-shot's last one
      const runs = document.createElement("span");
      runs.className = "runs";
      runs.textContent = (job.next_run ? "next run " + when(job.next_run) : "") +
        (job.last_run && job.last_run.end ? (job.next_run ? "; " : "") + "last run " + when(job.last_run.start) : "");
      pids.append(runs);
    }
    const command = cell(row, job.cmd, "command");
    command.title = job.cmd;
    const last = cell(row, job.last_exit || "-");
    if (job.last_error || job.blocked) {  // why it cannot start: said, not only a state
      last.textContent = job.last_error || "blocked: " + job.blocked;
      last.className = "error";
    }
    const actions = cell(row, "");
    const path = jobPath(job.name);
    const active = ["running", "starting", "backoff", "blocked"].includes(job.state);
    if (!active) button(actions, job.state === "scheduled" ? "run now" : "start",
                        () => api("POST", path + "/state", {state: "start"}));
    if (active || ["scheduled", "listening"].includes(job.state)) {
      button(actions, "stop", () => api("POST", path + "/state", {state: "stop"}));
    }
    if (active) button(actions, "reload", () => api("POST", path + "/state", {state: "reload"}));
    const count = document.createElement("input");
    count.type = "number"; count.min = "0"; count.className = "count"; count.value = job.target;
    count.addEventListener("click", (e) => e.stopPropagation());
    actions.appendChild(count);
    button(actions, "scale", () => api("POST", path + "/numprocesses", {scale: "=" + count.value}));
    body.appendChild(row);
  }
}

let refreshing = null;
function refresh() {  // at most one /status request in flight, and one waiting
  if (refreshing) { refreshing.again = true; return; }
  refreshing = {again: false};
  api("GET", "/status?history=1").then((data) => { render(data.jobs); $("error").textContent = ""; })
    .catch(showError)
    .finally(() => { const again = refreshing.again; refreshing = null; if (again) refresh(); });
}

function showLogs(title, job, path, format) {
  if (following) following.abort();
  following = new AbortController();
  following.job = job;
  $("logs").hidden = false;
  $("logs-title").textContent = title;
  const text = $("logs-text");
  text.textContent = "";
  refresh();
  if (!path) return;
  events(path, (event, data) => {
    const atBottom = text.scrollTop + text.clientHeight >= text.scrollHeight - 4;
    text.append(format(event, data));
    if (text.textContent.length > 500000) text.textContent = text.textContent.slice(-400000);
    if (atBottom) text.scrollTop = text.scrollHeight;
  }, following.signal).catch((err) => { if (err.name !== "AbortError") showError(err); });
}

function followJob(name, outputs) {
  history.replaceState(null, "", "#logs=" + encodeURIComponent(name));
  const short = name.slice(name.indexOf(".") + 1);
  if (outputs && !outputs.length) {  // nothing would ever come: say why
    showLogs("logs of " + name, name, null);
    $("logs-text").textContent = name + " captures no output: set its redirect_output (or log_file) to see it here.";
    return;
  }
  showLogs("logs of " + name, name, jobPath(name) + "/logs?lines=200&follow=1", (event, data) => {
    const line = JSON.parse(data);
    if (event === "overflow") return "[" + line.dropped + " lines dropped: this page read too slowly]\n";
    return clock(line.time) + " " + short + "." + line.slot + (line.label === "out" ? "" : ":" + line.label) +
      " | " + line.line + "\n";
  });
}

function followProcess(name, process, outputs) {
  if (!outputs.length) { followJob(name, outputs); return; }
  showLogs("output of process " + process.pid + " (" + name + ")", name,
           "/" + process.pid + "/streams/" + encodeURIComponent(outputs[0]) + "?tail=200", (event, data) => data);
}

$("logs-close").addEventListener("click", () => {
  history.replaceState(null, "", "#");
  if (following) following.abort();
  following = null;
  $("logs").hidden = true;
  refresh();
});

async function start() {
  try {
    const info = await api("GET", "/version");
    $("version").textContent = info.version;
  } catch (err) { showError(err); return; }
  refresh();
  $("status").textContent = "live";
  if (location.hash.startsWith("#logs=")) followJob(decodeURIComponent(location.hash.slice(6)));  // a link to them
  // Any event (spawn, exit, scale...) means the table changed; CPU and memory move on their own.
  events("/watch", () => refresh()).then(() => { $("status").textContent = "disconnected"; })
    .catch((err) => { $("status").textContent = "disconnected: " + err.message; });
}

setInterval(refresh, 5000);
start();
</script>
</body>
</html>
"""


@functools.lru_cache(maxsize=None)
def _dashboard():
    """The page's bytes and its Content-Security-Policy: nothing but its own script and style (by hash),
    and requests to this server."""
    import base64
    import hashlib

    def digest(tag):
        body = _DASHBOARD.split("<%s>" % tag, 1)[1].split("</%s>" % tag, 1)[0]
        return "'sha256-%s'" % base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    policy = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; img-src 'self'; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'" % (digest("script"), digest("style")))
    return _DASHBOARD.encode(), policy


if __name__ == "__main__":
    sys.exit(main())
