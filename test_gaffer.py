"""Tests of gaffer.py: real children, bounded waits, and a teardown that checks nothing leaked.

Run with: python3 -m unittest -v test_gaffer
"""

import base64
import contextlib
import hashlib
import http.client
import io
import json
import logging
import os
import queue
import re
import selectors
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

try:
    import grp
    import pwd
except ImportError:  # not on this platform: the tests that need them skip
    grp = pwd = None

import gaffer

PY = sys.executable
# Children run without site-packages (-S): none needs them, and each starts faster.
SLEEP = ["-S", "-c", "import time; time.sleep(60)"]
HAVE_PROC = os.path.isdir("/proc/self/fd")
TIMEOUT = 15.0


def wait_until(predicate, timeout=TIMEOUT, what=None):
    """Poll predicate until it returns a true value (returned) or the deadline passes (AssertionError)."""
    deadline, pause = time.monotonic() + timeout, 0.001
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what or predicate))
        time.sleep(pause)
        pause = min(pause * 1.5, 0.02)  # soon at first, then without stealing the CPU from what it waits for


def write_dedented(path, text):
    """Write text, dedented, to path; return the path."""
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


def read_text(path):
    with open(path) as f:
        return f.read()


def open_fds():
    return set(os.listdir("/proc/self/fd")) if HAVE_PROC else set()


def pidfds():
    """{descriptor: pid} of this process's open pidfds."""
    found = {}
    for fd in open_fds():
        try:
            if os.readlink("/proc/self/fd/" + fd) == "anon_inode:[pidfd]":
                found[int(fd)] = int(re.search(r"^Pid:\s*(-?\d+)", read_text("/proc/self/fdinfo/" + fd), re.M).group(1))
        except OSError:  # closed meanwhile (the listing's own descriptor)
            pass
    return found


class LoopCrash(BaseException):
    """What no callback guard catches: it ends the loop thread, as a bug in the loop would."""


def proc_table():
    """{pid: (ppid, sid, state)} of every process on the machine."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), int(fields[3]), fields[0])
    return table


def my_children():
    return [pid for pid, (ppid, _, _) in proc_table().items() if ppid == os.getpid()]


def alive(pid):
    """True while pid exists and is not a zombie."""
    if HAVE_PROC:
        entry = proc_table().get(pid)
        return entry is not None and entry[2] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def program_started(pid):
    """True once pid runs its program: in a cgroup, gaffer's launcher (/bin/sh) first enters it, then execs.
    An empty command line is an exec under way (the kernel sets it after the vfork parent goes on)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
    except OSError:  # gone, or no /proc: no launcher here
        return True
    return bool(cmdline) and not cmdline.startswith(b"/bin/sh\0-c\0")


def client(address, token=None):
    """The command line's own HTTP client of a gaffer server (JSON requests, event streams)."""
    return gaffer._Client(address, token)


def python(code):
    """A ProcessConfig cmd/args pair that runs a Python snippet."""
    return dict(cmd=PY, args=["-S", "-c", textwrap.dedent(code)])


class FakeClock:
    """time.monotonic (or another clock: time.time for the wall clock) plus an offset that tests move."""

    def __init__(self, base=time.monotonic):
        self.offset = 0.0
        self.base = base

    def __call__(self):
        return self.base() + self.offset


class Recorder:
    """Records events; wait_for() blocks until one matching arrives."""

    def __init__(self, emitter, pattern="."):
        self.events = []
        self.cond = threading.Condition()
        emitter.subscribe(pattern, self)

    def __call__(self, evtype, msg):
        with self.cond:
            self.events.append((evtype, msg))
            self.cond.notify_all()

    def names(self):
        with self.cond:
            return [e for e, _ in self.events]

    def matching(self, evtype, **fields):
        with self.cond:
            return [m for e, m in self.events
                    if e == evtype and all(m.get(k) == v for k, v in fields.items())]

    def wait_for(self, evtype, count=1, timeout=TIMEOUT, **fields):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for e, m in self.events
                         if e == evtype and all(m.get(k) == v for k, v in fields.items())]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("no %d x %r %r within %.1fs; got %r"
                                         % (count, evtype, fields, timeout, [e for e, _ in self.events]))
                self.cond.wait(remaining)


class LogRecords(logging.Handler):
    """What gaffer logs while the suite runs (warnings and errors): kept here instead of printed."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


LOGGED = LogRecords()


class LeakCheckedTestCase(unittest.TestCase):
    """Checks at teardown that no child, zombie, descendant, fd or thread was left behind, and that
    gaffer logged no traceback (a listener, timer or command that raised), unless the test expects one."""

    tracebacks_expected = False

    def setUp(self):
        self._logged_before = len(LOGGED.records)
        self.addCleanup(self._check_no_traceback)
        self._fds_before = open_fds()
        self._threads_before = set(threading.enumerate())
        self.tmp = tempfile.mkdtemp(prefix="gaffer-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.session_leaders = set()  # os pids of processes started in a new session
        self.addCleanup(self._check_nothing_left)

    def _check_no_traceback(self):
        if not self.tracebacks_expected:
            records = [r for r in LOGGED.records[self._logged_before:] if r.exc_info]
            self.assertEqual(["%s\n%s" % (r.getMessage(), logging.Formatter().formatException(r.exc_info))
                              for r in records], [], "gaffer logged a traceback")

    def _check_nothing_left(self):
        if HAVE_PROC:
            wait_until(lambda: not my_children(), 10, "no child nor zombie left")
            sids = self.session_leaders
            wait_until(lambda: not [p for p, (_, sid, st) in proc_table().items() if sid in sids and st != "Z"],
                       10, "no descendant of a spawned process left")
            wait_until(lambda: open_fds() <= self._fds_before, 10, "no fd left open")
        wait_until(lambda: set(threading.enumerate()) <= self._threads_before, 10, "no thread left")


class ManagerTestCase(LeakCheckedTestCase):
    """A running manager per test (self.m) with events recorded (self.rec); stopped and checked at teardown."""

    no_pidfd = False   # the poll reaper (GAFFER_NO_PIDFD=1)
    no_cgroup = False  # process groups only (GAFFER_NO_CGROUP=1)
    stats_interval = 1.0

    def setUp(self):
        for wanted, variable in ((self.no_pidfd, "GAFFER_NO_PIDFD"), (self.no_cgroup, "GAFFER_NO_CGROUP")):
            if wanted:
                self.setenv(variable, "1")
        super().setUp()
        self.clock = FakeClock()
        self.wall = FakeClock(time.time)  # what schedules follow
        self.m = gaffer.Manager(clock=self.clock, stats_interval=self.stats_interval, wall_clock=self.wall)
        self.rec = Recorder(self.m.events)
        self.m.events.subscribe("spawn", self._on_spawn)
        self.output = {}  # pid -> bytes read under any label
        self.m.start(self.make_apps())
        self.addCleanup(self._stop_manager)
        if self.no_pidfd:
            self.assertFalse(self.m.use_pidfd)
        if self.no_cgroup:
            self.assertIsNone(self.m._containment.cgroups)

    def make_apps(self):
        return []

    def setenv(self, variable, value):
        previous = os.environ.get(variable)
        os.environ[variable] = value
        self.addCleanup(lambda: os.environ.pop(variable) if previous is None
                        else os.environ.__setitem__(variable, previous))

    def _on_spawn(self, evtype, msg):
        # On the loop thread, before the first read: no output can be missed.
        self.session_leaders.add(msg["os_pid"])
        self.output[msg["pid"]] = bytearray()  # appended in place: a flood costs no quadratic copy

        def collect(label, io):
            with self.rec.cond:
                self.output[io["pid"]] += io["data"]
                self.rec.cond.notify_all()

        self.m.get_process(msg["pid"]).monitor_io(".", collect)

    def wait_output(self, pid, text, timeout=TIMEOUT):
        """Wait until process pid has written bytes `text` to a redirected output."""
        with self.rec.cond:
            if not self.rec.cond.wait_for(lambda: text in self.output.get(pid, b""), timeout):
                raise AssertionError("process %d never wrote %r; got %r" % (pid, text, self.output.get(pid)))

    def _stop_manager(self):
        self.m.stop()
        runner = threading.Thread(target=self.m.run)
        runner.start()
        runner.join(30)
        self.assertFalse(runner.is_alive(), "manager did not stop within 30 s")
        self.m.loop.thread.join(5)

    def load(self, name="w", numprocesses=1, code=None, **settings):
        settings.setdefault("graceful_timeout", 2.0)
        if code is not None:
            settings.update(python(code))
        else:
            settings.setdefault("cmd", PY)
            settings.setdefault("args", list(SLEEP))
        cmd = settings.pop("cmd")
        self.m.load(gaffer.ProcessConfig(name, cmd, numprocesses=numprocesses, **settings))
        return name

    def os_pid(self, pid):
        return self.m.get_process(pid).os_pid


# -- Configuration -------------------------------------------------------------

class ConfigTest(unittest.TestCase):

    def test_defaults_and_normalisation(self):
        cfg = gaffer.ProcessConfig("web", "python -u app.py", args="--port $PORT 'a b'",
                                   stop_signal="hup", flapping={"attempts": 3}, env={"N": 1})
        self.assertEqual(cfg.args, ["--port", "$PORT", "a b"])
        self.assertEqual(cfg.stop_signal, signal.SIGHUP)
        self.assertEqual(cfg.flapping, gaffer.FlappingInfo(attempts=3))
        self.assertEqual(cfg.env, {"N": "1"})
        self.assertEqual((cfg.numprocesses, cfg.graceful_timeout, cfg.os_env, cfg.stop_children),
                         (1, 10.0, True, True))
        self.assertEqual(gaffer.ProcessConfig("w", "x", uid="root", gid="0").uid, 0)
        self.assertEqual(gaffer.ProcessConfig("w", "x", uid=4000000000, gid=0).uid, 4000000000, "no user: a gid")
        for form in ("027", "0o027", " 27", 0o027):
            with self.subTest(form=form):
                self.assertEqual(gaffer.ProcessConfig("w", "x", umask=form).umask, 0o027, form)
        self.assertIsNone(gaffer.ProcessConfig("w", "x").umask, "the manager's umask by default")
        for form in (1, "1", "HUP", "SIGHUP", "hup", " sighup "):
            with self.subTest(form=form):
                self.assertEqual(gaffer.ProcessConfig("w", "x", stop_signal=form).stop_signal, 1, form)

    def test_unknown_setting_is_a_type_error_with_a_suggestion(self):
        with self.assertRaisesRegex(TypeError, r"'numprocess'.*did you mean 'numprocesses'"):
            gaffer.ProcessConfig("web", "x", numprocess=2)
        with self.assertRaisesRegex(TypeError, r"FlappingInfo has no setting 'atempts'.*'attempts'"):
            gaffer.ProcessConfig("web", "x", flapping={"atempts": 2})

    def test_bad_values_name_the_setting(self):
        cases = [
            (dict(numprocesses=-1), r"numprocesses must be >= 0, got -1"),
            (dict(numprocesses=1.5), r"numprocesses must be an int, got 1.5"),
            (dict(numprocesses=True), r"numprocesses must be an int"),
            (dict(graceful_timeout=-1), r"graceful_timeout must be >= 0"),
            (dict(graceful_timeout="soon"), r"graceful_timeout must be a number"),
            (dict(redirect_output=["a", "b", "c"]), r"redirect_output takes at most 2"),
            (dict(redirect_output="out"), r"redirect_output must be a list"),
            (dict(stop_signal="NOPE"), r"stop_signal must be a signal .* got 'NOPE'"),
            (dict(stop_signal=0), r"stop_signal must be a signal"),
            (dict(uid="no-such-user-here"), r"uid: no user named 'no-such-user-here'"),
            (dict(gid="no-such-group-here"), r"gid: no group named"),
            (dict(args="'unclosed"), r"args .* cannot be split"),
            (dict(args=[None]), r"args must hold strings"),
            (dict(env={"A=B": "x"}), r"env: 'A=B' is not a variable name"),
            (dict(env=["A"]), r"env must be a dict"),
            (dict(shell="yes"), r"shell must be True or False"),
            (dict(flapping={"attempts": 0}), r"flapping.attempts must be >= 1"),
            (dict(flapping=3), r"flapping must be a FlappingInfo"),
            (dict(custom_streams=["ctl", "ctl"]), r"label 'ctl' is used twice"),
            (dict(custom_streams=["bad label"]), r"custom_streams: each label"),
            (dict(umask="rw-"), r"umask must be an octal mode such as '027' or 0o027, got 'rw-'"),
            (dict(umask="0o1777"), r"umask must be a mode from 0 to 0o777"),
            (dict(umask=-1), r"umask must be a mode from 0 to 0o777, got -1"),
            (dict(uid=4000000000), r"uid 4000000000 names no user of this system, so it has no primary "
                                   r"group to run with: give gid too"),
        ]
        for settings, pattern in cases:
            with self.subTest(settings=settings), self.assertRaisesRegex(ValueError, pattern):
                gaffer.ProcessConfig("web", "x", **settings)
        for name in ("", "a.b", "a/b", None):
            with self.subTest(name=name), self.assertRaisesRegex(ValueError, r"name must"):
                gaffer.ProcessConfig(name, "x")
        for cmd in ("", "   ", None, "'unclosed"):
            with self.subTest(cmd=cmd), self.assertRaisesRegex(ValueError, r"cmd"):
                gaffer.ProcessConfig("web", cmd)

    def test_dict_access(self):
        cfg = gaffer.ProcessConfig("web", "x", args=["a"])
        self.assertEqual(cfg["args"], ["a"])
        self.assertEqual(cfg.get("numprocesses"), 1)
        self.assertEqual(cfg.get("nope", 7), 7)
        self.assertIn("cwd", cfg)
        self.assertNotIn("nope", cfg)
        with self.assertRaises(KeyError):
            cfg["nope"]
        cfg["numprocesses"] = 4
        cfg["args"] = "b c"
        self.assertEqual((cfg.numprocesses, cfg.args), (4, ["b", "c"]))
        with self.assertRaisesRegex(ValueError, "numprocesses must be >= 0"):
            cfg["numprocesses"] = -2
        with self.assertRaises(TypeError):
            cfg["nope"] = 1
        self.assertEqual(cfg.numprocesses, 4, "a refused change leaves the config as it was")

    def test_round_trip(self):
        cfg = gaffer.ProcessConfig("web", "x", args=["1"], env={"A": "b"}, flapping=gaffer.FlappingInfo(),
                                   redirect_output=["out", "err"], custom_streams=["ctl"], cwd="/tmp")
        data = cfg.to_dict()
        self.assertEqual(json.loads(json.dumps(data)), data)
        self.assertEqual(gaffer.ProcessConfig.from_dict(data), cfg)
        for missing in ("name", "cmd"):
            broken = dict(data)
            del broken[missing]
            with self.subTest(missing=missing), self.assertRaisesRegex(ValueError, "needs %r" % missing):
                gaffer.ProcessConfig.from_dict(broken)


# -- Events ------------------------------------------------------------------

class EventEmitterTest(unittest.TestCase):

    def test_patterns_once_and_unsubscribe(self):
        em = gaffer.EventEmitter()
        everything, prefix, exact, once = Recorder(em, "."), Recorder(em, "job.s.web"), [], []
        em.subscribe("spawn", lambda e, m: exact.append(m))
        em.subscribe_once("job", lambda e, m: once.append(e))
        em.publish("job.s.web.spawn", {"pid": 1})
        em.publish("job.s.webby.spawn", {"pid": 2})
        em.publish("spawn", {"pid": 3})
        self.assertEqual(everything.names(), ["job.s.web.spawn", "job.s.webby.spawn", "spawn"])
        self.assertEqual(prefix.names(), ["job.s.web.spawn"])
        self.assertEqual(prefix.events[0][1], {"pid": 1, "event": "job.s.web.spawn"})
        self.assertEqual(exact, [{"pid": 3, "event": "spawn"}])
        self.assertEqual(once, ["job.s.web.spawn"])
        em.unsubscribe(".", everything)
        em.publish("spawn", {})
        self.assertEqual(len(everything.events), 3)
        self.assertEqual(len(exact), 2)

    def test_a_raising_listener_is_logged_and_kept(self):
        em = gaffer.EventEmitter()
        calls = []

        def bad(evtype, msg):
            calls.append(evtype)
            raise RuntimeError("boom")

        em.subscribe("x", bad)
        after = Recorder(em, "x")
        with self.assertLogs("gaffer", logging.ERROR) as logs:
            em.publish("x", {})
            em.publish("x", {})
        self.assertEqual(calls, ["x", "x"])
        self.assertEqual(len(after.events), 2)
        self.assertIn("boom", "\n".join(logs.output))


# -- Manager -------------------------------------------------------------------

class ReapAndStopTests:
    """How exits are seen and how far stops reach: run by ManagerTest with pidfds and cgroups where the
    system has them, and by FallbackManagerTest with the fallbacks of a system without either."""

    def test_an_exited_process_is_replaced_at_once(self):
        self.load("w", 2)
        victim = self.os_pid(1)
        os.kill(victim, signal.SIGKILL)
        exit_msg = self.rec.wait_for("exit", pid=1)[0]
        self.assertEqual((exit_msg["exit_status"], exit_msg["term_signal"], exit_msg["os_pid"], exit_msg["once"]),
                         (0, signal.SIGKILL, victim, False))
        self.rec.wait_for("spawn", pid=3)
        self.assertEqual(self.m.pids("w"), [2, 3])
        names = self.rec.names()
        self.assertLess(names.index("proc.1.exit"), names.index("proc.3.spawn"))

    def test_exit_code_is_reported(self):
        self.load("w", code="import sys; sys.exit(3)")
        msg = self.rec.wait_for("exit", pid=1)[0]
        self.assertEqual((msg["exit_status"], msg["term_signal"]), (3, 0))

    def test_kill_and_killall(self):
        code = """
            import signal, sys, time
            signal.signal(signal.SIGHUP, lambda *a: sys.exit(7))
            print("ready", flush=True)
            time.sleep(60)
        """
        self.load("w", 2, code=code, redirect_output=["out"])
        for pid in (1, 2):
            self.wait_ready(pid)
        self.m.kill(1, "SIGHUP")
        self.assertEqual(self.rec.wait_for("exit", pid=1)[0]["exit_status"], 7)
        self.assertEqual(self.rec.matching("proc.1.kill"), [{"name": "default.w", "pid": 1, "signum": 1,
                                                             "event": "proc.1.kill"}])
        self.assertTrue(self.rec.matching("job.default.w.kill", pid=1))
        self.wait_ready(3)
        self.m.killall("w", "hup")
        self.rec.wait_for("exit", pid=2)
        self.rec.wait_for("exit", pid=3)
        self.assertEqual([m["exit_status"] for m in self.rec.matching("exit")], [7, 7, 7])
        self.assertTrue(self.rec.matching("job.default.w.kill", signum=1))

    def wait_ready(self, pid):
        """Wait until process pid printed 'ready' (its signal handlers are in place)."""
        self.wait_output(pid, b"ready")

    def test_graceful_timeout_escalates_to_sigkill(self):
        code = """
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("ready", flush=True)
            time.sleep(60)
        """
        self.load("w", code=code, graceful_timeout=0.2, redirect_output=["out"])
        self.wait_ready(1)
        self.m.stop_job("w")
        self.assertEqual(self.rec.wait_for("exit", pid=1)[0]["term_signal"], signal.SIGKILL)

    def grandchild_job(self, name, code_after, **settings):
        """A job whose process starts a grandchild, writes its pid to a file, then runs code_after."""
        pidfile = os.path.join(self.tmp, name + ".pid")
        code = textwrap.dedent("""
            import subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            with open(%r, "w") as f:
                f.write(str(child.pid))
        """) % pidfile + textwrap.dedent(code_after)
        self.load(name, code=code, **settings)
        return int(wait_until(lambda: os.path.exists(pidfile) and read_text(pidfile)))

    def test_stop_reaches_grandchildren(self):
        grandchild = self.grandchild_job("w", "time.sleep(60)")
        self.assertTrue(alive(grandchild))
        self.m.stop_job("w")
        wait_until(lambda: not alive(grandchild), what="grandchild stopped with its group")

    def test_leftovers_of_an_exited_process_are_stopped(self):
        grandchild = self.grandchild_job("w", "sys.exit(0)", numprocesses=1)
        wait_until(lambda: not alive(grandchild), what="the group of an exited leader stopped")
        self.rec.wait_for("exit", pid=1)

    def test_without_stop_children_only_the_leader_is_signalled(self):
        grandchild = self.grandchild_job("w", "time.sleep(60)", stop_children=False)
        self.m.stop_job("w")
        self.rec.wait_for("exit", pid=1)
        self.assertTrue(alive(grandchild))
        os.kill(grandchild, signal.SIGKILL)
        wait_until(lambda: not alive(grandchild))

    def test_respawn_failures_back_off_and_recover(self):
        link = os.path.join(self.tmp, "python")
        os.symlink(PY, link)
        self.m.load(gaffer.ProcessConfig("w", link, args=SLEEP, graceful_timeout=2))
        wait_until(lambda: program_started(self.os_pid(1)), what="the program run (through the launcher, in a cgroup)")
        os.unlink(link)
        os.kill(self.os_pid(1), signal.SIGKILL)
        stamps = []
        self.m.events.subscribe("spawn_error", lambda e, msg: stamps.append(time.monotonic()))
        self.rec.wait_for("spawn_error", count=4)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        # Lower bounds only: a timer may fire late on a loaded machine, never early.
        self.assertGreaterEqual(gaps[0], 0.08, "retries wait, never a tight loop: %r" % gaps)  # 0.1 s -20 %
        self.assertGreaterEqual(gaps[1], 0.16, "the delay doubles: %r" % gaps)                  # 0.2 s -20 %
        self.assertIn("No such file", self.rec.matching("spawn_error")[0]["reason"])
        self.assertEqual(self.m.info("w")["running"], 0, "the manager still answers")
        os.symlink(PY, link)
        self.clock.offset += 60  # the pending retry is due now: nothing waits for it in real time
        self.m.wakeup()
        wait_until(lambda: self.m.pids("w"), what="the job recovers once the binary is back")

    def test_host_children_are_not_stolen(self):
        self.load("w", 2)
        own = subprocess.Popen([PY, "-c", "import sys; sys.exit(5)"])
        os.kill(self.os_pid(1), signal.SIGKILL)  # the manager reaps one of its own meanwhile
        self.rec.wait_for("exit", pid=1)
        self.assertEqual(own.wait(TIMEOUT), 5, "the host's child kept its exit status")

    def test_no_fd_grows_over_many_spawn_exit_cycles(self):
        # Measured once the manager has settled, not mid-churn: on a loaded machine more than two
        # processes may be between exit and reaping at any instant, each with its pipes still open.
        self.load("guarded")  # the guardian's pipe opens with the first spawn, and stays
        before = open_fds()
        true = shutil.which("true")
        self.m.load(gaffer.ProcessConfig("w", true, numprocesses=2, redirect_output=["out", "err"],
                                         redirect_input=True, min_uptime=0))  # no backoff: as fast as it goes
        self.rec.wait_for("exit", count=100, timeout=90)  # a leak of one fd a cycle would show 100 times
        self.m.stop_job("w")
        wait_until(lambda: open_fds() <= before, what="the fds of 100 processes all closed")

    def test_stop_run_and_callbacks(self):
        self.load("w", 3)
        os_pids = [self.os_pid(p) for p in self.m.pids()]
        called = []
        stopper = threading.Thread(target=self.m.stop,
                                   args=(lambda m: called.append((m, threading.current_thread().name)),))
        started = time.monotonic()
        stopper.start()
        stopper.join(5)
        self.assertLess(time.monotonic() - started, 2, "stop returns at once")
        self.m.run()
        self.assertEqual(called, [(self.m, "gaffer-loop")])
        for os_pid in os_pids:
            self.assertFalse(alive(os_pid))
        self.assertFalse(self.m.active)
        self.assertFalse(self.m.started)
        for call in (lambda: self.m.pids(), lambda: self.m.load(gaffer.ProcessConfig("x", PY)),
                     lambda: self.m.restart()):
            with self.assertRaisesRegex(RuntimeError, "manager is not running"):
                call()
        late = []
        self.m.stop(late.append)
        self.assertEqual(late, [self.m], "stop on a stopped manager calls back at once")

    def test_a_crashed_loop_kills_every_child_and_closes_every_pidfd(self):
        self.load("w", 3)
        os_pids = [self.os_pid(pid) for pid in self.m.pids("w")]
        if self.m.use_pidfd:
            self.assertLessEqual(set(os_pids), set(pidfds().values()), "a pidfd for each child")

        def crash():
            raise LoopCrash("a bug in the loop itself")
        with self.assertLogs("gaffer", logging.CRITICAL) as logged:
            self.m.loop.call_soon_threadsafe(crash)  # commands catch Exception: a BaseException ends the loop
            self.assertTrue(self.m._stopped.wait(TIMEOUT), "the loop ended")
        self.assertIn("gaffer loop crashed", logged.output[0])
        self.tracebacks_expected = True
        for os_pid in os_pids:
            wait_until(lambda: not alive(os_pid), what="child %d killed as the loop ended" % os_pid)
        self.assertEqual(pidfds(), {}, "no pidfd left open, the guardian's neither")


class ManagerTest(ReapAndStopTests, ManagerTestCase):

    def test_load_is_synchronous_and_info_describes_the_job(self):
        self.load("web", 2)
        pids = self.m.pids("web")
        self.assertEqual(pids, [1, 2])
        for pid in pids:
            self.assertTrue(alive(self.os_pid(pid)))
        info = self.m.info("web")
        self.assertEqual({k: info[k] for k in ("name", "active", "running", "running_out", "max_processes",
                                               "processes")},
                         {"name": "default.web", "active": True, "running": 2, "running_out": 0,
                          "max_processes": 2, "processes": [1, 2]})
        self.assertEqual(info["config"]["numprocesses"], 2)
        proc = self.m.get_process(1)
        self.assertEqual((proc.name, proc.cmd, proc.args, proc.once, proc.active), ("default.web", PY, SLEEP,
                                                                                   False, True))
        self.assertEqual(proc.info["os_pid"], proc.os_pid)
        self.assertRegex(repr(proc), r"<Process 'default.web' pid=1 os_pid=\d+ READY>")
        self.assertEqual(self.rec.names()[:6], ["load", "start", "job.default.web.start", "spawn",
                                                "job.default.web.spawn", "proc.1.spawn"])
        spawn = self.rec.matching("spawn", pid=1)[0]
        self.assertEqual(spawn, {"name": "default.web", "pid": 1, "os_pid": proc.os_pid, "slot": 1, "event": "spawn"})

    def test_process_info_shows_the_jobs_own_environment_only(self):
        self.setenv("GAFFER_TEST_SECRET", "hunter2")  # inherited by the child (os_env), never shown
        self.load("web", env={"MODE": "prod"})
        pid = self.m.commit("web", env={"TASK": "1"})
        self.assertEqual(self.m.get_process(1).info["env"], {"MODE": "prod"})
        info = self.m.get_process(pid).info
        self.assertEqual(info["env"], {"MODE": "prod", "TASK": "1"})
        self.assertEqual((info["committed"], info["commited"]), (True, True), "the old spelling kept as an alias")
        self.assertEqual(self.m.get_process(1).env["GAFFER_TEST_SECRET"], "hunter2", "the child still gets it")

    def test_sessions_and_names(self):
        self.load("a")
        self.m.load(gaffer.ProcessConfig("b", PY, args=SLEEP), sessionid="s1")
        self.m.load(gaffer.ProcessConfig("c", PY, args=SLEEP, numprocesses=0), sessionid="s2")
        self.assertEqual(self.m.sessions, ["default", "s1", "s2"])
        self.assertEqual(self.m.jobs(), ["default.a", "s1.b", "s2.c"])
        self.assertEqual(self.m.jobs("s1"), ["s1.b"])
        walked = []
        self.m.jobs_walk(lambda m, name: walked.append(name))
        self.assertEqual(walked, ["default.a", "s1.b", "s2.c"])
        self.assertEqual(self.m.info("s1.b")["name"], "s1.b")
        self.assertEqual(self.m.info("s1/b")["name"], "s1.b")
        self.assertEqual(self.m.get("default.a").name, "a")
        with self.assertRaises(gaffer.ProcessConflict) as cm:
            self.m.load(gaffer.ProcessConfig("b", PY), sessionid="s1")
        self.assertEqual(cm.exception.errno, 409)
        self.m.unload("c", "s2")
        self.assertEqual(self.m.sessions, ["default", "s1"], "a session goes with its last job")
        self.m.unload(gaffer.ProcessConfig("b", "x"), sessionid="s1")
        self.assertEqual(self.m.jobs(), ["default.a"])

    def test_unknown_names_are_not_found(self):
        for call in (lambda: self.m.jobs("nope"), lambda: self.m.info("nope"), lambda: self.m.info("s.nope"),
                     lambda: self.m.get_process(99), lambda: self.m.kill(99, "TERM"),
                     lambda: self.m.stop_process(99), lambda: self.m.scale("nope", 1),
                     lambda: self.m.unload("nope"), lambda: self.m.commit("nope")):
            with self.subTest(call=call):
                with self.assertRaises(gaffer.ProcessNotFound) as cm:
                    call()
                self.assertEqual(cm.exception.errno, 404)
                self.assertIn("not found", str(cm.exception))

    def test_bad_arguments(self):
        self.load("w")
        with self.assertRaisesRegex(ValueError, "signal number or a name"):
            self.m.kill(1, "NOPE")
        with self.assertRaisesRegex(ValueError, "scale must be"):
            self.m.scale("w", "x2")
        with self.assertRaisesRegex(TypeError, "config must be a ProcessConfig"):
            self.m.load("w")
        with self.assertRaisesRegex(ValueError, "sessionid must be 1 to 128 ASCII letters"):
            self.m.load(gaffer.ProcessConfig("v", PY), sessionid="a.b")
        for name in ("a\nb", "caf\u00e9", "a b", "x" * 129):
            with self.subTest(name=name), self.assertRaisesRegex(ValueError, "name must be 1 to 128 ASCII"):
                self.m.load(gaffer.ProcessConfig(name, PY))
        self.assertEqual(self.m.jobs(), ["default.w"], "bad calls changed nothing")

    def test_scale_forms(self):
        self.load("w", 1)
        self.assertEqual(self.m.scale("w", 2), 3)
        self.assertEqual(len(self.m.pids("w")), 3, "scale returns after spawning")
        self.assertEqual(self.m.scale("w", "+1"), 4)
        self.assertEqual(self.m.scale("w", "1"), 5)
        self.assertEqual(self.m.scale("w", -1), 4)
        self.assertEqual(self.m.pids("w"), [1, 2, 3, 4], "the highest slot goes first")
        self.assertEqual(self.rec.matching("reap")[0]["pid"], 5)
        self.assertEqual([p.slot for p in self.m.list("w")], [1, 2, 3, 4])
        self.m.stop_process(2)  # its replacement takes the free slot: slots stay 1..N
        wait_until(lambda: sorted(p.slot for p in self.m.list("w")) == [1, 2, 3, 4] and 2 not in self.m.pids("w"))
        self.assertEqual(self.m.scale("w", "-2"), 2)
        self.assertEqual(sorted(p.slot for p in self.m.list("w")), [1, 2])
        self.assertEqual(self.m.scale("w", "=3"), 3)
        self.assertEqual(self.m.scale("w", 0), 3)
        self.assertEqual(self.m.scale("w", "-10"), 0, "the count never goes below 0")
        self.assertEqual(self.m.pids("w"), [])
        self.assertEqual(self.m.info("w")["max_processes"], 0)
        self.assertGreaterEqual(len(self.rec.matching("update", name="default.w")), 7)

    def test_scale_is_bounded_by_max_processes(self):
        self.load("w", 1, max_processes=3)
        for ask in (99999999, "+3", "=4"):
            with self.subTest(ask=ask), self.assertRaises(gaffer.ProcessError) as caught:
                self.m.scale("w", ask)
            self.assertEqual(caught.exception.errno, 400)
            self.assertRegex(caught.exception.reason, r"'default.w' may run at most 3 processes \(max_processes\), "
                                                      r"asked for \d+")
        self.assertEqual((self.m.info("w")["max_processes"], len(self.m.pids("w"))), (1, 1), "nothing changed")
        self.assertEqual(self.m.scale("w", "+2"), 3)
        self.assertEqual(gaffer.ProcessConfig("w", PY).max_processes, 1000)
        for settings, message in ((dict(numprocesses=1001), r"numprocesses must be <= max_processes \(1000\)"),
                                  (dict(max_processes=0), "max_processes must be >= 1")):
            with self.subTest(settings=settings, message=message):
                with self.assertRaisesRegex(ValueError, message):
                    gaffer.ProcessConfig("w", PY, **settings)

    def test_a_large_scale_spawns_in_batches_and_the_loop_keeps_answering(self):
        self.load("other")
        self.load("big", 0, max_processes=100)
        answers, done = [], threading.Event()

        def ask():  # another thread's calls, meanwhile: each must be answered between two batches
            while not done.is_set():
                started = time.monotonic()
                self.m.pids("other")
                answers.append(time.monotonic() - started)
                time.sleep(0.005)  # a client polling, not a second spawner of load

        asker = threading.Thread(target=ask)
        asker.start()
        try:
            self.assertEqual(self.m.scale("big", 100), 100)
        finally:
            done.set()
            asker.join()
        self.assertEqual(len(self.m.pids("big")), 100, "scale returns once all are spawned")
        self.assertGreater(len(answers), 5, "calls were answered while it spawned")
        self.assertLess(max(answers), 0.5, "no call waited for the whole spawn")
        self.m.stop_job("big")
        self.load("inline", 0)
        # From the loop thread (a listener), a call cannot wait for later turns: all batches run at once.
        self.assertEqual(self.m.loop.call(lambda: self.m.scale("inline", 40)), 40)
        self.assertEqual(len(self.m.pids("inline")), 40)

    def test_status_lists_every_job_with_its_state(self):
        false = shutil.which("false")
        self.load("up")
        self.load("idle", 0)
        self.load("off")
        self.m.stop_job("off")
        self.m.load(gaffer.ProcessConfig("fatal", false, flapping=dict(attempts=2, window=30, max_retry=0)))
        self.m.load(gaffer.ProcessConfig("crash", false))
        states = lambda: {job["name"]: job["state"] for job in self.m.status()}
        wait_until(lambda: states()["default.fatal"] == "fatal" and states()["default.crash"] == "backoff",
                   what="a flapping job given up, a crash loop backing off")
        self.assertEqual(states(), {"default.up": "running", "default.idle": "running", "default.off": "stopped",
                                    "default.fatal": "fatal", "default.crash": "backoff"})
        up = [job for job in self.m.status() if job["name"] == "default.up"][0]
        self.assertEqual((up["running"], up["target"], up["ready"], up["cmd"]), (1, 1, 1, " ".join([PY] + SLEEP)))
        self.assertEqual([p["pid"] for p in up["processes"]], self.m.pids("up"))
        spawns = len(self.rec.matching("spawn", name="default.fatal"))
        self.m.start_job("fatal")  # started by hand: no longer given up (until it flaps again, at once)
        self.rec.wait_for("spawn", count=spawns + 1, name="default.fatal")

    def test_stop_job_and_start_job(self):
        self.load("w", 2)
        self.m.scale("w", 1)
        old = [self.os_pid(pid) for pid in self.m.pids("w")]
        self.m.stop_job("w")
        self.assertEqual(self.m.pids("w"), [], "stopped processes leave the running list at once")
        self.assertFalse(self.m.info("w")["active"])
        self.rec.wait_for("exit", count=3)
        for os_pid in old:
            wait_until(lambda: not alive(os_pid))
        self.assertEqual(self.m.pids("w"), [], "no process of a stopped job is restarted")
        self.assertEqual(len(self.rec.matching("stop_process")), 3)
        self.assertEqual(self.rec.matching("stop"), [{"name": "default.w", "event": "stop"}])
        self.m.start_job("w")
        self.assertEqual(len(self.m.pids("w")), 3, "start_job keeps the scaled count")
        self.assertEqual(len(self.rec.matching("start")), 2)

    def test_unload_stops_the_processes(self):
        self.load("w", 2)
        os_pids = [self.os_pid(p) for p in self.m.pids("w")]
        self.m.unload("w")
        self.assertEqual(self.m.jobs(), [])
        self.assertEqual(self.m.pids(), [])
        self.rec.wait_for("exit", count=2)
        for os_pid in os_pids:
            wait_until(lambda: not alive(os_pid))
        self.assertIn("unload", self.rec.names())

    def test_reload_replaces_every_process(self):
        self.load("w", 2)
        self.m.scale("w", 1)
        self.m.reload("w")
        self.assertEqual(self.m.pids("w"), [4, 5], "count back to the config's, all new")
        self.rec.wait_for("exit", count=3)
        self.m.stop_job("w")
        self.m.reload("w")
        self.assertEqual(len(self.m.pids("w")), 2, "reload starts a stopped job")

    def test_each_slot_has_its_own_port_across_scale_reload_and_rollout(self):
        self.load("w", 2, port=8000)
        def ports():
            return sorted((p.slot, p.env["PORT"], p.info["env"]["PORT"]) for p in self.m.list("w"))
        self.assertEqual(ports(), [(1, "8000", "8000"), (2, "8001", "8001")])
        self.m.scale("w", "=1")
        self.m.scale("w", "=2")
        self.assertEqual(ports(), [(1, "8000", "8000"), (2, "8001", "8001")])
        self.m.reload("w")  # new ones first: each takes the slot of the one it replaces
        self.assertEqual(ports(), [(1, "8000", "8000"), (2, "8001", "8001")])
        self.m.scale("w", "=4")
        second = [p.pid for p in self.m.list("w") if p.slot == 2][0]
        self.m.stop_process(second)  # its replacement in slot 2 is the newest process
        wait_until(lambda: second not in self.m.pids("w") and len(self.m.pids("w")) == 4)
        self.m.reload("w")  # back to the config's 2: the lowest slots, whatever the processes' age
        self.assertEqual(ports(), [(1, "8000", "8000"), (2, "8001", "8001")])
        self.load("r", 2, port=9000, ready="delay:0.05")
        self.m.reload("r")  # a rollout, one at a time
        wait_until(lambda: len(self.m.pids("r")) == 2 and min(self.m.pids("r")) > 6, what="the rollout's end")
        self.assertEqual(sorted((p.slot, p.env["PORT"]) for p in self.m.list("r")), [(1, "9000"), (2, "9001")])
        self.load("edge", 1, port=65535)
        with self.assertRaisesRegex(gaffer.ProcessError, r"job 'default.edge' cannot start a process in slot 2: "
                                                          r"its \$PORT would be 65536, past 65535"):
            self.m.scale("edge", "=2")
        self.assertEqual((self.m.info("edge")["max_processes"], len(self.m.pids("edge"))), (1, 1), "the scale undone")
        for bad in (0, 65536, "80"):
            with self.subTest(bad=bad):
                with self.assertRaisesRegex(ValueError, r"^port must be "):
                    gaffer.ProcessConfig("x", "true", port=bad)

    def test_a_slot_keeps_its_port_and_its_streak_across_respawns(self):
        code = ("import os, sys, time\nif os.environ['GAFFER_PROCESS_NAME'] == 'w.2':\n    sys.exit(int(sys.argv[1]))\n"
                "time.sleep(60)")  # slot 2 exits (with the status given), slots 1 and 3 run
        self.load("w", 3, args=["-S", "-c", code, "0"], port=8000, restart="on-failure")
        self.rec.wait_for("exit", slot=2)  # a success: its slot stays empty
        third = [p for p in self.m.list("w") if p.slot == 3][0]
        spawns = len(self.rec.matching("spawn"))
        os.kill(third.os_pid, signal.SIGKILL)  # not a signal the manager sent: on-failure respawns it
        self.rec.wait_for("exit", pid=third.pid)
        respawned = self.rec.wait_for("spawn", count=spawns + 1)[spawns]
        self.assertEqual((respawned["slot"], self.m.get_process(respawned["pid"]).env["PORT"]), (3, "8002"),
                         "the slot that emptied is refilled, with its port, though slot 2 was free too")
        self.load("c", 3, args=["-S", "-c", code.replace("w.2", "c.2"), "1"], port=9000, min_uptime=0.2,
                  backoff_max=60)  # slot 2 crash-loops
        delays = [msg["delay"] for msg in self.rec.wait_for("backoff", count=3, name="default.c")]
        self.assertLess(delays[0], delays[2], "slot 2's streak grows: its respawns wait longer")
        third = [p for p in self.m.list("c") if p.slot == 3][0]
        wait_until(lambda: time.time() - third.create_time > 0.3, what="slot 3 up past min_uptime")
        os.kill(third.os_pid, signal.SIGKILL)
        msg = self.rec.wait_for("exit", pid=third.pid)[0]
        self.assertEqual((msg["respawn"], msg["delay"]), (True, 0.0), "at once: the streak is slot 2's, not 3's")

    def test_slots_stay_unique_and_low_through_churn(self):
        import random
        rng = random.Random(7)
        self.load("w", 3, min_uptime=0, port=7000)
        for step in range(40):  # scale both ways, stops, SIGKILLs and reloads, in a seeded random order
            action = rng.choice(("scale", "stop", "kill", "reload"))
            pids, gone = self.m.pids("w"), None
            if action == "scale":
                self.m.scale("w", "=%d" % rng.randint(0, 6))
            elif action == "stop" and pids:
                gone = rng.choice(pids)
                self.m.stop_process(gone)
            elif action == "kill" and pids:
                gone = rng.choice(pids)
                os.kill(self.os_pid(gone), signal.SIGKILL)
            elif action == "reload":
                self.m.reload("w")
                if step % 2:  # a rollout next time: one at a time, each new process in an old one's slot
                    self.m.update(gaffer.ProcessConfig("w", PY, args=list(SLEEP), numprocesses=3, min_uptime=0,
                                                       port=7000, graceful_timeout=2, ready="delay:0.01"))
            target = self.m.info("w")["max_processes"]

            def settled():  # no rollout under way (its new process shares a slot), the stopped one gone
                job = self.m.status()[0]
                return job["state"] == "running" and job["running"] == target and gone not in self.m.pids("w")
            wait_until(settled, what="step %d (%s): %d running" % (step, action, target))
            slots = sorted(p.slot for p in self.m.list("w"))
            self.assertEqual(slots, list(range(1, target + 1)), "step %d (%s)" % (step, action))
            self.assertEqual(sorted(int(p.env["PORT"]) - 6999 for p in self.m.list("w")), slots)

    def test_update(self):
        self.load("w", 2)
        marker = os.path.join(self.tmp, "updated")
        config = gaffer.ProcessConfig("w", PY, numprocesses=1, env={"MARK": marker}, graceful_timeout=2,
                                      args=["-S", "-c", "import os, time; open(os.environ['MARK'], 'w').close(); "
                                                  "time.sleep(60)"])
        self.m.update(config)
        self.assertEqual(self.m.pids("w"), [3, 4], "count is max(new, current), processes replaced")
        self.assertEqual(self.m.get("w").env, {"MARK": marker})
        wait_until(lambda: os.path.exists(marker))
        self.assertIn("update", self.rec.names())
        self.m.stop_job("w")
        self.m.update(gaffer.ProcessConfig("w", PY, args=SLEEP, numprocesses=3))
        self.assertEqual(self.m.pids("w"), [], "a stopped job stays stopped")
        self.assertEqual(self.m.info("w")["max_processes"], 3)
        self.m.update(gaffer.ProcessConfig("w", PY, args=SLEEP, graceful_timeout=2), start=True)
        self.assertEqual(len(self.m.pids("w")), 3)

    def test_commit(self):
        self.load("w", 1)
        pid = self.m.commit("w", graceful_timeout=0.5, env={"EXTRA": "1"})
        proc = self.m.get_process(pid)
        self.assertTrue(proc.once)
        self.assertEqual(proc.env["EXTRA"], "1")
        self.assertEqual(proc.graceful_timeout, 0.5)
        info = self.m.info("w")
        self.assertEqual((info["running"], info["running_out"], info["max_processes"]), (2, 1, 1))
        self.assertIn(pid, self.m.pids("w"))
        os.kill(proc.os_pid, signal.SIGKILL)
        self.assertTrue(self.rec.wait_for("exit", pid=pid)[0]["once"])
        self.assertEqual(self.m.pids("w"), [1], "a committed process is never restarted")
        self.assertEqual(self.m.info("w")["running_out"], 0)

    def test_stop_process_and_stopall_are_replaced(self):
        self.load("w", 2)
        self.m.stop_process(1)
        self.assertEqual(self.m.pids("w"), [2, 3])
        self.assertTrue(self.rec.matching("proc.1.stop"))
        self.m.get_process(2).stop()
        self.assertEqual(self.m.pids("w"), [3, 4])
        self.m.stopall("w")
        self.assertEqual(self.m.pids("w"), [5, 6])
        self.rec.wait_for("exit", count=4)
        self.assertEqual(self.m.pids("w"), [5, 6], "asked-for exits are not replaced twice")

    def test_stop_signal(self):
        code = """
            import signal, sys, time
            signal.signal(signal.SIGINT, lambda *a: sys.exit(5))
            print("ready", flush=True)
            time.sleep(60)
        """
        self.load("w", code=code, stop_signal="INT", redirect_output=["out"])
        self.wait_ready(1)
        self.m.stop_process(1)
        self.assertEqual(self.rec.wait_for("exit", pid=1)[0]["exit_status"], 5)

    def test_without_flapping_it_keeps_restarting(self):
        self.load("w", code="pass", min_uptime=0)  # no backoff either: the restarts come at once
        self.rec.wait_for("exit", count=5)
        self.assertTrue(self.m.info("w")["active"])
        self.assertFalse(self.rec.matching("flap"))

    def test_flapping_stops_then_retries_then_gives_up(self):
        flapping = gaffer.FlappingInfo(attempts=3, window=60, retry_in=30, max_retry=1)
        self.load("w", code="import sys; sys.exit(1)", flapping=flapping, min_uptime=0)
        self.rec.wait_for("flap")
        self.assertFalse(self.m.info("w")["active"])
        self.assertEqual(len(self.rec.matching("exit")), 3)
        self.assertEqual(self.rec.names().count("flap"), 1)
        self.assertLess(self.rec.names().index("flap"), self.rec.names().index("stop"))
        self.clock.offset += 31  # the retry is due; nothing waits 30 real seconds
        self.m.wakeup()
        self.rec.wait_for("flap", count=2)
        self.assertEqual(len(self.rec.matching("start")), 2)
        self.clock.offset += 31
        self.m.wakeup()
        self.assertEqual(self.m.pids("w"), [], "max_retry used up: stays stopped")
        self.assertEqual(len(self.rec.matching("start")), 2)
        self.assertFalse(self.m.info("w")["active"])
        self.m.start_job("w")  # by hand: retries are counted afresh
        self.rec.wait_for("flap", count=3)

    def test_spawn_failures_raise_and_load_nothing(self):
        plain = os.path.join(self.tmp, "not-executable")
        with open(plain, "w") as f:
            f.write("#!/bin/sh\n")
        cases = [
            (dict(cmd="/no/such/binary"), "No such file"),
            (dict(cmd=plain), "Permission denied"),
            (dict(cmd=PY, args=SLEEP, cwd="/no/such/dir"), "No such file"),
        ]
        for index, (settings, oserror) in enumerate(cases):
            name = "bad%d" % index
            with self.subTest(settings=settings):
                with self.assertRaises(gaffer.ProcessError) as cm:
                    self.m.load(gaffer.ProcessConfig(name, numprocesses=2, **settings))
                message = str(cm.exception)
                self.assertIn("default.%s" % name, message)
                self.assertIn(settings["cmd"], message)
                self.assertIn(oserror, message)
                self.assertIn("the job was not loaded", message)
                self.assertEqual(self.m.jobs(), [], "an error means nothing changed")
                self.assertEqual(self.m.pids(), [])
        self.assertTrue(self.rec.matching("spawn_error", name="default.bad0")[0]["reason"])
        self.assertEqual(len(self.rec.matching("unload")), 3, "listeners saw each load undone")
        self.m.load(gaffer.ProcessConfig("idle", "/no/such/binary"), start=False)
        for call in (lambda: self.m.start_job("idle"), lambda: self.m.commit("idle")):
            with self.subTest(call=call):
                self.assertRaises(gaffer.ProcessError, call)
        self.assertEqual(self.m.info("idle")["active"], False, "a failed start leaves a loaded job stopped")
        self.load("good")
        self.assertEqual(len(self.m.pids("good")), 1, "the manager keeps serving")

    def test_a_half_started_job_is_stopped(self):
        # The second spawn fails: the first process must not stay behind.
        link = os.path.join(self.tmp, "python")
        os.symlink(PY, link)
        remove_after_first = lambda evtype, msg: os.path.lexists(link) and os.unlink(link)
        self.m.events.subscribe_once("spawn", remove_after_first)
        with self.assertRaises(gaffer.ProcessError):
            self.m.load(gaffer.ProcessConfig("w", link, args=SLEEP, numprocesses=3))
        self.assertEqual(self.m.jobs(), [])
        self.assertEqual(self.m.pids(), [])
        self.rec.wait_for("exit", pid=1)

    def test_a_failure_in_a_later_batch_undoes_the_whole_call(self):
        # One spawn a loop turn (as on a slow machine): load and scale still fail as one call.
        self.addCleanup(setattr, gaffer, "_SPAWN_SLICE", gaffer._SPAWN_SLICE)
        gaffer._SPAWN_SLICE = 0.0
        link = os.path.join(self.tmp, "python")
        os.symlink(PY, link)
        self.m.events.subscribe("spawn", lambda evtype, msg: msg["pid"] == 2 and os.unlink(link))
        with self.assertRaisesRegex(gaffer.ProcessError, "the job was not loaded"):
            self.m.load(gaffer.ProcessConfig("w", link, args=SLEEP, numprocesses=4, graceful_timeout=2))
        self.assertEqual((self.m.jobs(), self.m.pids()), ([], []), "the two spawned processes are stopped")
        self.rec.wait_for("exit", count=2)
        os.symlink(PY, link)
        self.m.load(gaffer.ProcessConfig("w", link, args=SLEEP, numprocesses=1, graceful_timeout=2))
        before = self.m.pids("w")
        wait_until(lambda: program_started(self.os_pid(before[0])), what="the program run (through the launcher)")
        self.m.events.subscribe("spawn", lambda evtype, msg: msg["pid"] == before[0] + 1 and os.unlink(link))
        with self.assertRaises(gaffer.ProcessError):
            self.m.scale("w", 3)
        self.assertEqual((self.m.info("w")["max_processes"], self.m.pids("w")), (1, before), "as it was")

    def test_a_failed_scale_keeps_the_count(self):
        link = os.path.join(self.tmp, "python")
        os.symlink(PY, link)
        self.m.load(gaffer.ProcessConfig("w", link, args=SLEEP, numprocesses=1, graceful_timeout=2))
        wait_until(lambda: program_started(self.os_pid(1)), what="the program run (through the launcher, in a cgroup)")
        os.unlink(link)
        with self.assertRaisesRegex(gaffer.ProcessError, "No such file"):
            self.m.scale("w", 2)
        self.assertEqual(self.m.info("w")["max_processes"], 1)
        self.assertEqual((self.m.pids("w"), self.m.info("w")["active"]), ([1], True), "the running one is kept")

    def test_a_failed_update_keeps_the_old_config_and_processes(self):
        self.load("w", 2)
        with self.assertRaises(gaffer.ProcessError):
            self.m.update(gaffer.ProcessConfig("w", "/no/such/binary", numprocesses=3))
        self.assertEqual(self.m.pids("w"), [1, 2])
        self.assertEqual(self.m.get("w").cmd, PY)
        self.assertEqual(self.m.info("w")["max_processes"], 2)

    def test_listeners_may_call_the_manager_inline(self):
        seen = []

        def on_spawn(evtype, msg):
            seen.append(self.m.info("w")["running"])
            if msg["pid"] == 1:
                self.m.scale("w", 1)

        self.m.events.subscribe("spawn", on_spawn)
        self.load("w", 1)
        self.assertEqual(self.m.pids("w"), [1, 2])
        self.m.events.subscribe("exit", lambda e, msg: self.m.stop_job("w"))
        self.m.kill(1, "KILL")
        self.rec.wait_for("stop")
        self.assertEqual(self.m.pids("w"), [])

    def test_a_failing_listener_does_not_wedge_the_loop(self):
        self.m.events.subscribe("spawn", lambda e, msg: 1 / 0)
        with self.assertLogs("gaffer", logging.ERROR):
            self.load("w", 2)
        self.assertEqual(self.m.pids("w"), [1, 2])

    def test_calls_from_many_threads(self):
        self.load("w", 0)
        errors = []

        def worker():
            try:
                for _ in range(5):
                    self.m.scale("w", 1)
                    self.m.info("w")
                    self.m.scale("w", -1)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(self.m.info("w")["max_processes"], 0)
        self.assertEqual(self.m.pids("w"), [])

    def test_one_loop_thread_for_any_number_of_processes(self):
        before = threading.active_count()
        self.load("w", 40)
        self.assertEqual(len(self.m.pids("w")), 40)
        self.assertEqual(threading.active_count(), before)
        names = [t.name for t in threading.enumerate()]
        self.assertEqual(names.count("gaffer-loop"), 1)

    def test_restart_replaces_every_process(self):
        self.load("a", 2)
        self.load("b", 1)
        self.m.stop_job("b")
        self.rec.wait_for("exit", pid=3)
        done = threading.Event()
        exited = []
        self.m.restart(lambda m: (exited.extend(e["pid"] for e in self.rec.matching("exit")), done.set()))
        self.assertTrue(done.wait(TIMEOUT))
        self.assertEqual(sorted(self.m.pids()), [4, 5], "only running jobs restart; new ones in place")
        self.assertEqual(sorted(exited), [1, 2, 3], "the callback came after the old were reaped")


class FallbackManagerTest(ReapAndStopTests, ManagerTestCase):
    """The same, with the fallbacks of a system without pidfd and cgroups: waitpid(pid, WNOHANG)
    polling, process groups.  .ci/run runs the whole suite that way too (GAFFER_NO_PIDFD=1
    GAFFER_NO_CGROUP=1)."""

    no_pidfd = no_cgroup = True


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


FIREHOSE = """
    import hashlib, os, random, sys
    rng = random.Random(7)
    total, digest, out = int(sys.argv[1]), hashlib.sha256(), open(1, "wb", buffering=0, closefd=False)
    while total:
        chunk = memoryview(rng.randbytes(min(total, rng.choice([1, 100, 4096, 65536, 300000]))))
        digest.update(chunk)
        total -= len(chunk)
        while chunk:
            chunk = chunk[out.write(chunk):]
    os.write(2, digest.hexdigest().encode())
"""


class OutputTest(ManagerTestCase):

    def test_two_labels_and_a_merged_label(self):
        code = """
            import os, sys
            os.write(1, b"to stdout")
            os.write(2, b"to stderr")
        """
        chunks = {}

        def on_io(label, msg):
            chunks.setdefault((msg["name"], label), bytearray()).extend(msg["data"])
            self.assertEqual(msg["event"], label)

        # Subscribed before the loads: the first processes are read too (they exit at once, and their
        # respawns back off, so a listener that came later could miss everything).
        self.m.events.subscribe("spawn", lambda e, msg: self.m.get_process(msg["pid"]).monitor_io(".", on_io))
        self.load("two", code=code, redirect_output=["out", "err"])
        self.load("merged", code=code, redirect_output=["log", "log"])
        self.load("outonly", code=code, redirect_output=["out"])
        for name in ("two", "merged", "outonly"):
            self.rec.wait_for("exit", name="default." + name)
        self.assertEqual(chunks[("default.two", "out")][:9], b"to stdout")
        self.assertEqual(chunks[("default.two", "err")][:9], b"to stderr")
        self.assertEqual(chunks[("default.merged", "log")][:18], b"to stdoutto stderr", "one pipe, in order")
        self.assertEqual({label for name, label in chunks if name == "default.outonly"}, {"out"})
        self.assertEqual(chunks[("default.outonly", "out")][:9], b"to stdout")

    def test_a_20_mib_firehose_arrives_whole_and_before_exit(self):
        size = 20 << 20
        received, at_exit, err = hashlib.sha256(), [], []
        count = [0]

        def on_out(label, msg):
            received.update(msg["data"])
            count[0] += len(msg["data"])

        def on_spawn(evtype, msg):
            proc = self.m.get_process(msg["pid"])
            proc.monitor_io("out", on_out)
            proc.monitor_io("err", lambda label, msg: err.append(msg["data"]))

        self.m.events.subscribe("spawn", on_spawn)
        self.m.events.subscribe("exit", lambda e, msg: at_exit.append((count[0], b"".join(err))))
        self.m.load(gaffer.ProcessConfig("hose", PY, args=["-S", "-c", textwrap.dedent(FIREHOSE), str(size)],
                                         numprocesses=1, redirect_output=["out", "err"], restart="never"))
        self.assertEqual(self.rec.wait_for("exit", pid=1, timeout=60)[0]["exit_status"], 0)
        self.assertEqual(at_exit[0][0], size, "every byte before the exit event")
        self.assertEqual(at_exit[0][1].decode(), received.hexdigest(), "byte for byte, in order")

    def test_unread_output_is_dropped_and_memory_stays_flat(self):
        self.m.events.unsubscribe("spawn", self._on_spawn)  # nobody listens
        self.m.events.subscribe("spawn", lambda e, msg: self.session_leaders.add(msg["os_pid"]))
        before = rss_bytes()
        self.m.load(gaffer.ProcessConfig("hose", PY, args=["-S", "-c", textwrap.dedent(FIREHOSE), str(128 << 20)],
                                         redirect_output=["out"]))
        self.assertEqual(self.rec.wait_for("exit", pid=1, timeout=60)[0]["exit_status"], 0)
        self.m.stop_job("hose")
        self.assertLess(rss_bytes() - before, 32 << 20, "128 MiB read and dropped, not kept")

    def test_a_raising_io_listener_does_not_stop_the_stream(self):
        code = "import os\nfor i in range(50): os.write(1, b'%d,' % i)\n"

        def bad(label, msg):
            raise ValueError("listener bug")

        self.m.events.subscribe("spawn", lambda e, msg: self.m.get_process(msg["pid"]).monitor_io("out", bad))
        with self.assertLogs("gaffer", logging.ERROR):
            self.load("w", code=code, redirect_output=["out"], restart="never")  # no respawn raising later
            self.rec.wait_for("exit", pid=1)
        self.assertTrue(self.output[1].endswith(b"49,"))


ECHO = """
    import sys
    for line in sys.stdin:
        sys.stdout.write("echo:" + line)
        sys.stdout.flush()
"""


class InputTest(ManagerTestCase):

    def test_echo_through_stdin(self):
        self.load("echo", code=ECHO, redirect_input=True, redirect_output=["out"])
        self.m.send(1, "héllo\n")
        self.m.send(1, [b"two\n", "three\n"])
        proc = self.m.get_process(1)
        proc.write(b"four\n")
        proc.writelines(["five\n", b"six\n"])
        self.wait_output(1, b"echo:six\n")
        self.assertEqual(self.output[1].decode(), "".join("echo:%s\n" % w for w in
                                                          ["héllo", "two", "three", "four", "five", "six"]))

    def test_megabytes_to_a_late_reader(self):
        code = """
            import hashlib, sys, time
            print("ready", flush=True)
            time.sleep(1)
            data = sys.stdin.buffer.read(int(sys.argv[1]))
            print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
        """
        payload = os.urandom(5 << 20)
        self.m.load(gaffer.ProcessConfig("late", PY, args=["-S", "-c", textwrap.dedent(code), str(len(payload))],
                                         redirect_input=True, redirect_output=["out"], graceful_timeout=2))
        self.wait_ready(1)
        started = time.monotonic()
        self.m.send(1, payload)
        self.assertLess(time.monotonic() - started, 0.5, "send returns at once")
        started = time.monotonic()
        self.m.pids()
        self.m.info("late")
        self.assertLess(time.monotonic() - started, 0.5, "the loop serves other calls meanwhile")
        self.wait_output(1, hashlib.sha256(payload).hexdigest().encode())
        self.assertIn(b"%d " % len(payload), self.output[1])

    def wait_ready(self, pid):
        self.wait_output(pid, b"ready")

    def test_bad_sends(self):
        self.load("plain")
        with self.assertRaisesRegex(gaffer.ProcessError, "no stdin pipe .redirect_input is off."):
            self.m.send(1, "x")
        with self.assertRaisesRegex(gaffer.ProcessError, "no stream 'nope'"):
            self.m.send(1, "x", stream="nope")
        with self.assertRaisesRegex(TypeError, "send takes str, bytes"):
            self.m.send(1, 42)
        with self.assertRaises(gaffer.ProcessNotFound):
            self.m.send(99, "x")

    def test_a_child_that_closes_its_stdin(self):
        code = """
            import os, time
            os.close(0)
            print("ready", flush=True)
            time.sleep(60)
        """
        self.load("closer", code=code, redirect_input=True, redirect_output=["out"])
        self.wait_ready(1)
        with self.assertLogs("gaffer", logging.WARNING) as logs:
            self.m.send(1, b"x" * (1 << 20))
        self.assertIn("dropped", "\n".join(logs.output))
        with self.assertRaisesRegex(gaffer.ProcessError, "stdin of process 1 is closed"):
            self.m.send(1, "more")
        self.assertEqual(self.m.pids("closer"), [1], "the loop goes on")

    def test_input_queued_for_an_exiting_process_is_counted(self):
        code = """
            import time
            print("ready", flush=True)
            time.sleep(60)
        """
        self.load("deaf", code=code, redirect_input=True, redirect_output=["out"])
        self.wait_ready(1)
        self.m.send(1, b"x" * (4 << 20))
        with self.assertLogs("gaffer", logging.WARNING):
            self.m.kill(1, "KILL")
            msg = self.rec.wait_for("exit", pid=1)[0]
        self.assertGreater(msg["dropped_input"], 3 << 20)
        self.assertEqual(self.rec.wait_for("spawn", pid=2)[0]["pid"], 2)


class CustomStreamTest(ManagerTestCase):

    def test_a_duplex_stream(self):
        code = """
            import os, socket
            sock = socket.socket(fileno=int(os.environ["GAFFER_STREAM_CTL"]))
            sock.sendall(b"hello from child;")
            while True:
                data = sock.recv(4096)
                if not data:
                    break
                sock.sendall(b"got:" + data)
        """
        self.load("duplex", code=code, custom_streams=["ctl"])
        proc = self.m.get_process(1)
        self.assertEqual(list(proc.streams), ["ctl"])
        self.wait_output(1, b"hello from child;")
        self.m.send(1, "ping", stream="ctl")
        self.wait_output(1, b"got:ping")
        got = []
        proc.streams["ctl"].monitor(lambda label, msg: got.append((label, msg["data"])))
        proc.streams["ctl"].write(b"pong")
        self.wait_output(1, b"got:pong")
        self.assertEqual(got, [("ctl", b"got:pong")])
        self.assertIn("GAFFER_STREAM_CTL", self.run_env_probe())

    def run_env_probe(self):
        self.load("probe", code="import os; print(sorted(os.environ))", custom_streams=["ctl"],
                  redirect_output=["out"])
        pid = self.m.pids("probe")[0]
        self.wait_output(pid, b"]")
        return self.output[pid].decode()


SPIN = "while True: pass"
IDLE = "import time; time.sleep(60)"


class StatsTest(ManagerTestCase):

    def test_stats_of_a_busy_and_an_idle_child(self):
        self.load("busy", code=SPIN)
        self.load("idle", code=IDLE)
        busy, idle = self.m.get_process(1), self.m.get_process(2)
        self.assertEqual(set(busy.stats), {"pid", "os_pid", "cpu", "mem", "rss", "vms", "mem_info1", "mem_info2",
                                           "ctime", "num_threads"})
        deadline = time.monotonic() + TIMEOUT
        while busy.stats["cpu"] < 30:  # two samples with time between them; the first includes start-up
            self.assertLess(time.monotonic(), deadline, "a spinning child shows cpu")
            time.sleep(0.2)
        wait_until(lambda: idle.stats["cpu"] < 10 and idle.stats["rss"] > 1 << 20,  # past its start-up
                   what="an idle child shows little cpu")
        stats = idle.stats
        self.assertEqual((stats["pid"], stats["os_pid"]), (2, idle.os_pid))
        self.assertGreater(stats["rss"], 1 << 20)
        self.assertGreater(stats["vms"], stats["rss"])
        with open("/proc/meminfo") as f:
            total = int(f.readline().split()[1]) * 1024  # MemTotal comes first
        self.assertAlmostEqual(stats["mem"], stats["rss"] * 100 / total, delta=0.01)
        self.assertRegex(stats["mem_info1"], r"^\d+\.\dM$")
        self.assertRegex(stats["ctime"], r"^\d+:\d\d\.\d\d$")
        self.assertGreaterEqual(stats["num_threads"], 1)

    def test_manager_stats(self):
        self.load("w", 2, code=IDLE)
        stats = self.m.stats("w")
        self.assertEqual(stats["name"], "default.w")
        self.assertEqual([s["pid"] for s in stats["stats"]], [1, 2])
        cpus = [s["cpu"] for s in stats["stats"]]
        self.assertEqual((stats["max_cpu"], stats["min_cpu"]), (max(cpus), min(cpus)))
        self.assertAlmostEqual(stats["mem"], sum(s["mem"] for s in stats["stats"]), places=2)
        self.m.scale("w", "=0")
        stats = self.m.stats("w")
        self.assertEqual(stats["stats"], [])
        self.assertEqual({stats[k] for k in ("cpu", "max_cpu", "min_cpu", "mem", "max_mem", "min_mem")}, {"N/A"})

    def test_on_demand_stats_never_move_the_samplers_baseline(self):
        self.m.stats_interval = 0.2
        self.load("busy", code=SPIN)
        seen = Recorder(gaffer.EventEmitter())
        self.m.monitor(seen, "busy")
        seen.wait_for("stat")  # the first: since the start
        done = threading.Event()

        def dashboard():  # status() on every event, as the dashboard calls it
            while not done.is_set():
                self.m.status()
                self.m.stats("busy")
        caller = threading.Thread(target=dashboard)
        caller.start()
        try:
            samples = [msg["cpu"] for msg in seen.wait_for("stat", count=6)[1:]]
        finally:
            done.set()
            caller.join()
        self.assertGreater(sorted(samples)[len(samples) // 2], 40, "a spinning child over each whole interval: %r"
                           % samples)

    def test_monitor_follows_the_job_and_stops_cleanly(self):
        self.m.stats_interval = 0.05
        self.load("w", 1, code=IDLE)
        seen, other = Recorder(gaffer.EventEmitter()), Recorder(gaffer.EventEmitter())
        self.m.monitor(seen, "w")
        seen.wait_for("stat", pid=1)
        self.m.scale("w", 1)
        msg = seen.wait_for("stat", pid=2)[0]
        self.assertEqual((msg["name"], msg["os_pid"]), ("default.w", self.os_pid(2)))
        self.m.unmonitor(seen, "w")
        before = len(seen.events)
        self.m.get_process(1).monitor(other)
        other.wait_for("stat", count=3)
        self.assertEqual(len(seen.events), before, "no sample after unmonitor")
        self.m.kill(1, "KILL")
        self.rec.wait_for("exit", pid=1)
        self.assertEqual(self.m.loop.call(lambda: (self.m._sampler._monitors, self.m._sampler._timer)), ({}, None),
                         "a process's monitors end with it; no timer runs for nobody")


class PubSubTest(ManagerTestCase):

    def test_events_topics(self):
        everything = self.m.subscribe("EVENTS")
        spawns = self.m.subscribe("EVENTS:spawn")
        bound = []
        everything.bind("exit", lambda evtype, msg: bound.append(msg["pid"]))
        self.load("w")
        self.m.kill(1, "KILL")
        self.rec.wait_for("spawn", pid=2)
        self.assertEqual(spawns.get(TIMEOUT)[1]["pid"], 1)
        self.assertEqual(spawns.get(TIMEOUT)[1]["pid"], 2)
        with self.assertRaises(queue.Empty):
            spawns.get(0.01)
        names = []
        while True:
            try:
                names.append(everything.get(0)[0])
            except queue.Empty:
                break
        self.assertIn("load", names)
        self.assertNotIn("exit", names, "a message a callback took is not queued")
        self.assertEqual(bound, [1])
        self.m.unsubscribe("EVENTS:spawn", spawns)
        self.assertTrue(spawns.closed)
        with self.assertRaises(EOFError):
            spawns.get(0)

    def test_job_and_process_topics(self):
        self.load("w")
        job = self.m.subscribe("JOB:default.w")
        proc = self.m.subscribe("PROCESS:1")
        self.m.kill(1, "KILL")
        self.assertEqual([e for e, _ in proc], ["kill", "exit"], "closed after the exit")
        self.assertEqual(job.get(TIMEOUT)[0], "kill")
        self.assertEqual(job.get(TIMEOUT)[0], "exit")
        evtype, msg = job.get(TIMEOUT)
        self.assertEqual((evtype, msg["event"], msg["pid"]), ("spawn", "spawn", 2))
        self.m.unload("w")
        self.assertEqual([e for e, _ in job], ["ready", "stop"], "closed by unload")

    def test_stats_topics(self):
        self.m.stats_interval = 0.05
        self.load("w", 1, code=IDLE)
        by_job, by_pid = self.m.subscribe("STATS:default.w"), self.m.subscribe("STATS:1")
        got = []
        by_pid.bind(lambda msg: got.append(msg))
        self.m.scale("w", 1)
        pids = set()
        while pids != {1, 2}:
            evtype, msg = by_job.get(TIMEOUT)
            self.assertEqual(evtype, "stat")
            pids.add(msg["pid"])
        wait_until(lambda: got)
        self.assertEqual(got[0]["pid"], 1)
        self.assertIn("cpu", got[0])

    def test_stream_topic_consumed_by_another_thread(self):
        code = """
            import os, sys, time
            sys.stdin.readline()
            for i in range(100):
                os.write(1, b"line %d\\n" % i)
            os.write(2, b"done")
        """
        self.load("w", code=code, redirect_output=["out", "err"], redirect_input=True)
        channel = self.m.subscribe("STREAM:1")
        errs = []
        channel.bind("err", lambda label, msg: errs.append(msg["data"]))
        collected = []
        reader = threading.Thread(target=lambda: collected.extend(channel))
        reader.start()
        self.m.send(1, "go\n")
        reader.join(TIMEOUT)
        self.assertFalse(reader.is_alive(), "iteration ends when the process exits")
        self.assertEqual({label for label, _ in collected}, {"out"})
        self.assertEqual(b"".join(m["data"] for _, m in collected), b"".join(b"line %d\n" % i for i in range(100)))
        self.assertEqual(b"".join(errs), b"done")

    def test_overflow_is_counted_and_reported(self):
        self.load("w", 0)
        channel = self.m.subscribe("EVENTS:update", max_bytes=3 * 300)
        for _ in range(10):
            self.m.scale("w", "=0")
        self.assertEqual(channel.dropped, 7)
        got = [channel.get(0) for _ in range(3)]
        self.assertEqual([e for e, _ in got], ["update"] * 3)
        self.m.scale("w", "=0")
        evtype, msg = channel.get(0)
        self.assertEqual((evtype, msg["dropped"], msg["topic"]), ("overflow", 7, "EVENTS:update"))
        self.assertEqual(channel.get(0)[0], "update")

    def test_bad_topics(self):
        self.load("w")
        for topic, errno in (("NOPE:x", 400), ("PROCESS:abc", 400), ("STREAM:", 400), (42, 400),
                             ("PROCESS:99", 404), ("JOB:nope", 404), ("STATS:nope", 404), ("JOB:s.nope", 404)):
            with self.subTest(topic=topic), self.assertRaises(gaffer.ProcessError) as cm:
                self.m.subscribe(topic)
            self.assertEqual(cm.exception.errno, errno)
        self.assertEqual(self.m.loop.call(lambda: len(self.m._topics)), 0, "nothing half-made")

    def test_stop_closes_every_channel(self):
        self.load("w")
        channels = [self.m.subscribe(t) for t in ("EVENTS", "JOB:w", "PROCESS:1", "STATS:w", "STREAM:1")]
        self._stop_manager()
        for channel in channels:
            self.assertTrue(channel.closed, channel)
        self.assertIn("stop", [evtype for evtype, _ in channels[1]])


class PollReaperOutputTest(ManagerTestCase):
    no_pidfd = True
    test_two_labels_and_a_merged_label = OutputTest.test_two_labels_and_a_merged_label
    test_a_20_mib_firehose_arrives_whole_and_before_exit = OutputTest.test_a_20_mib_firehose_arrives_whole_and_before_exit


HEAVY_MODULES = ("http.server", "http.client", "socketserver", "argparse", "ssl", "email", "configparser",
                 "json", "hmac", "difflib")


class LifecycleTest(LeakCheckedTestCase):

    def test_run_before_start_and_calls_before_start(self):
        m = gaffer.Manager()
        with self.assertRaisesRegex(RuntimeError, "never started"):
            m.run()
        with self.assertRaisesRegex(RuntimeError, "manager is not running"):
            m.load(gaffer.ProcessConfig("w", PY))

    def test_import_loads_neither_the_http_nor_the_command_line_parts(self):
        code = ("import sys, gaffer; m = gaffer.Manager(); m.start(); m.stop(); m.run(); "
                "print(' '.join(sorted(set(sys.modules) & {%s})))"
                % ", ".join(repr(name) for name in HEAVY_MODULES))
        result = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                                cwd=os.path.dirname(GAFFER), env={**os.environ, "PYTHONPATH": ""})
        self.assertEqual(result.returncode, 0, result.stderr)
        baseline = subprocess.run([PY, "-c", "import sys; print(' '.join(sorted(set(sys.modules) & {%s})))"
                                   % ", ".join(repr(name) for name in HEAVY_MODULES)],
                                  capture_output=True, text=True, timeout=TIMEOUT).stdout.split()
        self.assertEqual(sorted(set(result.stdout.split()) - set(baseline)), [],
                         "loaded by gaffer beyond what the bare interpreter has")

    def test_a_failing_app_leaves_the_manager_stopped(self):
        class App:
            def __init__(self, fail):
                self.fail, self.calls = fail, []

            def start(self, loop, manager):
                self.calls.append("start")
                if self.fail:
                    raise OSError("address in use")

            def stop(self):
                self.calls.append("stop")

            def restart(self):
                self.calls.append("restart")

        good, bad = App(False), App(True)
        m = gaffer.Manager()
        with self.assertRaisesRegex(OSError, "address in use"):
            m.start([good, bad])
        self.assertFalse(m.started)
        self.assertEqual(good.calls, ["start", "stop"])
        self.assertEqual(bad.calls, ["start"])

    def run_script(self, code, *extra):
        """Start a host program that prints the os pids of its children, then waits."""
        script = os.path.join(self.tmp, "host.py")
        with open(script, "w") as f:
            f.write("import sys\nsys.path.insert(0, %r)\n" % os.path.dirname(os.path.abspath(gaffer.__file__)))
            f.write(code)
        host = subprocess.Popen([PY, script, *extra], stdout=subprocess.PIPE, text=True)
        self.addCleanup(host.wait)
        self.addCleanup(host.kill)
        self.addCleanup(host.stdout.close)
        line = host.stdout.readline()
        os_pids = [int(p) for p in line.split()]
        self.assertEqual(len(os_pids), 2, line)
        self.session_leaders.update(os_pids)
        return host, os_pids

    HOST = textwrap.dedent("""
        import sys, gaffer
        m = gaffer.Manager()
        m.start()
        m.load(gaffer.ProcessConfig("w", sys.executable, args=["-S", "-c", "import time; time.sleep(60)"],
                                    numprocesses=2, graceful_timeout=3))
        pids = [p.os_pid for p in m.list()]
    """)

    def test_sigint_and_sigterm_stop_run_in_the_main_thread(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            with self.subTest(signal=signum):
                host, os_pids = self.run_script(self.HOST + textwrap.dedent("""
                    import signal, threading, time

                    def announce():  # once run() has its handlers in place
                        while (signal.getsignal(signal.SIGINT) is signal.default_int_handler
                               or signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
                            time.sleep(0.001)
                        print(*pids, flush=True)

                    threading.Thread(target=announce).start()
                    m.run()
                    print('clean exit')
                """))
                host.send_signal(signum)
                self.assertEqual(host.stdout.read().strip(), "clean exit")
                self.assertEqual(host.wait(TIMEOUT), 0)
                for os_pid in os_pids:
                    self.assertFalse(alive(os_pid))

    @unittest.skipUnless(sys.platform.startswith("linux"), "PR_SET_CHILD_SUBREAPER is Linux's")
    def test_a_subreaper_host_that_never_calls_run_reaps_its_adopted_zombies(self):
        host = subprocess.Popen([PY, "-S", "-c", textwrap.dedent("""
            import os, sys, time
            sys.path.insert(0, %r)
            import gaffer
            m = gaffer.Manager(subreaper=True)
            m.start()
            m.load(gaffer.ProcessConfig("app", sys.executable, args=["-S", "-c", %r, "gentle"], cwd=%r))
            print(m.list()[0].os_pid, flush=True)
            time.sleep(60)  # a host that never calls run(): no SIGCHLD handler
        """) % (os.path.dirname(GAFFER), textwrap.dedent(INIT_APP), self.tmp)], stdout=subprocess.PIPE, text=True)
        self.addCleanup(host.wait)
        self.addCleanup(host.kill)
        self.addCleanup(host.stdout.close)
        app = int(host.stdout.readline())
        self.session_leaders.add(app)
        wait_until(lambda: os.path.exists(os.path.join(self.tmp, "forked")), what="20 orphans adopted, then exited")
        zombies = lambda: [pid for pid, (ppid, _, st) in proc_table().items() if ppid == host.pid and st == "Z"]  # noqa
        wait_until(lambda: not zombies(), 3, "the host's adopted zombies reaped within a second")
        self.assertTrue(alive(app), "the app itself is left alone")

    def test_a_with_block_returns_once_the_loop_thread_has_ended(self):
        with gaffer.Manager() as m:
            m.load(gaffer.ProcessConfig("w", PY, args=SLEEP, graceful_timeout=2))
            self.session_leaders.add(m.list()[0].os_pid)
        self.assertFalse(m.loop.thread.is_alive())
        self.assertNotIn("gaffer-loop", [thread.name for thread in threading.enumerate()])

    def test_atexit_stops_children_of_a_host_that_forgot(self):
        host, os_pids = self.run_script(self.HOST + "print(*pids, flush=True)\n")
        self.assertEqual(host.wait(TIMEOUT), 0)
        for os_pid in os_pids:
            wait_until(lambda: not alive(os_pid), what="children of an exited host")




# -- Privileges: what a job runs gets what it was given, and nothing of the manager's ---------

REPORT = """
    import json, os, resource, socket, sys, time
    umask = os.umask(0)
    cgroup = open("/proc/self/cgroup").read() if os.path.exists("/proc/self/cgroup") else ""
    print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()), "umask": umask,
                      "env": {k: os.environ.get(k) for k in ("GAFFER_TOKEN", "HOME", "USER", "LOGNAME", "SHELL")},
                      "vars": {k: v for k, v in os.environ.items() if k.startswith("T_")},
                      "rlimits": {name: resource.getrlimit(getattr(resource, "RLIMIT_" + name.upper()))
                                  for name in ("nofile", "core", "nproc")},
                      "cgroup": cgroup.rpartition("0::")[2].strip()}), flush=True)
    if "NOTIFY_SOCKET" in os.environ:
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
    time.sleep(60)
"""


def python_for(user):
    """An interpreter that `user` can run (this suite's may sit in a directory only root enters), or None."""
    for candidate in dict.fromkeys([PY, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")]):
        try:
            if candidate and subprocess.run([candidate, "-S", "-c", "pass"], user=user, timeout=TIMEOUT,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                return candidate
        except OSError:
            continue
    return None


class SecretsTest(ManagerTestCase):

    def report(self, name, **settings):
        settings.setdefault("cmd", PY)
        self.load(name, args=["-S", "-c", textwrap.dedent(REPORT)], redirect_output=["out"], **settings)
        pid = self.m.pids(name)[0]
        wait_until(lambda: self.m.get_process(pid).tail(), what="the report of %s" % name)
        return json.loads(self.m.get_process(pid).tail()[0])

    def test_the_token_gaffer_reads_never_reaches_a_child(self):
        self.setenv("GAFFER_TOKEN", "the-managers-secret-token")
        self.assertIsNone(self.report("inherits")["env"]["GAFFER_TOKEN"], "not inherited")
        self.assertEqual(self.report("given", env={"GAFFER_TOKEN": "its-own"})["env"]["GAFFER_TOKEN"], "its-own",
                         "a job's own env may still set it")
        self.assertEqual(self.report("umask", umask="077")["umask"], 0o077)


class EnvFileTest(SecretsTest):
    """env_file: .env files read at each spawn, between the manager's environment and the job's env."""

    def write(self, name, text):
        return write_dedented(os.path.join(self.tmp, name), text)

    def test_precedence_optional_files_and_an_edit_picked_up_by_a_reload(self):
        self.setenv("T_OS", "manager")
        self.setenv("T_A", "manager")
        first = self.write("first.env", """
            # a comment
            export T_A=first
            T_B='first # not a comment'
            T_C="line\\none"
        """)
        second = self.write("second.env", "T_B=second\nT_D=second\n")
        report = self.report("w", env_file=[first, second, "-" + os.path.join(self.tmp, "absent.env")],
                             env={"T_D": "env"})
        self.assertEqual(report["vars"], {"T_OS": "manager", "T_A": "first", "T_B": "second", "T_C": "line\none",
                                          "T_D": "env"}, "os_env, then the files in order, then env")
        self.assertEqual(self.report("alone", env_file=first, os_env=False)["vars"]["T_A"], "first", "one path")
        self.write("second.env", "T_B=edited\n")
        old = self.m.pids("w")
        self.m.reload("w")
        wait_until(lambda: self.m.pids("w") != old and self.m.get_process(self.m.pids("w")[0]).tail())
        self.assertEqual(json.loads(self.m.get_process(self.m.pids("w")[0]).tail()[0])["vars"]["T_B"], "edited")

    def test_a_missing_or_bad_file_is_refused_at_load_and_nothing_is_loaded(self):
        bad = self.write("bad.env", "T_A=1\nthis is no assignment\n")
        for env_file, message in [
            (os.path.join(self.tmp, "absent.env"), "env_file %s does not exist (a name that starts with '-' may "
                                                   "be missing)" % os.path.join(self.tmp, "absent.env")),
            (bad, "%s:2: expected KEY=value, got 'this is no assignment'" % bad),
            (self.tmp, "env_file %s cannot be read: Is a directory" % self.tmp),
            ([3], "env_file must be a path or a list of paths, got [3]"),
        ]:
            with self.subTest(env_file=env_file), self.assertRaisesRegex(ValueError, re.escape(message)):
                self.load("w", env_file=env_file)
        self.assertEqual(self.m.jobs(), [])

    def test_a_file_gone_since_the_load_is_a_spawn_error_retried_on_the_backoff(self):
        path = self.write("gone.env", "T_A=1\n")
        self.load("w", env_file=path)
        os.unlink(path)
        self.m.kill(self.m.pids("w")[0], "KILL")
        error = self.rec.wait_for("spawn_error", name="default.w")[0]
        self.assertIn("env_file %s does not exist" % path, error["reason"])
        self.rec.wait_for("backoff", name="default.w")
        self.write("gone.env", "T_A=2\n")
        self.rec.wait_for("spawn", count=2, name="default.w", timeout=TIMEOUT)


class RlimitTest(SecretsTest):
    """rlimits: set before the program runs (the child reads them with resource.getrlimit)."""

    def test_the_child_runs_with_its_limits_from_its_first_instruction(self):
        import resource
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        soft = min(256, hard)
        report = self.report("w", rlimits={"nofile": [soft, hard], "core": 0}, ready="output:{")
        self.assertEqual(report["rlimits"]["nofile"], [soft, hard])
        self.assertEqual(report["rlimits"]["core"], [0, 0], "one number sets both")
        self.assertEqual(report["vars"], {}, "no LISTEN_PID or other variable of the launcher's")
        self.assertNotIn("LISTEN_PID", self.m.get_process(self.m.pids("w")[0]).env)
        if gaffer._may_raise_limits():
            self.assertEqual(self.report("raised", rlimits={"nofile": hard + 1})["rlimits"]["nofile"],
                             [hard + 1, hard + 1], "root raises a hard limit")
        else:
            with self.assertRaisesRegex(ValueError, r"rlimits: nofile's hard limit \d+ is above this manager's own"):
                self.load("raised", rlimits={"nofile": hard + 1})
        if os.geteuid() == 0:
            python = python_for("nobody")
            if python is not None:
                dropped = self.report("dropped", cmd=python, uid="nobody", rlimits={"nproc": [100, 200]})
                self.assertEqual((dropped["uid"], dropped["rlimits"]["nproc"]), (pwd.getpwnam("nobody").pw_uid,
                                                                                 [100, 200]))

    def test_bad_limits_are_refused_and_nothing_is_loaded(self):
        for rlimits, message in [
            ({"files": 10}, "rlimits: unknown limit 'files' (this system has "),
            ({"nofile": [10, 5]}, "rlimits: nofile's soft limit 10 is above its hard limit 5"),
            ({"nofile": -3}, "rlimits: nofile must be >= 0, got -3"),
            ({"nofile": [1, 2, 3]}, "rlimits: nofile takes a limit or [soft, hard], got [1, 2, 3]"),
            ("nofile=10", "rlimits must be a dict such as {'nofile': 65536}, got 'nofile=10'"),
        ]:
            with self.subTest(rlimits=rlimits), self.assertRaisesRegex(ValueError, re.escape(message)):
                self.load("w", rlimits=rlimits)
        self.assertEqual(self.m.jobs(), [])


@unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0, "dropping privileges needs root")
class PrivilegeTest(SecretsTest):
    """A job with a uid runs as systemd's User= and supervisord's user= run it: the user's primary group
    and its own supplementary groups, its HOME, USER, LOGNAME and SHELL, and the umask it was given."""

    def setUp(self):
        super().setUp()
        self.python = python_for("nobody")
        if self.python is None:
            self.skipTest("no Python interpreter here that the user nobody can run")

    def test_uid_alone_drops_groups_and_sets_the_users_environment(self):
        import pwd
        nobody = pwd.getpwnam("nobody")
        self.setenv("GAFFER_TOKEN", "the-managers-secret-token")
        self.setenv("HOME", "/root")
        report = self.report("w", cmd=self.python, uid="nobody", umask="027", ready="notify", ready_timeout=30)
        self.m.wait_ready("w", TIMEOUT)  # READY=1 reached a socket the manager bound as root
        self.assertEqual((report["uid"], report["gid"]), (nobody.pw_uid, nobody.pw_gid), "the primary group")
        self.assertEqual(report["groups"], sorted(set(os.getgrouplist("nobody", nobody.pw_gid))),
                         "the user's groups, none of root's")
        self.assertNotIn(0, report["groups"])
        self.assertEqual(report["env"], {"GAFFER_TOKEN": None, "HOME": nobody.pw_dir, "USER": "nobody",
                                         "LOGNAME": "nobody", "SHELL": nobody.pw_shell})
        self.assertEqual(report["umask"], 0o027)
        report = self.report("own", cmd=self.python, uid="nobody", gid=0, os_env=False, env={"HOME": "/srv"})
        self.assertEqual((report["gid"], report["env"]["HOME"], report["env"]["USER"]), (0, "/srv", "nobody"),
                         "a gid given is kept; the job's env wins; os_env off still sets the user's variables")

    def test_another_user_s_program_runs_in_its_slot_s_cgroup_from_its_first_instruction(self):
        cgroups = self.m._containment.cgroups
        if cgroups is None:
            self.skipTest("no writable cgroup v2 hierarchy here (or GAFFER_NO_CGROUP is set)")
        for name, settings in (("theirs", dict(cmd=self.python, uid="nobody")), ("ours", {})):
            with self.subTest(name=name):
                report = self.report(name, **settings)
                self.assertTrue(report["cgroup"].endswith("/%s/default.%s/1" % (os.path.basename(cgroups.base), name)),
                                "moved before its program ran (the mover for another user): %r" % report["cgroup"])
        wait_until(lambda: not [t for t in threading.enumerate() if t.name == "gaffer cgroup mover"],
                   what="the mover's thread gone once it has no work")

    def test_health_notify_as_another_user(self):
        code = textwrap.dedent(REPORT).replace("time.sleep(60)", textwrap.dedent("""
            while True:
                time.sleep(0.05)
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"WATCHDOG=1", os.environ["NOTIFY_SOCKET"])
        """))
        self.load("w", cmd=self.python, args=["-S", "-c", code], uid="nobody", ready="notify",
                  health="notify", health_interval=0.5, ready_timeout=30)
        self.m.wait_ready("w", TIMEOUT)
        wait_until(lambda: self.m.get_process(1).info["health_passed"] >= 3, what="WATCHDOG=1 pings arrive")
        self.assertEqual(self.rec.matching("unhealthy"), [])


# -- Containment: nothing a job starts outlives it ------------------------------------

STUBBORN_FAMILY = """
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    with open(os.path.join(os.environ["FAMILY"], str(os.getpid())), "w") as f:
        f.write("%d %d" % (os.getpid(), child.pid))
    time.sleep(60)
"""


SETSID_DAEMON = """
    import os, signal, sys, time
    cgroup = open("/proc/self/cgroup").read() if os.path.exists("/proc/self/cgroup") else ""
    deadline = time.monotonic() + 0.5
    while os.environ.get("IN_CGROUP") and open("/proc/self/cgroup").read() == cgroup and time.monotonic() < deadline:
        time.sleep(0.001)  # a fork before the manager moved it into its cgroup would leave it behind
    if os.fork() == 0:  # a daemon, the classic way: fork, setsid, fork; it ignores SIGTERM
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            with open(sys.argv[1] + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(sys.argv[1] + ".tmp", sys.argv[1])
            time.sleep(60)
        os._exit(0)
    os.wait()
    time.sleep(60)
"""


STOP_FAMILY = """
    import os, signal, sys, time
    cgroup = open("/proc/self/cgroup").read() if os.path.exists("/proc/self/cgroup") else ""
    deadline = time.monotonic() + 0.5
    while os.environ.get("IN_CGROUP") and open("/proc/self/cgroup").read() == cgroup and time.monotonic() < deadline:
        time.sleep(0.001)  # a fork before the manager moved it into its cgroup would leave it behind
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the leader, and what it forks, all ignore SIGTERM
    for kind in ("group", "escaped"):  # a child in its group, and a daemon that left it (fork, setsid, fork)
        if os.fork() == 0:
            if kind == "escaped":
                os.setsid()
                if os.fork():
                    os._exit(0)
            with open(sys.argv[1] + "." + kind + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(sys.argv[1] + "." + kind + ".tmp", sys.argv[1] + "." + kind)
            time.sleep(60)
            os._exit(0)
    time.sleep(60)
"""


def family_host(count):
    """A host program's code: a manager with `count` STUBBORN_FAMILY processes and a SETSID_DAEMON, then a sleep."""
    return textwrap.dedent("""
        import os, sys, time
        sys.path.insert(0, %r)
        import gaffer
        m = gaffer.Manager()
        m.start()
        m.load(gaffer.ProcessConfig("w", sys.executable, args=["-S", "-c", %r], numprocesses=%d, graceful_timeout=0.5))
        m.load(gaffer.ProcessConfig("d", sys.executable, args=["-S", "-c", %r, os.environ["FAMILY"] + "/daemon"],
                                    graceful_timeout=0.5))
        time.sleep(60)
    """) % (os.path.dirname(GAFFER), textwrap.dedent(STUBBORN_FAMILY), count, textwrap.dedent(SETSID_DAEMON))


class ContainmentTest(LeakCheckedTestCase):

    def family(self, count):
        """The os pids that `count` processes wrote in the family directory (a STUBBORN_FAMILY writes
        its own and its child's, a SETSID_DAEMON the daemon's)."""
        folder = os.path.join(self.tmp, "family")

        def written():
            return [read_text(os.path.join(folder, name)) for name in os.listdir(folder) if "tmp" not in name]
        wait_until(lambda: len(written()) >= count, what="%d families" % count)
        pids = [int(pid) for text in written() for pid in text.split()]
        self.session_leaders.update(pids)
        return pids

    def setUp(self):
        super().setUp()
        os.mkdir(os.path.join(self.tmp, "family"))
        self.env = {**os.environ, "FAMILY": os.path.join(self.tmp, "family")}

    def assert_gone_by(self, pids, seconds, what):
        started = time.monotonic()
        wait_until(lambda: not any(alive(pid) for pid in pids), seconds, what)
        return time.monotonic() - started

    def test_a_host_killed_while_its_children_ignore_sigterm_leaves_nothing(self):
        host_code = family_host(3)
        # SIGTERM: Python's default handler, so no atexit runs; the cgroups' or /proc's way to the daemon
        for signum, no_cgroup in ((signal.SIGKILL, ""), (signal.SIGTERM, "1")):
            with self.subTest(signal=signum.name, no_cgroup=no_cgroup):
                host = subprocess.Popen([PY, "-S", "-c", host_code], env=dict(self.env, GAFFER_NO_CGROUP=no_cgroup))
                self.addCleanup(host.wait)
                self.addCleanup(host.kill)
                pids = self.family(4)
                host.send_signal(signum)
                self.assertEqual(host.wait(TIMEOUT), -signum)
                took = self.assert_gone_by(pids, 0.5 + 3, "every process and child gone after the guardian's SIGKILL")
                self.assertGreater(took, 0.3, "they ignored SIGTERM: only the SIGKILL after graceful_timeout ended them")
                for name in os.listdir(os.path.join(self.tmp, "family")):
                    os.unlink(os.path.join(self.tmp, "family", name))

    def guardian_of(self, host):
        """The os pid of the live guardian of a host program, or None."""
        mark = b"gaffer guardian of pid %d" % host
        for pid, (_, _, state) in proc_table().items():
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if mark in cmdline.split(b"\0") and state != "Z":
                self.assertLess(len(cmdline), 1024, "a short command line that says what it is")
                return pid
        return None

    @unittest.skipUnless(HAVE_PROC, "finds the guardian by its command line in /proc")
    def test_a_guardian_killed_is_replaced_and_the_next_one_stops_everything(self):
        host_code = family_host(2)
        for no_cgroup in ("", "1"):
            with self.subTest(no_cgroup=no_cgroup):
                log = open(os.path.join(self.tmp, "host.log"), "w+")
                self.addCleanup(log.close)
                host = subprocess.Popen([PY, "-S", "-c", host_code], env=dict(self.env, GAFFER_NO_CGROUP=no_cgroup),
                                        stderr=log)
                self.addCleanup(host.wait)
                self.addCleanup(host.kill)
                pids = self.family(3)
                first = wait_until(lambda: self.guardian_of(host.pid), what="the guardian")
                os.kill(first, signal.SIGKILL)  # as the OOM killer would
                started = time.monotonic()
                second = wait_until(lambda: self.guardian_of(host.pid) not in (None, first) and self.guardian_of(host.pid),
                                    what="another guardian")
                self.assertLess(time.monotonic() - started, 1.5, "within a second")
                self.assertTrue(all(alive(pid) for pid in pids), "the processes kept running meanwhile")
                log.seek(0)
                self.assertEqual(log.read(), "the guardian (pid %d) exited with status -9; another is started\n" % first)
                host.kill()
                self.assertEqual(host.wait(TIMEOUT), -signal.SIGKILL)
                self.assert_gone_by(pids, 0.5 + 3, "the second guardian stopped every process and the daemon")
                wait_until(lambda: not alive(second), what="the guardian's own exit")
                for name in os.listdir(os.path.join(self.tmp, "family")):
                    os.unlink(os.path.join(self.tmp, "family", name))

    def test_a_run_command_killed_with_sigkill_leaves_nothing(self):
        proc = subprocess.Popen([*CLI, "run", "-n", "2", "--graceful-timeout", "0.5", "--", PY, "-c",
                                 textwrap.dedent(STUBBORN_FAMILY)], cwd=self.tmp, stdout=subprocess.DEVNULL,
                                env={**self.env, **CLI_ENV})
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        pids = self.family(2)
        proc.kill()
        proc.wait(TIMEOUT)
        self.assert_gone_by(pids, 0.5 + 3, "the runner's processes and their children gone")

    def test_without_a_guardian_nothing_more_runs(self):
        with gaffer.Manager(guardian=False) as m:
            m.load(gaffer.ProcessConfig("w", PY, args=SLEEP, graceful_timeout=2))
            self.session_leaders.add(m.list()[0].os_pid)
            self.assertEqual(my_children(), [m.list()[0].os_pid], "no guardian next to the process")
        with self.assertRaisesRegex(ValueError, "guardian must be True or False"):
            gaffer.Manager(guardian="yes")



class EscapeTest(ManagerTestCase):
    """What leaves the process group: found in the job's cgroup, or through /proc without one."""

    def start_daemon(self, name="w", in_cgroup=False):
        path = os.path.join(self.tmp, name + ".daemon")
        self.m.load(gaffer.ProcessConfig(name, PY, args=["-S", "-c", textwrap.dedent(SETSID_DAEMON), path],
                                         graceful_timeout=0.2, env={"IN_CGROUP": "1"} if in_cgroup else {}))
        daemon = int(wait_until(lambda: os.path.exists(path) and read_text(path), what="the daemon's pid"))
        self.session_leaders.add(daemon)
        self.assertTrue(alive(daemon))
        return daemon

    def test_a_setsid_daemon_that_ignores_sigterm_is_stopped_with_its_job(self):
        daemon = self.start_daemon()
        expected = "cgroup" if self.m._containment.cgroups is not None else "group"
        self.assertEqual(self.m.info("w")["containment"], expected)
        self.m.stop_job("w")
        self.rec.wait_for("exit", pid=1)
        wait_until(lambda: not alive(daemon), 0.2 + 5, "the setsid daemon killed after graceful_timeout")

    def test_the_daemon_of_a_process_that_crashes_ends_with_it(self):
        path = os.path.join(self.tmp, "w.daemon")
        self.m.load(gaffer.ProcessConfig("w", PY, args=["-S", "-c", textwrap.dedent(SETSID_DAEMON), path],
                                         graceful_timeout=0.2, restart="never"))
        daemon = int(wait_until(lambda: os.path.exists(path) and read_text(path), what="the daemon's pid"))
        self.session_leaders.add(daemon)
        os.kill(self.os_pid(1), signal.SIGKILL)  # killed from outside: nobody asked the manager to stop it
        self.rec.wait_for("exit", pid=1)
        wait_until(lambda: not alive(daemon), 0.2 + 5, "the setsid daemon (it ignores SIGTERM) killed at graceful_timeout")

    def test_stop_process_reaches_the_daemon_of_that_process_only(self):
        self.m.load(gaffer.ProcessConfig("other", PY, args=SLEEP, graceful_timeout=2))
        daemon = self.start_daemon()
        other = self.os_pid(self.m.pids("other")[0])
        self.m.stop_process(self.m.pids("w")[0])
        wait_until(lambda: not alive(daemon), 0.2 + 5, "the daemon of the stopped process")
        self.assertTrue(alive(other), "another job's process is left alone")

    def test_every_stop_path_ends_the_group_the_cgroup_and_what_escaped_alike(self):
        in_cgroup = self.m._containment.cgroups is not None
        for how in ("stop_process", "stop_job", "scale", "unload", "reload", "manager stop"):
            with self.subTest(how=how):
                name = how.replace(" ", "_")
                path = os.path.join(self.tmp, name)
                self.m.load(gaffer.ProcessConfig(name, PY, args=["-S", "-c", textwrap.dedent(STOP_FAMILY), path],
                                                 graceful_timeout=0.2, restart="never",
                                                 env={"IN_CGROUP": "1"} if in_cgroup else {}))
                leader = self.os_pid(self.m.pids(name)[0])
                family = [leader] + [int(wait_until(lambda: os.path.exists(path + "." + kind) and read_text(
                    path + "." + kind), what="its %s pid" % kind)) for kind in ("group", "escaped")]
                self.session_leaders.add(family[2])
                self.assertEqual(self.m.info(name)["containment"], "cgroup" if in_cgroup else "group")
                if how == "stop_process":
                    self.m.stop_process(self.m.pids(name)[0])
                elif how == "stop_job":
                    self.m.stop_job(name)
                elif how == "scale":
                    self.m.scale(name, "=0")
                elif how == "unload":
                    self.m.unload(name)
                elif how == "reload":  # a new process first (its own family), then the old one stops
                    self.m.reload(name)
                else:
                    self.m.stop()
                    self.m.run()
                wait_until(lambda: not any(alive(pid) for pid in family), 0.2 + 5,
                           "leader, group child and escaped daemon killed at graceful_timeout")
                if how == "reload":
                    for kind in ("group", "escaped"):
                        self.session_leaders.add(int(wait_until(lambda: os.path.exists(path + "." + kind) and read_text(
                            path + "." + kind) != str(family[1 if kind == "group" else 2]) and read_text(path + "." + kind),
                            what="the new process's %s" % kind)))
                    self.m.unload(name)

    def test_cgroups_are_removed_with_the_job_and_limits_are_refused_with_a_reason(self):
        cgroups = self.m._containment.cgroups
        if cgroups is None:
            with self.assertRaisesRegex(ValueError, "memory_max needs cgroup containment, which this manager"):
                self.m.load(gaffer.ProcessConfig("limited", PY, args=SLEEP, memory_max="64M"))
            self.skipTest("no writable cgroup v2 hierarchy here (or GAFFER_NO_CGROUP is set)")
        self.start_daemon(in_cgroup=True)
        leaf = os.path.join(cgroups.base, "default.w", "1")
        self.assertEqual(sorted(map(int, read_text(os.path.join(leaf, "cgroup.procs")).split()))[0],
                         self.os_pid(1), "the process is in a cgroup of its own, with its daemon")
        self.assertEqual(len(read_text(os.path.join(leaf, "cgroup.procs")).split()), 2)
        self.m.unload("w")
        wait_until(lambda: not os.path.exists(os.path.join(cgroups.base, "default.w")), what="the job's cgroup gone")
        with open(os.path.join(cgroups.base, "cgroup.controllers")) as f:
            offered = f.read().split()
        if "memory" in offered:
            self.skipTest("the memory controller is enabled here: a limit is not refused")
        with self.assertRaisesRegex(ValueError, r"memory_max needs the cgroup memory controller, which \S+ does "
                                                r"not offer \(it has: "):
            self.m.load(gaffer.ProcessConfig("limited", PY, args=SLEEP, memory_max="64M"))
        self.assertEqual(self.m.jobs(), [], "nothing loaded")

    def test_cgroups_true_where_none_can_be_made_is_a_clear_error(self):
        code = textwrap.dedent("""
            import os, sys
            sys.path.insert(0, %r)
            import gaffer
            if os.getuid() == 0:
                os.setuid(65534)  # nobody: the cgroup hierarchy is root's
            try:
                gaffer.Manager(cgroups=True, guardian=False).start()
            except RuntimeError as exc:
                print(exc)
            else:
                print("made")
            os._exit(0)
        """) % os.path.dirname(GAFFER)
        result = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
        if result.stdout.strip() == "made":
            self.skipTest("this user has a delegated cgroup: cgroups=True works")
        self.assertRegex(result.stdout, r"^cgroups=True, but the cgroup /\S*gaffer-\d+-1-[0-9a-f]{6} cannot be made: "
                                        r"(\[Errno \d+\] .+|no cgroup2 mount in /proc/self/mountinfo)$")
        with self.assertRaisesRegex(ValueError, "cgroups must be 'auto', True or False, got 'yes'"):
            gaffer.Manager(cgroups="yes")


    def test_a_slot_s_cgroup_is_reused_by_its_respawns_and_removed_with_the_slot(self):
        cgroups = self.m._containment.cgroups
        if cgroups is None:
            self.skipTest("no writable cgroup v2 hierarchy here (or GAFFER_NO_CGROUP is set)")
        job_dir = os.path.join(cgroups.base, "default.w")
        leaves = lambda: sorted(name for name in os.listdir(job_dir) if os.path.isdir(os.path.join(job_dir, name)))
        cgroup_of = lambda pid: read_text("/proc/%d/cgroup" % self.os_pid(pid)).split("::")[-1].strip()
        self.m.load(gaffer.ProcessConfig("w", PY, args=SLEEP, numprocesses=2, graceful_timeout=1))
        wait_until(lambda: all(program_started(self.os_pid(pid)) for pid in self.m.pids("w")), what="both programs")
        self.assertEqual([cgroup_of(pid).rsplit("/", 1)[1] for pid in self.m.pids("w")], ["1", "2"],
                         "each process runs in its slot's cgroup, from its first instruction")
        inode = os.stat(os.path.join(job_dir, "1")).st_ino
        for round_ in range(3):
            old = next(pid for pid in self.m.pids("w") if self.m.get_process(pid).slot == 1)
            os.kill(self.os_pid(old), signal.SIGKILL)
            new = self.rec.wait_for("spawn", count=3 + round_)[-1]["pid"]
            wait_until(lambda: program_started(self.os_pid(new)), what="the respawned program")
            self.assertTrue(cgroup_of(new).endswith("/default.w/1"), cgroup_of(new))
            self.assertEqual(os.stat(os.path.join(job_dir, "1")).st_ino, inode, "the same cgroup, not made again")
            self.assertEqual(leaves(), ["1", "2"])
        self.m.reload("w")  # each new process next to the old one of its slot: a cgroup of its own
        wait_until(lambda: len(self.m.pids("w")) == 2 and all(program_started(self.os_pid(pid)) for pid in self.m.pids("w"))
                   and min(self.m.pids("w")) > new, what="the reload's new processes")
        self.assertEqual(len({cgroup_of(pid) for pid in self.m.pids("w")}), 2, "two processes never share one")
        self.m.scale("w", "=1")
        slot_of = lambda leaf: leaf.split(".")[0]
        wait_until(lambda: {slot_of(leaf) for leaf in leaves()} == {"1"}, what="slot 2's cgroups removed with the slot")
        self.assertLessEqual(len(leaves()), 2, "a slot keeps one spare cgroup at most, beside its process's")
        self.assertIn(cgroup_of(self.m.pids("w")[0]).rsplit("/", 1)[1], leaves(), "the one left is slot 1's")
        self.m.stop_job("w")
        wait_until(lambda: leaves() == [], what="the stopped job's cgroups removed")
        self.m.unload("w")
        wait_until(lambda: not os.path.exists(job_dir), what="the job's cgroup removed with it")

    def test_after_a_thousand_respawns_no_cgroup_pidfd_or_guardian_entry_is_left(self):
        containment = self.m._containment
        true = shutil.which("true")
        self.m.load(gaffer.ProcessConfig("t", true, min_uptime=0, graceful_timeout=1))
        self.rec.wait_for("spawn", count=1000, timeout=120)
        self.m.stop_job("t")
        self.rec.wait_for("stop", name="default.t")
        wait_until(lambda: not self.m.pids("t"), what="the last process reaped")
        guardian = containment._guardian[0].pid if containment._guardian is not None else None
        self.assertEqual(set(pidfds().values()) - {guardian}, set(), "a pidfd for each live child only")
        self.assertEqual((containment._held, containment._guarded, containment._orphans), ({}, {}, {}))
        if containment.cgroups is not None:
            job_dir = os.path.join(containment.cgroups.base, "default.t")
            self.assertEqual([name for name in os.listdir(job_dir) if os.path.isdir(os.path.join(job_dir, name))], [],
                             "no cgroup left of the job's slot")
            self.assertEqual(containment._spares.get(self.m._job("t"), {}), {})


class FallbackEscapeTest(EscapeTest):
    no_cgroup = True



# -- Held sockets ---------------------------------------------------------------------

# A server as sd_listen_fds(3) specifies its side: LISTEN_PID must be its own pid, its sockets sit at
# 3, 4, ... in LISTEN_FDNAMES's order.  It reports what it found, then answers each connection with
# its pid (after `delay` seconds, then READY=1 where NOTIFY_SOCKET is set).  Asked to stop (SIGTERM), it
# finishes the request in hand and exits, as servers do: what waits in the backlog is the next one's.
SD_LISTEN_SERVER = """
    import json, os, selectors, signal, socket, sys, time
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    assert os.environ["LISTEN_PID"] == str(os.getpid()), "LISTEN_PID is not this process"
    count, names = int(os.environ["LISTEN_FDS"]), os.environ["LISTEN_FDNAMES"].split(":")
    socks = [socket.socket(fileno=3 + i) for i in range(count)]
    print(json.dumps({"names": names, "argv": sys.argv[1:], "pid": os.getpid(), "uid": os.getuid(),
                      "groups": sorted(os.getgroups()), "cgroup": open("/proc/self/cgroup").read().rpartition("0::")[2].strip()
                      if os.path.exists("/proc/self/cgroup") else "",
                      "reuseport": [s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in socks],
                      "families": [s.family.name for s in socks], "listening": [s.getsockopt(socket.SOL_SOCKET,
                      socket.SO_ACCEPTCONN) for s in socks], "ports": [s.getsockname()[1] if s.family != socket.AF_UNIX
                      else None for s in socks]}), flush=True)
    time.sleep(float(os.environ.get("DELAY", "0")))
    if "NOTIFY_SOCKET" in os.environ:
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
    selector = selectors.DefaultSelector()
    for s in socks:
        selector.register(s, selectors.EVENT_READ)
    answered = 0
    while not stopping:
        for key, _ in selector.select(0.05):  # a stop is seen within 50 ms when idle
            conn, _ = key.fileobj.accept()
            conn.sendall(b"%d\\n" % os.getpid())
            conn.close()
            answered += 1
            if answered == int(os.environ.get("CRASH_AFTER", "0")):  # a crash between two requests
                os._exit(1)
"""


def ask(address):
    """Connect, and return what the server says (its pid)."""
    family, where = gaffer._socket_address(address)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(where)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(64)
            if not chunk:
                break
            data += chunk
    return int(data)


class SocketTest(ManagerTestCase):
    """Listening sockets the manager binds once and hands to each process, as systemd does."""

    def serve(self, name, sockets, **settings):
        self.m.load(gaffer.ProcessConfig(name, PY, args=["-S", "-c", textwrap.dedent(SD_LISTEN_SERVER),
                                                          "--fd", "$GAFFER_SOCKET_%s" % sockets[0].upper()],
                                         sockets=sockets, redirect_output=["out"], graceful_timeout=2, **settings))

    def report(self, pid):
        wait_until(lambda: self.m.get_process(pid).tail(), what="the report of process %d" % pid)
        return json.loads(self.m.get_process(pid).tail()[0])

    def test_a_server_finds_its_sockets_as_sd_listen_fds_says_and_keeps_them_across_respawns(self):
        bound = []
        self.m.events.subscribe("socket_bound", lambda evtype, msg: bound.append(msg))
        web = self.m.add_socket("web", "tcp://127.0.0.1:0", reuseport=True, backlog=16)
        owner = "nobody" if os.geteuid() == 0 else None  # only root can give a file away
        admin = self.m.add_socket("admin", "unix:" + os.path.join(self.tmp, "admin.sock"), mode=0o600, owner=owner)
        self.assertRegex(web["address"], r"^tcp://127\.0\.0\.1:\d+$", "the real port, not 0")
        made = os.stat(os.path.join(self.tmp, "admin.sock"))
        self.assertEqual(stat.S_IMODE(made.st_mode), 0o600)
        if owner is not None:
            import pwd
            self.assertEqual(made.st_uid, pwd.getpwnam("nobody").pw_uid)
        self.assertEqual([msg["name"] for msg in bound], ["web", "admin"])
        self.serve("w", ["web", "admin"])
        report = self.report(1)
        self.assertEqual(report["pid"], self.os_pid(1), "LISTEN_PID and os_pid are the program's pid")
        self.assertEqual((report["names"], report["families"], report["listening"], report["argv"]),
                         (["web", "admin"], ["AF_INET", "AF_UNIX"], [1, 1], ["--fd", "3"]))
        self.assertEqual(report["ports"][0], int(web["address"].rpartition(":")[2]))
        self.assertEqual(report["reuseport"], [1, 0], "SO_REUSEPORT where it was asked for")
        self.assertEqual(self.m.info("w")["sockets"], ["web", "admin"])
        self.assertEqual(ask(web["address"]), self.os_pid(1))
        self.assertEqual(ask(admin["address"]), self.os_pid(1))
        os.kill(self.os_pid(1), signal.SIGKILL)
        self.rec.wait_for("spawn", pid=2)
        self.report(2)
        self.assertEqual(ask(web["address"]), self.os_pid(2), "the same socket, answered by the respawn")
        self.assertEqual([(s["name"], s["address"], s["jobs"]) for s in self.m.sockets()],
                         [("web", web["address"], ["default.w"]), ("admin", admin["address"], ["default.w"])])
        with self.assertRaisesRegex(gaffer.ProcessConflict, "socket 'web' is in use by default.w"):
            self.m.remove_socket("web")
        self.m.unload("w")
        self.rec.wait_for("exit", pid=2)
        self.m.remove_socket("web")
        with self.assertRaises(ConnectionRefusedError):
            ask(web["address"])
        self.m.remove_socket("admin")
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "admin.sock")), "the socket file it made is removed")
        self.assertEqual(self.m.sockets(), [])

    def test_bad_sockets_are_refused_in_one_line_and_nothing_is_left_bound(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            with self.assertRaisesRegex(gaffer.ProcessError, r"^cannot bind socket 'web' to tcp://127\.0\.0\.1:%d: "
                                                             r"\[Errno 98\] Address already in use$" % port):
                self.m.add_socket("web", "tcp://127.0.0.1:%d" % port)
        for address, message in (("127.0.0.1:80", "a socket address is tcp://HOST:PORT"),
                                 ("tcp://127.0.0.1:99999", "a socket address is"), ("unix:", "a socket address is"),
                                 ("tcp://[::1:80", "a socket address is")):
            with self.subTest(address=address), self.assertRaisesRegex(ValueError, message):
                self.m.add_socket("web", address)
        self.assertEqual(self.m.sockets(), [], "nothing half-bound")
        path = os.path.join(self.tmp, "u.sock")
        with socket.socket(socket.AF_UNIX) as live:
            live.bind(path)
            live.listen(1)
            with self.assertRaisesRegex(gaffer.ProcessError, r"cannot bind socket 'u' to unix:%s: \[Errno 98\] a "
                                                             r"process listens on it" % re.escape(path)):
                self.m.add_socket("u", "unix:" + path)
        self.assertTrue(os.path.exists(path), "a socket file in use is left alone")
        self.m.add_socket("u", "unix:" + path)  # stale now: nothing listens on it, so it is replaced
        self.m.remove_socket("u")
        with open(path, "w"):
            pass
        with self.assertRaisesRegex(gaffer.ProcessError, "it exists and is not a socket"):
            self.m.add_socket("u", "unix:" + path)
        self.assertTrue(os.path.isfile(path), "a file that is not a socket is never removed")
        with self.assertRaisesRegex(ValueError, "job 'w' uses the socket 'nope', which the manager does not hold"):
            self.serve("w", ["nope"])
        web = self.m.add_socket("web", "tcp://127.0.0.1:0")
        port = int(web["address"].rpartition(":")[2])
        with self.assertRaisesRegex(ValueError, r"ready 'tcp:%d' checks port %d, which the manager's socket holds: "
                                                r".* Use notify, output: or a port" % (port, port)):
            self.serve("w", ["web"], ready="tcp:%d" % port)
        with self.assertRaisesRegex(gaffer.ProcessConflict, "socket 'web' is held already"):
            self.m.add_socket("web", "tcp://127.0.0.1:0")
        self.assertEqual(self.m.jobs(), [], "nothing loaded")
        with self.assertRaisesRegex(gaffer.ProcessNotFound, "socket 'nope' not found"):
            self.m.remove_socket("nope")

    def test_an_on_demand_job_listens_and_starts_at_its_first_connection(self):
        with self.assertRaisesRegex(ValueError, "on_demand needs sockets"):
            gaffer.ProcessConfig("w", PY, on_demand=True)
        web = self.m.add_socket("web", "tcp://127.0.0.1:0")
        self.serve("w", ["web"], on_demand=True, numprocesses=2)
        state = lambda: {job["name"]: job["state"] for job in self.m.status()}["default.w"]
        self.assertEqual((self.m.pids("w"), state(), self.rec.matching("spawn")), ([], "listening", []))
        answer = ask(web["address"])  # waits in the backlog for a process it started
        self.assertIn(answer, [self.os_pid(pid) for pid in self.m.pids("w")])
        self.assertEqual(len(self.m.pids("w")), 2, "at its configured count")
        self.m.stop_job("w")
        self.rec.wait_for("exit", count=2)  # a stopping server drains: it may still accept meanwhile
        self.assertEqual((self.m.pids("w"), state()), ([], "stopped"))
        self.m.start_job("w")
        self.assertEqual((self.m.pids("w"), state()), ([], "listening"), "listening again, nothing spawned")
        self.assertIn(ask(web["address"]), [self.os_pid(pid) for pid in self.m.pids("w")])
        self.m.stop_job("w")
        self.m.start_job("w")
        self.assertEqual(state(), "listening")
        self.m.stop()  # while it listens: the watch on its socket ends with the loop
        self.m.run()
        with self.assertRaises(ConnectionRefusedError):
            ask(web["address"])

    def test_sockets_count_the_connections_waiting_to_be_accepted(self):
        if gaffer._tcp_listeners() is None:
            self.skipTest("neither sock_diag nor /proc/net/tcp here")
        web = self.m.add_socket("web", "tcp://127.0.0.1:0")
        _, where = gaffer._socket_address(web["address"])
        clients = [socket.create_connection(where, timeout=TIMEOUT) for _ in range(3)]
        try:  # no job: the kernel completes each handshake and queues it
            wait_until(lambda: self.m.sockets()[0]["waiting"] == 3, what="3 connections waiting")
        finally:
            for client in clients:
                client.close()

    def test_ipv6(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6 here")
        try:
            web = self.m.add_socket("web", "tcp://[::1]:0")
        except gaffer.ProcessError as exc:
            self.skipTest("no ::1 here: %s" % exc.reason)
        self.assertRegex(web["address"], r"^tcp://\[::1\]:\d+$")
        self.serve("w", ["web"])
        self.assertEqual(self.report(1)["families"], ["AF_INET6"])
        self.assertEqual(ask(web["address"]), self.os_pid(1))

    def test_reloads_updates_and_restarts_over_a_held_socket_lose_no_connection(self):
        web = self.m.add_socket("web", "tcp://127.0.0.1:0")
        self.serve("w", ["web"], ready="notify", env={"DELAY": "0.5"}, ready_timeout=30)
        config = self.m.get("w")
        self.m.wait_ready("w", TIMEOUT)
        errors, answers, stop = [], [], threading.Event()

        def hammer():
            while not stop.is_set():
                try:
                    answers.append(ask(web["address"]))
                except (OSError, ValueError) as exc:
                    errors.append(exc)

        client = threading.Thread(target=hammer)
        client.start()
        started = [self.m.get_process(self.m.pids("w")[0]).create_time]
        try:
            for round_, how in enumerate(("reload", "update", "restart", "reload", "update")):
                old = self.m.pids("w")[0]
                if how == "reload":
                    self.m.reload("w")
                elif how == "update":  # a new version: another env, the same socket
                    config = gaffer.ProcessConfig.from_dict(dict(config.to_dict(), env={"DELAY": "0.5",
                                                                                        "VERSION": str(round_)}))
                    self.m.update(config)
                else:
                    self.m.restart()
                wait_until(lambda: len(self.m.pids("w")) == 1 and self.m.pids("w")[0] != old
                           and self.m.get_process(self.m.pids("w")[0]).status == "ready", what="reload %d" % round_)
                self.assertGreater(self.m.get_process(self.m.pids("w")[0]).create_time, started[-1])
                started.append(self.m.get_process(self.m.pids("w")[0]).create_time)
                new = self.os_pid(self.m.pids("w")[0])
                wait_until(lambda: answers and answers[-1] == new, what="the client served by the new process")
        finally:
            stop.set()
            client.join(TIMEOUT)
        self.assertEqual(errors, [], "no connection refused or reset during five replacements")
        self.assertGreater(len(answers), 20)

    def test_crashes_between_requests_lose_no_connection(self):
        web = self.m.add_socket("web", "tcp://127.0.0.1:0")
        self.serve("w", ["web"], env={"CRASH_AFTER": "25"}, min_uptime=0)
        answers = [ask(web["address"]) for _ in range(130)]  # queued in the backlog while a respawn starts
        self.assertEqual(len(answers), 130, "every request answered")
        self.assertGreaterEqual(len(set(answers)), 6, "by a new process after each crash")
        self.assertGreaterEqual(self.m.info("w")["restarts"], 5)

    @unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0, "binding a port below 1024 needs root")
    def test_a_port_below_1024_bound_as_root_serves_a_job_run_as_nobody(self):
        python = python_for("nobody")
        if python is None:
            self.skipTest("no Python interpreter here that the user nobody can run")
        for port in range(1023, 900, -1):
            try:
                web = self.m.add_socket("web", "tcp://127.0.0.1:%d" % port)
                break
            except gaffer.ProcessError:
                continue
        else:
            self.skipTest("no free port below 1024")
        self.m.load(gaffer.ProcessConfig("w", python, args=["-S", "-c", textwrap.dedent(SD_LISTEN_SERVER)],
                                         sockets=["web"], uid="nobody", redirect_output=["out"], graceful_timeout=2))
        import pwd
        report = self.report(1)
        nobody = pwd.getpwnam("nobody")
        self.assertEqual((report["pid"], report["uid"]), (self.os_pid(1), nobody.pw_uid),
                         "the launcher, root, binds nothing and drops to the job's user before the exec")
        self.assertEqual(report["groups"], sorted(set(os.getgrouplist("nobody", nobody.pw_gid))))
        if self.m._containment.cgroups is not None:
            self.assertTrue(report["cgroup"].endswith("/default.w/1"), report["cgroup"])
        self.assertEqual(ask(web["address"]), self.os_pid(1))


class FallbackSocketTest(SocketTest):
    no_pidfd = no_cgroup = True


# -- Readiness ------------------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LISTEN_LATE = """
    import os, socket, time
    time.sleep(0.3)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", int(os.environ["PORT"])))
    server.listen(16)
    while True:
        conn, _ = server.accept()
        conn.recv(1000)
        conn.sendall(b"HTTP/1.0 %s OK\\r\\nContent-Length: 0\\r\\n\\r\\n" % os.environ.get("STATUS", "200").encode())
        conn.close()
"""


class ReadinessTest(ManagerTestCase):

    def assert_ready_after(self, name, seconds):
        self.m.wait_ready(name, timeout=TIMEOUT)
        msg = self.rec.wait_for("ready", name="default." + name)[0]
        self.assertGreaterEqual(msg["elapsed"], seconds * 0.9, msg)
        self.assertEqual(self.rec.matching("job.default.%s.ready" % name)[0]["pid"], msg["pid"])
        self.assertEqual(self.rec.matching("proc.%d.ready" % msg["pid"])[0]["os_pid"], msg["os_pid"])
        process = self.m.get_process(msg["pid"])
        self.assertEqual((process.ready, process.status, process.info["ready"]), (True, "ready", True))
        self.assertEqual(self.m.info(name)["ready"], 1)
        return msg

    def test_without_a_check_a_process_is_ready_at_once(self):
        self.load("w", 2)
        self.assertEqual(self.m.info("w")["ready"], 2)
        self.assertEqual([m["pid"] for m in self.rec.matching("ready")], [1, 2])
        names = self.rec.names()
        self.assertLess(names.index("proc.1.spawn"), names.index("proc.1.ready"))

    def test_tcp_and_http_checks_wait_for_the_port(self):
        cases = [("tcp", "tcp:$PORT", {}), ("tcp-host", "tcp:127.0.0.1:$PORT", {}),
                 ("http", "http://127.0.0.1:${PORT}/health", {}), ("failing", "http://127.0.0.1:$PORT/",
                                                                  {"STATUS": "503"})]
        ports = {}
        for name, check, env in cases:  # all at once: each listens 0.3 s after its spawn
            ports[name] = free_port()
            self.load(name, code=LISTEN_LATE, ready=check, env={"PORT": str(ports[name]), **env})
            pid = self.m.pids(name)[0]
            self.assertEqual(self.m.get_process(pid).status, "starting")
            self.assertEqual(self.m.info(name)["ready"], 0)
        for name, check, env in cases[:3]:
            with self.subTest(check=check):
                self.assert_ready_after(name, 0.3)
                socket.create_connection(("127.0.0.1", ports[name]), timeout=TIMEOUT).close()  # open when ready
        with self.assertRaisesRegex(TimeoutError, r"'default.failing' is not ready after 0.5s: 0 of 1"):
            self.m.wait_ready("failing", timeout=0.5)

    def test_a_rollout_cannot_be_fooled_by_the_process_it_replaces(self):
        serve = """
            import os, socket, sys, time
            time.sleep(float(sys.argv[1]))
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # old and new may listen at once
            server.bind(("127.0.0.1", int(os.environ["PORT"])))
            server.listen(64)
            while True:
                conn, _ = server.accept()
                conn.sendall(sys.argv[2].encode())
                conn.close()
        """
        port = free_port()
        args = lambda delay, version: ["-S", "-c", textwrap.dedent(serve), str(delay), version]  # noqa: E731
        self.load("w", args=args(0, "v1"), port=port, ready="tcp:$PORT", ready_timeout=1.0)
        self.m.wait_ready("w", TIMEOUT)
        answers, done = [], threading.Event()

        def client():  # the service, as its users see it: answered all along
            while not done.is_set():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                        answers.append(sock.recv(16).decode())
                except OSError as exc:
                    answers.append(repr(exc))
        reader = threading.Thread(target=client)
        reader.start()
        self.addCleanup(reader.join)
        self.addCleanup(done.set)
        wait_until(lambda: answers, what="a first answer")
        self.m.update(gaffer.ProcessConfig("w", PY, args=SLEEP, port=port, ready="tcp:$PORT", ready_timeout=1.0,
                                           graceful_timeout=2))  # a command that never listens
        failed = self.rec.wait_for("rollout_failed")[0]
        self.assertIn("was not ready within 1s", failed["reason"])
        self.assertEqual(self.rec.matching("ready", pid=2), [], "never counted ready")
        self.assertEqual(self.m.pids("w"), [1], "the old process kept its place")
        self.assertEqual(set(answers), {"v1"}, "the old process served all along")
        self.m.reload("w")  # its own command again, which listens only after 0.5 s
        self.m.update(gaffer.ProcessConfig("w", PY, args=args(0.5, "v2"), port=port, ready="tcp:$PORT",
                                           ready_timeout=5.0, graceful_timeout=2))
        ready = self.rec.wait_for("rollout")[0] and self.rec.matching("ready", name="default.w")[-1]
        self.assertGreaterEqual(ready["elapsed"], 0.45, "ready once it listened, not when the old one answered")
        wait_until(lambda: answers[-1] == "v2", what="the new version serving")  # (with no connection lost:
        done.set()                                                                # SocketTest, held sockets)
        reader.join()

    def test_output_check_reads_lines_of_the_redirected_output(self):
        code = """
            import os, time
            os.write(1, b"booting\\nlisten")
            time.sleep(0.3)
            os.write(1, b"ing on 8080\\n")
            time.sleep(60)
        """
        self.load("w", code=code, ready=r"output:listening on \d+", redirect_output=["out"])
        self.assert_ready_after("w", 0.3)
        self.assertEqual(self.output[1], b"booting\nlistening on 8080\n", "listeners still get every byte")

    def test_notify_check_speaks_sd_notify(self):
        code = """
            import os, socket, time
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.sendto(b"STATUS=warming up", os.environ["NOTIFY_SOCKET"])
            time.sleep(0.3)
            sock.sendto(b"READY=1\\nSTATUS=serving", os.environ["NOTIFY_SOCKET"])
            time.sleep(60)
        """
        self.load("w", code=code, ready="notify")
        path = self.m.get_process(1).env.get("NOTIFY_SOCKET")  # set at spawn, not in the job's env
        self.assertIsNone(path)
        self.assert_ready_after("w", 0.3)
        info = self.m.get_process(1).info
        self.assertEqual(info["notify_status"], "serving")
        notify_dir = self.m._checks._notify_dir
        self.assertEqual(len(os.listdir(notify_dir)), 1)
        self.m.stop_job("w")
        self.rec.wait_for("exit", pid=1)
        self.assertEqual(os.listdir(notify_dir), [], "the socket goes with its process")

    def test_a_notify_flood_does_not_hold_the_loop(self):
        code = """
            import os, socket
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
            for _ in range(3):  # four senders: faster than one reader
                if os.fork() == 0:
                    break
            while True:
                try:
                    sock.sendto(b"STATUS=" + b"x" * 1000, os.environ["NOTIFY_SOCKET"])
                except OSError:
                    pass
        """
        self.load("flood", code=code, ready="notify")
        self.m.wait_ready("flood", timeout=TIMEOUT)
        started = time.monotonic()
        self.load("other")
        self.assertEqual(self.m.pids("other"), [2])
        self.assertLess(time.monotonic() - started, 5, "the loop still serves calls")
        wait_until(lambda: self.m.get_process(1).info["notify_status"] == "x" * 1000, what="a STATUS= read")

    def test_delay_check(self):
        self.load("w", ready="delay:0.3")
        self.assert_ready_after("w", 0.3)

    def test_callable_check_runs_off_the_loop_thread(self):
        calls = []

        def check(process):
            calls.append((threading.current_thread().name, process.pid))
            return len(calls) >= 3

        self.load("w", ready=check)
        self.m.wait_ready("w", timeout=TIMEOUT)
        self.assertEqual(len(calls), 3)
        self.assertTrue(all(name.startswith("gaffer-check") and pid == 1 for name, pid in calls), calls)

    def test_a_process_not_ready_in_time_is_replaced(self):
        self.load("w", code="import time; print('up', flush=True); time.sleep(60)", ready="output:never",
                  redirect_output=["out"], ready_timeout=0.3)
        msg = self.rec.wait_for("ready_timeout")[0]
        self.assertEqual((msg["name"], msg["pid"]), ("default.w", 1))
        self.rec.wait_for("exit", pid=1)
        self.rec.wait_for("spawn", pid=2)
        self.assertEqual(self.m.info("w")["ready"], 0)

    def test_wait_ready_and_its_errors(self):
        self.m.load(gaffer.ProcessConfig("w", PY, args=SLEEP, ready="delay:0.3", graceful_timeout=2), wait=True)
        self.assertEqual(self.m.info("w")["ready"], 1, "load(wait=True) returns once ready")
        self.load("never", code="import time; time.sleep(60)", ready="output:x", redirect_output=["out"])
        with self.assertRaisesRegex(TimeoutError, r"'default.never' is not ready after 0.2s: 0 of 1 processes"):
            self.m.wait_ready("never", timeout=0.2)
        with self.assertRaises(gaffer.ProcessNotFound):
            self.m.wait_ready("nope")
        for action, error, message in ((self.m.stop_job, gaffer.ProcessError, "is stopped"),
                                       (self.m.unload, gaffer.ProcessNotFound, "was unloaded")):
            with self.subTest(action=action.__name__):
                if action == self.m.unload:
                    self.m.start_job("never")
                threading.Timer(0.1, action, ("never",)).start()
                with self.assertRaisesRegex(error, message):
                    self.m.wait_ready("never", timeout=TIMEOUT)
        seen = []

        def on_load(evtype, msg):
            try:
                self.m.wait_ready("w")
            except RuntimeError as exc:
                seen.append(str(exc))

        self.m.events.subscribe("load", on_load)
        self.load("other")
        self.assertIn("would wait for itself", seen[0])

    def test_a_dependency_chain_loaded_in_reverse_starts_in_order_and_stops_in_reverse(self):
        def job(name, *deps):
            return gaffer.ProcessConfig(name, PY, args=SLEEP, ready="delay:0.1", depends_on=list(deps),
                                        graceful_timeout=2)

        self.m.load(job("web", "app"))
        self.assertEqual((self.m.pids("web"), self.m.info("web")["waiting_for"]), ([], ["default.app"]))
        self.m.load(job("app", "default.db"))
        self.assertEqual(self.m.info("app")["waiting_for"], ["default.db"])
        self.m.load(job("db"), wait=True)
        self.m.wait_ready("web", timeout=TIMEOUT)
        self.assertEqual(self.m.info("web")["waiting_for"], [])
        names = self.rec.names()
        for first, then in (("job.default.db.ready", "job.default.app.spawn"),
                            ("job.default.app.ready", "job.default.web.spawn")):
            self.assertLess(names.index(first), names.index(then))
        started = time.monotonic()
        self.m.stop()
        runner = threading.Thread(target=self.m.run)
        runner.start()
        runner.join(TIMEOUT)
        self.assertLess(time.monotonic() - started, 10)
        names = self.rec.names()
        for first, then in (("job.default.web.exit", "job.default.app.stop"),
                            ("job.default.app.exit", "job.default.db.stop")):
            self.assertLess(names.index(first), names.index(then), "dependents are gone first")

    def test_dependency_cycles_and_self_dependencies_are_refused(self):
        self.m.load(gaffer.ProcessConfig("a", PY, args=SLEEP, depends_on=["b"]))
        self.m.load(gaffer.ProcessConfig("b", PY, args=SLEEP, depends_on=["s.c"]), start=False)
        with self.assertRaisesRegex(ValueError, r"cycle: s.c -> default.a -> default.b -> s.c"):
            self.m.load(gaffer.ProcessConfig("c", PY, args=SLEEP, depends_on=["default.a"]), sessionid="s")
        with self.assertRaisesRegex(ValueError, r"cycle: default.b -> default.a -> default.b"):
            self.m.update(gaffer.ProcessConfig("b", PY, args=SLEEP, depends_on=["a"]))
        self.assertEqual(self.m.get("b").depends_on, ["s.c"], "a refused update changes nothing")
        self.assertEqual(self.m.jobs(), ["default.a", "default.b"])
        with self.assertRaisesRegex(ValueError, "job 'a' cannot depend on itself"):
            gaffer.ProcessConfig("a", PY, depends_on="a")
        self.assertEqual(gaffer.ProcessConfig("a", PY, depends_on="db, s.cache").depends_on, ["db", "s.cache"])
        self.assertEqual(self.m.pids(), [], "a waits for b, which is stopped")

    SHARED_PORT = """
        import os, socket, time
        time.sleep(0.3)  # a slow start: a replacement that is not ready yet must not take over
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        server.bind(("127.0.0.1", int(os.environ["PORT"])))
        server.listen(64)
        print("listening", flush=True)
        while True:
            server.accept()[0].close()
    """

    def test_a_rolling_reload_never_closes_the_port(self):
        port = free_port()
        self.load("web", 2, code=self.SHARED_PORT, env={"PORT": str(port)}, ready="output:listening",
                  redirect_output=["out"])
        self.m.wait_ready("web", timeout=TIMEOUT)
        refused, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
                except ConnectionRefusedError as exc:  # the port was closed
                    refused.append(exc)
                except ConnectionResetError:  # queued at an old process as it exited: SO_REUSEPORT does that
                    pass

        clients = threading.Thread(target=client)
        clients.start()
        try:
            self.m.reload("web")
            self.rec.wait_for("rollout")
        finally:
            stop.set()
            clients.join()
        self.assertEqual(refused, [], "a client always found the port open")
        self.assertEqual(self.m.pids("web"), [3, 4])
        names = self.rec.names()
        self.assertLess(names.index("proc.3.ready"), names.index("proc.1.stop"), "an old one goes once a new one is ready")
        self.assertLess(names.index("proc.1.stop"), names.index("proc.4.spawn"), "one at a time")

    def test_a_failed_rollout_keeps_the_old_processes_and_config(self):
        self.load("w", 2, code="import time; print('up', flush=True); time.sleep(60)", ready="output:up",
                  redirect_output=["out"])
        self.m.wait_ready("w", timeout=TIMEOUT)
        broken = gaffer.ProcessConfig("w", PY, args=["-S", "-c", "import time; time.sleep(60)"], numprocesses=2,
                                      ready="output:up", redirect_output=["out"], ready_timeout=0.3,
                                      graceful_timeout=2)
        self.m.update(broken)
        msg = self.rec.wait_for("rollout_failed")[0]
        self.assertIn("was not ready within 0.3s", msg["reason"])
        self.rec.wait_for("exit", pid=3)
        self.assertEqual(self.m.pids("w"), [1, 2], "the old ones keep serving")
        self.assertEqual(self.m.get("w").args, ["-S", "-c", "import time; print('up', flush=True); time.sleep(60)"])
        crashing = gaffer.ProcessConfig("w", PY, args=["-S", "-c", "import sys; sys.exit(1)"], numprocesses=2,
                                        ready="output:up", redirect_output=["out"], graceful_timeout=2)
        self.m.update(crashing)
        self.assertIn("exited before it was ready", self.rec.wait_for("rollout_failed", count=2)[1]["reason"])
        self.assertEqual(self.m.pids("w"), [1, 2])
        restarted = threading.Event()
        self.m.restart(lambda manager: restarted.set())
        self.assertTrue(restarted.wait(TIMEOUT), "a rolling restart calls back once the old are reaped")
        self.assertEqual(len(self.m.pids("w")), 2)
        self.assertNotIn(1, self.m.pids("w"))

    def test_rollouts_interrupted_by_a_reload_a_scale_a_listener_and_a_stop(self):
        slow = "import time; time.sleep(0.15); print('up', flush=True); time.sleep(60)"
        self.load("w", 2, code=slow, ready="output:up", redirect_output=["out"])
        self.m.wait_ready("w", timeout=TIMEOUT)
        self.m.reload("w")
        self.m.reload("w")  # the first rollout gives way to the second
        self.assertIn("replaced by a newer rollout", self.rec.wait_for("rollout_failed")[0]["reason"])
        self.m.scale("w", "-1")  # mid-rollout: one old one goes now
        self.rec.wait_for("rollout")
        self.m.wait_ready("w", timeout=TIMEOUT)
        self.assertEqual(len(self.m.pids("w")), 1)
        self.assertEqual(len(self.rec.matching("rollout")), 1)

        def meddle(evtype, msg):  # a listener reloads on every ready: each rollout replaces the last
            if len(self.rec.matching("ready", name="default.w")) < 6:
                self.m.reload("w")

        self.m.events.subscribe("job.default.w.ready", meddle)
        self.m.reload("w")
        wait_until(lambda: len(self.rec.matching("ready", name="default.w")) >= 6)
        self.m.events.unsubscribe("job.default.w.ready", meddle)
        self.m.wait_ready("w", timeout=TIMEOUT)
        self.m.reload("w")
        stopped = time.monotonic()
        self.m.stop()  # mid-rollout
        runner = threading.Thread(target=self.m.run)
        runner.start()
        runner.join(TIMEOUT)
        self.assertFalse(runner.is_alive())
        self.assertLess(time.monotonic() - stopped, 10)

    def test_wait_ready_says_what_a_job_waits_for(self):
        self.m.load(gaffer.ProcessConfig("web", PY, args=SLEEP, depends_on=["db"]))
        with self.assertRaisesRegex(TimeoutError, r"0 of 1 processes ready; waiting for default.db"):
            self.m.wait_ready("web", timeout=0.1)
        self.assertEqual(self.m.not_ready(), ["default.web"])
        self.m.load(gaffer.ProcessConfig("db", PY, args=SLEEP, graceful_timeout=2))
        self.m.wait_ready("web", timeout=TIMEOUT)
        self.m.unload("db")
        self.assertEqual(len(self.m.pids("web")), 1, "running dependents are not stopped")
        self.m.kill(self.m.pids("web")[0], "KILL")
        self.rec.wait_for("exit", name="default.web")
        self.assertEqual((self.m.pids("web"), self.m.info("web")["waiting_for"]), ([], ["default.db"]),
                         "a respawn waits for the dependency again")

    def test_update_restarts_only_for_what_changed(self):
        def config(**settings):
            return gaffer.ProcessConfig("w", PY, **{"args": SLEEP, "numprocesses": 2, "graceful_timeout": 2,
                                                    **settings})

        self.m.load(config())
        self.m.update(config())
        self.assertEqual(self.m.pids("w"), [1, 2], "nothing differs: nothing restarted")
        self.m.update(config(numprocesses=3))
        self.assertEqual(self.m.pids("w"), [1, 2, 3], "only the count: it scales")
        self.m.update(config(numprocesses=3, graceful_timeout=5, stop_signal="INT", flapping={"attempts": 3}))
        self.assertEqual(self.m.pids("w"), [1, 2, 3], "read after spawn: applied in place")
        self.assertEqual(self.m.get_process(1).graceful_timeout, 5.0)
        self.assertEqual(self.m.get_process(1).config.stop_signal, signal.SIGINT)
        self.m.update(config(numprocesses=3, graceful_timeout=5, env={"NEW": "1"}))
        self.assertEqual(self.m.pids("w"), [4, 5, 6], "used to spawn: replaced")
        self.assertEqual(self.m.get_process(4).env["NEW"], "1")

    def test_bad_checks_are_refused_and_nothing_is_loaded(self):
        cases = [
            (dict(ready="ftp://x"), "ready: unknown check 'ftp://x'"),
            (dict(ready="output:(", redirect_output=["out"]), "bad regex"),
            (dict(ready="output:ok"), "set redirect_output"),
            (dict(ready="tcp:http"), "tcp:PORT"),
            (dict(ready="delay:soon"), "delay:SECONDS"),
            (dict(ready=42), "ready must be"),
            (dict(ready="delay:1", ready_timeout=-1), "ready_timeout must be >= "),
        ]
        for settings, message in cases:
            with self.subTest(settings=settings), self.assertRaisesRegex(ValueError, message):
                self.m.load(gaffer.ProcessConfig("w", PY, **settings))
        self.assertEqual(self.m.jobs(), [])



# -- Restart policies ------------------------------------------------------------------

class DependencyConditionTest(ManagerTestCase):
    """depends_on with conditions (started, ready, healthy, completed, completed_successfully), one-shot
    jobs that end completed or failed, a dependent blocked by what can no longer happen, and dependents
    restarted with what they depend on."""

    def oneshot(self, name, code, **settings):
        """A job whose process runs `code` once: restart never."""
        return self.load(name, code=code, restart="never", **settings)

    def test_a_one_shot_job_ends_completed_or_failed_with_its_last_run(self):
        self.oneshot("ok", "pass")
        self.oneshot("bad", "import sys; sys.exit(3)", numprocesses=2)
        self.rec.wait_for("job.default.ok.completed")
        self.rec.wait_for("job.default.bad.failed")
        ok, bad = self.m.info("ok"), self.m.info("bad")
        self.assertEqual((ok["state"], ok["active"], ok["running"]), ("completed", False, 0))
        self.assertEqual((bad["state"], bad["last_run"]["exit_status"]), ("failed", 3))
        run = ok["last_run"]
        self.assertEqual((run["exit_status"], run["term_signal"]), (0, 0))
        self.assertLessEqual(run["start"], run["end"])
        self.assertLess(abs(run["end"] - time.time()), 60, "epoch seconds")
        states = {job["name"]: job["state"] for job in self.m.status()}
        self.assertEqual((states["default.ok"], states["default.bad"]), ("completed", "failed"))
        self.assertEqual(self.rec.matching("job.default.ok.stop"), [], "it ended: completed, not stopped")
        self.m.start_job("ok")  # runs it again
        self.rec.wait_for("job.default.ok.completed", count=2)
        self.assertEqual(len(self.rec.matching("spawn", name="default.ok")), 2)

    def test_a_migration_gates_the_app_until_it_completed_successfully(self):
        gate = os.path.join(self.tmp, "go")
        self.load("app", depends_on={"migrate": "completed_successfully"})
        self.oneshot("migrate", "import os, sys, time\nwhile not os.path.exists(%r): time.sleep(0.01)" % gate)
        self.rec.wait_for("spawn", name="default.migrate")
        info = self.m.info("app")
        self.assertEqual((self.m.pids("app"), info["waiting_for"], info["blocked"], info["state"]),
                         ([], ["default.migrate"], None, "starting"))
        open(gate, "w").close()
        self.rec.wait_for("spawn", name="default.app")
        names = self.rec.names()
        self.assertLess(names.index("job.default.migrate.completed"), names.index("job.default.app.spawn"))
        self.assertEqual(self.m.info("app")["waiting_for"], [])

    def test_a_dependency_that_fails_blocks_its_dependent_until_it_is_started_again(self):
        flag = os.path.join(self.tmp, "fail")
        open(flag, "w").close()
        self.load("app", depends_on={"migrate": "completed_successfully"})
        self.oneshot("migrate", "import os, sys; sys.exit(3 if os.path.exists(%r) else 0)" % flag)
        blocked = self.rec.wait_for("job.default.app.blocked")[0]
        self.assertEqual(blocked["reason"], "default.migrate failed with exit 3")
        info = self.m.info("app")
        self.assertEqual((info["state"], info["blocked"], info["waiting_for"], info["running"]),
                         ("blocked", "default.migrate failed with exit 3", ["default.migrate"], 0))
        row = next(job for job in self.m.status() if job["name"] == "default.app")
        self.assertEqual((row["state"], row["blocked"]), ("blocked", "default.migrate failed with exit 3"))
        os.unlink(flag)
        self.m.start_job("migrate")  # the fix is in: its next run succeeds and unblocks the app
        self.rec.wait_for("spawn", name="default.app")
        self.assertEqual((self.m.info("app")["blocked"], self.m.info("app")["state"]), (None, "running"))

    def test_each_condition(self):
        gate = os.path.join(self.tmp, "go")
        wait_gate = "import os, time\nwhile not os.path.exists(%r): time.sleep(0.01)\n" % gate
        # started: as soon as it spawned, before it is ready
        self.load("slow", code=wait_gate + "print('up', flush=True)\ntime.sleep(60)", ready="output:up",
                  redirect_output=["out"])
        self.load("s", depends_on={"slow": "started"})
        self.load("r", depends_on={"slow": "ready"})
        self.rec.wait_for("spawn", name="default.s")
        self.assertEqual(self.m.pids("r"), [], "ready: not before it is ready")
        open(gate, "w").close()
        self.rec.wait_for("spawn", name="default.r")
        # completed: whatever the status; completed_successfully: not with a failure (blocked)
        self.oneshot("once", "import sys; sys.exit(1)")
        self.load("c", depends_on={"once": "completed"})
        self.load("cs", depends_on={"once": "completed_successfully"})
        self.rec.wait_for("spawn", name="default.c")
        self.rec.wait_for("job.default.cs.blocked")
        # a job that went fatal can no longer be ready
        self.load("flappy", code="import sys; sys.exit(1)", flapping=dict(attempts=2, window=10, max_retry=0))
        self.rec.wait_for("job.default.flappy.flap")
        self.load("f", depends_on=["flappy"])
        self.assertEqual(self.rec.wait_for("job.default.f.blocked")[0]["reason"],
                         "default.flappy is fatal (it was flapping)")

    def test_healthy_waits_for_a_passing_health_check(self):
        port = free_port()
        flag = os.path.join(self.tmp, "healthy")
        server = """
            import os, socket, time
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", %d)); s.listen(8)
            while True:
                c, _ = s.accept()
                c.recv(1024)
                ok = os.path.exists(%r)
                c.sendall(b"HTTP/1.0 %%s\\r\\nContent-Length: 0\\r\\n\\r\\n" %% (b"200 OK" if ok else b"503 No"))
                c.close()
        """ % (port, flag)
        self.load("db", code=server, health="http://127.0.0.1:%d/" % port, health_interval=0.1, health_retries=1000)
        self.load("app", depends_on={"db": "healthy"})
        self.rec.wait_for("ready", name="default.db")
        self.assertEqual(self.m.pids("app"), [], "ready but not yet healthy")
        open(flag, "w").close()
        self.rec.wait_for("spawn", name="default.app")

    def test_a_dependent_with_restart_follows_a_rolling_reload_of_its_dependency(self):
        self.load("db", ready="delay:0.05")
        self.load("app", depends_on={"db": {"condition": "ready", "restart": True}}, ready="delay:0.05")
        self.load("other", depends_on=["db"])
        self.rec.wait_for("ready", name="default.app")
        app_before, other_before = self.m.pids("app"), self.m.pids("other")
        self.m.reload("db")
        self.rec.wait_for("job.default.db.rollout")
        self.rec.wait_for("job.default.app.rollout")
        names = self.rec.names()
        self.assertLess(names.index("job.default.db.rollout"), names.index("job.default.app.rollout"))
        wait_until(lambda: self.m.pids("app") != app_before and len(self.m.pids("app")) == 1, TIMEOUT,
                   "app replaced by a new process")
        self.assertEqual(self.m.pids("other"), other_before, "without restart: true it keeps running")
        # stopped, then started again: the dependent follows once it is ready again
        self.m.stop_job("db")
        app_before = self.m.pids("app")
        self.m.start_job("db")
        self.rec.wait_for("job.default.app.rollout", count=2)
        self.assertNotEqual(self.m.pids("app"), app_before)
        restarted = threading.Event()
        self.m.restart(lambda manager: restarted.set())  # every job replaced: the app once, not a second time
        self.assertTrue(restarted.wait(TIMEOUT))
        self.rec.wait_for("job.default.app.rollout", count=3)
        self.assertEqual(self.rec.matching("rollout_failed"), [])

    def test_bad_conditions_are_refused_and_nothing_is_loaded(self):
        for depends_on, message in [
            ({"db": "done"}, "depends_on: unknown condition 'done' for 'db': give started, ready, healthy, "
                             "completed or completed_successfully"),
            ({"db": {"condition": "ready", "when": 1}}, "depends_on: 'db' takes a condition"),
            ({"db": {"restart": "yes"}}, "depends_on: db's restart must be True or False"),
            ("db:ready:later", "depends_on: give JOB, JOB:CONDITION or JOB:CONDITION:restart, got 'db:ready:later'"),
            (3, "depends_on must be a list of job names or a mapping"),
        ]:
            with self.subTest(depends_on=depends_on), self.assertRaisesRegex(ValueError, re.escape(message)):
                gaffer.ProcessConfig("w", PY, depends_on=depends_on)
        self.assertEqual(gaffer.ProcessConfig("w", PY, depends_on="db, m:completed:restart").depends_on,
                         {"db": {"condition": "ready", "restart": False},
                          "m": {"condition": "completed", "restart": True}}, "the INI form")
        config = gaffer.ProcessConfig("w", PY, depends_on={"db": "healthy"})
        self.assertEqual(gaffer.ProcessConfig.from_dict(config.to_dict()).depends_on, config.depends_on)
        self.load("a", depends_on={"b": "ready"})
        with self.assertRaisesRegex(ValueError, "depends_on makes a cycle: default.b -> default.a -> default.b"):
            self.load("b", depends_on={"a": "started"})
        self.assertEqual(self.m.jobs(), ["default.a"])


class CronTest(unittest.TestCase):
    """Cron expressions read as Vixie cron and cronie read them, and their next times in local time."""

    def in_zone(self, zone):
        previous = os.environ.get("TZ")
        os.environ["TZ"] = zone
        time.tzset()

        def restore():
            if previous is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = previous
            time.tzset()
        self.addCleanup(restore)
        if zone != "UTC" and time.daylight == 0:
            self.skipTest("no time zone data for %s here" % zone)

    @staticmethod
    def utc(*fields):
        import calendar
        return calendar.timegm(fields + (0,) * (6 - len(fields)))

    def test_next_times(self):
        self.in_zone("UTC")
        friday = self.utc(2026, 12, 4, 10, 0)  # a Friday
        for expression, after, expected in [
            ("0 0 * * *", self.utc(2026, 1, 31, 12), self.utc(2026, 2, 1)),
            ("0 0 31 * *", self.utc(2026, 2, 1), self.utc(2026, 3, 31)),  # a month end: February has none
            ("0 0 30 * *", self.utc(2026, 1, 31), self.utc(2026, 3, 30)),
            ("0 0 29 2 *", self.utc(2026, 1, 1), self.utc(2028, 2, 29)),  # the next leap year
            ("@yearly", self.utc(2026, 6, 15), self.utc(2027, 1, 1)),
            ("@ANNUALLY", self.utc(2026, 6, 15), self.utc(2027, 1, 1)),
            ("@monthly", self.utc(2026, 12, 31, 23, 59), self.utc(2027, 1, 1)),
            ("@weekly", friday, self.utc(2026, 12, 6)),
            ("@daily", friday, self.utc(2026, 12, 5)),
            ("@hourly", self.utc(2026, 12, 4, 10, 0, 30), self.utc(2026, 12, 4, 11)),
            ("*/15 * * * *", self.utc(2026, 12, 4, 12, 7), self.utc(2026, 12, 4, 12, 15)),
            ("*/15 * * * *", self.utc(2026, 12, 4, 12, 15), self.utc(2026, 12, 4, 12, 30)),  # strictly after
            ("5/20 * * * *", self.utc(2026, 12, 4, 12, 7), self.utc(2026, 12, 4, 12, 25)),
            ("0 9 * * mon-fri", friday, self.utc(2026, 12, 7, 9)),
            ("0 9 * * MON-Fri", friday, self.utc(2026, 12, 7, 9)),
            ("0 0 13 * 5", friday, self.utc(2026, 12, 11)),  # both restricted: the 13th OR a Friday
            ("0 0 */10 * 5", friday, self.utc(2026, 12, 11)),  # a * day of month: the 1st, 11th... AND Friday
            ("0 0 * * 7", friday, self.utc(2026, 12, 6)),  # 7 is Sunday
            ("0 0 * * 0", friday, self.utc(2026, 12, 6)),
            ("30 4 1,15 * *", friday, self.utc(2026, 12, 15, 4, 30)),
            ("0 12 1 JAN,jul *", friday, self.utc(2027, 1, 1, 12)),
            ("0-10/5 8-9 * * *", friday, self.utc(2026, 12, 5, 8)),
        ]:
            with self.subTest(expression=expression):
                self.assertEqual(gaffer._Cron(expression).next_after(after), expected)

    def test_daylight_saving_time(self):
        self.in_zone("America/New_York")  # 2026: 2:00 -> 3:00 on March 8, 2:00 -> 1:00 on November 1
        cron = gaffer._Cron("30 2 * * *")
        skipped = cron.next_after(self.utc(2026, 3, 7, 17))
        self.assertEqual(skipped, self.utc(2026, 3, 8, 7), "2:30 does not exist: it runs when the gap ends, 3:00")
        self.assertEqual(cron.next_after(skipped), self.utc(2026, 3, 9, 6, 30), "then 2:30 EDT the next day")
        every_minute = gaffer._Cron("* * * * *")
        self.assertEqual(every_minute.next_after(self.utc(2026, 3, 8, 6, 59)), self.utc(2026, 3, 8, 7),
                         "the skipped minutes run once, at 3:00")
        self.assertEqual(every_minute.next_after(self.utc(2026, 3, 8, 7)), self.utc(2026, 3, 8, 7, 1))
        repeated = gaffer._Cron("30 1 * * *")
        first = repeated.next_after(self.utc(2026, 10, 31, 16))
        self.assertEqual(first, self.utc(2026, 11, 1, 5, 30), "1:30 EDT, the first of the two")
        self.assertEqual(repeated.next_after(first), self.utc(2026, 11, 2, 6, 30), "not 1:30 EST the same night")
        self.assertEqual(repeated.next_after(self.utc(2026, 11, 1, 6)), self.utc(2026, 11, 2, 6, 30),
                         "from inside the repeated hour too")
        self.assertEqual(gaffer._Cron("0 0 * * *").next_after(self.utc(2026, 3, 7, 12)), self.utc(2026, 3, 8, 5))

    def test_bad_expressions_are_one_line_each(self):
        for settings, message in [
            (dict(schedule="61 * * * *"), "schedule '61 * * * *': the minute field takes 0-59, got '61'"),
            (dict(schedule="* * * * * *"), "schedule '* * * * * *': give five fields (minute hour day-of-month "
                                           "month day-of-week), got 6"),
            (dict(schedule="* * * foo *"), "the month field takes 1-12 or a name (jan, feb, mar...), got 'foo'"),
            (dict(schedule="*/0 * * * *"), "the minute field's step must be a number > 0, got '0'"),
            (dict(schedule="0 0 5-1 * *"), "the day of month field's range '5-1' goes backwards"),
            (dict(schedule="@reboot"), "schedule '@reboot': unknown macro (the macros are @yearly"),
            (dict(schedule="0 0 30 2 *"), "schedule '0 0 30 2 *' matches no day: it would never run"),
            (dict(schedule=5), "schedule must be a cron expression such as '*/5 * * * *' or '@daily', got 5"),
            (dict(every="5x"), "every must be seconds or a duration such as '30s', '5m', '1h', got '5x'"),
            (dict(every=0.5), "every must be >= 1.0, got 0.5"),
            (dict(schedule="@daily", every="1h"), "give schedule or every, not both"),
            (dict(schedule="@daily", concurrency="allow"), "concurrency must be 'skip', 'queue' or 'replace'"),
            (dict(schedule="@daily", jitter=-1), "jitter must be >= 0.0, got -1"),
            (dict(catch_up=True), "catch_up needs a schedule or every"),
        ]:
            with self.subTest(settings=settings), self.assertRaisesRegex(ValueError, re.escape(message)):
                gaffer.ProcessConfig("w", PY, **settings)
        self.assertEqual(gaffer.ProcessConfig("w", PY, every="5m", jitter="10m").every, 300.0)


class ScheduleTest(ManagerTestCase):
    """Jobs with a schedule or every: a timer towards each run on the wall clock, and what a run that is
    due while the last one runs does (concurrency)."""

    def advance(self, seconds):
        """Both clocks move on, and the loop takes a turn (a call wakes it)."""
        self.wall.offset += seconds
        self.clock.offset += seconds
        self.m.pids()

    def until_next_run(self, name):
        self.advance(self.m.info(name)["next_run"] - self.wall() + 0.01)

    def gated(self, name, **settings):
        """A job whose runs each say they started (started-N) and wait for their own end-N file, so the
        test says when each one ends."""
        code = """
            import os, sys, time
            n = len(os.listdir(%r)) + 1
            open(os.path.join(%r, "started-%%d" %% n), "w").close()
            while not os.path.exists(os.path.join(%r, "end-%%d" %% n)): time.sleep(0.01)
        """ % (self.runs, self.runs, self.tmp)
        return self.load(name, code=code, **settings)

    def end_run(self, number):
        open(os.path.join(self.tmp, "end-%d" % number), "w").close()

    def setUp(self):
        super().setUp()
        self.runs = os.path.join(self.tmp, "runs")
        os.mkdir(self.runs)

    def test_a_cron_job_waits_runs_at_its_time_and_start_job_runs_it_now(self):
        self.load("tick", code="print('tick')", schedule="* * * * *", redirect_output=["out"])
        info = self.m.info("tick")
        self.assertEqual((info["state"], self.m.pids("tick"), info["last_run"]), ("scheduled", [], None))
        self.assertLessEqual(info["next_run"] - self.wall(), 60)
        self.assertEqual(info["next_run"] % 60, 0, "at the start of a minute")
        due = info["next_run"]
        self.until_next_run("tick")
        self.rec.wait_for("job.default.tick.completed")
        info = self.m.info("tick")
        self.assertEqual((info["state"], info["last_run"]["exit_status"], info["next_run"]), ("scheduled", 0, due + 60))
        self.assertEqual(self.m.logs("tick")[-1]["line"], "tick", "each run is a process, with its output")
        self.m.start_job("tick")  # now
        self.rec.wait_for("job.default.tick.completed", count=2)
        self.assertEqual(len(self.rec.matching("spawn", name="default.tick")), 2)
        self.assertEqual(self.m.info("tick")["next_run"], due + 60, "a run by hand moves no scheduled one")
        self.m.stop_job("tick")
        self.assertEqual((self.m.info("tick")["state"], self.m.info("tick")["next_run"]), ("stopped", None))
        self.advance(120)
        self.assertEqual(len(self.rec.matching("spawn", name="default.tick")), 2, "stopped: no run")

    def test_every_runs_at_start_then_at_fixed_steps_and_a_failed_run_says_so(self):
        self.load("beat", code="import sys; sys.exit(4)", every="30s")
        self.rec.wait_for("job.default.beat.failed")
        first = self.m.info("beat")
        self.assertEqual((first["state"], first["last_run"]["exit_status"]), ("scheduled", 4))
        start = first["next_run"] - 30
        self.until_next_run("beat")
        self.rec.wait_for("job.default.beat.failed", count=2)
        self.assertAlmostEqual(self.m.info("beat")["next_run"], start + 60, delta=0.01, msg="fixed steps")

    def test_skip_leaves_out_a_run_due_while_the_last_one_runs(self):
        self.gated("job", every="10s")
        self.rec.wait_for("spawn", name="default.job")
        self.until_next_run("job")
        wait_until(lambda: self.m.info("job")["next_run"] > self.wall() + 5, what="the next run armed")
        self.assertEqual(len(self.rec.matching("spawn", name="default.job")), 1, "skipped")
        self.end_run(1)
        self.rec.wait_for("job.default.job.completed")
        self.assertEqual((self.m.info("job")["state"], len(os.listdir(self.runs))), ("scheduled", 1))

    def test_queue_runs_it_once_the_last_one_ended(self):
        self.gated("job", every="10s", concurrency="queue")
        self.rec.wait_for("spawn", name="default.job")
        self.until_next_run("job")
        self.until_next_run("job")  # two due while it runs: one is queued
        self.assertEqual(len(self.rec.matching("spawn", name="default.job")), 1)
        self.end_run(1)
        self.rec.wait_for("spawn", count=2, name="default.job")
        self.end_run(2)
        self.rec.wait_for("job.default.job.completed", count=2)
        self.assertEqual(len(self.rec.matching("spawn", name="default.job")), 2, "one queued run, not two")

    def test_replace_stops_the_last_run_for_the_new_one(self):
        self.gated("job", every="10s", concurrency="replace")
        first = self.rec.wait_for("spawn", name="default.job")[0]["pid"]
        wait_until(lambda: os.listdir(self.runs), what="the first run under way")
        self.until_next_run("job")
        self.rec.wait_for("stop_process", pid=first)
        self.rec.wait_for("spawn", count=2, name="default.job")
        self.rec.wait_for("exit", pid=first)
        wait_until(lambda: len(os.listdir(self.runs)) == 2, what="the second run under way")
        self.end_run(2)
        self.rec.wait_for("job.default.job.completed")

    def test_a_wall_clock_jump_is_noticed_at_the_next_wake_up(self):
        hourly = gaffer._Cron("0 * * * *")
        self.load("hourly", code="pass", schedule="0 * * * *")
        self.assertEqual(self.m.info("hourly")["next_run"], hourly.next_after(self.wall()))
        self.wall.offset += 3 * 3600 + 1  # forward, past three runs (a suspend): one run, then the next hour
        self.advance(60)  # the timer wakes within a minute to read the wall clock
        self.rec.wait_for("job.default.hourly.completed")
        self.assertEqual(self.m.info("hourly")["next_run"], hourly.next_after(self.wall()))
        self.assertEqual(len(self.rec.matching("spawn", name="default.hourly")), 1, "missed runs are not run")
        ahead = self.m.info("hourly")["next_run"]
        self.wall.offset -= 2 * 3600  # backward (NTP): the next run is worked out again
        self.advance(60)
        wait_until(lambda: self.m.info("hourly")["next_run"] == hourly.next_after(self.wall()) < ahead,
                   what="next_run moved back")

    def test_jitter_moves_each_run_later_by_up_to_that_much(self):
        self.load("late", code="pass", schedule="@hourly", jitter="10m")
        base = gaffer._Cron("@hourly").next_after(self.wall())
        when = self.m.info("late")["next_run"]
        self.assertTrue(base <= when <= base + 600, (base, when))
        self.until_next_run("late")
        self.rec.wait_for("job.default.late.completed")
        self.assertTrue(base + 3600 <= self.m.info("late")["next_run"] <= base + 4200)

    def test_catch_up_runs_a_missed_run_once_at_load(self):
        day = 86400
        self.m.load(gaffer.ProcessConfig("nightly", PY, args=["-S", "-c", "pass"], schedule="0 3 * * *",
                                         catch_up=True), last_run=self.wall() - 2 * day)
        self.rec.wait_for("job.default.nightly.completed")
        self.assertEqual(self.m.info("nightly")["state"], "scheduled")
        self.m.load(gaffer.ProcessConfig("recent", PY, args=["-S", "-c", "pass"], schedule="0 3 * * *",
                                         catch_up=True), last_run=self.wall() - 60)
        self.m.load(gaffer.ProcessConfig("plain", PY, args=["-S", "-c", "pass"], schedule="0 3 * * *"),
                    last_run=self.wall() - 2 * day)
        self.assertEqual(len(self.rec.matching("spawn", name="default.recent")) +
                         len(self.rec.matching("spawn", name="default.plain")), 0,
                         "nothing missed since, or no catch_up: no run")
        self.assertEqual(len(self.rec.matching("spawn", name="default.nightly")), 1, "once, not once a day missed")

    def test_a_scheduled_job_s_last_run_meets_a_completed_condition(self):
        self.load("nightly", code="import sys; sys.exit(2)", schedule="0 3 * * *")
        self.load("report", depends_on={"nightly": "completed_successfully"})
        self.assertEqual((self.m.pids("report"), self.m.info("report")["blocked"]), ([], None), "no run yet")
        self.m.start_job("nightly")  # a run now, which fails
        self.assertEqual(self.rec.wait_for("job.default.report.blocked")[0]["reason"],
                         "default.nightly failed with exit 2")
        self.m.update(gaffer.ProcessConfig("nightly", PY, args=["-S", "-c", "pass"], schedule="0 3 * * *"))
        self.m.start_job("nightly")
        self.rec.wait_for("spawn", name="default.report")

    def test_an_update_works_the_schedule_out_again_and_runs_nothing(self):
        self.load("tick", code="pass", schedule="*/5 * * * *")
        due = self.m.info("tick")["next_run"]
        self.m.update(gaffer.ProcessConfig("tick", PY, args=["-S", "-c", "pass"], schedule="*/10 * * * *"),
                      start=True)  # as a SIGHUP'd config file's changed job is updated
        self.assertEqual(self.m.info("tick")["state"], "scheduled", "an update runs nothing")
        self.assertEqual(self.m.info("tick")["next_run"] % 600, 0)
        self.assertGreaterEqual(self.m.info("tick")["next_run"], due)
        self.assertEqual(self.rec.matching("spawn", name="default.tick"), [])
        self.until_next_run("tick")
        self.rec.wait_for("job.default.tick.completed")  # its slot left empty by the run
        self.m.update(gaffer.ProcessConfig("tick", PY, args=list(SLEEP)), start=True)  # no schedule any more
        self.rec.wait_for("spawn", count=2, name="default.tick")
        self.assertEqual((self.m.info("tick")["state"], self.m.info("tick")["next_run"]), ("running", None))


class RestartPolicyTest(ManagerTestCase):

    def test_a_crash_loop_backs_off_by_default(self):
        false = shutil.which("false")
        self.m.load(gaffer.ProcessConfig("crash", false))
        backoffs = self.rec.wait_for("backoff", count=4)
        expected = [0.1, 0.2, 0.4, 0.8]
        for msg, delay in zip(backoffs, expected):
            self.assertGreaterEqual(msg["delay"], delay * 0.8 - 0.001, backoffs)
            self.assertLessEqual(msg["delay"], delay * 1.2 + 0.001, backoffs)
        spawns = len(self.rec.matching("spawn"))
        self.assertLessEqual(spawns, 6, "a handful of spawns, not hundreds: %d" % spawns)
        info = self.m.info("crash")
        self.assertEqual(len(info["backoff"]), 1, "info shows the pending respawn")
        self.assertGreaterEqual(info["restarts"], 4)
        self.assertEqual(info["last_exit"], "exit 1")
        self.assertGreaterEqual(self.m.stats("crash")["restarts"], 4)
        self.assertTrue(all(m["respawn"] for m in self.rec.matching("exit")))

    def test_a_stable_run_resets_the_backoff(self):
        counter = os.path.join(self.tmp, "runs")
        code = """
            import os, sys, time
            path = sys.argv[1]
            runs = int(open(path).read()) if os.path.exists(path) else 0
            open(path, "w").write(str(runs + 1))
            if runs == 3:
                time.sleep(0.4)  # longer than min_uptime: a stable run
            if runs >= 6:
                time.sleep(60)
        """
        self.m.load(gaffer.ProcessConfig("w", PY, args=["-S", "-c", textwrap.dedent(code), counter], min_uptime=0.3,
                                         graceful_timeout=2))
        self.rec.wait_for("spawn", pid=7)
        kinds = [e for e in self.rec.names() if e in ("spawn", "backoff", "exit")]
        # runs 0-2 exit quickly: nothing, then 0.1 s, 0.2 s; run 3 is stable; then 4 and 5 start over
        self.assertEqual(kinds, ["spawn", "exit", "spawn", "exit", "backoff", "spawn", "exit", "backoff", "spawn",
                                 "exit", "spawn", "exit", "spawn", "exit", "backoff", "spawn"])

    def test_on_failure(self):
        script = "import sys, time; code = int(sys.argv[1]); time.sleep(0.1 if code >= 0 else 60); sys.exit(code)"
        for name, code in (("ok", 0), ("bad", 3), ("killed", -1), ("asked", -1)):
            self.m.load(gaffer.ProcessConfig(name, PY, args=["-S", "-c", script, str(code)], restart="on-failure",
                                             success_codes=[0, 1], graceful_timeout=2))
        self.m.kill(self.m.pids("asked")[0], "KILL")
        os.kill(self.os_pid(self.m.pids("killed")[0]), signal.SIGKILL)
        for name, respawn in (("ok", False), ("bad", True), ("killed", True), ("asked", False)):
            with self.subTest(job=name):
                msg = self.rec.wait_for("exit", name="default." + name)[0]
                self.assertEqual(msg["respawn"], respawn, msg)
        self.rec.wait_for("spawn", count=2, name="default.bad")
        self.rec.wait_for("spawn", count=2, name="default.killed")
        info = self.m.info("ok")
        self.assertEqual((info["state"], info["active"], info["running"], info["max_processes"]),
                         ("completed", False, 0, 1), "its one slot left empty: loaded, completed, nothing running")
        self.m.start_job("ok")
        self.assertEqual(len(self.m.pids("ok")), 1, "start_job fills it again")

    def test_never(self):
        self.m.load(gaffer.ProcessConfig("batch", PY, args=["-S", "-c", "pass"], numprocesses=2, restart="never"))
        self.rec.wait_for("exit", count=2, name="default.batch")
        self.assertEqual(self.m.info("batch")["running"], 0)
        self.assertEqual(self.m.scale("batch", 1), 3)
        self.rec.wait_for("exit", count=5, name="default.batch")  # the scale filled all three slots
        self.assertEqual(len(self.rec.matching("spawn", name="default.batch")), 5)
        self.m.reload("batch")
        self.rec.wait_for("spawn", count=7, name="default.batch")

    def test_bad_policies_are_refused(self):
        for settings, message in [
            (dict(restart="sometimes"), "restart must be 'always', 'on-failure' or 'never'"),
            (dict(success_codes=["0"]), "success_codes must be an int"),
            (dict(success_codes=0), "success_codes must be a list"),
            (dict(success_codes=[256]), "success_codes must be <= 255"),
            (dict(min_uptime=-1), "min_uptime must be >= 0"),
            (dict(backoff_max=float("inf")), "backoff_max must be <= "),
            (dict(max_rss="12 parsecs"), "max_rss must be bytes or a size such as '200M'"),
            (dict(max_age=-1), "max_age must be >= "),
        ]:
            with self.subTest(settings=settings), self.assertRaisesRegex(ValueError, message):
                gaffer.ProcessConfig("w", PY, **settings)

# The policies decide on an exit, whichever reaper saw it: they do not run again under the poll reaper.


class RecycleTest(ManagerTestCase):
    stats_interval = 0.05

    def test_a_process_over_max_rss_is_replaced_new_one_first(self):
        marker = os.path.join(self.tmp, "grown")
        code = """
            import os, sys, time
            if not os.path.exists(sys.argv[1]):
                open(sys.argv[1], "w").close()
                hog = bytearray(100 << 20)  # touched: resident
                for i in range(0, len(hog), 4096):
                    hog[i] = 1
            print("up", flush=True)
            time.sleep(60)
        """
        self.m.load(gaffer.ProcessConfig("w", PY, args=["-S", "-c", textwrap.dedent(code), marker], max_rss="50M",
                                         graceful_timeout=2))
        msg = self.rec.wait_for("recycle")[0]
        self.assertEqual(msg["pid"], 1)
        self.assertRegex(msg["reason"], r"^rss \d+\.\dM > 50\.0M$")
        self.rec.wait_for("exit", pid=1)
        names = self.rec.names()
        self.assertLess(names.index("proc.2.ready"), names.index("proc.1.stop"), "the new one first")
        time.sleep(0.3)  # several samples: the new, small process stays
        self.assertEqual(self.m.pids("w"), [2])
        self.assertEqual(len(self.rec.matching("recycle")), 1)

    def test_max_age_with_variance(self):
        self.m.load(gaffer.ProcessConfig("w", PY, args=SLEEP, numprocesses=2, max_age=0.2, max_age_variance=1.0,
                                         graceful_timeout=2))
        recycled = self.rec.wait_for("recycle", count=2, timeout=TIMEOUT)
        limits = [float(m["reason"].rpartition("> ")[2].rstrip("s")) for m in recycled]
        self.assertTrue(all(0.2 <= limit <= 1.2 for limit in limits), limits)
        self.assertNotEqual(limits[0], limits[1], "each process has its own share of the variance")
        self.assertEqual(len(self.m.pids("w")), 2)

    def test_no_limit_no_sampling(self):
        self.load("w")
        self.assertIsNone(self.m._sampler._timer, "nothing samples /proc when nothing needs it")
        self.m.load(gaffer.ProcessConfig("r", PY, args=SLEEP, max_rss="1G", graceful_timeout=2))
        self.assertIsNotNone(self.m._sampler._timer)
        self.m.unload("r")
        wait_until(lambda: self.m._sampler._timer is None, what="the sampler stops with the last limited job")


# -- Health checks: a ready process checked every health_interval, replaced when it fails ----

SERVE_A_SECOND_ONCE = """
    import os, socket, sys, time
    first = not os.path.exists(sys.argv[1])
    open(sys.argv[1], "a").close()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    deadline = time.monotonic() + 10
    while True:  # the process it replaces may hold the port a moment longer
        try:
            server.bind(("127.0.0.1", int(os.environ["PORT"])))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    server.listen(64)
    server.settimeout(0.05)
    until = time.monotonic() + (1.0 if first else 3600)
    while time.monotonic() < until:
        try:
            conn, _ = server.accept()
        except socket.timeout:
            continue
        conn.recv(1000)
        conn.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\n")
        conn.close()
    time.sleep(60)  # still listening, never accepting: a check connects, asks, and hears nothing
"""


class LogTest(ManagerTestCase):
    """log_file (rotation, reopen, timestamps, "-", errors), the tail of each output, logs()."""

    def path(self, name):
        return os.path.join(self.tmp, name)

    def test_rotation_at_a_tiny_size_keeps_every_byte_in_order(self):
        log = self.path("logs/w.log")  # the directory is made
        self.load("w", code="""
            import sys
            for n in range(3000):
                sys.stdout.write("line %05d %s\\n" % (n, "x" * (n % 37)))
                if n % 7 == 0:
                    sys.stdout.flush()
            sys.stdout.write("no newline at the end")
        """, log_file=log, log_max_bytes=4096, log_backups=3, restart="never")
        self.rec.wait_for("exit")
        files = [log + suffix for suffix in (".3", ".2", ".1", "")]
        self.assertEqual(sorted(os.listdir(self.path("logs"))), ["w.log", "w.log.1", "w.log.2", "w.log.3"],
                         "exactly log_backups old files")
        for name in files:
            self.assertLessEqual(os.path.getsize(name), 4096, name)
        text = "".join(read_text(name) for name in files)
        self.assertTrue(text.endswith("line 02999 %s\nno newline at the end\n" % ("x" * (2999 % 37))))
        lines = text.splitlines()[:-1]
        first = int(lines[0].split()[1])
        self.assertEqual(lines, ["line %05d %s" % (n, "x" * (n % 37)) for n in range(first, 3000)],
                         "the newest lines, none lost, cut or repeated across rotations")
        self.assertGreater(first, 0, "the oldest went with the rotations")

    ECHO = """
        import sys
        for line in sys.stdin:
            print(line.strip(), flush=True)
    """

    def say(self, pid, log, text):
        def written():
            try:
                return text in read_text(log)
            except FileNotFoundError:  # renamed by a rotation, not made again yet
                return False
        self.m.send(pid, text + "\n")
        wait_until(written, what="%r written" % text)

    def test_hourly_and_daily_rotation_at_the_local_clock_s_boundary(self):
        for rotate, step in (("hourly", 3600), ("daily", 86400)):
            with self.subTest(rotate=rotate):
                log = self.path("%s.log" % rotate)
                self.load(rotate, code=self.ECHO, log_file=log, log_rotate=rotate, log_backups=2, redirect_input=True)
                pid = self.m.pids(rotate)[0]
                self.say(pid, log, "first")
                self.wall.offset += step  # the next hour (or day) of the wall clock
                self.say(pid, log, "second")
                self.assertEqual((read_text(log + ".1"), read_text(log)), ("first\n", "second\n"))
                for n in range(3):
                    self.wall.offset += step
                    self.say(pid, log, "more %d" % n)
                self.assertEqual(sorted(f for f in os.listdir(self.tmp) if f.startswith(rotate)),
                                 [rotate + ".log", rotate + ".log.1", rotate + ".log.2"], "log_backups old files")
                self.assertEqual(read_text(log + ".2"), "more 0\n")
        boundary = gaffer._next_boundary("daily", time.mktime((2026, 12, 4, 18, 30, 0, 0, 0, -1)))
        self.assertEqual(time.localtime(boundary)[:6], (2026, 12, 5, 0, 0, 0), "midnight of the local clock")

    def test_compressed_backups_off_the_loop(self):
        import gzip
        log = self.path("w.log")
        self.load("w", code=self.ECHO, log_file=log, log_max_bytes=64, log_backups=2, log_compress=True,
                  redirect_input=True)
        pid = self.m.pids("w")[0]
        for n in range(5):
            self.say(pid, log, "%02d %s" % (n, "x" * 40))
        wait_until(lambda: sorted(os.listdir(self.tmp)) == ["w.log", "w.log.1.gz", "w.log.2.gz"],
                   what="two gzipped backups, nothing set aside left")
        self.assertEqual(gzip.open(log + ".1.gz").read(), b"03 %s\n" % (b"x" * 40))
        self.assertEqual(gzip.open(log + ".2.gz").read(), b"02 %s\n" % (b"x" * 40))
        wait_until(lambda: not [t for t in threading.enumerate() if t.name == "gaffer-compress"],
                   what="the compressor's thread gone once idle")

    def test_syslog_and_journal_as_their_daemons_read_them(self):
        sockets = {}
        for kind in ("syslog", "journal"):
            sock = sockets[kind] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(self.path(kind + ".sock"))
            sock.settimeout(TIMEOUT)
            self.addCleanup(sock.close)
        code = "import sys; print('to out', flush=True); print('to err', file=sys.stderr, flush=True)"
        self.load("web", code=code, log_file="syslog:" + self.path("syslog.sock"), restart="never")
        self.load("db", code=code, log_file="journal:" + self.path("journal.sock"), restart="never")
        web, db = (self.rec.wait_for("spawn", name="default." + name)[0]["os_pid"] for name in ("web", "db"))
        rfc3164 = re.compile(r"<(\d{1,3})>([A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d) ([^\s\[:]+)\[(\d+)\]: (.*)", re.S)
        got = {}
        for _ in range(2):
            match = rfc3164.fullmatch(sockets["syslog"].recv(65536).decode())
            self.assertIsNotNone(match, "an RFC 3164 line, as glibc's syslog(3) sends it")
            pri, stamp, tag, pid, text = match.groups()
            time.strptime(stamp, "%b %d %H:%M:%S")
            got[text] = (int(pri) // 8, int(pri) % 8, tag, int(pid))
        self.assertEqual(got, {"to out": (3, 6, "web.1", web), "to err": (3, 3, "web.1", web)},
                         "facility daemon; stdout info, stderr err")
        entries = {}
        for _ in range(2):
            fields = dict(line.split("=", 1) for line in sockets["journal"].recv(65536).decode().split("\n")[:-1])
            entries[fields["MESSAGE"]] = fields
        self.assertEqual({message: (f["PRIORITY"], f["SYSLOG_IDENTIFIER"], f["GAFFER_JOB"], f["GAFFER_SLOT"],
                                    f["GAFFER_STREAM"], f["SYSLOG_PID"]) for message, f in entries.items()},
                         {"to out": ("6", "db.1", "default.db", "1", "out", str(db)),
                          "to err": ("3", "db.1", "default.db", "1", "err", str(db))})

    def test_a_log_socket_without_its_daemon_drops_and_counts(self):
        self.load("w", code="print('nobody listens', flush=True)", log_file="syslog:" + self.path("absent.sock"),
                  restart="never")
        self.rec.wait_for("exit", name="default.w")
        wait_until(lambda: self.m.info("w")["log_dropped"] == 1, what="the line counted")
        with self.assertRaisesRegex(ValueError, r"log_rotate must be 'size', 'hourly' or 'daily', got 'weekly'"):
            gaffer.ProcessConfig("w", PY, log_file="w.log", log_rotate="weekly")

    def test_reopen_after_the_file_was_moved_and_timestamps(self):
        log = self.path("w.log")
        self.load("w", code="""
            import sys
            for line in sys.stdin:
                print(line.strip(), flush=True)
        """, log_file=log, log_timestamps=True, redirect_input=True)
        pid = self.m.pids("w")[0]
        self.m.send(pid, "before\n")
        wait_until(lambda: "before" in read_text(log))
        os.rename(log, log + ".old")  # what logrotate does
        self.m.send(pid, "still old\n")
        wait_until(lambda: "still old" in read_text(log + ".old"), what="written to the moved file until reopened")
        self.m.reopen_logs()
        self.m.send(pid, "after\n")
        wait_until(lambda: os.path.exists(log) and "after" in read_text(log))
        self.assertNotIn("before", read_text(log))
        stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d "
        self.assertRegex(read_text(log), "^%safter\n$" % stamp)
        self.assertRegex(read_text(log + ".old"), "^%sbefore\n%sstill old\n$" % (stamp, stamp))

    def test_one_file_for_several_processes_never_mixes_lines(self):
        log = self.path("all.log")
        self.load("w", 4, code="""
            import os, sys
            me = os.getpid()
            for n in range(300):  # each line in three writes, a pipe read may end in any of them
                os.write(1, b"%d " % me)
                os.write(1, b"%d " % n + b"y" * 500)
                os.write(1, b" end\\n")
        """, log_file=log, restart="never", log_max_bytes=0)
        self.rec.wait_for("exit", count=4)
        lines = read_text(log).splitlines()
        self.assertEqual(len(lines), 1200)
        for line in lines:
            self.assertRegex(line, r"^\d+ \d+ y{500} end$")
        for pid in set(line.split()[0] for line in lines):
            self.assertEqual([int(l.split()[1]) for l in lines if l.split()[0] == pid], list(range(300)))

    def test_output_without_newlines_is_cut_and_rotated_in_bounded_pieces(self):
        log = self.path("flood.log")
        self.load("w", code="""
            import os
            for _ in range(4):
                os.write(1, b"x" * (1 << 20))  # 4 MiB, never a newline: one pipe read may take 1 MiB
        """, log_file=log, log_max_bytes=4096, log_backups=100, restart="never", tail_bytes=200000)
        self.rec.wait_for("exit")
        files = sorted(os.listdir(self.tmp))
        self.assertEqual(len(files), 64, files)  # 64 KiB pieces, each longer than a file: one per file
        for name in files:
            self.assertEqual(read_text(os.path.join(self.tmp, name)), "x" * 65536 + "\n", name)
        kept = [row["line"] for row in self.m.logs("w", lines=1000)]
        self.assertTrue(3 <= len(kept) <= 6 and set(kept) == {"x" * 65536}, "bounded by about tail_bytes")
        self.load("quiet", code="""
            import os
            for _ in range(4):
                os.write(1, b"y" * (1 << 20))
            os.write(1, b"y" * 10 + b" the end")
        """, redirect_output=["out"], restart="never", tail_bytes=200000)  # no reader of lines: the tail's path
        self.rec.wait_for("exit", name="default.quiet")
        kept = [row["line"] for row in self.m.logs("quiet", lines=1000)]
        self.assertEqual(kept[-1], "y" * 10 + " the end")
        self.assertTrue(3 <= len(kept) - 1 <= 6 and set(kept[:-1]) == {"y" * 65536}, kept[:-1])

    def test_the_last_words_of_a_crashed_process_are_kept(self):
        self.load("w", code="""
            import sys
            print("starting", flush=True)
            print("about to fail", file=sys.stderr, flush=True)
            sys.stdout.write("half a line")
            sys.exit(3)
        """, redirect_output=["out", "err"], restart="never")
        self.rec.wait_for("exit")
        self.assertEqual(self.m.pids("w"), [], "gone")
        rows = self.m.logs("w")
        self.assertEqual([(r["pid"], r["slot"], r["label"], r["line"]) for r in rows if r["label"] == "out"],
                         [(1, 1, "out", "starting"), (1, 1, "out", "half a line")])
        self.assertIn((1, "err", "about to fail"), [(r["pid"], r["label"], r["line"]) for r in rows])
        self.assertEqual([r["time"] for r in rows], sorted(r["time"] for r in rows))
        self.assertEqual(len(self.m.logs("w", lines=1)), 1)
        self.assertEqual(self.m.logs("w", lines=0), [])

    def test_tail_keeps_tail_bytes_and_ten_exited_processes(self):
        self.load("w", 12, code="""
            for n in range(2000):
                print("%04d" % n)
        """, redirect_output=["out"], tail_bytes=1000, restart="never")
        self.rec.wait_for("exit", count=12)
        rows = self.m.logs("w", lines=100000)
        pids = sorted(set(r["pid"] for r in rows))
        self.assertEqual(len(pids), 10, "the last 10 exited processes")
        for pid in pids:
            lines = [r["line"] for r in rows if r["pid"] == pid]
            self.assertEqual(lines[-1], "1999")
            self.assertLessEqual(5 * len(lines), 1000 + 65536, "about tail_bytes")
            self.assertEqual(lines, ["%04d" % n for n in range(2000 - len(lines), 2000)])

    def test_process_tail_and_a_stream_that_starts_with_it(self):
        self.load("w", code="""
            import sys, time
            for n in range(50):
                print("early %d" % n)
            sys.stdout.flush()
            for line in sys.stdin:
                print(line.strip(), flush=True)
        """, redirect_output=["out"], redirect_input=True)
        process = self.m.get_process(self.m.pids("w")[0])
        wait_until(lambda: process.tail(lines=1) == ["early 49"])
        self.assertEqual(process.tail("out", 3), ["early 47", "early 48", "early 49"])
        self.assertEqual(len(process.tail()), 50)
        channel = self.m.subscribe("STREAM:%d" % process.pid, tail=2)
        self.m.send(process.pid, "later\n")
        data = b""
        while not data.endswith(b"later\n"):
            data += channel.get(TIMEOUT)[1]["data"]
        self.assertEqual(data, b"early 48\nearly 49\nlater\n", "history, then what came: no gap, no repeat")
        channel.close()
        follow = self.m.subscribe("LOGS:default.w", tail=1)
        self.m.send(process.pid, "live\n")
        self.assertEqual([follow.get(TIMEOUT)[1]["line"] for _ in range(2)], ["later", "live"])
        follow.close()

    def test_a_listener_may_stop_the_job_on_a_process_s_last_words(self):
        self.m.load(gaffer.ProcessConfig("w", PY, args=["-S", "-c", "import sys; sys.stdout.write('bye')"],
                                         redirect_output=["out"]), start=False)
        channel = self.m.subscribe("LOGS:default.w")  # an unfinished line is delivered only as it exits
        channel.bind("line", lambda evtype, msg: msg["line"] == "bye" and self.m.stop_job("w"))
        self.m.start_job("w")
        msg = self.rec.wait_for("exit")[0]
        self.assertFalse(msg["respawn"], "stopped from its own exit: not replaced")
        self.assertEqual(self.m.status()[0]["state"], "stopped")
        self.assertEqual(self.m.pids("w"), [])
        channel.close()

    def test_a_slow_follower_costs_bounded_memory_and_hears_of_the_gap(self):
        self.m.load(gaffer.ProcessConfig("w", redirect_output=["out"], restart="never", **python("""
            for n in range(2000):
                print("%04d" % n + "z" * 10000)  # 20 MB of long lines for a reader that reads nothing yet
        """)), start=False)
        channel = self.m.subscribe("LOGS:default.w", max_bytes=1 << 20)
        self.m.start_job("w")
        self.rec.wait_for("exit")
        self.assertLessEqual(channel._queued_bytes, 1 << 20, "the lines' own size counts")
        channel.close()  # what was queued is still read, then where the gap is
        messages = list(channel)
        kept = [msg["line"][:4] for evtype, msg in messages if evtype == "line"]
        self.assertEqual(kept, ["%04d" % n for n in range(len(kept))], "the first ones, in order")
        self.assertLess(len(kept), 200)
        self.assertEqual(messages[-1], ("overflow", {"event": "overflow", "topic": "LOGS:default.w",
                                                     "dropped": 2000 - len(kept)}))

    def test_stdout_mode_prefixes_each_line(self):
        code = textwrap.dedent("""
            import sys, threading
            sys.path.insert(0, %r)
            import gaffer
            with gaffer.Manager() as m:
                exited = threading.Event()
                m.events.subscribe("exit", lambda evtype, msg: exited.set())
                m.load(gaffer.ProcessConfig("web", sys.executable, args=["-S", "-c", "print('a'); print('b')"],
                                            log_file="-", restart="never"))
                exited.wait(10)
        """) % os.path.dirname(GAFFER)
        result = subprocess.run([PY, "-S", "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.stdout, "web.1 | a\nweb.1 | b\n", result.stderr)

    def test_a_log_file_that_is_not_a_regular_file_is_never_rotated(self):
        fifo = self.path("pipe")
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader: the FIFO can be opened for writing
        self.addCleanup(os.close, reader)
        got = bytearray()
        self.load("w", code="import sys\nfor i in range(200):\n    print('x' * 99, flush=True)\nimport time; "
                            "time.sleep(60)", log_file=fifo, log_max_bytes=1000, log_backups=2)

        def read():
            try:
                got.extend(os.read(reader, 65536))
            except BlockingIOError:
                pass
            return len(got) >= 200 * 100
        wait_until(read, what="every line through the FIFO")
        self.assertTrue(stat.S_ISFIFO(os.stat(fifo).st_mode), "still the FIFO")
        self.assertEqual(sorted(name for name in os.listdir(self.tmp) if name.startswith("pipe")), ["pipe"],
                         "nothing renamed, nothing made beside it")

    def test_bad_log_settings_and_a_full_disk(self):
        with self.assertRaisesRegex(ValueError, r"log_file 'x/\{job\}.log': unknown field \{job\}"):
            gaffer.ProcessConfig("w", PY, log_file="x/{job}.log")
        with self.assertRaisesRegex(ValueError, r"^log_backups must be <= 1000"):
            gaffer.ProcessConfig("w", PY, log_file="x.log", log_backups=5000)
        blocked = self.path("file")
        with open(blocked, "w"):
            pass
        with self.assertRaisesRegex(gaffer.ProcessError, r"cannot open log file %s/w.log: File exists"
                                    % re.escape(blocked)):  # its directory would be a file: the OS says so
            self.load("w", log_file=blocked + "/{name}.log")
        self.assertEqual(self.m.jobs(), [], "not loaded")
        fifo = self.path("fifo")
        os.mkfifo(fifo)  # nobody reads it: an error now, not a loop that waits for a reader forever
        with self.assertRaisesRegex(gaffer.ProcessError, r"cannot open log file %s: No such device or address"
                                    % re.escape(fifo)):
            self.load("w", log_file=fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:  # a reader that never reads: once the pipe is full, lines are dropped and counted
            self.load("piped", code="""
                for n in range(20000):
                    print("%05d" % n + "p" * 100)
            """, log_file=fifo, restart="never")
            self.rec.wait_for("exit", name="default.piped")
            self.assertGreater(self.m.info("piped")["log_dropped"], 0)
        finally:
            os.close(reader)
        if not os.path.exists("/dev/full"):
            self.skipTest("no /dev/full to fill a disk")
        self.load("full", code="""
            for n in range(100):
                print(n)
        """, log_file="/dev/full", log_max_bytes=0, restart="never")
        self.rec.wait_for("exit", name="default.full")
        self.assertEqual(self.m.info("full")["log_dropped"], 100, "counted, and the loop went on")
        self.assertEqual(len(self.m.logs("full")), 100, "the tail has them all the same")


class ExecProbeTest(ManagerTestCase):
    """ready="exec:CMD" and health="exec:CMD": a command run as a child the loop watches, in the job's
    environment, cwd and user; exit 0 passes, its output is the reason, and it is killed at the timeout."""

    def test_a_readiness_probe_passes_once_its_command_exits_zero(self):
        flag = os.path.join(self.tmp, "ready")
        self.load("w", ready="exec:test -f $FLAG", env={"FLAG": flag}, cwd=self.tmp)
        pid = self.m.pids("w")[0]
        self.assertEqual(self.m.get_process(pid).status, "starting", "the file is not there yet")
        open(flag, "w").close()
        self.rec.wait_for("ready", pid=pid)

    def test_a_failing_health_probe_gives_its_output_as_the_reason(self):
        self.load("w", health="exec:%s -S -c \"import os, sys; print('down in', os.getcwd()); sys.exit(2)\"" % PY,
                  cwd=self.tmp, health_interval=0.05, health_retries=2)
        msg = self.rec.wait_for("unhealthy")[0]
        self.assertEqual(msg["reason"], "exec:%s -S -c \"import os, sys; print('down in', os.getcwd()); sys.exit(2)\" "
                         "exited with 2: down in %s" % (PY, os.path.realpath(self.tmp)))
        self.assertEqual([p for p in self.m.list() if p.pid not in self.m.pids("w")], [],
                         "a probe is no process of any job")

    def test_a_hanging_probe_is_killed_with_what_it_started_at_its_timeout(self):
        started = os.path.join(self.tmp, "started")
        self.load("w", health="exec:sh -c 'sleep 60 & echo $! >> %s; wait'" % started, health_interval=0.05,
                  health_timeout=0.3, health_retries=2)
        msg = self.rec.wait_for("unhealthy")[0]
        self.assertEqual(msg["reason"], "exec:sh -c 'sleep 60 & echo $! >> %s; wait' did not end within 0.3s "
                         "(killed)" % started)
        def dead(pid):
            try:
                return read_text("/proc/%s/stat" % pid).partition(")")[2].split()[0] == "Z"
            except OSError:  # reaped
                return True
        for pid in read_text(started).split():
            wait_until(lambda: dead(pid), what="the probe's own child killed with its group")

    @staticmethod
    def probes():
        """The manager's children that run sleep (a probe; the job's processes run Python)."""
        def cmdline(pid):
            try:
                return read_text("/proc/%d/cmdline" % pid)
            except OSError:  # reaped meanwhile
                return ""
        return [child for child in my_children() if "sleep" in cmdline(child)]

    def test_a_probe_that_cannot_start_fails_and_nothing_is_left_when_the_process_goes(self):
        self.load("w", ready="exec:/nonexistent/probe", ready_timeout=0.5)
        self.rec.wait_for("ready_timeout", name="default.w")
        self.load("slow", health="exec:sleep 30", health_interval=0.01, health_timeout=30)
        pid = self.m.pids("slow")[0]
        wait_until(lambda: self.probes(), what="the probe running")
        self.m.stop_job("slow")
        self.rec.wait_for("exit", pid=pid)
        wait_until(lambda: not self.probes(), what="the probe of a process that went is killed and reaped")

    def test_bad_exec_checks_are_refused(self):
        for settings, message in [(dict(ready="exec:"), "ready 'exec:': give the command to run, as exec:CMD"),
                                  (dict(health="exec:'open"), "health \"exec:'open\": No closing quotation")]:
            with self.subTest(settings=settings), self.assertRaisesRegex(ValueError, re.escape(message)):
                gaffer.ProcessConfig("w", PY, **settings)


class HealthTest(ManagerTestCase):

    def test_a_server_that_stops_answering_is_replaced_and_the_new_one_is_healthy(self):
        marker = os.path.join(self.tmp, "served")
        self.m.load(gaffer.ProcessConfig(
            "web", PY, args=["-S", "-c", textwrap.dedent(SERVE_A_SECOND_ONCE), marker], env={"PORT": str(free_port())},
            ready="http://127.0.0.1:$PORT/", health="http://127.0.0.1:$PORT/health", health_interval=0.05,
            health_timeout=0.2, health_retries=3, graceful_timeout=2))
        msg = self.rec.wait_for("unhealthy")[0]
        self.assertEqual((msg["name"], msg["pid"], msg["reason"]), ("default.web", 1, "no answer within 0.2s"))
        self.assertEqual(self.rec.matching("job.default.web.unhealthy")[0]["pid"], 1)
        self.rec.wait_for("exit", pid=1)
        names = self.rec.names()
        self.assertLess(names.index("proc.1.ready"), names.index("unhealthy"))
        self.assertLess(names.index("unhealthy"), names.index("proc.2.spawn"))
        wait_until(lambda: self.m.get_process(2).info["health_passed"] >= 5, what="the new one answers its checks")
        info = self.m.get_process(2).info
        self.assertEqual((info["health_failures"], info["status"]), (0, "ready"))
        self.assertEqual(len(self.rec.matching("unhealthy")), 1)
        self.assertEqual(self.m.info("web")["restarts"], 1)

    def test_hanging_checks_hold_one_thread_each_and_delay_nothing_else(self):
        hang = socket.socket()  # listens, never accepts: connections wait in its backlog, unanswered
        hang.bind(("127.0.0.1", 0))
        hang.listen(1000)
        self.addCleanup(hang.close)  # resets what waits there: the checks end
        release = threading.Event()
        self.addCleanup(release.set)
        url = "http://127.0.0.1:%d/" % hang.getsockname()[1]
        self.load("hung", 3, health=url, health_interval=0.01, health_timeout=30)
        self.load("stuck", health=lambda process: release.wait(), health_interval=0.05, health_timeout=0.2)
        port = hang.getsockname()[1]
        self.load("other", ready="tcp:%d" % port)  # a connect is all a tcp check needs
        wait_until(lambda: len(self.rec.matching("unhealthy", name="default.stuck")) >= 2,
                   what="the stuck callable's processes replaced")
        reasons = {m["reason"] for m in self.rec.matching("unhealthy")}
        self.assertEqual(reasons, {"the previous check is still running"}, "a stuck check gets no second thread")
        hung = self.m.pids("hung")
        started = time.monotonic()
        os.kill(self.os_pid(self.m.pids("other")[0]), signal.SIGKILL)
        spawned = self.rec.wait_for("spawn", count=2, name="default.other")[1]
        self.m.wait_ready("other", timeout=TIMEOUT)
        self.assertLess(time.monotonic() - started, 5, "respawned and ready while 3 checks hang")
        self.assertEqual(self.m.pids("other"), [spawned["pid"]])
        self.assertEqual(self.m.pids("hung"), hung, "a 30 s timeout is not over yet")
        checkers = [t for t in threading.enumerate() if t.name.startswith("gaffer-check")]
        stuck = len(self.rec.matching("spawn", name="default.stuck"))
        self.assertLessEqual(len(checkers), 3 + stuck + 1, "one thread per hanging process at most")

    def test_notify_watchdog(self):
        code = """
            import os, socket, sys, time
            print(os.environ["WATCHDOG_USEC"], flush=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            for _ in range(10):
                sock.sendto(b"WATCHDOG=1", os.environ["NOTIFY_SOCKET"])
                time.sleep(0.05)
            time.sleep(60)  # alive, silent
        """
        self.load("w", code=code, health="notify", health_interval=0.2, health_retries=2, redirect_output=["out"])
        self.wait_output(1, b"200000\n")
        msg = self.rec.wait_for("unhealthy")[0]
        self.assertEqual((msg["pid"], msg["reason"]), (1, "no WATCHDOG=1 within 0.2s"))
        self.rec.wait_for("exit", pid=1)
        self.assertGreaterEqual(self.rec.matching("exit", pid=1)[0]["term_signal"], 1)
        self.rec.wait_for("spawn", pid=2)

    def test_bad_health_settings_are_refused(self):
        for settings, message in [
            (dict(health="output:up", redirect_output=["out"]), "health 'output:up': a health check is tcp:"),
            (dict(health="delay:1"), "health 'delay:1': a health check is"),
            (dict(health="ftp://x"), "health: unknown check 'ftp://x'"),
            (dict(health=42), "health must be"),
            (dict(health_retries=0), "health_retries must be >= 1"),
            (dict(health_interval=0), "health_interval must be >= "),
            (dict(health_timeout=float("inf")), "health_timeout must be <= "),
        ]:
            with self.subTest(settings=settings), self.assertRaisesRegex(ValueError, message):
                gaffer.ProcessConfig("w", PY, **settings)


# -- Loop survival: what a hostile caller, listener or child does to the loop ----------

IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


class LoopSurvivalTest(ManagerTestCase):

    def stop_and_time(self):
        """Stop the manager and return how long run() took (failing past 20 s)."""
        started = time.monotonic()
        self.m.stop()
        runner = threading.Thread(target=self.m.run)
        runner.start()
        runner.join(20)
        self.assertFalse(runner.is_alive(), "stop() + run() did not finish")
        return time.monotonic() - started

    def test_a_command_that_posts_another_cannot_starve_timers(self):
        loop, fired, posted = self.m.loop, threading.Event(), []
        deadline = time.monotonic() + 1.0

        def again():  # posts itself from the loop, as a listener calling the manager can
            posted.append(1)
            if time.monotonic() < deadline and not fired.is_set():
                loop.call_soon_threadsafe(again)
        started = time.monotonic()
        loop.call(lambda: (loop.call_later(0.01, fired.set), loop.call_soon_threadsafe(again)))
        self.assertTrue(fired.wait(TIMEOUT))
        self.assertLess(time.monotonic() - started, 0.5, "the 10 ms timer waited for %d commands" % len(posted))

    def test_stop_finishes_when_a_group_outlives_its_sigkilled_leader(self):
        # Leader and child both ignore SIGTERM; SIGKILL at the deadline; the leader may be reaped
        # before the rest of its group, whose kill timer has fired already.
        code = """
            import os, signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            print("forked", flush=True)
            time.sleep(60)
        """
        self.load("w", 3, code=code, graceful_timeout=0.3, redirect_output=["out"])
        for pid in (1, 2, 3):
            self.wait_output(pid, b"forked")
        self.assertLess(self.stop_and_time(), 10)

    def test_a_group_emptied_after_its_leader_is_noticed_at_once(self):
        # The leader exits on SIGTERM, its child a moment later: run() must not wait for the deadline.
        # The child waits for SIGTERM with sigwait: a Python handler misses a signal that lands between
        # its last check and the sleep's system call, and the child would then sleep its 60 s.
        code = """
            import os, signal, sys, time
            if os.fork() == 0:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
                signal.sigwait({signal.SIGTERM})
                time.sleep(0.2)
                os._exit(0)
            print("forked", flush=True)
            time.sleep(60)
        """
        self.load("w", code=code, graceful_timeout=60, redirect_output=["out"])
        self.wait_output(1, b"forked")
        self.assertLess(self.stop_and_time(), 20)  # the deadline is 60 s away
        self.assertEqual(self.m.started, False)

    def test_huge_waits_are_refused_and_the_loop_clamps_its_sleep(self):
        cases = [
            (dict(graceful_timeout=1e9), "graceful_timeout must be <= 604800"),
            (dict(graceful_timeout=float("inf")), "graceful_timeout must be <= "),
            (dict(graceful_timeout=float("nan")), "graceful_timeout must be "),
            (dict(flapping={"retry_in": 1e12}), "flapping.retry_in must be <= "),
            (dict(flapping={"window": 1e12}), "flapping.window must be <= "),
            (dict(numprocesses=1 << 40), "numprocesses must be <= "),
        ]
        for settings, message in cases:
            with self.subTest(settings=settings), self.assertRaisesRegex(ValueError, message):
                gaffer.ProcessConfig("w", PY, **settings)
        with self.assertRaisesRegex(ValueError, "stats_interval must be <= "):
            gaffer.Manager(stats_interval=1e10)
        with self.assertRaisesRegex(ValueError, "graceful_timeout must be <= "):
            self.m.commit("nope", graceful_timeout=1e10)
        # A timer far away (set by an app, say) must not overflow select: the loop goes on serving.
        fired = []
        self.m.loop.call(lambda: self.m.loop.call_later(1e12, fired.append, 1))
        self.m.loop.wakeup()
        self.load("w")
        self.assertEqual(self.m.pids("w"), [1])
        os.kill(self.os_pid(1), signal.SIGKILL)
        self.rec.wait_for("spawn", pid=2)
        self.assertEqual(fired, [])

    def test_listeners_that_change_the_manager_during_restart_and_stop(self):
        for name in ("a", "b", "c", "d"):
            self.load(name, 2)
        errors = []

        def meddle(evtype, msg):
            try:
                if evtype == "spawn" and "default.b" in self.m.jobs():
                    self.m.unload("b")          # mid-restart, a job not replaced yet goes away
                    self.m.load(gaffer.ProcessConfig("late", PY, args=SLEEP, graceful_timeout=2))
                elif evtype == "job.default.a.stop":
                    self.m.unload("c")           # mid-stop, the job after this one goes away
                    self.m.load(gaffer.ProcessConfig("e", PY, args=SLEEP, graceful_timeout=2))
                    self.m.scale("d", 3)
                    self.m.restart()
                elif evtype == "exit":
                    self.m.start_job("d")
            except (gaffer.ProcessError, RuntimeError) as exc:
                errors.append(exc)

        restarted = threading.Event()
        self.m.events.subscribe(".", meddle)
        self.m.restart(lambda manager: restarted.set())
        self.assertTrue(restarted.wait(TIMEOUT), "restart finished")
        self.assertNotIn("default.b", self.m.jobs())
        self.assertIn("default.late", self.m.jobs())
        self.assertLess(self.stop_and_time(), 15)
        self.assertEqual(self.m._procs, {}, "every process was reaped")

    def test_a_callback_may_close_a_socket_that_is_ready_in_the_same_batch(self):
        pairs = [socket.socketpair() for _ in range(2)]
        for a, b in pairs:
            self.addCleanup(a.close)
            self.addCleanup(b.close)
        loop, calls = self.m.loop, []

        def close_the_other(index):
            def callback(mask):
                calls.append(index)
                pairs[index][0].recv(16)
                other = pairs[1 - index][0]
                if other.fileno() != -1:
                    loop.set_events(other, 0)
                    other.close()
            return callback

        def register():
            for index, (a, _) in enumerate(pairs):
                loop.set_events(a, selectors.EVENT_READ, close_the_other(index))
            for _, b in pairs:  # both ready before the loop selects again
                b.send(b"x")
        loop.call(register)
        wait_until(lambda: calls)
        self.load("w")  # the loop still serves
        self.assertEqual(self.m.pids("w"), [1])
        self.assertEqual(len(calls), 1, "the closed socket's callback was not called")
        loop.call(loop.set_events, [a for a, _ in pairs if a.fileno() != -1][0], 0)

    def test_waiting_calls_on_the_loop_thread_raise(self):
        seen = []

        def listener(evtype, msg):
            for call in (self.m.run, lambda: self.m.loop.submit(len, ())):
                try:
                    call()
                except RuntimeError as exc:
                    seen.append(str(exc))

        self.m.events.subscribe("load", listener)
        self.load("w")
        self.assertEqual(len(seen), 2, seen)
        self.assertIn("would wait for itself", seen[0])
        self.assertIn("would wait for itself", seen[1])

    def test_repr_from_another_thread_while_jobs_change(self):
        stop, failures = threading.Event(), []

        def spin():
            while not stop.is_set():
                try:
                    repr(self.m)
                except Exception as exc:  # "dictionary changed size during iteration"
                    failures.append(exc)
                    return

        spinner = threading.Thread(target=spin)
        spinner.start()
        try:
            for i in range(40):
                self.m.load(gaffer.ProcessConfig("j%d" % i, PY, args=SLEEP, numprocesses=0), sessionid="s%d" % i)
            for i in range(40):
                self.m.unload("s%d.j%d" % (i, i))
        finally:
            stop.set()
            spinner.join()
        self.assertEqual(failures, [])
        self.assertRegex(repr(self.m), r"<Manager running jobs=0 processes=0>")

    def test_a_failure_inside_stop_or_restart_is_logged(self):
        class Broken(gaffer.Manager):
            def _do_restart(self, callback):
                raise RuntimeError("restart broke")

        m = Broken()
        m.start()
        try:
            with self.assertLogs("gaffer", logging.ERROR) as logs:
                m.restart()
                wait_until(lambda: any("restart broke" in line for line in logs.output))
        finally:
            m.stop()
            m.run()


class PollReaperLoopSurvivalTest(LoopSurvivalTest):
    """The cases where how exits are seen matters; the others do not depend on the reaper."""
    no_pidfd = True
    test_huge_waits_are_refused_and_the_loop_clamps_its_sleep = None
    test_a_callback_may_close_a_socket_that_is_ready_in_the_same_batch = None
    test_waiting_calls_on_the_loop_thread_raise = None
    test_repr_from_another_thread_while_jobs_change = None
    test_a_failure_inside_stop_or_restart_is_logged = None


# -- The seed's behaviours ----------------------------------------------------------

class SeedCompatibilityTest(ManagerTestCase):

    def test_the_stop_callback_sees_a_stopped_manager(self):
        self.load("w")
        seen = []
        done = threading.Event()
        self.m.stop(lambda manager: (seen.append((manager.started, manager.active)), done.set()))
        self.assertTrue(done.wait(TIMEOUT))
        self.assertEqual(seen, [(False, False)])
        later = []
        self.m.stop(lambda manager: later.append(manager.started))
        self.assertEqual(later, [False], "a stop after the end calls back at once")

    def test_publish_takes_any_payload(self):
        em = gaffer.EventEmitter()
        got = []
        em.subscribe("test", lambda *args, **kwargs: got.append((args, kwargs)))
        em.publish("test", 1)
        em.publish("test", 1, 2, key="v")
        em.publish("test")
        em.publish("test", {"a": 1})
        self.assertEqual(got, [(("test", 1), {}), (("test", 1, 2), {"key": "v"}), (("test",), {}),
                               (("test", {"a": 1, "event": "test"}), {})])

    def test_a_trailing_dot_means_the_same_pattern(self):
        em = gaffer.EventEmitter()
        dotted, plain = Recorder(em, "a.b."), Recorder(em, "a.b")
        em.publish("a.b.c", {})
        em.publish("a.bc", {})
        self.assertEqual(dotted.names(), ["a.b.c"])
        self.assertEqual(plain.names(), ["a.b.c"])
        em.unsubscribe("a.b", dotted)
        em.publish("a.b", {})
        self.assertEqual(dotted.names(), ["a.b.c"], "unsubscribed by the plain form")

    def test_scaling_up_a_job_loaded_stopped_starts_it(self):
        self.m.load(gaffer.ProcessConfig("w", PY, args=SLEEP, numprocesses=0, graceful_timeout=2), start=False)
        committed = self.m.commit("w")
        self.assertEqual(self.m.info("w")["active"], False)
        self.assertEqual(self.m.scale("w", 1), 1)
        info = self.m.info("w")
        self.assertEqual((info["active"], info["running"], info["running_out"]), (True, 2, 1))
        self.assertIn(committed, info["processes"])
        self.m.stop_job("w")
        self.assertEqual(self.m.scale("w", -1), 0)
        self.assertEqual(self.m.info("w")["active"], False, "scaling down leaves a stopped job stopped")

# -- HTTP controller -------------------------------------------------------------

class HttpTestCase(ManagerTestCase):
    token = None
    options = {}

    def make_apps(self):
        self.http = gaffer.HttpHandler("127.0.0.1:0", token=self.token, max_body=4096, **self.options)
        return [self.http]

    def raw(self, data, timeout=TIMEOUT):
        """Send raw bytes on a new connection; return (status, JSON body) of the answer."""
        with socket.create_connection(("127.0.0.1", self.http.port), timeout=timeout) as sock:
            sock.sendall(data)
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            body = resp.read()
            self.assertEqual(resp.getheader("Content-Type"), "application/json", body[:200])
            return resp.status, json.loads(body)

    def http_threads(self):
        return [t for t in threading.enumerate() if t.name == "gaffer-http"]

    def req(self, method, path, body=None, raw=None, headers=None, token=True):
        """(status, decoded JSON body, headers) of one request."""
        headers = dict(headers or {})
        if self.token and token:
            headers.setdefault("Authorization", "Bearer " + self.token)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:  # what each route takes: raw bytes for stdin and streams, JSON elsewhere
            raw_route = re.search(r"/(stdin|streams/)", path)
            headers.setdefault("Content-Type", "application/octet-stream" if raw_route else "application/json")
        headers = {key: value for key, value in headers.items() if value is not None}  # None: leave it out
        conn = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null"), dict(resp.getheaders())
        finally:
            conn.close()

    def ok(self, method, path, body=None, status=200, **kw):
        got, payload, _ = self.req(method, path, body, **kw)
        self.assertEqual(got, status, payload)
        return payload

    def sse(self, path):
        """Open an event stream with the command line's own reader: an iterator of (event, data), read as
        the SSE specification says (CR LF, CR and LF each end a line); close() ends it."""
        events = client("127.0.0.1:%d" % self.http.port, self.token).events(path, TIMEOUT)
        self.addCleanup(events.close)
        return events


def parse_exposition(text):
    """Prometheus's text format 0.0.4, read strictly: {name: {"type", "help", "samples": {labels: value}}}.
    AssertionError on what Prometheus would refuse: a sample before its TYPE, a family split in two, a
    TYPE or HELP twice, a bad name, label or escape, a duplicate series, a counter not named _total."""
    name_re, label_re = r"[a-zA-Z_:][a-zA-Z0-9_:]*", r"[a-zA-Z_][a-zA-Z0-9_]*"
    families, done, current = {}, set(), None
    assert text.endswith("\n"), "the exposition ends with a newline"
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = "line %d: %r" % (number, line)
        if line.startswith("# "):
            keyword, name, rest = (line[2:].split(" ", 2) + [""])[:3]
            if keyword not in ("HELP", "TYPE"):
                continue  # a comment
            assert re.fullmatch(name_re, name), where
            family = families.setdefault(name, {"type": None, "help": None, "samples": {}})
            assert family[keyword.lower()] is None and name not in done, "%s: a second %s" % (where, keyword)
            if keyword == "TYPE":
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped"), where
                assert not family["samples"], "%s: TYPE after samples" % where
            family[keyword.lower()] = rest
            if current != name:
                done.add(current)
            current = name
            continue
        match = re.fullmatch(r"(%s)(?:\{(.*)\})? (\S+)(?: -?\d+)?" % name_re, line)
        assert match, where
        name, labels_text, value = match.groups()
        assert name == current and families[name]["type"], "%s: a sample outside its family, or before TYPE" % where
        labels, rest = [], labels_text or ""
        while rest:
            label = re.match(r'(%s)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)' % label_re, rest)
            assert label, "%s: bad labels at %r" % (where, rest)
            labels.append((label.group(1), re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1),
                                                  label.group(2))))
            rest = rest[label.end():]
        key = tuple(sorted(labels))
        assert len(dict(labels)) == len(labels), "%s: a label twice" % where
        assert key not in families[name]["samples"], "%s: a duplicate series" % where
        families[name]["samples"][key] = float(value)
        if families[name]["type"] == "counter":
            assert name.endswith("_total"), "%s: a counter's name ends with _total" % where
    return families


class MetricsTest(HttpTestCase):
    """GET /metrics in Prometheus's text format: the jobs, slots, cgroups, held sockets and the manager."""

    token = "metrics-scrape-token-1234"
    stats_interval = 0.05

    def scrape(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/metrics", headers={"Authorization": "Bearer " + self.token})
            resp = conn.getresponse()
            body = resp.read().decode()
            self.assertEqual((resp.status, resp.getheader("Content-Type")),
                             (200, "text/plain; version=0.0.4; charset=utf-8"), body)
            return parse_exposition(body)
        finally:
            conn.close()

    @staticmethod
    def value(families, name, **labels):
        samples = families[name]["samples"]
        found = [value for key, value in samples.items() if dict(key).items() >= labels.items()]
        if len(found) != 1:
            raise AssertionError("%s %r: %d series in %r" % (name, labels, len(found), samples))
        return found[0]

    def test_jobs_slots_cgroups_and_the_manager(self):
        self.load("web", 2)
        self.load("once", code="import sys; sys.exit(3)", restart="never")
        self.rec.wait_for("job.default.once.failed")
        self.assertEqual(self.req("GET", "/metrics", token=False)[0], 401, "the token rule of every route")
        first = self.scrape()  # the first scrape starts the sampler: no process has been read yet
        for name in ("gaffer_job_state", "gaffer_job_processes", "gaffer_job_restarts_total",
                     "gaffer_process_start_time_seconds", "gaffer_process_ready", "gaffer_process_last_exit_code",
                     "gaffer_manager_uptime_seconds", "gaffer_manager_loop_turn_max_seconds"):
            self.assertIn(name, first)
            self.assertTrue(first[name]["help"], name)
        self.assertEqual(self.value(first, "gaffer_job_state", job="web", state="running"), 1)
        self.assertEqual(sum(v for k, v in first["gaffer_job_state"]["samples"].items() if ("job", "web") in k), 1,
                         "one state at a time")
        self.assertEqual(self.value(first, "gaffer_job_state", job="once", state="failed"), 1)
        self.assertEqual(self.value(first, "gaffer_job_processes", job="web", kind="target"), 2)
        self.assertEqual(self.value(first, "gaffer_job_processes", job="web", kind="ready"), 2)
        self.assertEqual(self.value(first, "gaffer_process_last_exit_code", job="once", slot="1"), 3)
        self.assertEqual(self.value(first, "gaffer_process_ready", session="default", job="web", slot="2"), 1)
        start = self.value(first, "gaffer_process_start_time_seconds", job="web", slot="1")
        self.assertLess(abs(start - time.time()), 60)
        wait_until(lambda: "gaffer_process_resident_memory_bytes" in self.scrape(), what="a tick of the sampler")
        later = self.scrape()
        self.assertGreater(self.value(later, "gaffer_process_resident_memory_bytes", job="web", slot="1"), 1 << 20)
        self.assertGreaterEqual(self.value(later, "gaffer_process_cpu_seconds_total", job="web", slot="1"), 0)
        self.assertGreater(self.value(later, "gaffer_manager_uptime_seconds"), 0)
        if self.m._containment.cgroups is not None:  # cpu.stat is there without any controller
            self.assertGreater(self.value(later, "gaffer_cgroup_cpu_seconds_total", job="web", slot="1"), 0)
        else:
            self.assertNotIn("gaffer_cgroup_cpu_seconds_total", later)
        os.kill(self.os_pid(self.m.pids("web")[0]), signal.SIGKILL)
        self.rec.wait_for("spawn", count=3, name="default.web")
        wait_until(lambda: self.value(self.scrape(), "gaffer_job_restarts_total", job="web") == 1)
        self.assertEqual(self.value(self.scrape(), "gaffer_process_last_exit_code", job="web", slot="1"), -9)

    def test_a_held_socket_s_waiting_connections(self):
        self.m.add_socket("web", "tcp://127.0.0.1:0")
        port = int(self.m.sockets()[0]["address"].rpartition(":")[2])
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for conn in conns:
            self.addCleanup(conn.close)
        wait_until(lambda: self.value(self.scrape(), "gaffer_socket_waiting_connections", socket="web") == 3)

    def test_label_values_are_escaped(self):
        self.assertEqual(gaffer._label_value('a"b\\c\nd'), '"a\\"b\\\\c\\nd"')
        families = parse_exposition('# TYPE x gauge\nx{a="q\\"\\\\\\n"} 1\n')
        self.assertEqual(families["x"]["samples"], {(("a", 'q"\\\n'),): 1.0})

    @unittest.skipUnless(shutil.which("promtool"), "promtool (Debian's prometheus package) is not installed")
    def test_promtool_accepts_it(self):
        self.load("web", 2)
        conn = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=TIMEOUT)
        conn.request("GET", "/metrics", headers={"Authorization": "Bearer " + self.token})
        text = conn.getresponse().read()
        conn.close()
        result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class Receiver:
    """A local HTTP server that records the JSON bodies posted to it: it answers 200, fails (500) the
    first `failures` posts, or hangs (never answers) until it is closed."""

    def __init__(self, test, failures=0, hang=False):
        import http.server
        self.bodies, self.attempts, self.release = [], 0, threading.Event()
        self.cond = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.cond:
                    receiver.attempts += 1
                    failing = receiver.attempts <= failures
                if hang:
                    receiver.release.wait(30)
                    return
                if not failing:  # before the answer: the next post, on another thread, comes after it
                    with receiver.cond:
                        receiver.bodies.append((self.path, self.headers["Content-Type"], json.loads(body)))
                        receiver.cond.notify_all()
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d/hook" % self.server.server_address[1]
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        test.addCleanup(lambda: (self.release.set(), self.server.shutdown(), self.server.server_close(),
                                 thread.join(5)))

    def wait(self, count, timeout=TIMEOUT):
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.bodies) >= count, timeout):
                raise AssertionError("%d posts, not %d: %r" % (len(self.bodies), count, self.bodies))
            return list(self.bodies)


class WebhooksTest(ManagerTestCase):
    """WebhooksApp: events posted as JSON to URLs, each URL on a thread and a queue of its own."""

    def make_apps(self):
        self.ok, self.failing, self.hanging = Receiver(self), Receiver(self, failures=2), Receiver(self, hang=True)
        self.hooks = gaffer.WebhooksApp({"exit": [self.ok.url, self.hanging.url],
                                         "job.default.w": self.failing.url}, timeout=0.3, retry_for=2.0)
        return [self.hooks]

    def test_events_posted_retried_and_a_hanging_url_delays_nothing(self):
        started = time.monotonic()
        self.load("w", code="import sys; sys.exit(3)", restart="never")
        path, content_type, body = self.ok.wait(1)[0]
        self.assertLess(time.monotonic() - started, 5, "not held up by the URL that hangs")
        self.assertEqual((path, content_type), ("/hook", "application/json"))
        self.assertEqual((body["event"], body["name"], body["exit_status"]), ("exit", "default.w", 3))
        events = [b["event"] for _, _, b in self.failing.wait(2)]
        self.assertEqual(events[:2], ["job.default.w.start", "job.default.w.spawn"],
                         "in order, the first retried past two failures")
        wait_until(lambda: "job.default.w.failed" in [b["event"] for _, _, b in self.failing.bodies],
                   what="all of the job's events, its last one too")
        wait_until(lambda: self.failing.attempts - self.hooks.stats()[self.failing.url]["sent"] == 2,
                   what="two failed attempts, the rest sent (once the last answer was read)")
        self.assertEqual(self.hooks.stats()[self.hanging.url]["sent"], 0)
        wait_until(lambda: self.hooks.stats()[self.hanging.url]["failed"] >= 1, TIMEOUT,
                   "the hanging URL's post given up after retry_for")

    def test_bad_hooks_are_refused(self):
        for hooks, message in [({"exit": "ftp://host/x"}, "a webhook URL is http:// or https:// with a host, got"),
                               ({"exit": "http:///x"}, "with a host"),
                               ({"exit": []}, "webhook 'exit': give a URL or a list of URLs, got []"),
                               ({3: "http://h/"}, "a webhook's event pattern is a string"),
                               ({"exit": "http://h:99999/"}, "webhook URL 'http://h:99999/': Port out of range"),
                               ("http://h/", "hooks must be a dict of event patterns to URLs")]:
            with self.subTest(hooks=hooks), self.assertRaisesRegex(ValueError, re.escape(message)):
                gaffer.WebhooksApp(hooks)

    def test_a_full_queue_drops_and_counts(self):
        hooks = gaffer.WebhooksApp({".": self.hanging.url}, timeout=0.2, retry_for=0, max_queue=2)
        hooks.start(self.m.loop, self.m)
        self.addCleanup(hooks.stop)
        self.load("w", 3)
        wait_until(lambda: hooks.stats()[self.hanging.url]["dropped"] > 0, what="posts dropped")


class HttpTest(HttpTestCase):

    def test_read_routes(self):
        self.load("w", 2)
        self.assertEqual(self.ok("GET", "/"), {"name": "gaffer", "version": gaffer.__version__})
        self.assertEqual(self.ok("GET", "/version")["version"], gaffer.__version__)
        self.assertEqual(self.ok("GET", "/ping"), {"ok": True})
        self.assertEqual(self.ok("GET", "/sessions"), {"sessions": ["default"]})
        self.assertEqual(self.ok("GET", "/jobs"), {"jobs": ["default.w"]})
        self.assertEqual(self.ok("GET", "/jobs/default"), {"sessionid": "default", "jobs": ["default.w"]})
        info = self.ok("GET", "/jobs/default/w")
        self.assertEqual((info["name"], info["running"], info["processes"]), ("default.w", 2, [1, 2]))
        self.assertEqual([s["pid"] for s in self.ok("GET", "/jobs/default/w/stats")["stats"]], [1, 2])
        self.assertEqual(self.ok("GET", "/jobs/default/w/numprocesses"), {"numprocesses": 2})
        self.assertEqual(self.ok("GET", "/jobs/default/w/state"), {"active": True})
        self.assertEqual(self.ok("GET", "/jobs/default/w/pids"), {"pids": [1, 2]})
        self.assertEqual(self.ok("GET", "/pids"), {"pids": [1, 2]})
        self.assertEqual(self.ok("GET", "/1")["os_pid"], self.os_pid(1))
        self.assertEqual(self.ok("GET", "/1/stats")["pid"], 1)

    def test_write_routes(self):
        config = {"name": "w", "cmd": PY, "args": SLEEP, "graceful_timeout": 2}
        self.assertEqual(self.ok("POST", "/jobs/s1", config, status=201), {"ok": True})
        self.assertEqual(self.m.pids("s1.w"), [1])
        self.ok("POST", "/jobs/s1", {**config, "name": "idle", "start": False}, status=201)
        self.assertEqual(self.m.pids("s1.idle"), [])
        self.assertEqual(self.ok("POST", "/jobs/s1/w/numprocesses", {"scale": "+2"}), {"numprocesses": 3})
        self.assertEqual(self.ok("POST", "/jobs/s1/w/numprocesses", {"scale": -1}), {"numprocesses": 2})
        self.ok("POST", "/jobs/s1/w/state", {"state": "stop"}, status=202)
        self.assertFalse(self.m.info("s1.w")["active"])
        self.ok("POST", "/jobs/s1/w/state", {"state": "start"}, status=202)
        self.ok("POST", "/jobs/s1/w/state", {"state": "reload"}, status=202)
        self.assertEqual(len(self.m.pids("s1.w")), 1)
        pid = self.ok("POST", "/jobs/s1/w/commit", {"env": {"X": "1"}, "graceful_timeout": 1})["pid"]
        self.assertTrue(self.m.get_process(pid).once)
        self.ok("PUT", "/jobs/s1/w", {**config, "numprocesses": 3}, status=201)
        self.assertEqual(self.m.info("s1.w")["max_processes"], 3)
        self.ok("POST", "/jobs/s1/w/signal", {"signal": "KILL"}, status=202)
        self.rec.wait_for("exit", count=4, name="s1.w", term_signal=9)
        victim = self.m.pids("s1.w")[0]
        self.ok("POST", "/%d/signal" % victim, {"signal": 9}, status=202)
        self.rec.wait_for("exit", pid=victim)
        victim = self.m.pids("s1.w")[0]
        self.assertEqual(self.ok("DELETE", "/%d" % victim), {"ok": True})
        self.assertNotIn(victim, self.m.pids())
        self.assertEqual(self.ok("DELETE", "/jobs/s1/w"), {"ok": True})
        self.assertEqual(self.m.jobs(), ["s1.idle"])

    def test_stdin_and_stream_writes(self):
        self.load("echo", code=ECHO, redirect_input=True, redirect_output=["out"])
        self.ok("POST", "/1/stdin", raw=b"raw body\n", status=202)
        self.wait_output(1, b"echo:raw body\n")
        code = """
            import os, socket
            sock = socket.socket(fileno=int(os.environ["GAFFER_STREAM_CTL"]))
            data = sock.recv(100)
            sock.sendall(b"ctl got " + data)
            sock.recv(1)
        """
        self.load("ctl", code=code, custom_streams=["ctl"])
        pid = self.m.pids("ctl")[0]
        self.ok("POST", "/%d/streams/ctl" % pid, raw=b"hello", status=202)
        self.wait_output(pid, b"ctl got hello")

    def test_errors(self):
        self.load("w")
        cases = [
            ("POST", "/jobs/default", None, b"{not json", 400, "not valid JSON"),
            ("POST", "/jobs/default", None, b"[1, 2]", 400, "must be a JSON object"),
            ("POST", "/jobs/default", {"name": "x"}, None, 400, "needs 'cmd'"),
            ("POST", "/jobs/default", {"name": "x", "cmd": "y", "numprocess": 1}, None, 400, "did you mean"),
            ("POST", "/jobs/default", {"name": "x", "cmd": "y", "numprocesses": -1}, None, 400, ">= 0"),
            ("POST", "/jobs/default", {"name": "w", "cmd": PY}, None, 409, "already loaded"),
            ("POST", "/jobs/default/w/numprocesses", {}, None, 400, "needs 'scale'"),
            ("POST", "/jobs/default/w/numprocesses", {"scale": "lots"}, None, 400, "scale must be"),
            ("POST", "/jobs/default/w/state", {"state": "dance"}, None, 400, "state must be"),
            ("POST", "/jobs/default/w/signal", {"signal": "NOPE"}, None, 400, "signal"),
            ("PUT", "/jobs/default/w", {"name": "other", "cmd": PY}, None, 400, "names job 'other'"),
            ("GET", "/jobs/default/nope", None, None, 404, "not found"),
            ("GET", "/jobs/nope", None, None, 404, "not found"),
            ("GET", "/99", None, None, 404, "not found"),
            ("GET", "/nowhere", None, None, 404, "no route"),
            ("POST", "/1/stdin", None, b"x", 400, "redirect_input is off"),
            ("GET", "/1/streams/out", None, None, 404, "no output or stream"),
            ("POST", "/jobs/default", None, b"x" * 5000, 413, "over the limit"),
        ]
        for method, path, body, raw, status, reason in cases:
            with self.subTest(method=method, path=path, body=body if raw is None else raw[:20]):
                got, payload, _ = self.req(method, path, body, raw=raw)
                self.assertEqual((got, payload["errno"]), (status, status), payload)
                self.assertIn(reason, payload["error"])
        got, payload, headers = self.req("DELETE", "/pids")
        self.assertEqual((got, headers.get("Allow")), (405, "GET"))
        self.assertEqual(self.m.jobs(), ["default.w"], "no bad request reached the manager")
        self.assertEqual(self.m.pids(), [1])
        self.assertEqual(headers.get("Gaffer-Version"), gaffer.__version__, "on every answer: what a proxy passes on")
        got, payload, _ = self.req("POST", "/jobs/default/w/commit")  # no body: no Content-Type needed (curl -X POST)
        self.assertEqual((got, payload), (200, {"pid": 2}))

    def test_ready_probe(self):
        self.assertEqual(self.ok("GET", "/ready"), {"ready": True}, "no job: nothing to wait for")
        self.load("w")
        self.load("slow", code="import time; time.sleep(60)", ready="output:never", redirect_output=["out"])
        self.m.load(gaffer.ProcessConfig("idle", PY, ready="output:never", redirect_output=["out"]), start=False)
        status, payload, _ = self.req("GET", "/ready")
        self.assertEqual((status, payload["ready"], payload["waiting"], payload["errno"]),
                         (503, False, ["default.slow"], 503), "a stopped job is not waited for")
        self.assertEqual(self.ok("GET", "/1")["status"], "ready")
        self.assertEqual(self.ok("GET", "/jobs/default/slow")["ready"], 0)
        self.m.stop_job("slow")
        self.assertEqual(self.ok("GET", "/ready"), {"ready": True})

    def test_watch_events(self):
        events = self.sse("/watch?pattern=job.default.w")
        self.load("w")
        evtype, data = next(events)
        self.assertEqual(evtype, "job.default.w.start")
        self.assertEqual(json.loads(data)["name"], "default.w")
        evtype, data = next(events)
        self.assertEqual((evtype, json.loads(data)["pid"]), ("job.default.w.spawn", 1))
        events.close()  # the client leaves: the server's stream ends (the teardown checks its thread is gone)

    def test_output_streams_as_text_and_base64(self):
        code = """
            import os, sys
            sys.stdin.readline()
            os.write(1, "héllo\\nworld".encode())
            os.write(2, bytes([0, 255]))
        """
        self.load("w", code=code, redirect_output=["out", "err"], redirect_input=True)
        text = self.sse("/1/streams/out")
        binary = self.sse("/1/streams/err?encoding=base64")
        self.m.send(1, "go\n")
        received = ""
        for evtype, data in text:
            self.assertEqual(evtype, "out")
            received += data
        self.assertEqual(received, "héllo\nworld", "the stream ended with the process")
        self.assertEqual([(e, base64.b64decode(d)) for e, d in binary], [("err", bytes([0, 255]))])

    def test_streams_end_when_the_manager_stops(self):
        self.load("w")
        events = self.sse("/watch")
        done = threading.Event()
        seen = []
        reader = threading.Thread(target=lambda: (seen.extend(events), done.set()))
        reader.start()
        self.m.stop()
        self.assertTrue(done.wait(TIMEOUT), "the stream ended")
        reader.join(TIMEOUT)
        self.assertIn("stop", [e for e, _ in seen])


class HttpSecurityTest(HttpTestCase):
    """What a web page in the user's browser, or a hostile client, may try against the loopback API."""

    options = dict(allowed_hosts=["gaffer.test"], allowed_origins=["https://ops.example"], request_timeout=1.0)
    JOB = {"name": "pwned", "cmd": PY, "args": SLEEP}

    def test_cross_site_requests_are_refused_and_change_nothing(self):
        self.load("w", redirect_input=True)
        port = self.http.port
        cases = [
            # a form or a fetch() with a "simple" content type: no CORS preflight would stop it
            ("POST", "/jobs/default", {"Content-Type": "text/plain"}, 415),
            ("POST", "/jobs/default", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
            ("POST", "/jobs/default", {"Content-Type": "multipart/form-data; boundary=x"}, 415),
            ("POST", "/jobs/default", {"Content-Type": None}, 415),
            ("POST", "/jobs/default/w/state", {"Content-Type": "text/plain"}, 415),
            ("POST", "/1/stdin", {"Content-Type": "text/plain"}, 415),
            ("POST", "/1/stdin", {"Content-Type": "application/json"}, 415),
            # a cross-origin request, whatever it sends
            ("POST", "/jobs/default", {"Origin": "http://evil.example"}, 403),
            ("POST", "/jobs/default", {"Origin": "null"}, 403),
            ("GET", "/jobs", {"Origin": "http://localhost:%d.evil.example" % port}, 403),
            # DNS rebinding: evil.example now resolves to 127.0.0.1
            ("POST", "/jobs/default", {"Host": "evil.example:%d" % port}, 403),
            ("GET", "/jobs", {"Host": "evil.example"}, 403),
            ("GET", "/jobs", {"Host": "127.0.0.1.evil.example:%d" % port}, 403),
            # a CORS preflight is never granted
            ("OPTIONS", "/jobs/default", {"Origin": "http://evil.example",
                                          "Access-Control-Request-Method": "POST"}, 403),
            ("OPTIONS", "/jobs/default", {}, 405),
        ]
        for method, path, headers, status in cases:
            with self.subTest(method=method, path=path, headers=headers):
                body = self.JOB if path == "/jobs/default" else {"state": "stop"}
                data = json.dumps(body).encode()
                got, payload, answer = self.req(method, path, raw=data, headers=headers)
                self.assertEqual((got, payload["errno"]), (status, status), payload)
                self.assertFalse([k for k in answer if k.lower().startswith("access-control")])
        self.assertEqual(self.m.jobs(), ["default.w"], "nothing was loaded")
        self.assertTrue(self.m.info("w")["active"], "nothing was stopped")
        self.assertEqual(self.output[1], b"", "nothing reached stdin")

    def exchange(self, data):
        """Send raw bytes; return every answer's status until the server closes the connection."""
        with socket.create_connection(("127.0.0.1", self.http.port), timeout=TIMEOUT) as sock:
            sock.sendall(data)
            received = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        return [int(status) for status in re.findall(rb"(?:^|\n)HTTP/1\.[01] (\d{3}) ", received)]

    def test_framing_is_strict_so_nothing_can_be_smuggled(self):
        self.load("w")
        smuggled = b"DELETE /jobs/default/w HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        body = json.dumps({"state": "start"}).encode()
        head = b"POST /jobs/default/w/state HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        cases = [  # each: the first request refused, the connection closed, the "body" never served
            (b"Transfer-Encoding: chunked \r\n", 501),
            (b"Transfer-Encoding: identity, chunked\r\n", 501),
            (b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(body), 501),
            (b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(body), len(body)), 400),
            (b"Content-Length: %d\r\nContent-Length: 0\r\n" % len(body), 400),
            (b"Content-Length : 0\r\n", 400),
            (b"X-Folded: a\r\n Content-Length: 0\r\n", 400),
        ]
        for headers, status in cases:
            with self.subTest(headers=headers):
                self.assertEqual(self.exchange(head + headers + b"\r\n" + body + smuggled), [status])
        self.assertEqual(self.m.jobs(), ["default.w"], "no smuggled DELETE ran")
        self.assertEqual(self.exchange(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body),
                         [202], "one Content-Length is served")

    def test_output_cannot_inject_an_event(self):
        injection = "x\\r\\revent: injected\\rdata: evil\\r\\r"
        self.load("w", code="import sys, time\nsys.stdout.write('%s\\n')\nsys.stdout.flush()\ntime.sleep(60)" % injection,
                  redirect_output=["out"])
        wait_until(lambda: self.m.get_process(1).tail(), what="the output")
        events = self.sse("/1/streams/out?tail=1")
        event, data = next(events)  # read as the SSE specification says: CR LF, CR and LF end lines
        self.assertEqual((event, data.split("\n")), ("out", ["x", "", "event: injected", "data: evil", "", ""]),
                         "every CR became a line of the one event's data")

    def test_the_servers_own_names_and_origins_are_served(self):
        port = self.http.port
        for host in ("127.0.0.1:%d" % port, "localhost:%d" % port, "LOCALHOST", "[::1]:%d" % port,
                     "127.9.9.9", "gaffer.test:%d" % port, "gaffer.test"):
            with self.subTest(host=host):
                self.assertEqual(self.ok("GET", "/jobs", headers={"Host": host}), {"jobs": []})
        for origin in ("http://127.0.0.1:%d" % port, "https://ops.example"):
            with self.subTest(origin=origin):
                self.assertEqual(self.ok("GET", "/jobs", headers={"Origin": origin}), {"jobs": []})
        self.ok("POST", "/jobs/default", self.JOB, status=201, headers={"Origin": "https://ops.example"})
        self.assertEqual(self.m.jobs(), ["default.pwned"])

    def test_an_error_answer_changes_nothing(self):
        bad = [
            ({**self.JOB, "cwd": "/no/such/dir"}, 400, "the job was not loaded"),
            ({**self.JOB, "name": "a\nb"}, 400, "ASCII"),
            ({**self.JOB, "graceful_timeout": 1e300}, 400, "graceful_timeout must be <="),
        ]
        for body, status, reason in bad:
            with self.subTest(body=body):
                got, payload, _ = self.req("POST", "/jobs/default", body)
                self.assertEqual(got, status, payload)
                self.assertIn(reason, payload["error"])
        self.assertEqual(self.m.jobs(), [])
        self.load("w")
        got, payload, _ = self.req("GET", "/%D9%A1")  # an Arabic-Indic one is not pid 1
        self.assertEqual(got, 404, payload)
        got, payload, _ = self.req("POST", "/jobs/default/w/numprocesses", {"scale": "+\u0661"})
        self.assertEqual(got, 400, payload)
        self.assertEqual(self.m.info("w")["max_processes"], 1)

    def test_every_error_is_json(self):
        deep = b"[" * 100000 + b"]" * 100000
        cases = [
            (b"PATCH /jobs HTTP/1.1\r\nHost: localhost\r\n\r\n", 405),
            (b"BREW /jobs HTTP/1.1\r\nHost: localhost\r\n\r\n", 501),
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET /jobs HTTP/9.9\r\n\r\n", 505),
            (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
            (b"GET /jobs HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
            (b"GET /jobs HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n", 431),
            (b"POST /jobs/default HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
             % (len(deep), deep), 413),
        ]
        for data, status in cases:
            with self.subTest(request=data[:40]):
                got, payload = self.raw(data)
                self.assertEqual((got, payload["errno"]), (status, status), payload)
        self.http.max_body = 1 << 20
        got, payload, _ = self.req("POST", "/jobs/default", raw=deep)
        self.assertEqual(got, 400, payload)
        self.assertIn("nested too deep", payload["error"])

    def test_half_open_and_slow_clients_are_dropped_while_others_are_served(self):
        port, threads_before = self.http.port, len(self.http_threads())
        rude = []
        for _ in range(10):  # half a request line, then silence
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /ping HTT")
            rude.append(sock)
        short = socket.create_connection(("127.0.0.1", port))  # a body shorter than its Content-Length
        short.sendall(b"POST /jobs/default HTTP/1.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"na")
        rude.append(short)
        drip = socket.create_connection(("127.0.0.1", port))  # one byte at a time, never late by much
        rude.append(drip)
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)  # keep-alive, then idle
        idle.request("GET", "/ping")
        self.assertEqual(idle.getresponse().read(), b'{"ok": true}\n')
        rude.append(idle.sock)
        for sock in rude:
            self.addCleanup(sock.close)
        wait_until(lambda: len(self.http_threads()) >= threads_before + 13, what="every client served a thread")
        started = time.monotonic()
        self.assertEqual(self.ok("GET", "/ping"), {"ok": True})
        self.assertLess(time.monotonic() - started, 5, "the others are served meanwhile")
        dripped = 0
        try:
            while time.monotonic() - started < 5:
                drip.sendall(b"GET /ping HTTP/1.1\r\n"[dripped % 20:dripped % 20 + 1])
                dripped += 1
                if wait_readable(drip, 0.2):
                    break
        except OSError:
            pass
        for sock in rude:
            with self.subTest(sock=sock):
                sock.settimeout(TIMEOUT)
                try:
                    self.assertEqual(sock.recv(100), b"", "the server closed the connection")
                except ConnectionResetError:
                    pass
        self.assertLess(time.monotonic() - started, 8, "dropped after request_timeout (1 s), not held")
        wait_until(lambda: len(self.http_threads()) <= threads_before, what="their threads gone")
        self.assertEqual(self.m.jobs(), [])

    def test_clients_that_leave_print_no_traceback(self):
        self.load("w", code="import sys; sys.stdout.write('x' * 100000); sys.stdout.flush(); import time; "
                            "time.sleep(60)", redirect_output=["out"])
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            for path in ("/jobs/default/w/stats", "/watch", "/1/streams/out", "/jobs"):
                for _ in range(5):
                    sock = socket.create_connection(("127.0.0.1", self.http.port))
                    sock.sendall(b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % path.encode())
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()  # a reset, mid-answer
            self.assertEqual(self.ok("GET", "/ping"), {"ok": True})
            wait_until(lambda: len(self.http_threads()) == 0, what="every handler thread ended")
        self.assertNotIn("Traceback", stderr.getvalue())


def wait_readable(sock, timeout):
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(timeout))


class HttpLimitsTest(HttpTestCase):
    options = dict(max_connections=2, request_timeout=1.0)

    def test_past_max_connections_clients_wait_in_the_backlog(self):
        port = self.http.port
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for sock in idle:
            self.addCleanup(sock.close)
        wait_until(lambda: len(self.http_threads()) == 2, what="the two idle clients served")
        most = []
        watching = threading.Event()

        def count_threads():
            while not watching.is_set():
                most.append(len(self.http_threads()))
                time.sleep(0.01)

        watcher = threading.Thread(target=count_threads)
        watcher.start()
        try:
            started = time.monotonic()
            self.assertEqual(self.ok("GET", "/ping"), {"ok": True})  # served once an idle one is dropped
            waited = time.monotonic() - started
        finally:
            watching.set()
            watcher.join()
        self.assertGreater(waited, 0.5, "it waited for a free connection")
        self.assertLessEqual(max(most), 2, "never more threads than max_connections")

    def test_two_hundred_simultaneous_clients_are_all_answered(self):
        sel = selectors.DefaultSelector()
        self.addCleanup(sel.close)
        started = time.monotonic()
        for _ in range(200):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", self.http.port))
            sel.register(sock, selectors.EVENT_WRITE, [b""])
        answered, slowest = 0, 0.0
        while answered < 200 and time.monotonic() - started < 30:
            for key, mask in sel.select(1):
                sock = key.fileobj
                if mask & selectors.EVENT_WRITE:
                    sock.send(b"GET /ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    sel.modify(sock, selectors.EVENT_READ, key.data)
                    continue
                data = sock.recv(4096)
                key.data[0] += data
                if not data:
                    self.assertIn(b'{"ok": true}', key.data[0])
                    sel.unregister(sock)
                    sock.close()
                    answered += 1
                    slowest = time.monotonic() - started
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        self.assertEqual(answered, 200)
        self.assertLess(slowest, 10, "no client waits on a full backlog (SYN retries)")


class HttpTokenTest(HttpTestCase):
    token = "s3cret-token-of-the-test"  # 16 characters at least over TCP

    def test_token_required(self):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": self.token}):
            with self.subTest(headers=headers):
                status, payload, _ = self.req("GET", "/jobs", headers=headers, token=False)
                self.assertEqual((status, payload["errno"]), (401, 401))
        self.assertEqual(self.ok("GET", "/jobs"), {"jobs": []})

    def test_the_dashboard_page_and_the_api_it_calls(self):
        self.m.stats_interval = 0.1  # the charts' ticks
        conn = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=TIMEOUT)
        conn.request("GET", "/", headers={"Accept": "text/html,application/xhtml+xml"})  # a browser, no token
        resp = conn.getresponse()
        page = resp.read().decode()
        conn.close()
        self.assertEqual((resp.status, resp.getheader("Content-Type")), (200, "text/html; charset=utf-8"))
        policy = resp.getheader("Content-Security-Policy")
        script = page.split("<script>", 1)[1].split("</script>", 1)[0]
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        self.assertIn("script-src 'sha256-%s';" % digest, policy, "only its own script runs")
        self.assertTrue(policy.startswith("default-src 'none';") and "connect-src 'self'" in policy, policy)
        self.assertNotRegex(page, r"(src|href)\s*=\s*[\"']?(https?:)?//", "no external asset")
        self.assertNotRegex(script, r"innerHTML|localStorage|sessionStorage|document\.cookie|\?token=",
                            "text only, and the token stays in memory, never in a URL or a cookie")
        self.assertLess(len(page.splitlines()), 400)
        self.assertEqual(self.req("GET", "/", token=False)[0], 401, "curl still gets JSON, behind the token")
        self.assertEqual(self.ok("GET", "/")["name"], "gaffer")
        # What the page calls, each as it calls it: the same API as any client.
        for fragment in ('"/version"', '"/status?history=1"', '"/watch"', '"/state", {state: "start"}',
                         '"/numprocesses", {scale:',
                         '"/logs?lines=200&follow=1"', '"/streams/" + encodeURIComponent(outputs[0]) + "?tail=200"',
                         '"Bearer " + token'):
            self.assertIn(fragment, script)
        self.load("w", code="import time\nprint('hello', flush=True)\ntime.sleep(60)", redirect_output=["out"])
        self.assertEqual(self.ok("GET", "/version")["name"], "gaffer")
        self.assertEqual([job["name"] for job in self.ok("GET", "/status")["jobs"]], ["default.w"])
        self.assertNotIn("history", self.ok("GET", "/status")["jobs"][0], "ps asks for none")
        wait_until(lambda: len(self.ok("GET", "/status?history=1")["jobs"][0]["history"]) >= 2,
                   what="the charts' history, kept by the sampler once the page asks for it")
        point = self.ok("GET", "/status?history=1")["jobs"][0]["history"][-1]
        self.assertTrue(abs(point[0] - time.time()) < 60 and point[2] > 1 << 20, point)
        for state in ("stop", "start", "reload"):
            self.ok("POST", "/jobs/default/w/state", {"state": state}, status=202)
        self.assertEqual(self.ok("POST", "/jobs/default/w/numprocesses", {"scale": "=2"}), {"numprocesses": 2})
        lines = self.sse("/jobs/default/w/logs?lines=200&follow=1")
        self.assertEqual(json.loads(next(lines)[1])["line"], "hello")
        pid = self.m.pids("w")[0]
        wait_until(lambda: self.m.get_process(pid).tail() == ["hello"])
        output = self.sse("/%d/streams/out?tail=200" % pid)
        label, data = next(output)
        while not data.endswith("\n"):  # "hello" may have been read before its newline was written
            data += next(output)[1]
        self.assertEqual((label, data), ("out", "hello\n"))
        self.sse("/watch")

    def test_a_public_address_needs_a_token(self):
        with self.assertRaisesRegex(ValueError, "refusing to serve '0.0.0.0:0' without a token"):
            gaffer.HttpHandler("0.0.0.0:0")
        public = gaffer.HttpHandler("0.0.0.0:0", token="t" * 16)
        self.assertEqual(public.address, ("0.0.0.0", 0))

    def test_addresses(self):
        self.assertEqual(gaffer.HttpHandler(8080).address, ("127.0.0.1", 8080))
        self.assertEqual(gaffer.HttpHandler(":8080").address, ("127.0.0.1", 8080))
        self.assertEqual(gaffer.HttpHandler("[::1]:80").address, ("::1", 80))
        self.assertEqual(gaffer.HttpHandler("unix:/tmp/g.sock").address, "/tmp/g.sock")
        self.assertEqual(gaffer.HttpHandler("http://127.0.0.1:8080/").address, ("127.0.0.1", 8080), "a URL")
        for bad in ("host:port", "127.0.0.1:70000", "unix:", None, "127.0.0.1:\u0665\u0660\u0660\u0660"):
            with self.subTest(address=bad), self.assertRaisesRegex(ValueError, "address"):
                gaffer.HttpHandler(bad)
        for settings, message in [
            (dict(max_connections=0), "max_connections must be >= 1"),
            (dict(max_connections=10 ** 9), "max_connections must be <= "),
            (dict(request_timeout=float("inf")), "request_timeout must be <= "),
            (dict(request_timeout=0), "request_timeout must be >= "),
            (dict(allowed_hosts="example.com"), "allowed_hosts must be a list"),
            (dict(allowed_origins=[None]), "allowed_origins must be a list"),
        ]:
            with self.subTest(settings=settings), self.assertRaisesRegex(ValueError, message):
                gaffer.HttpHandler("127.0.0.1:0", **settings)


class HttpUnixSocketTest(LeakCheckedTestCase):

    def test_serve_on_a_unix_socket(self):
        path = os.path.join(self.tmp, "gaffer.sock")
        app = gaffer.HttpHandler("unix:" + path)
        m = gaffer.Manager()
        m.start([app])
        try:
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, "only its owner may connect")
            api = client("unix:" + path)
            self.assertEqual(api.request("GET", "/ping"), {"ok": True})
            with socket.socket(socket.AF_UNIX) as sock:  # any Host: no browser reaches a unix socket
                sock.connect(path)
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
                self.assertIn(b"200 OK", sock.recv(1000))
        finally:
            m.stop()
            m.run()
        self.assertFalse(os.path.exists(path), "the socket file is removed at stop")


# -- Command line ------------------------------------------------------------------

GAFFER = os.path.abspath(gaffer.__file__)
# The command line runs as "python3 -m gaffer" with its bytecode cached in a directory of the
# suite's own: a script is compiled at every start (80 ms here), and this machine's environment
# sets PYTHONDONTWRITEBYTECODE.  test_version_help_and_python_m runs "python3 gaffer.py" itself.
CLI = [PY, "-S", "-m", "gaffer"]  # -S: without site-packages, which gaffer never needs (and a slow .pth here)
CLI_ENV = {"PYTHONPATH": os.path.dirname(GAFFER), "PYTHONDONTWRITEBYTECODE": ""}


def setUpModule():
    CLI_ENV["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="gaffer-test-pycache-")
    logger = logging.getLogger("gaffer")  # kept, not printed: a test about a log line uses assertLogs
    logger.addHandler(LOGGED)
    logger.propagate = False


def tearDownModule():
    shutil.rmtree(CLI_ENV.pop("PYTHONPYCACHEPREFIX"), True)
    logging.getLogger("gaffer").removeHandler(LOGGED)
    logging.getLogger("gaffer").propagate = True


class CommandLineTestCase(LeakCheckedTestCase):
    """Runs gaffer.py as a program in a temporary directory."""

    def write(self, name, text):
        return write_dedented(os.path.join(self.tmp, name), text)

    def gaffer(self, *args, timeout=60, env=None):
        return subprocess.run([*CLI, *args], cwd=self.tmp, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **CLI_ENV, **(env or {})})

    def cli(self, *args):
        """gaffer.main(args) in this process, in the temporary directory: for the commands that only read
        files and arguments (check, help, bad input), a program start each would cost 0.1 s here."""
        out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
        os.chdir(self.tmp)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = gaffer.main(list(args))
                except SystemExit as exc:  # argparse: --help, a bad choice
                    code = exc.code
        finally:
            os.chdir(cwd)
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())

    def spawn(self, *args, env=None):
        """Start gaffer.py in the background; lines it prints are collected for wait_line()."""
        proc = subprocess.Popen([*CLI, *args], cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, **CLI_ENV, **(env or {})})
        lines, cond = [], threading.Condition()

        def read():
            for line in proc.stdout:
                with cond:
                    lines.append(line.rstrip("\n"))
                    match = re.search(r"started with pid (\d+)", line)
                    if match:
                        self.session_leaders.add(int(match.group(1)))
                    cond.notify_all()
            with cond:
                lines.append(None)
                cond.notify_all()

        reader = threading.Thread(target=read)
        reader.start()
        proc.lines = lines

        def wait_line(pattern, count=1, timeout=TIMEOUT):
            with cond:
                ok = cond.wait_for(lambda: len([l for l in lines if l and re.search(pattern, l)]) >= count, timeout)
                if not ok:
                    raise AssertionError("no line matching %r in %r" % (pattern, lines))
                return [l for l in lines if l and re.search(pattern, l)]

        def finish(timeout=TIMEOUT):
            code = proc.wait(timeout)
            reader.join(timeout)
            proc.stdout.close()
            return code

        proc.wait_line, proc.finish = wait_line, finish
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), finish()))
        return proc


class RunnerTest(CommandLineTestCase):

    PROCFILE = """
        # a comment, then a blank line

        web: echo "web port=$PORT greeting=$GREETING"; exec sleep 60
        worker: exec python3 -c "import time; print('working', flush=True); time.sleep(60)"
    """

    def test_start_prefixes_ports_concurrency_and_ctrl_c(self):
        self.write("Procfile", self.PROCFILE)
        self.write(".env", """
            # comment
            export GREETING="hello world"  # trailing comment
            OTHER='single # quoted'
        """)
        proc = self.spawn("start", "-c", "web=2")
        lines = proc.wait_line(r"web\.\d +\| web port=", count=2)
        proc.wait_line(r"worker\.1 \| working")
        self.assertEqual(sorted(re.search(r"port=(\d+)", l).group(1) for l in lines), ["5000", "5001"])
        self.assertIn("greeting=hello world", lines[0])
        self.assertRegex(lines[0], r"^\d\d:\d\d:\d\d web\.[12]\s+\| ")
        self.assertFalse(any("\033[" in l for l in proc.lines if l), "no colour when piped")
        proc.wait_line(r"system\s+\| worker\.1 started with pid \d+")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.finish(), 0, "stopped on request")
        self.assertEqual(len(proc.wait_line(r"stopping")), 3)

    def test_honchos_own_scenarios(self):
        """What a user coming from honcho runs, as honcho's documentation shows it."""
        self.write("Procfile", "web: exec sleep 60\n")
        proc = self.spawn("start", "-c", "web=0")  # nothing to run: back at once, as honcho
        self.assertEqual(proc.finish(), 0)
        self.write("Procfile.dev", 'web: echo "port=$PORT name=$GAFFER_PROCESS_NAME"; exec sleep 60\n'
                                   'quiet: echo hushed; echo done; touch said; exec sleep 60\n')
        self.write("dev.env", "PORT=7000\n")
        proc = self.spawn("-f", "Procfile.dev", "-e", "dev.env", "start", "--no-colour", "-q", "quiet")
        proc.wait_line(r"web\.1 +\| port=7000 name=web\.1$")  # PORT from the .env file, the name honcho gives
        wait_until(lambda: os.path.exists(os.path.join(self.tmp, "said")), what="the quiet process wrote")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.finish(), 0, proc.lines)
        self.assertFalse([line for line in proc.lines if line and "hushed" in line], "-q hides its output")
        proc = self.spawn("start", "--no-prefix", env={"PROCFILE": "Procfile.dev", "PORT": "7100"})
        proc.wait_line(r"^port=7100 name=web\.1$")  # $PROCFILE and $PORT from the environment, no prefix
        proc.wait_line(r"^done$")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.finish(), 0, proc.lines)
        self.write(".env", "PROCFILE=Procfile.dev\n")
        self.assertIn("valid Procfile Procfile.dev", self.cli("check").stdout, "PROCFILE from .env")
        self.assertIn("valid Procfile Procfile", self.cli("-f", "Procfile", "check").stdout, "-f before the command")
        self.assertEqual(self.cli("-e", "dev.env", "check").returncode, 0)
        self.assertEqual(self.cli("version").stdout, "gaffer.py %s\n" % gaffer.__version__)
        result = self.cli("export", "supervisord", os.path.join(self.tmp, "out"), "-a", "app")  # honcho's: no -o
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(os.listdir(os.path.join(self.tmp, "out")), ["app.conf"])

    def test_the_first_exit_stops_the_rest_and_gives_the_code(self):
        self.write("Procfile", """
            fail: sleep 0.5; exit 3
            long: exec sleep 60
        """)
        proc = self.spawn("start")
        self.assertEqual(proc.finish(), 3)
        proc.wait_line(r"fail\.1 exited with code 3")
        proc.wait_line(r"long\.1 stopping")

    def test_keep_alive_and_a_subset(self):
        self.write("Procfile", """
            blink: echo blink
            other: exec sleep 60
        """)
        proc = self.spawn("start", "--keep-alive", "blink")
        proc.wait_line(r"blink\.1 \| blink", count=3)
        self.assertFalse(any("other" in l for l in proc.lines if l))
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.finish(), 0)

    def test_start_serves_the_controller_and_scales_a_type_with_a_port_each(self):
        self.write("Procfile", """
            web: exec python3 -S -c "import os, signal, time; port = os.environ['PORT']; signal.signal(signal.SIGUSR1, lambda *a: print('usr1 on', port, flush=True)); print('port', port, flush=True); time.sleep(60)"
            worker: exec sleep 60
        """)
        sock = os.path.join(self.tmp, "runner.sock")
        http = ("--http", "unix:" + sock)
        proc = self.spawn("start", "-c", "web=2", *http)
        proc.wait_line(r"worker\.1 started")
        proc.wait_line(r"web\.\d +\| port", count=2)
        self.assertEqual(client("unix:" + sock).request("GET", "/jobs")["jobs"],
                         ["default.web", "default.worker"])
        result = self.gaffer("ps", *http)
        self.assertEqual([line.split()[0] for line in result.stdout.splitlines()[1:]],
                         ["default.web.1", "default.web.2", "default.worker.1"])
        result = self.gaffer("scale", "web", "4", *http)  # the type, as honcho's -c counts it
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "web: 4"), result.stderr)
        ports = {re.search(r"(web\.\d) +\| port (\d+)", line).groups() for line in proc.wait_line(r"web\.\d +\| port",
                                                                                               count=4)}
        self.assertEqual(ports, {("web.1", "5000"), ("web.2", "5001"), ("web.3", "5002"), ("web.4", "5003")})
        logs = self.spawn("logs", "-f", "-n", "0", "web.3", *http)  # one process, by the name start shows
        for sent in range(1, 100):  # until logs is connected: it shows what comes after
            result = self.gaffer("kill", "web.3", "USR1", *http)
            self.assertEqual(result.returncode, 0, result.stderr)
            proc.wait_line(r"web\.3 +\| usr1 on 5002", count=sent)
            try:
                logs.wait_line(r"^\d\d:\d\d:\d\d web\.3 \| usr1 on 5002$", timeout=0.2)  # as logs -n prints it
                break
            except AssertionError:
                pass
        else:
            self.fail("logs web.3 never showed its output")
        logs.terminate()
        logs.finish()
        self.assertRegex(self.gaffer("logs", "-n", "1", "web.3", *http).stdout, r"^\d\d:\d\d:\d\d web\.3 \| usr1 on 5002\n$")
        self.assertEqual(self.gaffer("scale", "web", "2", *http).returncode, 0)  # the highest slots go
        proc.wait_line(r"web\.[34] killed by signal 15", count=2)
        self.assertFalse([line for line in proc.lines if re.search(r"web\.[12] (killed|stopping)", line)])
        result = self.gaffer("kill", "web.4", "USR1", *http)
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr.strip(), r"^gaffer: web.4: default.web has no process in slot 4 now "
                                                r"\(it has 1, 2\)$")
        result = self.gaffer("status", "web.1", *http)  # as kill and logs take it
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"^default\.web\.1: ready, pid \d+, os pid \d+, up \d+:\d\d:\d\d, cpu ")
        result = self.gaffer("stop", "web.1", *http)
        self.assertEqual(result.returncode, 2)
        self.assertRegex(result.stderr.strip(), r"^gaffer: web.1 is process 1 of job default.web: this command "
                                                r"takes the job \(web\)")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.finish(), 0)

    def test_second_ctrl_c_kills_at_once(self):
        self.write("Procfile", """
            stubborn: exec python3 -c "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
        """)
        proc = self.spawn("start", "--graceful-timeout", "60")
        proc.wait_line(r"stubborn\.1 \| ready")
        proc.send_signal(signal.SIGINT)
        proc.wait_line(r"stopping")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.finish(timeout=10), 0)
        proc.wait_line(r"killed by signal 9")

    def test_second_ctrl_c_kills_what_a_leader_left_at_once(self):
        # The leader exits on SIGTERM; its child ignores it: the group outlives its reaped leader.
        code = ("import os, signal, time\n"
                "if os.fork() == 0:\n"
                "    signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60); os._exit(0)\n"
                "print('ready', flush=True); time.sleep(60)\n")
        proc = self.spawn("run", "--graceful-timeout", "60", "--", PY, "-c", code)
        proc.wait_line(r"\| ready")
        proc.send_signal(signal.SIGINT)
        proc.wait_line(r"exited with code|killed by signal")  # the leader is gone, its child is not
        self.assertIsNone(proc.poll(), "run waits for the rest of the group")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.finish(timeout=10), 0)

    def test_colour_on_a_terminal(self):
        import pty
        self.write("Procfile", "hello: echo hi\n")
        primary, secondary = pty.openpty()
        proc = subprocess.Popen([PY, GAFFER, "start"], cwd=self.tmp, stdout=secondary, stderr=secondary)
        os.close(secondary)
        output = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            output += chunk
        os.close(primary)
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertIn(b"\033[", output)
        self.assertIn(b"hi", output)
        result = self.gaffer("start", "--no-color")
        self.assertNotIn("\033[", result.stdout)

    def test_run_one_command(self):
        proc = self.spawn("run", "-n", "2", "--name", "hello", "--", PY, "-c",
                          "import time; print('hi', flush=True); time.sleep(60)")
        proc.wait_line(r"hello\.1 \| hi")
        proc.wait_line(r"hello\.2 \| hi")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.finish(), 0)

    def test_a_closed_stdout_stops_the_runner_quietly(self):
        read_end, write_end = os.pipe()
        proc = subprocess.Popen([PY, GAFFER, "run", "--", "echo", "hello"], cwd=self.tmp, stdout=write_end,
                                stderr=subprocess.PIPE, text=True)
        os.close(write_end)
        self.assertTrue(os.read(read_end, 100), "some output came")
        os.close(read_end)  # the reader goes away, as head does
        self.assertEqual(proc.wait(TIMEOUT), 1)
        self.assertNotIn("Traceback", proc.stderr.read())
        proc.stderr.close()

    def test_run_keeps_the_command_alive_and_names_it_after_the_script(self):
        self.write("worker.py", "print('once')\n")
        proc = self.spawn("run", "--", PY, "-S", "worker.py")
        proc.wait_line(r"^\S+ worker\.1 +\| once", count=3)  # not "python3.1", which reads like a version
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.finish(), 0)
        for command, name in ((["python3", "-m", "http.server"], "http_server"), (["/bin/sleep", "1"], "sleep"),
                              (["python3", "-c", "pass"], "python3"), (["node", "app/server.js"], "server")):
            self.assertEqual(gaffer._run_name(command), name)

    def test_check_and_bad_input(self):
        self.write("Procfile", self.PROCFILE)
        result = self.cli("check")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("web: echo", result.stdout)
        self.assertIn("2 process types", result.stdout)
        self.write("Bad", "web: ok\nthis line is wrong\n")
        self.write("Dup", "web: a\n\nweb: b\n")
        self.write("bad.env", "GOOD=1\nnot a pair\n")
        with open(os.path.join(self.tmp, "Latin1"), "wb") as f:
            f.write(b"web: echo ok\nworker: echo caf\xe9\n")
        with open(os.path.join(self.tmp, "latin1.env"), "wb") as f:
            f.write(b"NAME=caf\xe9\n")
        cases = [
            (["check", "-f", "Latin1"], r"^gaffer: Latin1:2: the Procfile is not UTF-8 \(byte 0xe9\)$"),
            (["start", "-e", "latin1.env"], r"^gaffer: latin1.env:1: the env file is not UTF-8 \(byte 0xe9\)$"),
            (["start", "--graceful-timeout", "-3"], r"^gaffer: start: argument --graceful-timeout: seconds must "
                                                    r"be >= 0, got -3.0$"),
            (["run", "--graceful-timeout", "nan", "--", "true"], r"argument --graceful-timeout: seconds must"),
            (["start", "-p", "70000"], r"^gaffer: start: argument -p/--port: port must be <= 65535, got 70000$"),
            (["start", "-p", "65500", "-c", "web=2"], r"^gaffer: -p 65500: worker.1 would get \$PORT 65600, "
                                                      r"past 65535$"),
            (["ps", "--http", "nonsense"], r"^gaffer: ps: argument --http: address 'nonsense': the port must be"),
            (["wait", "web", "--timeout", "inf"], r"argument --timeout: seconds must be <= "),
            (["scale", "web", "=x"], r"^gaffer: scale: N, =N, \+N or -N expected, got '=x'$"),
            (["check", "-f", "Bad"], r"Bad:2: expected 'name: command'"),
            (["check", "-f", "Dup"], r"Dup:3: process 'web' is already defined at line 1"),
            (["check", "-f", "Missing"], r"cannot read Procfile Missing"),
            (["start", "-e", "bad.env"], r"bad.env:2: expected KEY=value"),
            (["start", "-c", "nope=2"], r"-c: no process named 'nope'"),
            (["start", "-c", "web=x"], r"-c: expected name=count"),
            (["start", "nope"], r"no process named 'nope'"),
            (["run"], r"give the command after --"),
            (["run", "-n", "0", "--", "true"], r"-n: copies must be >= 1"),
            (["run", "-n", "x", "--", "true"], r"^gaffer: run: argument -n: copies must be an integer, got 'x'$"),
            (["start", "-q", "nope"], r"^gaffer: -q: no process named 'nope' \(there are web, worker\)$"),
            (["export", "systemd"], r"give the directory to write in, as -o DIR or after the format, once"),
            (["run", "--http", "0.0.0.0:1", "--", "true"], r"refusing to serve '0.0.0.0:1' without a token"),
            (["run", "--http", "nowhere:port", "--", "true"], r"the port must be a number"),
            (["frobnicate"], r"invalid choice"),
        ]
        for args, message in cases:
            with self.subTest(args=args):
                result = self.cli(*args)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertRegex(result.stderr, message)
                self.assertEqual(len(result.stderr.strip().splitlines()), 1, "one clear line")
        result = self.cli("scale", "web", "x", "--json")  # for scripts: the error as JSON on stdout
        self.assertEqual((result.returncode, result.stderr), (2, ""))
        self.assertEqual(json.loads(result.stdout), {"error": "scale: N, =N, +N or -N expected, got 'x'",
                                                     "exit_code": 2})

    def test_a_missing_binary_is_said_once(self):
        result = self.gaffer("run", "--", "/nonexistent/binary")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        lines = [line for line in result.stdout.splitlines() if "/nonexistent/binary" in line]
        self.assertEqual(len(lines), 1, result.stdout)
        self.assertRegex(lines[0], r"system +\| job 'default.binary' cannot start '/nonexistent/binary': "
                                   r"\[Errno 2\] No such file or directory")

    def test_every_option_says_what_it_does(self):
        parser = gaffer._parser()
        commands = next(action for action in parser._actions if action.dest == "command").choices
        for name, sub in commands.items():
            for action in sub._actions:
                with self.subTest(command=name, option=action.option_strings or action.dest):
                    self.assertTrue(action.help and action.help.strip(), "--help gives it a line")

    def test_version_help_and_python_m(self):
        for form in ([PY, GAFFER], [PY, "-m", "gaffer"]):  # the script, and the module the other tests run
            with self.subTest(form=form):
                result = subprocess.run([*form, "--version"], cwd=os.path.dirname(GAFFER), capture_output=True,
                                        text=True, timeout=30)
                self.assertEqual(result.stdout.strip(), "gaffer.py %s" % gaffer.__version__)
        for command in ("start", "run", "check", "serve", "ps", "scale", "kill", "watch", "logs", "export"):
            with self.subTest(command=command):
                result = self.cli(command, "--help")
                self.assertEqual(result.returncode, 0)
                self.assertIn("usage: gaffer %s" % command, result.stdout)


class ServeTest(CommandLineTestCase):
    """serve from JSON and INI files, SIGHUP, and every client command against it."""

    def serve(self, config, *extra, env=None):
        self.sock = os.path.join(self.tmp, "g.sock")
        proc = self.spawn("serve", "-c", config, "--http", "unix:" + self.sock, *extra, env=env)
        self.addCleanup(lambda: proc.poll() is None and (proc.terminate(), proc.finish()))
        proc.wait_line(r"ready: \d+ jobs")
        return proc

    def client(self, *args, check=True):
        # In this process (self.cli): a client command only sends requests and prints; a program start
        # each costs 0.1 s here.  logs and watch, and the tests of start-up itself, run as programs.
        result = self.cli(*args, "--http", "unix:" + self.sock)
        if check:
            self.assertEqual(result.returncode, 0, result.stderr)
        return result

    def jobs(self):
        return client("unix:" + self.sock).request("GET", "/jobs")["jobs"]

    def pids(self, job="default.a"):
        return client("unix:" + self.sock).request("GET", "/jobs/%s/pids" % job.replace(".", "/"))["pids"]

    def json_config(self, jobs):
        return self.write("gaffer.json", json.dumps({"jobs": jobs}))

    def job(self, name, **settings):
        return {"name": name, "cmd": PY, "args": SLEEP, "graceful_timeout": 2, **settings}

    def record_leaders(self):
        for pid in client("unix:" + self.sock).request("GET", "/pids")["pids"]:
            info = client("unix:" + self.sock).request("GET", "/%d" % pid)
            self.session_leaders.add(info["os_pid"])

    def test_json_config_sighup_and_sigterm(self):
        config = self.json_config([self.job("a"), self.job("b", numprocesses=2), self.job("c", session="s")])
        proc = self.serve(config)
        self.assertEqual(self.jobs(), ["default.a", "default.b", "s.c"])
        self.record_leaders()
        a_pids = self.pids()
        self.json_config([self.job("a"), self.job("b", numprocesses=3), self.job("d")])
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: self.jobs() == ["default.a", "default.b", "default.d"],
                   what="reloaded config; serve printed %r" % proc.lines)
        proc.wait_line(r"INFO gaffer: reloaded %s: 1 loaded \(default\.d\), 1 updated \(default\.b\), 1 unloaded "
                       r"\(s\.c\)$" % re.escape(config))  # one line that counts and names them
        self.record_leaders()
        self.assertEqual(self.pids(), a_pids, "an unchanged job is untouched")
        self.assertEqual(len(self.pids("default.b")), 3)
        proc.terminate()
        self.assertEqual(proc.finish(), 0)

    def test_a_socket_of_the_config_is_kept_across_sighup_and_closed_with_its_last_job(self):
        server = self.write("server.py", SD_LISTEN_SERVER)
        config = self.write("gaffer.ini", """
            [socket:web]
            address = tcp://127.0.0.1:0
            backlog = 64

            [job:web]
            cmd = %s
            args = -S %s
            sockets = web
            graceful_timeout = 2

            [job:other]
            cmd = %s
            args = -S -c "import time; time.sleep(60)"
            graceful_timeout = 2
            """ % (PY, server, PY))
        check = self.cli("check", "-c", config)
        self.assertIn("  socket web: tcp://127.0.0.1:0", check.stdout.splitlines())
        proc = self.serve(config)
        self.record_leaders()
        api = client("unix:" + self.sock)
        sockets = api.request("GET", "/sockets")["sockets"]
        self.assertEqual([(s["name"], s["jobs"]) for s in sockets], [("web", ["default.web"])])
        address = sockets[0]["address"]
        first = ask(address)
        self.assertEqual(first, api.request("GET", "/%d" % self.pids("default.web")[0])["os_pid"])
        proc.send_signal(signal.SIGHUP)  # the same file: the socket and its process stay
        proc.wait_line(r"reloaded .*: 0 loaded, 0 updated, 0 unloaded")
        self.assertEqual(api.request("GET", "/sockets")["sockets"][0]["address"], address)
        self.assertEqual(ask(address), first)
        self.assertIn("default.web: sockets web", self.client("ps").stdout.splitlines())
        self.write("gaffer.ini", """
            [job:other]
            cmd = %s
            args = -S -c "import time; time.sleep(60)"
            graceful_timeout = 2
            """ % PY)
        proc.send_signal(signal.SIGHUP)
        proc.wait_line(r"reloaded .*: 0 loaded, 0 updated, 1 unloaded \(default\.web\)")
        wait_until(lambda: api.request("GET", "/sockets")["sockets"] == [], what="the socket closed with its job")
        wait_until(lambda: not self.port_open(address), what="its port closed")
        proc.terminate()
        self.assertEqual(proc.finish(), 0)

    @staticmethod
    def port_open(address):
        try:
            ask(address)
        except ConnectionRefusedError:
            return False
        except (OSError, ValueError):  # a process still stopping closed it unanswered
            return True
        return True

    def test_a_socket_that_cannot_be_bound_stops_serve_and_run_in_one_line(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            address = "tcp://127.0.0.1:%d" % taken.getsockname()[1]
            config = self.json_config([self.job("a", sockets=["web"])])
            with open(config) as f:
                data = json.load(f)
            data["sockets"] = {"web": address}
            with open(config, "w") as f:
                json.dump(data, f)
            result = self.gaffer("serve", "-c", config, "--http", "unix:" + os.path.join(self.tmp, "g.sock"))
            self.assertEqual(result.returncode, 1, result.stderr)
            self.assertEqual(result.stderr.strip().splitlines()[-1],
                             "gaffer: %s: cannot bind socket 'web' to %s: [Errno 98] Address already in use"
                             % (config, address))
            result = self.gaffer("run", "--socket", "web=" + address, "--", PY, "-c", "pass")
            self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
            self.assertIn("cannot bind socket 'web' to %s: [Errno 98] Address already in use" % address, result.stdout)
        for args, message in ((("run", "--socket", "web", "--", PY), "give NAME=ADDRESS"),
                              (("run", "--socket", "web=127.0.0.1:80", "--", PY), "a socket address is")):
            with self.subTest(args=args):
                result = self.cli(*args)
                self.assertEqual(result.returncode, 2)
                self.assertIn(message, result.stderr)
        bad = self.write("bad.json", json.dumps({"jobs": [self.job("a", sockets=["nope"])]}))
        result = self.cli("check", "-c", bad)
        self.assertEqual((result.returncode, result.stderr.strip()),
                         (2, "gaffer: %s: default.a: sockets names 'nope', which the file does not declare" % bad))

    def test_run_with_a_socket(self):
        port = free_port()
        proc = self.spawn("run", "--socket", "web=tcp://127.0.0.1:%d" % port, "--", PY, "-S", "-c",
                          textwrap.dedent(SD_LISTEN_SERVER), "--fd", "$GAFFER_SOCKET_WEB")
        self.addCleanup(lambda: proc.poll() is None and (proc.terminate(), proc.finish()))
        report = json.loads(proc.wait_line(r'"names": \["web"\]')[0].split("| ", 1)[1])
        self.assertEqual((report["argv"], report["ports"]), (["--fd", "3"], [port]))
        self.assertEqual(ask("tcp://127.0.0.1:%d" % port), report["pid"])
        proc.terminate()
        self.assertEqual(proc.finish(), 0)

    def test_ini_config(self):
        config = self.write("gaffer.ini", """
            [gaffer]
            http_endpoints = public

            [endpoint:public]
            bind = 127.0.0.1:0

            [job:a]
            cmd = %s
            args = -c "import os, time; print(os.environ['GREETING'], flush=True); time.sleep(60)"
            numprocesses = 2
            redirect_output = out, err
            graceful_timeout = 2
            flapping = 3, 1.5, 7, 2

            [env:a]
            GREETING = hello

            [process:s.b]
            cmd = %s
            args = -c "import time; time.sleep(60)"
            stop_children = false
        """ % (PY, PY))
        os.mkdir(os.path.join(self.tmp, "conf.d"))
        self.write("conf.d/c.ini", "[job:c]\ncmd = %s\nargs = %s\ndepends_on = d\n" % (PY, shlex.join(SLEEP)))
        self.write("conf.d/d.json", json.dumps({"jobs": [self.job("d", session="default")]}))
        self.write("conf.d/notes.txt", "not a config")
        with open(config) as f:  # jobs from other files: an INI glob, a JSON file, depends_on across them
            text = f.read().replace("[gaffer]\n", "[gaffer]\ninclude = conf.d/*.ini conf.d/d.json\n")
        self.write("gaffer.ini", text)
        proc = self.serve(config)
        self.assertEqual(self.jobs(), ["default.a", "default.c", "default.d", "s.b"])

        def states():
            return [(job["state"], job["restarts"]) for job in json.loads(self.client("status", "--json").stdout)]
        wait_until(lambda: states() == [("running", 0)] * 4, what="every job running, none restarted")
        self.record_leaders()
        info = client("unix:" + self.sock).request("GET", "/jobs/default/a")
        self.assertEqual((info["running"], info["config"]["env"], info["config"]["flapping"]["window"],
                          info["config"]["redirect_output"]), (2, {"GREETING": "hello"}, 1.5, ["out", "err"]))
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.finish(), 0)

    def test_sigusr1_reopens_log_files_after_a_logrotate(self):
        log = os.path.join(self.tmp, "logs", "a.log")
        tick = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.05)\n"
        server = self.serve(self.json_config([self.job("a", args=["-S", "-c", tick], log_file="logs/{name}.log")]))
        self.record_leaders()
        wait_until(lambda: os.path.exists(log) and "tick" in read_text(log))
        os.rename(log, log + ".1")  # what logrotate does, then it signals
        server.send_signal(signal.SIGUSR1)
        wait_until(lambda: os.path.exists(log) and "tick" in read_text(log), what="a new file after SIGUSR1")
        self.assertEqual(server.poll(), None, "SIGUSR1 does not stop serve")
        server.send_signal(signal.SIGINT)
        self.assertEqual(server.finish(), 0)

    def test_a_catch_up_job_missed_while_serve_was_down_runs_once_and_each_run_is_noted(self):
        config = self.json_config([self.job("nightly", args=["-S", "-c", "pass"], schedule="0 3 * * *", catch_up=True),
                                   self.job("beat", args=["-S", "-c", "pass"], every="1h", catch_up=True),
                                   self.job("plain", args=["-S", "-c", "pass"], schedule="0 3 * * *")])
        state = os.path.join(self.tmp, "state.json")
        missed = time.time() - 2 * 86400
        with open(state, "w") as f:
            json.dump({"jobs": {}, "runs": {"default.nightly": missed, "default.plain": missed}}, f)
        server = self.serve(config, "--state", state)

        def status():
            return {job["name"]: job for job in json.loads(self.client("status", "--json").stdout)}
        wait_until(lambda: all(status()[name]["last_run"] and status()[name]["last_run"]["end"]
                               for name in ("default.nightly", "default.beat")), what="both ran at start")
        jobs = status()
        self.assertEqual([jobs[name]["state"] for name in ("default.nightly", "default.beat", "default.plain")],
                         ["scheduled"] * 3)
        self.assertIsNone(jobs["default.plain"]["last_run"], "no catch_up: a missed run is not run")
        wait_until(lambda: set(json.loads(read_text(state))["runs"]) == {"default.nightly", "default.beat",
                                                                          "default.plain"}, what="the runs noted")
        runs = json.loads(read_text(state))["runs"]
        self.assertGreater(runs["default.nightly"], missed + 86400, "the run it just made")
        self.assertEqual(runs["default.plain"], missed, "kept as it was")
        ps = self.client("ps").stdout
        self.assertRegex(ps, r"default\.nightly +scheduled")
        self.assertRegex(ps, r"\ndefault\.nightly: next run \d{4}-\d\d-\d\d 03:00:00, last run [\d:\- ]+ "
                             r"\(exit 0 after \d+\.\ds\)\n")
        server.send_signal(signal.SIGINT)
        self.assertEqual(server.finish(), 0)

    def test_webhooks_from_the_config_file(self):
        receiver = Receiver(self)
        ini = self.write("hooks.ini", "[webhooks]\nexit = %s\njob.default.w = %s %s\n[job:w]\ncmd = %s -S -c pass\n"
                                      "restart = never\n" % (receiver.url, receiver.url, receiver.url, PY))
        check = self.cli("check", "-c", ini)
        self.assertEqual(check.returncode, 0, check.stderr)
        self.assertIn("  webhook exit: %s\n" % receiver.url, check.stdout)
        self.assertEqual(gaffer._read_config(self.write("hooks.json", json.dumps(
            {"webhooks": {"exit": receiver.url}, "jobs": []})))[4], {"exit": receiver.url})
        server = self.serve(ini)
        wait_until(lambda: any(body["event"] == "exit" for _, _, body in receiver.bodies), what="the exit posted")
        exit_body = next(body for _, _, body in receiver.bodies if body["event"] == "exit")
        wait_until(lambda: [body["event"] for _, _, body in receiver.bodies].count("job.default.w.exit") == 1,
                   what="the job's exit posted once (its pattern names the URL twice)")
        self.assertEqual((exit_body["name"], exit_body["exit_status"]), ("default.w", 0))
        server.send_signal(signal.SIGINT)
        self.assertEqual(server.finish(), 0)
        bad = self.write("bad.ini", "[webhooks]\nexit = ftp://example.org/\n[job:w]\ncmd = true\n")
        result = self.cli("check", "-c", bad)
        self.assertEqual((result.returncode, result.stderr.strip()), (2, "gaffer: %s: webhooks: a webhook URL is "
                         "http:// or https:// with a host, got 'ftp://example.org/'" % bad))

    def top(self, rows, columns, address=None):
        """gaffer top on a pseudo-terminal of that size: (the process, the master end)."""
        import fcntl
        import termios
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        proc = subprocess.Popen([PY, GAFFER, "top", "--http", address or "unix:" + self.sock], stdin=slave, stdout=slave,
                                stderr=slave, env=dict(os.environ, TERM="xterm"), start_new_session=True)
        os.close(slave)
        self.addCleanup(os.close, master)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        return proc, master

    @staticmethod
    def screen_text(master, until, timeout=TIMEOUT):
        """What the terminal got, escape sequences left out, read until `until` is in it."""
        import select
        data, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    data += os.read(master, 65536)
                except OSError:  # the other end closed: the program ended
                    break
            text = re.sub(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>]|\][^\x07]*\x07)", "", data.decode("utf-8", "replace"))
            if until in text:
                return text
        raise AssertionError("%r never showed; the terminal got %r" % (until, data[-2000:]))

    def test_top_through_a_pseudo_terminal(self):
        server = self.serve(self.json_config([self.job("web", numprocesses=2)]))
        self.record_leaders()
        proc, master = self.top(24, 100)
        text = self.screen_text(master, "default.web")  # the header, then the jobs: the first frame
        self.assertIn("JOB", text)
        self.assertIn("web.2 pid", self.screen_text(master, "web.2 pid") if "web.2 pid" not in text else text,
                      "each slot's process under its job")
        os.write(master, b"+")
        wait_until(lambda: json.loads(self.client("status", "--json").stdout)[0]["target"] == 3,
                   what="+ scaled the job up")
        self.record_leaders()
        os.write(master, b"s")
        wait_until(lambda: json.loads(self.client("status", "--json").stdout)[0]["state"] == "stopped",
                   what="s stopped the selected job")
        os.write(master, b"q")
        self.assertEqual(proc.wait(TIMEOUT), 0, "q quits with 0")
        server.send_signal(signal.SIGINT)
        server.finish()

    def test_top_refuses_a_pipe_and_a_tiny_terminal_in_one_line(self):
        server = self.serve(self.json_config([self.job("web")]))
        self.record_leaders()
        result = self.cli("top", "--http", "unix:" + self.sock)  # in this process: stdout is no tty
        self.assertEqual((result.returncode, result.stderr.strip()),
                         (2, "gaffer: top: needs a terminal (stdin and stdout are not ttys); use ps or watch instead"))
        proc, master = self.top(8, 30)
        text = self.screen_text(master, "needs 40x10")
        self.assertIn("gaffer: top: the terminal is 30x8; it needs 40x10 at least", text)
        self.assertEqual(proc.wait(TIMEOUT), 2)
        import http.server
        other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        threading.Thread(target=other.serve_forever, daemon=True).start()
        self.addCleanup(lambda: (other.shutdown(), other.server_close()))
        proc, master = self.top(24, 100, "127.0.0.1:%d" % other.server_address[1])
        self.assertIn("is not a gaffer server", self.screen_text(master, "gaffer server"))
        self.assertEqual(proc.wait(TIMEOUT), 1)
        server.send_signal(signal.SIGINT)
        server.finish()

    def test_schedules_in_ini_and_json(self):
        ini = self.write("s.ini", "[job:backup]\ncmd = sleep 1\nschedule = 30 2 * * mon-fri\njitter = 10m\n"
                         "concurrency = queue\ncatch_up = yes\n[job:probe]\ncmd = true\nevery = 5m\n")
        as_json = self.write("s.json", json.dumps({"jobs": [
            {"name": "backup", "cmd": "sleep 1", "schedule": "30 2 * * mon-fri", "jitter": "10m",
             "concurrency": "queue", "catch_up": True}, {"name": "probe", "cmd": "true", "every": 300}]}))
        for path in (ini, as_json):
            with self.subTest(path=os.path.basename(path)):
                (_, backup), (_, probe) = gaffer._read_config(path)[0]
                self.assertEqual((backup.schedule, backup.jitter, backup.concurrency, backup.catch_up, probe.every),
                                 ("30 2 * * mon-fri", 600.0, "queue", True, 300.0))
        bad = self.write("bad.ini", "[job:backup]\ncmd = true\nschedule = 30 25 * * *\n")
        result = self.cli("check", "-c", bad)
        self.assertEqual(result.returncode, 2)
        self.assertIn("schedule '30 25 * * *': the hour field takes 0-23, got '25'", result.stderr)

    def test_state_file_brings_back_what_the_api_changed(self):
        config = self.json_config([self.job("a"), self.job("d")])
        state = os.path.join(self.tmp, "state.json")
        server = self.serve(config, "--state", state)
        self.client("scale", "a", "3")
        self.write("more.json", json.dumps({"jobs": [self.job("b", session="s2"), self.job("c")]}))
        self.client("load", "more.json")
        self.client("stop", "c")
        self.client("unload", "d")
        self.client("kill", "a", "CONT")  # not a change to restore
        self.record_leaders()
        recorded = json.loads(read_text(state))["jobs"]
        self.assertEqual(sorted(recorded), ["default.a", "default.c", "default.d", "s2.b"])
        self.assertEqual(recorded["default.d"], {"unloaded": True})

        def jobs():
            return {job["name"]: (job["state"], job["target"]) for job in
                    json.loads(self.client("status", "--json").stdout)}
        before = jobs()
        self.assertEqual(before, {"default.a": ("running", 3), "s2.b": ("running", 1),
                                  "default.c": ("stopped", 1)})
        server.kill()  # no goodbye: the guardian stops the processes, the file is all that is left
        server.finish()
        wait_until(lambda: not [p for p, (_, sid, st) in proc_table().items()
                                if sid in self.session_leaders and st != "Z"], what="the guardian's cleanup")
        server = self.serve(config, "--state", state)
        self.record_leaders()
        wait_until(lambda: jobs() == before, what="the same jobs at the same scale")
        server.send_signal(signal.SIGINT)
        server.finish()
        with open(state, "w") as f:
            f.write('{"jobs": {"default.a": ')  # not JSON: corrupt (a bad entry alone: StateFileTest)
        server = self.serve(config, "--state", state)
        self.record_leaders()
        server.wait_line(r"ERROR gaffer: state file %s is corrupt \(.*\); set aside as %s.corrupt, starting "
                         r"from the config alone$" % (re.escape(state), re.escape(state)))
        self.assertEqual(jobs(), {"default.a": ("running", 1), "default.d": ("running", 1)})
        self.assertTrue(os.path.exists(state + ".corrupt") and not os.path.exists(state))
        server.send_signal(signal.SIGINT)
        self.assertEqual(server.finish(), 0)

    def test_a_hostile_state_file_never_takes_serve_down(self):
        config = self.json_config([self.job("a"), self.job("b", depends_on=["a"]), self.job("f"),
                                   self.job("g", numprocesses=3)])
        state = os.path.join(self.tmp, "state.json")

        def entry(name, count=1, active=True, **settings):
            return {"config": self.job(name, **settings), "numprocesses": count, "active": active}
        with open(state, "w") as f:
            json.dump({"jobs": {
                "default.a": entry("a", depends_on=["b"]),  # a cycle with the config's b
                "default.c": entry("c", args=5),  # a wrong type
                "default.d": entry("d", no_such_setting=1),
                "default.e": "not an object",
                "default.h": entry("h", memory_max="1G"),  # a limit this machine cannot enforce here
                "default.f": entry("f", count=3, active=False),  # stopped over the API: never spawned
                "default.g": entry("g", count=1),  # scaled down from 3
            }}, f)
        server = self.serve(config, "--state", state)
        self.record_leaders()
        prefix = r"ERROR gaffer: state file %s: " % re.escape(state)
        for name, reason in [("a", r"depends_on makes a cycle: default.a -> default.b -> default.a"),
                             ("c", r"args must be a list or a str, got 5"),
                             ("d", r"ProcessConfig has no setting 'no_such_setting'"),
                             ("e", r"its entry must be an object, got 'not an object'"),
                             ("h", r"memory_max needs .*")]:
            with self.subTest(job=name):
                self.assertEqual(len(server.wait_line(prefix + r"default\.%s is not restored: %s$" % (name, reason))),
                                 1)
        jobs = {job["name"]: (job["state"], job["target"], len(job["processes"]))
                for job in json.loads(self.client("status", "--json").stdout)}
        self.assertEqual(jobs, {"default.a": ("running", 1, 1), "default.b": ("running", 1, 1),
                                "default.f": ("stopped", 3, 0), "default.g": ("running", 1, 1)},
                         "serve runs, the config's a in place of the refused one")
        self.assertEqual([line for line in server.lines if line and '"default.f"' in line], [],
                         "the stopped job was never spawned")
        self.assertNotIn("Traceback", "\n".join(filter(None, server.lines)))
        server.send_signal(signal.SIGINT)
        self.assertEqual(server.finish(), 0)
        with open(state, "w") as f:
            f.write("{not json")
        sock = self.sock = os.path.join(self.tmp, "d.sock")
        result = self.gaffer("serve", "-c", config, "--state", state, "--daemon", "--http", "unix:" + sock)
        self.addCleanup(lambda: os.path.exists(sock) and client("unix:" + sock).request(
            "POST", "/shutdown"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stderr, r"^gaffer: state file %s is corrupt \(.*\); set aside as %s\.corrupt, "
                                        r"starting from the config alone\n$" % (re.escape(state), re.escape(state)),
                         "said on the terminal, not only in the log")
        self.record_leaders()
        self.client("shutdown")
        wait_until(lambda: not os.path.exists(sock), what="the daemon's exit")

    def test_a_job_that_cannot_start_stays_visible_and_is_retried(self):
        program = os.path.join(self.tmp, "later", "tool")  # a binary that appears later, as a mount does
        mount = os.path.join(self.tmp, "mnt")
        config = self.json_config([self.job("a"), self.job("late", cmd=program, args=[], backoff_max=0.2),
                                   self.job("nocwd", cwd=mount, backoff_max=0.2)])
        check = self.cli("check", "-c", config)
        self.assertEqual(check.returncode, 0, "a warning: it may be there when serve runs")
        self.assertEqual(check.stderr.splitlines(), [
            "gaffer: warning: default.late cannot start here now: its program %s is not found" % program,
            "gaffer: warning: default.nocwd cannot start here now: its cwd %s is not a directory" % mount])
        sock = self.sock = os.path.join(self.tmp, "d.sock")
        result = self.gaffer("serve", "-c", config, "--daemon", "--http", "unix:" + sock)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sorted(result.stderr.splitlines()), [
            "gaffer: default.late could not start, and is retried: job 'default.late' cannot start %r: [Errno 2] No "
            "such file or directory: %r" % (program, program),
            "gaffer: default.nocwd could not start, and is retried: job 'default.nocwd' cannot start %r: [Errno 2] "
            "No such file or directory: %r" % (PY, mount)], "the terminal says which jobs could not start")
        api = client("unix:" + sock)
        self.addCleanup(lambda: os.path.exists(sock) and api.request("POST", "/shutdown"))
        jobs = {job["name"]: job for job in api.request("GET", "/status")["jobs"]}
        self.assertEqual({name: (job["state"], job["target"]) for name, job in jobs.items()},
                         {"default.a": ("running", 1), "default.late": ("backoff", 1), "default.nocwd": ("backoff", 1)})
        self.assertIn("No such file or directory", jobs["default.late"]["last_error"])
        self.assertEqual(api.request("GET", "/jobs/default/late")["last_error"], jobs["default.late"]["last_error"])
        self.session_leaders.add(jobs["default.a"]["processes"][0]["os_pid"])
        ps = self.client("ps").stdout
        self.assertRegex(ps, r"default\.late\.1 +backoff ", "its slot has a row")
        self.assertIn("default.late: job 'default.late' cannot start", ps, "ps says why")
        os.mkdir(os.path.dirname(program))
        with open(program, "w") as f:
            f.write("#!%s\nimport time\ntime.sleep(60)\n" % PY)
        os.chmod(program, 0o755)
        running = wait_until(lambda: [job for job in api.request("GET", "/status")["jobs"]
                                      if job["name"] == "default.late" and job["state"] == "running"],
                             what="the job that could not start runs once its binary is there")[0]
        self.session_leaders.add(running["processes"][0]["os_pid"])
        self.assertIsNone(running["last_error"], "cleared by the spawn that worked")
        self.client("shutdown")
        wait_until(lambda: not os.path.exists(sock), what="the daemon's exit")

    def test_ps_has_a_row_per_slot_each_with_its_own_state(self):
        crash = "import os, sys, time\nif os.environ['GAFFER_PROCESS_NAME'] == 'w.2':\n    sys.exit(1)\ntime.sleep(60)"
        self.serve(self.json_config([self.job("w", args=["-S", "-c", crash], numprocesses=2, backoff_max=60)]))
        wait_until(lambda: re.search(r"default\.w\.2 +backoff ", self.client("ps").stdout),
                   what="the crash-looping slot in backoff")
        ps = self.client("ps").stdout
        rows = {line.split()[0]: line.split()[1] for line in ps.splitlines()[1:]}
        self.assertEqual(rows, {"default.w.1": "running", "default.w.2": "backoff"}, ps)
        status = json.loads(self.client("status", "--json").stdout)[0]
        self.assertEqual((status["state"], [row["slot"] for row in status["slots"]]), ("backoff", [2]))
        self.session_leaders.update(proc["os_pid"] for proc in status["processes"])

    def test_logs_of_a_job_that_captures_nothing_say_why(self):
        self.serve(self.json_config([self.job("a")]))
        self.record_leaders()
        for target in ("a", "a.1"):
            with self.subTest(target=target):
                result = self.client("logs", target)
                self.assertEqual((result.stdout, result.stderr), ("", "gaffer: default.a captures no output (its "
                                                                   "redirect_output is empty): there are no lines to show\n"))

    def test_files_serve_writes_cannot_be_steered(self):
        victim = self.write("victim", "precious\n")
        state, pidfile = os.path.join(self.tmp, "state.json"), os.path.join(self.tmp, "serve.pid")
        with open(pidfile, "w") as f:  # stale: the pid of a live program that is not gaffer (this test)
            f.write("%d\n" % os.getpid())
        server = self.serve(self.json_config([self.job("a")]), "--state", state, "--pidfile", pidfile)
        self.record_leaders()
        self.assertEqual(read_text(pidfile), "%d\n" % server.pid, "a stale pid does not stop serve")
        os.symlink(victim, "%s.%d.tmp" % (state, server.pid))  # the temporary name serve used to write
        self.client("scale", "a", "2")
        self.record_leaders()
        self.assertEqual(read_text(victim), "precious\n", "the planted symlink was not followed")
        self.assertEqual(stat.S_IMODE(os.stat(state).st_mode), 0o600, "it holds the jobs' environments")
        self.assertEqual(json.loads(read_text(state))["jobs"]["default.a"]["numprocesses"], 2)
        self.assertEqual([name for name in os.listdir(self.tmp) if name.endswith(".tmp") and "state" in name],
                         ["state.json.%d.tmp" % server.pid], "no temporary file is left")
        result = self.gaffer("serve", "-c", os.path.join(self.tmp, "gaffer.json"), "--pidfile", pidfile,
                             "--http", "unix:" + self.sock + "2")
        self.assertEqual((result.returncode, result.stderr.strip()),
                         (1, "gaffer: %s: gaffer is already running as pid %d" % (pidfile, server.pid)),
                         "the lock of a live serve is what refuses")
        server.send_signal(signal.SIGINT)
        self.assertEqual(server.finish(), 0)
        self.assertFalse(os.path.exists(pidfile))

    @unittest.skipUnless(HAVE_PROC, "reads the daemon's session in /proc")
    def test_daemon_pidfile_and_log_file(self):
        config = self.json_config([self.job("a")])
        sock = self.sock = os.path.join(self.tmp, "d.sock")
        pidfile, log = os.path.join(self.tmp, "d.pid"), os.path.join(self.tmp, "logs.txt")
        daemon = ("serve", "-c", config, "--daemon", "--pidfile", pidfile, "--log-file", log)
        result = self.gaffer(*daemon, "--http", "unix:" + sock)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))  # back once serving
        with open(pidfile) as f:
            pid = int(f.read())

        def gone():
            state = proc_table().get(pid)
            return state is None or state[2] == "Z"  # a zombie until its new parent reaps it
        self.addCleanup(lambda: gone() or (os.kill(pid, signal.SIGKILL), wait_until(gone)))
        ppid, sid, _ = proc_table()[pid]
        self.assertNotEqual(ppid, os.getpid(), "detached: not our child")
        self.assertNotIn(sid, (pid, os.getsid(0)), "a session of its own, which it does not lead")
        info = client("unix:" + sock).request("GET", "/status")["jobs"][0]
        self.session_leaders.add(info["processes"][0]["os_pid"])
        self.assertEqual((info["name"], info["running"]), ("default.a", 1))
        result = self.gaffer(*daemon, "--http", "unix:" + sock + "2")  # the same pidfile: refused
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.strip(), "gaffer: %s: gaffer is already running as pid %d" % (pidfile, pid))
        self.client("shutdown")
        wait_until(gone, what="the daemon's exit")
        self.assertFalse(os.path.exists(pidfile), "the pidfile is removed at exit")
        with open(log) as f:
            text = f.read()
        self.assertIn("serving HTTP on unix:" + sock, text)
        self.assertRegex(text, r"INFO gaffer: a\.1 started with pid \d+\n")  # as supervisord says it
        self.assertRegex(text, r"INFO gaffer: a\.1 (killed by signal 15|exited with code 0)\n")
        self.assertNotIn("GET /status", text, "HTTP requests are logged at debug level")
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with taken:  # a daemon that cannot start: the command says why, with exit code 1
            result = self.gaffer(*daemon, "--http", "127.0.0.1:%d" % taken.getsockname()[1])
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr.strip(), r"^gaffer: cannot serve on http://127.0.0.1:\d+: Address already "
                                                r"in use$")
        self.assertFalse(os.path.exists(pidfile))
        result = self.gaffer("serve", "-c", config, "--daemon", "--pidfile", "/nonexistent/d.pid", "--http",
                             "unix:" + sock)  # the daemon's own error, said by the command that started it
        self.assertEqual((result.returncode, result.stderr.strip()),
                         (2, "gaffer: --pidfile /nonexistent/d.pid: No such file or directory"))
        result = self.cli("serve", "-c", config, "--state", "/nonexistent/state.json")
        self.assertEqual((result.returncode, result.stderr.strip()),
                         (2, "gaffer: --state /nonexistent/state.json: cannot write in /nonexistent"))

    def check_refuses(self, cases):
        """Each (config file, message): check -c exits 2 with that one line."""
        for name, message in cases:
            with self.subTest(config=name):
                result = self.cli("check", "-c", name)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertRegex(result.stderr.strip(), message)

    def test_bad_includes(self):
        self.write("main.json", json.dumps({"include": ["more.json"], "jobs": [self.job("a")]}))
        self.write("more.json", json.dumps({"include": ["main.json"], "jobs": [self.job("b")]}))
        self.write("twice.json", json.dumps({"include": ["one.ini"], "jobs": [self.job("a")]}))
        self.write("one.ini", "[job:a]\ncmd = x\n")
        self.write("missing.ini", "[gaffer]\ninclude = none.ini, empty.d/*.ini\n[job:a]\ncmd = x\n")
        self.write("notlist.json", json.dumps({"include": "more.json", "jobs": []}))
        self.write("glob.ini", "[gaffer]\ninclude = empty.d/*.ini\n[job:a]\ncmd = x\n")
        self.check_refuses([
                ("main.json", r"^gaffer: more.json: include: \S*main.json includes more.json again$"),
                ("twice.json", r"^gaffer: twice.json: job default.a is defined twice \(in twice.json and "
                               r"\S*one.ini\)$"),
                ("missing.ini", r"^gaffer: missing.ini: include: cannot read none.ini$"),
                ("notlist.json", r"^gaffer: notlist.json: include: must be a list of file names or patterns$")])
        result = self.cli("check", "-c", "glob.ini")  # a pattern that matches nothing is an empty conf.d
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_bad_config_files(self):
        self.write("unknown.json", json.dumps({"jobs": [{"name": "a", "cmd": "x", "numprocess": 2}]}))
        self.write("notobject.json", "[1]")
        self.write("badint.ini", "[job:a]\ncmd = x\nnumprocesses = many\n")
        self.write("badvalue.ini", "[job:a]\ncmd = x\nnumprocesses = -1\n")
        self.write("nocmd.ini", "[job:a]\nnumprocesses = 1\n")
        cases = [
            ("unknown.json", r"unknown.json: jobs\[0\] \(a\): ProcessConfig has no setting 'numprocess'; "
                             r"did you mean 'numprocesses'"),
            ("notobject.json", r"notobject.json: the config must be a JSON object"),
            ("badint.ini", r"badint.ini: job:a/numprocesses: numprocesses must be an integer, got 'many'"),
            ("badvalue.ini", r"badvalue.ini: job:a: numprocesses must be >= 0, got -1"),
            ("nocmd.ini", r"nocmd.ini: job:a: cmd must be a non-empty str"),
            ("missing.ini", r"cannot read config file missing.ini"),
        ]
        self.write("twice.json", json.dumps({"jobs": [{"name": "a", "cmd": "x"}, {"name": "a", "cmd": "y"}]}))
        self.write("twice.ini", "[job:a]\ncmd = x\n[process:a]\ncmd = y\n")
        self.write("section.ini", "[job:a]\ncmd = x\n[jobs:b]\ncmd = y\n")
        self.write("gaffer.ini", "[gaffer]\nhtp = 127.0.0.1:1\n[job:a]\ncmd = x\n")
        self.write("endpoint.ini", "[gaffer]\nhttp_endpoints = public\n[job:a]\ncmd = x\n")
        self.write("address.json", json.dumps({"http": "nowhere", "jobs": []}))
        with open(os.path.join(self.tmp, "latin1.ini"), "wb") as f:
            f.write(b"[job:a]\ncmd = echo caf\xe9\n")
        self.write("optional.ini", "[job:a]\ncmd = x\npids_max = 5\ncpu_max = 0.5\nmemory_max = 64M\n"
                                   "max_age = 60\nport = 8000\n")
        self.check_refuses([  # what check -c reads is what serve reads: the same lines, in this process
                ("twice.json", r"^gaffer: twice.json: job default.a is defined twice$"),
                ("twice.ini", r"^gaffer: twice.ini: job default.a is defined twice$"),
                ("section.ini", r"^gaffer: section.ini: unknown section \[jobs:b\] \(the sections are"),
                ("gaffer.ini", r"^gaffer: gaffer.ini: \[gaffer\]: unknown setting 'htp'"),
                ("endpoint.ini", r"^gaffer: endpoint.ini: \[gaffer\]: http_endpoints names 'public', but there "
                                 r"is no \[endpoint:public\] section$"),
                ("address.json", r"^gaffer: address.json: http: address 'nowhere': the port must be"),
                ("latin1.ini", r"^gaffer: latin1.ini:2: the config file is not UTF-8 \(byte 0xe9\)$")])
        result = self.cli("check", "-c", "optional.ini")  # optional numbers, written as INI text
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(gaffer._read_config(os.path.join(self.tmp, "optional.ini"))[0][0][1].pids_max, 5)
        cases.append(("section.ini", r"unknown section \[jobs:b\]"))
        for name, message in cases:
            with self.subTest(config=name):
                result = self.gaffer("serve", "-c", name, "--http", "unix:" + os.path.join(self.tmp, "x.sock"))
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertRegex(result.stderr, message)

    def test_client_commands(self):
        code = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.2)\n"
        self.server = self.serve(self.json_config([self.job("a", args=["-S", "-c", code], redirect_output=["out"])]))
        self.record_leaders()
        ps = self.client("ps").stdout.splitlines()
        self.assertEqual(ps[0].split(), ["JOB", "STATE", "PID", "OS_PID", "UPTIME", "CPU%", "MEM%", "RESTARTS",
                                         "LAST", "EXIT", "COMMAND"])
        self.assertEqual(ps[1].split()[:3], ["default.a.1", "running", "1"])
        self.assertEqual(ps[1].split()[7:10], ["0", "-", PY], "no restart, no exit yet, then the command")
        row = json.loads(self.client("ps", "--json").stdout)[0]
        self.assertEqual((row["pid"], row["job"], row["state"]), (1, "default.a", "running"))
        self.assertNotIn("env", row, "never the environment")
        self.assertIn("default.a: running, 1 of 1 running, 1 ready, 0 restarts", self.client("status", "a").stdout)
        self.assertEqual(self.client("scale", "a", "3").stdout.strip(), "a: 3", "N sets the count")
        self.assertEqual(self.client("scale", "a", "+1").stdout.strip(), "a: 4")
        self.assertEqual(self.client("scale", "a", "-2").stdout.strip(), "a: 2")
        self.record_leaders()
        self.client("stop", "a")
        self.assertEqual(self.pids(), [])
        self.write("Procfile", "a: false\n")  # JOB with --http asks the server, even next to a Procfile
        self.client("start", "a")
        self.assertEqual(len(self.pids()), 2, "the scaled count, kept across stop and start")
        self.client("reload", "a")
        self.record_leaders()
        pid = self.pids()[0]
        logs = self.spawn("logs", "-f", str(pid), "--http", "unix:" + self.sock)
        logs.wait_line(r"^\d\d:\d\d:\d\d a\.\d \| tick$", count=2)  # as logs -n and start print lines
        wait_until(lambda: len(self.client("logs", "-n", "2", str(pid)).stdout.splitlines()) == 2)
        self.assertRegex(self.client("logs", "-n", "2", str(pid)).stdout,
                         r"^(\d\d:\d\d:\d\d a\.\d \| tick\n){2}$")  # as tail -n 2

        watch = self.spawn("watch", "job.default", "--http", "unix:" + self.sock)
        wait_until(lambda: self.client("kill", "a", "CONT") and [l for l in watch.lines if l and "kill" in l],
                   what="watch following the events")
        self.client("kill", str(pid), "KILL")
        watch.wait_line(r"^job\.default\.a\.exit .*\"term_signal\": 9")
        logs.finish()  # the stream ends with the process
        self.record_leaders()
        self.client("kill", "a", "TERM")
        watch.wait_line(r"job\.default\.a\.exit .*\"term_signal\": 15")
        before = set(self.pids())
        self.assertEqual(self.client("restart", "a").stdout.strip(), "a: reload")  # reload's other name
        self.record_leaders()
        self.assertFalse(before & set(self.pids()), "every process replaced")
        lines = self.client("logs", "a", "-n", "3").stdout.splitlines()  # the job's: exited processes too
        self.assertEqual(len(lines), 3)
        for line in lines:
            self.assertRegex(line, r"^\d\d:\d\d:\d\d a\.[12] \| tick$")
        follow = self.spawn("logs", "a", "-f", "-n", "1", "--http", "unix:" + self.sock)
        follow.wait_line(r"^\d\d:\d\d:\d\d a\.[12] \| tick$", count=4)  # one from history, then live ones
        follow.terminate()
        follow.finish()
        rows = client("unix:" + self.sock).request("GET", "/jobs/default/a/logs?lines=2")["lines"]
        self.assertEqual([(sorted(row), row["line"], row["label"]) for row in rows],
                         [(["label", "line", "pid", "slot", "time"], "tick", "out")] * 2)
        self.write("b.json", json.dumps(self.job("b", session="s2")))
        self.assertIn("loaded s2.b", self.client("load", "b.json").stdout)
        self.record_leaders()
        self.assertIn("s2.b", self.jobs())
        self.client("unload", "s2.b")
        self.assertNotIn("s2.b", self.jobs())
        watch.terminate()
        watch.finish()
        self.assertIn("stopping", self.client("shutdown").stdout)
        self.assertEqual(self.server.finish(), 0, "serve stops gracefully and exits 0")

    def test_the_new_settings_in_ini_and_json(self):
        ini = self.write("new.ini", """
            [job:web]
            cmd = sleep 60
            restart = on-failure
            success_codes = 0, 3
            min_uptime = 0.5
            max_rss = 200M
            max_age = 3600
            max_age_variance = 60
            ready = tcp:5000
            ready_timeout = 30
            depends_on = db
            health = http://127.0.0.1:5000/health
            health_interval = 5
            health_timeout = 2.5
            health_retries = 4
            port = 8000
            log_file = logs/{name}.{slot}.log
            log_max_bytes = 1M
            log_backups = 2
            log_timestamps = yes
            tail_bytes = 8K
            rlimits = nofile=4096 core=0 nproc=512:1024
            [job:db]
            cmd = sleep 60
        """)
        as_json = self.write("new.json", json.dumps({"jobs": [
            {"name": "web", "cmd": "sleep 60", "restart": "on-failure", "success_codes": [0, 3], "min_uptime": 0.5,
             "max_rss": "200M", "max_age": 3600, "max_age_variance": 60, "ready": "tcp:5000", "ready_timeout": 30,
             "depends_on": ["db"], "health": "http://127.0.0.1:5000/health", "health_interval": 5,
             "health_timeout": 2.5, "health_retries": 4, "port": 8000, "log_file": "logs/{name}.{slot}.log",
             "log_max_bytes": "1M", "log_backups": 2, "log_timestamps": True, "tail_bytes": 8192,
             "rlimits": {"nofile": 4096, "core": 0, "nproc": [512, 1024]}},
            {"name": "db", "cmd": "sleep 60"}]}))
        for path in (ini, as_json):
            with self.subTest(path=os.path.basename(path)):
                web = gaffer._read_config(path)[0][0][1]
                self.assertEqual((web.restart, web.success_codes, web.min_uptime, web.max_rss, web.max_age,
                                  web.max_age_variance, web.ready, web.ready_timeout, web.depends_on, web.health,
                                  web.health_interval, web.health_timeout, web.health_retries),
                                 ("on-failure", [0, 3], 0.5, 200 << 20, 3600.0, 60.0, "tcp:5000", 30.0, ["db"],
                                  "http://127.0.0.1:5000/health", 5.0, 2.5, 4))
                self.assertEqual((web.port, web.log_file, web.log_max_bytes, web.log_backups, web.log_timestamps,
                                  web.tail_bytes, web.redirect_output),
                                 (8000, "logs/{name}.{slot}.log", 1 << 20, 2, True, 8192, ["out", "err"]))
                self.assertEqual(web.rlimits, {"nofile": [4096, 4096], "core": [0, 0], "nproc": [512, 1024]})
                self.assertEqual(self.cli("check", "-c", path).returncode, 0)
        for setting, message in (("max_rss = 12 parsecs", "max_rss must be bytes or a size"),
                                 ("health = output:up", "a health check is tcp:"),
                                 ("log_file = {job}.log", "unknown field {job}"),
                                 ("log_max_bytes = lots", "log_max_bytes must be bytes or a size")):
            with self.subTest(setting=setting, message=message):
                bad = self.write("bad.ini", "[job:web]\ncmd = sleep 60\n%s\n" % setting)
                result = self.cli("check", "-c", bad)
                self.assertEqual(result.returncode, 2)
                self.assertIn(message, result.stderr)

    def test_env_files_in_config_files_are_relative_to_the_file(self):
        os.makedirs(os.path.join(self.tmp, "conf"))
        self.write("conf/app.env", "T_A=1\n")
        ini = self.write("conf/g.ini", "[job:web]\ncmd = sleep 60\nenv_file = app.env, -missing.env\n"
                         "depends_on = db:completed_successfully, cache:ready:restart\n"
                         "[job:db]\ncmd = true\nrestart = never\n[job:cache]\ncmd = sleep 60\n")
        as_json = self.write("conf/g.json", json.dumps({"jobs": [
            {"name": "web", "cmd": "sleep 60", "env_file": ["app.env", "-missing.env"],
             "depends_on": {"db": "completed_successfully", "cache": {"condition": "ready", "restart": True}}},
            {"name": "db", "cmd": "true", "restart": "never"}, {"name": "cache", "cmd": "sleep 60"}]}))
        conf = os.path.join(self.tmp, "conf")
        for path in (ini, as_json):
            with self.subTest(path=os.path.basename(path)):
                web = gaffer._read_config(path)[0][0][1]
                self.assertEqual(web.env_file, [os.path.join(conf, "app.env"), "-" + os.path.join(conf, "missing.env")])
                self.assertEqual(web.depends_on, {"db": {"condition": "completed_successfully", "restart": False},
                                                  "cache": {"condition": "ready", "restart": True}})
                self.assertEqual(self.cli("check", "-c", path).returncode, 0)
        self.write("conf/app.env", "T_A=1\nnot an assignment\n")
        result = self.cli("check", "-c", ini)
        self.assertEqual(result.returncode, 2)
        self.assertIn("%s:2: expected KEY=value, got 'not an assignment'" % os.path.join(conf, "app.env"),
                      result.stderr)

    @unittest.skipUnless(pwd is not None and grp is not None, "needs the pwd and grp modules")
    def test_users_groups_and_umask_read_as_supervisord_reads_them(self):
        """user and group names as supervisord's user=, and a umask in octal as its umask= (027 is 0o027)."""
        try:
            user, group = pwd.getpwuid(65534).pw_name, grp.getgrgid(65534).gr_name
        except KeyError:
            self.skipTest("this system has no user and group 65534")
        ini = self.write("users.ini", "[job:web]\ncmd = sleep 60\nuid = %s\ngid = %s\numask = 027\n"
                         % (user, group))
        as_json = self.write("users.json", json.dumps({"jobs": [
            {"name": "web", "cmd": "sleep 60", "uid": user, "gid": group, "umask": "027"}]}))
        for path in (ini, as_json):
            with self.subTest(path=os.path.basename(path)):
                web = gaffer._read_config(path)[0][0][1]
                self.assertEqual((web.uid, web.gid, web.umask), (65534, 65534, 0o027))
        bad = self.write("bad.ini", "[job:web]\ncmd = sleep 60\nuid = no-such-user-here\n")
        result = self.cli("check", "-c", bad)
        self.assertEqual(result.returncode, 2)
        self.assertIn("uid: no user named 'no-such-user-here'", result.stderr)

    def test_check_validates_dependencies_in_config_files(self):
        good = self.write("good.ini", """
            [job:db]
            cmd = sleep 60
            [job:web]
            cmd = sleep 60
            depends_on = db, batch.worker
            [job:batch.worker]
            cmd = sleep 60
        """)
        result = self.cli("check", "-c", good)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("default.web: sleep 60 (after db, batch.worker)", result.stdout)
        cases = [
            ({"jobs": [{"name": "a", "cmd": "x", "depends_on": ["b"]}]}, "depends_on names 'b', which the file"),
            ({"jobs": [{"name": "a", "cmd": "x", "depends_on": ["b"]}, {"name": "b", "cmd": "x", "depends_on": "a"}]},
             "cycle: default.a -> default.b -> default.a"),
            ({"jobs": [{"name": "a", "cmd": "x", "depends_on": ["a"]}]}, "cannot depend on itself"),
        ]
        for config, message in cases:
            with self.subTest(config=config):
                path = self.write("bad.json", json.dumps(config))
                for run, command in ((self.cli, ["check", "-c", path]),
                                     (self.gaffer, ["serve", "-c", path, "--http", "unix:x.sock"])):
                    result = run(*command)
                    self.assertEqual(result.returncode, 2, result.stderr)
                    self.assertIn(message, result.stderr)

    def test_wait_command(self):
        code = "import time; time.sleep(0.3); print('up', flush=True); time.sleep(60)"
        self.serve(self.json_config([self.job("a", ready="delay:0.3"),
                                     self.job("b", args=["-S", "-c", code], ready="output:up", redirect_output=["out"]),
                                     self.job("never", ready="output:x", redirect_output=["out"])]))
        self.record_leaders()
        for job in ("a", "b"):
            with self.subTest(job=job):
                result = self.client("wait", job, "--timeout", "10")
                self.assertIn("default.%s: ready (1 processes)" % job, result.stdout)
        result = self.client("wait", "never", "--timeout", "0.3", check=False)
        self.assertEqual(result.returncode, 1)
        self.assertIn("default.never is not ready after 0.3s: 0 of 1 processes ready", result.stderr)
        self.client("stop", "never")
        result = self.client("wait", "never", check=False)
        self.assertEqual((result.returncode, result.stderr.strip()), (1, "gaffer: default.never is stopped"))
        result = self.client("status", "a")
        self.assertIn("default.a: running, 1 of 1 running, 1 ready", result.stdout)

    def test_tcp_with_allow_host_and_client_commands(self):
        config = self.json_config([self.job("a")])
        proc = self.spawn("serve", "-c", config, "--http", "127.0.0.1:0", "--allow-host", "gaffer.test")
        line = proc.wait_line(r"serving HTTP on http://127.0.0.1:\d+")[0]
        address = "127.0.0.1:%s" % re.search(r"127.0.0.1:(\d+)", line).group(1)
        proc.wait_line(r"ready: \d+ jobs")

        def status(host):
            conn = http.client.HTTPConnection(address, timeout=TIMEOUT)
            try:
                conn.request("GET", "/jobs", headers={"Host": host})
                return conn.getresponse().status
            finally:
                conn.close()

        self.assertEqual(status("gaffer.test"), 200)
        self.assertEqual(status(address), 200)
        self.assertEqual(status("rebound.example"), 403)
        url = re.search(r"http://127.0.0.1:\d+", line).group(0)  # as serve prints it
        for args in (("scale", "a", "2"), ("stop", "a"), ("start", "a"), ("reload", "a"), ("kill", "a", "HUP")):
            with self.subTest(args=args):
                result = self.gaffer(*args, "--http", url if args[0] == "scale" else address)
                self.assertEqual(result.returncode, 0, result.stderr)
        pids = client(address).request("GET", "/pids")["pids"]
        for pid in pids:
            self.session_leaders.add(client(address).request("GET", "/%d" % pid)["os_pid"])
        self.assertEqual(len(pids), 1)
        proc.terminate()
        self.assertEqual(proc.finish(), 0)

    def test_token(self):
        self.serve(self.json_config([self.job("a")]), "--token", "t0ken")
        result = self.client("ps", check=False)
        self.assertEqual(result.returncode, 1)
        self.assertIn("missing or wrong bearer token (401)", result.stderr)
        result = self.gaffer("status", "a", "--http", "unix:" + self.sock, env={"GAFFER_TOKEN": "t0ken"})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("default.a: running", result.stdout)
        os_pid = client("unix:" + self.sock, "t0ken").request("GET", "/1")["os_pid"]
        self.session_leaders.add(os_pid)

    def test_tokens_from_a_file_or_the_environment_and_never_in_a_child(self):
        token = "a-token-of-32-characters-for-tcp"
        secret = self.write("secret", token + "\n")  # its one trailing newline is not part of it
        os.chmod(secret, 0o600)
        shown = "import os, time\nprint(os.environ.get('GAFFER_TOKEN'), flush=True)\ntime.sleep(60)"
        config = self.json_config([self.job("a", args=["-S", "-c", shown], redirect_output=["out"])])
        server = self.serve(config, env={"GAFFER_TOKEN": token})  # as the README's container example runs it
        self.assertEqual(self.client("ps", check=False).returncode, 1, "the environment's token is required")
        info = client("unix:" + self.sock, token).request("GET", "/1")
        self.session_leaders.add(info["os_pid"])
        wait_until(lambda: self.client("logs", "a", "--token-file", secret).stdout.strip(), what="a's output")
        self.assertTrue(self.client("logs", "a", "--token-file", secret).stdout.strip().endswith("| None"),
                        "the child never saw the token")
        result = self.gaffer("status", "a", "--http", "unix:" + self.sock, env={"GAFFER_TOKEN": token})
        self.assertEqual(result.returncode, 0, result.stderr)
        result = self.client("status", "a", "--token", token)
        self.assertEqual(result.stderr, "gaffer: warning: --token is visible to every user of this machine (ps, "
                                        "/proc/PID/cmdline); give --token-file FILE or $GAFFER_TOKEN instead\n")
        for args, message in [
            (("--token", "\u20acuro"), "the token must be visible ASCII characters (33 to 126), but character 1 "
                                      "is U+20AC"),
            (("--token-file", secret, "--token", token), "give --token or --token-file, not both"),
            (("--token-file", os.path.join(self.tmp, "nope")), "--token-file %s: No such file or directory"
             % os.path.join(self.tmp, "nope")),
            (("--token-file", self.write("empty", "")), "--token-file %s is empty" % os.path.join(self.tmp, "empty")),
        ]:
            with self.subTest(args=args):
                result = self.client("status", *args, check=False)
                self.assertEqual((result.returncode, result.stderr.splitlines()[-1]), (2, "gaffer: " + message))
        result = self.cli("ps", "--http", "127.0.0.1:1", "--token", "short-token")
        self.assertEqual(result.stderr.splitlines()[-1], "gaffer: the token must be at least 16 characters when "
                                                         "served over TCP, got 11")
        server.send_signal(signal.SIGINT)
        self.assertEqual(server.finish(), 0)
        result = self.gaffer("serve", "-c", config, "--http", "127.0.0.1:0", env={"GAFFER_TOKEN": "short-token"})
        self.assertEqual((result.returncode, result.stderr.strip()),
                         (2, "gaffer: token must be at least 16 characters when served over TCP, got 11"))
        os.mkdir(os.path.join(self.tmp, "conf"))
        readable = self.write("conf/readable", token)  # token_file: relative to the config file
        os.chmod(readable, 0o644)
        self.write("conf/gaffer.json", json.dumps({"token_file": "readable", "jobs": [self.job("b")]}))
        server = self.serve(os.path.join(self.tmp, "conf", "gaffer.json"))
        server.wait_line(r"warning: token file %s can be read by other users \(mode 0644\); chmod 600 it"
                         % re.escape(readable))
        self.assertEqual(self.client("ps", check=False).returncode, 1)
        self.assertEqual(self.client("ps", "--token-file", readable).returncode, 0)
        self.session_leaders.add(client("unix:" + self.sock, token).request("GET", "/1")["os_pid"])

    def test_names_resolve_in_any_session_when_unique(self):
        self.write("gaffer.json", json.dumps({"jobs": [
            self.job("a"), self.job("u", session="batch"), self.job("w", session="batch"),
            self.job("w", session="other")]}))
        self.serve(os.path.join(self.tmp, "gaffer.json"))
        self.record_leaders()
        self.assertIn("batch.u: running", self.client("status", "u").stdout)
        self.assertEqual(self.client("stop", "u").returncode, 0)
        self.assertIn("batch.u: stopped", self.client("status", "batch.u").stdout)
        result = self.client("status", "w", check=False)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.strip(), "gaffer: job 'w' is in 2 sessions (batch.w, other.w); "
                                                "say which, as session.job")
        ps = self.client("ps").stdout
        self.assertRegex(ps, r"batch\.u +stopped +- +- ", "a stopped job has its row")

    def test_client_commands_through_a_proxy_that_rewrites_server(self):
        import http.server
        self.serve(self.json_config([self.job("a")]))
        self.record_leaders()
        upstream = "unix:" + self.sock

        class Proxy(http.server.BaseHTTPRequestHandler):  # as nginx does: its own Server header
            def do_GET(self):
                family, address = gaffer._parse_address(upstream)
                conn = http.client.HTTPConnection("localhost", timeout=TIMEOUT)
                conn.sock = socket.socket(family)
                conn.sock.connect(address)
                length = int(self.headers.get("Content-Length", 0))
                conn.request(self.command, self.path, self.rfile.read(length) if length else None,
                             {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")})
                answer = conn.getresponse()
                body = answer.read()
                self.send_response_only(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("server", "date", "connection", "transfer-encoding"):
                        self.send_header(key, value)
                self.send_header("Server", "nginx/1.22.1")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                conn.close()

            do_POST = do_GET

            def log_message(self, *args):
                pass

        proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
        thread = threading.Thread(target=proxy.serve_forever)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(proxy.server_close)
        self.addCleanup(proxy.shutdown)
        address = "127.0.0.1:%d" % proxy.server_address[1]
        result = self.cli("status", "a", "--http", address)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("default.a: running", result.stdout)
        self.assertEqual(self.cli("scale", "a", "=1", "--http", address).returncode, 0)

    def test_client_errors(self):
        self.serve(self.json_config([self.job("a")]))
        self.record_leaders()
        result = self.client("status", "nope", check=False)
        self.assertEqual(result.returncode, 1)
        self.assertIn("job 'default.nope' not found (404)", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        result = self.client("scale", "a", "lots", check=False)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(self.client("scale", "a", "=2").stdout.strip(), "a: 2")  # as the API takes it
        result = self.client("stop", "nope", "--json", check=False)
        self.assertEqual((result.returncode, result.stderr), (1, ""))
        self.assertRegex(json.loads(result.stdout)["error"], r"job 'default.nope' not found \(404\)")
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with taken:  # an address in use is a failure at run time: exit code 1, one line, nothing left running
            result = self.gaffer("serve", "-c", self.json_config([self.job("b")]),
                                 "--http", "127.0.0.1:%d" % taken.getsockname()[1])
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertRegex(result.stderr.strip(), r"^gaffer: cannot serve on http://127.0.0.1:\d+: Address already "
                                                r"in use$")
        result = self.gaffer("ps", "--http", "127.0.0.1:1")
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr, r"^gaffer: cannot reach gaffer at 127.0.0.1:1: .*refused")
        import http.server

        class Other(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the suite's output holds no log lines
                pass
        other = http.server.HTTPServer(("127.0.0.1", 0), Other)
        server = threading.Thread(target=other.serve_forever)
        server.start()
        try:
            address = "127.0.0.1:%d" % other.server_address[1]
            result = self.gaffer("ps", "--http", address)
        finally:
            other.shutdown()
            server.join()
            other.server_close()
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr.strip(), r"^gaffer: %s is not a gaffer server \(it answered HTTP 404, "
                                                r"Server: SimpleHTTP/[\d.]+ Python/[\d.]+\)$" % address)


class ExportTest(CommandLineTestCase):

    def test_systemd_and_supervisord(self):
        self.write("Procfile", "web: python3 -m http.server $PORT\nworker: ./work --level=100%\n")
        self.write(".env", "TOKEN=abc\nWEIRD='a\"b\\c%d$e,f=g'\n")
        out = os.path.join(self.tmp, "out")
        result = self.cli("export", "systemd", "-c", "web=2", "-o", out, "-a", "shop")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sorted(os.listdir(out)), ["shop-web-1.service", "shop-web-2.service",
                                                   "shop-worker-1.service", "shop.target"])
        unit = read_text(os.path.join(out, "shop-web-2.service"))
        self.assertIn('Environment="PORT=5001"', unit)
        self.assertIn('Environment="TOKEN=abc"', unit)
        self.assertIn('Environment="WEIRD=a\\"b\\\\c%%d$e,f=g"', unit, "no $ expansion in Environment=: no $$")
        self.assertIn('Environment="PATH=%s"' % os.environ["PATH"], unit, "the exporting shell's PATH")
        self.assertIn("EnvironmentFile=%s\n" % os.path.join(os.path.realpath(self.tmp), ".env"),
                      unit.replace(self.tmp, os.path.realpath(self.tmp)), "read again at each start")
        self.assertIn("WorkingDirectory=%s" % self.tmp, unit)
        self.assertIn('ExecStart=/bin/sh -c "exec python3 -m http.server $$PORT"', unit, "the program replaces sh")
        self.assertIn('"exec ./work --level=100%%"', read_text(os.path.join(out, "shop-worker-1.service")))
        self.assertIn("Wants=shop-web-1.service shop-web-2.service shop-worker-1.service",
                      read_text(os.path.join(out, "shop.target")))
        result = self.cli("export", "supervisord", "-c", "web=2", "-o", out, "-a", "shop")
        self.assertEqual(result.returncode, 0, result.stderr)
        conf = read_text(os.path.join(out, "shop.conf"))
        for section in ("[supervisord]", "[unix_http_server]", "[rpcinterface:supervisor]", "[supervisorctl]",
                        "[program:shop-web-2]", "[group:shop]"):
            self.assertIn("\n%s\n" % section, "\n" + conf)
        self.assertRegex(conf, r'environment=PATH="[^"]*",PORT="5001",TOKEN="abc",WEIRD=\'a"b\\c%%d\$e,f=g\'\n')
        self.assertIn("programs=shop-web-1,shop-web-2,shop-worker-1", conf)
        self.assertIn("stopasgroup=true", conf)
        fragment = self.cli("export", "supervisord", "--fragment", "--dry-run", "-o", out, "-a", "frag")
        self.assertEqual(fragment.returncode, 0, fragment.stderr)
        self.assertTrue(fragment.stdout.startswith("==> %s <==\n[program:frag-web-1]" % os.path.join(out, "frag.conf")))
        self.assertFalse(os.path.exists(os.path.join(out, "frag.conf")), "a dry run writes nothing")
        self.write(".env", "LEAD='\"quoted'\n")  # supervisord's parser strips quotes at the ends: refused
        result = self.cli("export", "supervisord", "-o", out)
        self.assertEqual(result.returncode, 2)
        self.assertIn("the value of LEAD cannot be written for supervisord", result.stderr)

    def test_runit_and_launchd(self):
        self.write("Procfile", "w: printf '%s/%s' \"$WEIRD\" \"$PORT\"\n")
        self.write(".env", "WEIRD='a\"b\\c%d$e,f=g'\n")
        out = os.path.join(self.tmp, "out")
        result = self.cli("export", "runit", "-o", out, "-a", "shop")
        self.assertEqual(result.returncode, 0, result.stderr)
        run = os.path.join(out, "shop-w-1", "run")
        self.assertTrue(os.access(run, os.X_OK) and os.access(os.path.join(out, "shop-w-1", "log", "run"), os.X_OK))
        got = subprocess.run([run], timeout=TIMEOUT, check=True, capture_output=True, text=True)  # as runsv runs it
        self.assertEqual(got.stdout, 'a"b\\c%d$e,f=g/5000', "the values arrive intact")
        self.assertIn("\nexec printf ", read_text(run), "the program itself, not a shell, gets sv's signals")
        result = self.cli("export", "launchd", "-o", out, "-a", "shop", "-u", "www")
        self.assertEqual(result.returncode, 0, result.stderr)
        import plistlib
        with open(os.path.join(out, "shop.w.1.plist"), "rb") as f:
            plist = plistlib.load(f)
        self.assertEqual((plist["Label"], plist["ProgramArguments"][:2], plist["UserName"], plist["KeepAlive"]),
                         ("shop.w.1", ["/bin/sh", "-c"], "www", True))
        self.assertEqual(plist["EnvironmentVariables"]["WEIRD"], 'a"b\\c%d$e,f=g')
        self.assertEqual(plist["WorkingDirectory"], self.tmp)
        self.write("two.env", "WEIRD=plain\nMORE=1\n")  # several -e files, as honcho takes them: the later wins
        result = self.cli("export", "launchd", "-o", out, "-a", "shop", "-e", ".env,two.env", "--dry-run")
        self.assertEqual(result.returncode, 0, result.stderr)
        plist = plistlib.loads(result.stdout.split("<==\n", 1)[1].encode())
        self.assertEqual((plist["EnvironmentVariables"]["WEIRD"], plist["EnvironmentVariables"]["MORE"]), ("plain", "1"))

    def test_a_hostile_env_cannot_inject_into_an_export(self):
        project = os.path.join(self.tmp, "app%n")  # systemd would expand %n: escaped everywhere
        os.mkdir(project)
        self.write("app%n/Procfile", "web: python3 -m http.server $PORT\n")
        self.write("app%n/.env", 'EVIL="x\\nExecStartPre=/bin/touch %s"\n' % os.path.join(self.tmp, "pwned"))
        out = os.path.join(self.tmp, "out")
        procfile, env = os.path.join(project, "Procfile"), os.path.join(project, ".env")
        result = self.cli("export", "systemd", "-f", procfile, "-e", env, "-o", out, "-a", "shop")
        self.assertEqual(result.returncode, 0, result.stderr)
        unit = read_text(os.path.join(out, "shop-web-1.service"))
        self.assertEqual([line for line in unit.splitlines() if line.startswith("ExecStartPre")], [])
        self.assertIn('Environment="EVIL=x\\nExecStartPre=', unit, "the newline is a C escape in its quotes")
        self.assertIn("WorkingDirectory=%s" % project.replace("%", "%%"), unit)
        if shutil.which("systemd-analyze"):
            check = subprocess.run(["systemd-analyze", "verify", os.path.join(out, "shop-web-1.service")],
                                   capture_output=True, text=True, timeout=60)
            self.assertNotRegex(check.stdout + check.stderr, r"shop-web-1\.service:\d+:", "no line refused")
        for fmt, message in [("supervisord", "the value of EVIL cannot be written for supervisord: it holds the "
                                             "control character '\\n'"),
                             ("launchd", None), ("runit", None)]:
            with self.subTest(format=fmt):
                result = self.cli("export", fmt, "-f", procfile, "-e", env, "-o", out, "-a", "shop")
                if message:
                    self.assertEqual((result.returncode, result.stderr), (2, "gaffer: export %s: %s\n" % (fmt, message)))
                else:
                    self.assertEqual(result.returncode, 0, result.stderr)
        self.write("app%n/.env", "CTRL=a\x01b\n")
        result = self.cli("export", "launchd", "-f", procfile, "-e", env, "-o", out)
        self.assertEqual((result.returncode, result.stderr), (2, "gaffer: export launchd: the value of CTRL cannot "
                                                                 "be written for launchd: it holds the control "
                                                                 "character '\\x01'\n"))
        for args, message in [(("-a", "x%n"), "-a 'x%n': an application name is letters"),
                              (("-u", "root\nExecStartPre=x"), "is not a user name")]:
            with self.subTest(args=args, message=message):
                result = self.cli("export", "systemd", "-f", procfile, "-o", out, *args)
                self.assertEqual(result.returncode, 2)
                self.assertIn(message, result.stderr)
        if shutil.which("supervisord"):  # what supervisord itself reads of a whole config, % and all
            self.write("app%n/.env", "PLAIN=%d\n")
            self.assertEqual(self.cli("export", "supervisord", "-f", procfile, "-e", env, "-o", out).returncode, 0)
            conf = os.path.join(out, "app_n.conf")
            parsed = subprocess.run([sys.executable, "-c", "import sys; from supervisor.options import ServerOptions;"
                                     "o = ServerOptions(); o.configfile = sys.argv[1]; o.process_config();"
                                     "p = o.process_group_configs[0].process_configs[0];"
                                     "print(p.command, p.directory, p.environment['PLAIN'], sep='|')", conf],
                                    capture_output=True, text=True, timeout=60)
            if "No module named" not in parsed.stderr:
                self.assertEqual(parsed.stdout.strip(), "/bin/sh -c \"exec python3 -m http.server $PORT\"|%s|%%d"
                                 % project, parsed.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "pwned")))

    @unittest.skipUnless(shutil.which("runsv") and shutil.which("sv"), "runit is not installed (apt-get install runit)")
    def test_runit_sv_down_leaves_nothing_alive(self):
        self.write("Procfile", "simple: %s -S -c 'import time; time.sleep(60)'\n"
                               "shell: %s -S -c 'import time; time.sleep(60)' | cat\n" % (PY, PY))
        out = os.path.join(self.tmp, "sv")
        self.assertEqual(self.cli("export", "runit", "-o", out, "-a", "t").returncode, 0)
        for service in ("t-simple-1", "t-shell-1"):
            with self.subTest(service=service):
                directory = os.path.join(out, service)
                runsv = subprocess.Popen(["runsv", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.addCleanup(runsv.wait, TIMEOUT)
                self.addCleanup(lambda runsv=runsv: runsv.poll() is None and runsv.kill())  # this one's
                pidfile = os.path.join(directory, "supervise", "pid")
                wait_until(lambda: os.path.exists(pidfile) and read_text(pidfile).strip(), what="runsv started it")
                leader = int(read_text(pidfile))
                # Its group once it leads one of its own (chpst -P): before, it is still in runsv's, which is
                # this test's, and the family would take in this very process.
                family = wait_until(lambda: [pid for pid, (_, sid, st) in proc_table().items()
                                             if os.getpgid(pid) == os.getpgid(leader) and st != "Z"
                                             and pid != runsv.pid and "python" in read_text("/proc/%d/cmdline" % pid)]
                                    if alive(leader) and os.getpgid(leader) != os.getpgid(runsv.pid) else None,
                                    what="the program running in a group of its own")
                subprocess.run(["sv", "down", directory], check=True, timeout=TIMEOUT, capture_output=True)
                wait_until(lambda: not any(alive(pid) for pid in family + [leader]),
                           what="nothing left after sv down (left: %s)" % family)
                subprocess.run(["sv", "exit", directory], timeout=TIMEOUT, capture_output=True)
                runsv.wait(TIMEOUT)


# -- Init mode: gaffer as a container's PID 1 --------------------------------------

INIT_APP = """
    import os, signal, sys, time
    signal.signal(signal.SIGUSR1, lambda *a: open("usr1", "w").close())
    if sys.argv[1] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for _ in range(20):  # grandchildren that outlive their parent a moment: orphans, then zombies
        if os.fork() == 0:
            if os.fork() == 0:
                time.sleep(0.05)
                os._exit(0)
            os._exit(0)
        os.wait()
    time.sleep(0.2)  # every grandchild has exited: a zombie now, unless something reaped it
    open("forked", "w").close()
    while not os.path.exists("quit"):
        time.sleep(0.01)
    sys.exit(3)
"""


def unshare_works():
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                              timeout=TIMEOUT).returncode == 0
    except OSError:
        return False


class InitModeTest(CommandLineTestCase):

    def descendants(self, pid):
        table, found, todo = proc_table(), {}, [pid]
        while todo:
            parent = todo.pop()
            for child, (ppid, _, state) in table.items():
                if ppid == parent:
                    found[child] = state
                    todo.append(child)
        return found

    def start_in_a_pid_namespace(self, mode):
        if not unshare_works():
            self.skipTest("unshare --pid --fork --mount-proc needs root and Linux")
        self.write("app.py", INIT_APP)
        self.write("Procfile", "app: %s -S app.py %s\n" % (PY, mode))
        unshare = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", *CLI, "start",
                                    "--graceful-timeout", "0.5"], cwd=self.tmp, stdout=subprocess.DEVNULL,
                                   env={**os.environ, **CLI_ENV})
        self.addCleanup(unshare.wait)
        self.addCleanup(unshare.kill)
        wait_until(lambda: os.path.exists(os.path.join(self.tmp, "forked")), what="the app forked its orphans")
        init = [pid for pid, (ppid, _, _) in proc_table().items() if ppid == unshare.pid][0]  # PID 1 inside
        self.addCleanup(lambda: alive(init) and os.kill(init, signal.SIGKILL))  # the namespace dies with it
        self.session_leaders.update(self.descendants(init))
        return unshare, init

    def test_as_pid_1_orphans_are_reaped_signals_forwarded_and_the_exit_code_kept(self):
        unshare, init = self.start_in_a_pid_namespace("normal")
        wait_until(lambda: "Z" not in self.descendants(init).values(), what="no zombie left in the namespace")
        os.kill(init, signal.SIGUSR1)
        wait_until(lambda: os.path.exists(os.path.join(self.tmp, "usr1")), what="SIGUSR1 forwarded to the app")
        self.write("quit", "")
        self.assertEqual(unshare.wait(TIMEOUT), 3, "the exit code of the process that ended the run")

    def test_sigterm_to_pid_1_stops_everything_within_the_grace_period(self):
        unshare, init = self.start_in_a_pid_namespace("stubborn")
        started = time.monotonic()
        os.kill(init, signal.SIGTERM)
        self.assertEqual(unshare.wait(TIMEOUT), 0, "stopped on request")
        self.assertLess(time.monotonic() - started, 0.5 + 3, "SIGKILL after --graceful-timeout 0.5")

    def test_a_subreaper_leaves_the_hosts_own_children_alone(self):
        code = textwrap.dedent("""
            import os, subprocess, sys, time
            sys.path.insert(0, %r)
            import gaffer
            m = gaffer.Manager(subreaper=True)
            m.start()
            m.load(gaffer.ProcessConfig("w", sys.executable, args=["-S", "-c", %r, "normal"], cwd=%r))
            codes = [subprocess.run([sys.executable, "-S", "-c", "raise SystemExit(%%d)" %% n]).returncode
                     for n in range(5)]  # while orphans of the job exit and are reaped
            own = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(0.3); raise SystemExit(7)"])
            while not os.path.exists(%r):
                time.sleep(0.01)
            codes.append(own.wait())
            print(codes, flush=True)
            m.stop()
            m.run()
        """) % (os.path.dirname(GAFFER), textwrap.dedent(INIT_APP), self.tmp, os.path.join(self.tmp, "forked"))
        result = subprocess.run([PY, "-S", "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.stdout.strip(), "[0, 1, 2, 3, 4, 7]", result.stderr)


if __name__ == "__main__":
    unittest.main()
