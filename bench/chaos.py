#!/usr/bin/env python3
"""A chaos run: random calls from many threads, killed and misbehaving children, rude HTTP clients.

    python3 bench/chaos.py [--seconds 60] [--seed N]
    GAFFER_NO_PIDFD=1 python3 bench/chaos.py      # the same on the polling reaper

For --seconds, 8 threads make random Manager calls, one thread SIGKILLs random
children, and HTTP clients send valid, invalid and half-finished requests.  The
children misbehave: some ignore SIGTERM, some fork grandchildren, one floods its
stdout, one crashes in a loop.  Every few seconds the invariants are checked: no
zombie outlives a check, no exited process stays listed, the manager answers,
and the fd and thread counts stay bounded.  At the end, stop() must finish in
time and leave no process, fd or thread behind.  Prints a summary; the exit
code is 1 on any violation.  Standard library only; not a unit test.
"""

import argparse
import collections
import faulthandler
import http.client
import json
import logging
import os
import queue
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import gaffer  # noqa: E402

PY = sys.executable
GRACEFUL = 1.0  # every job's graceful_timeout: the final stop must finish within it and a margin
CHILDREN = {
    "sleeper": "import time; time.sleep(3600)",
    "stubborn": "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)",
    "forker": """
import os, signal, time
for _ in range(2):
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a grandchild that only SIGKILL ends
        time.sleep(3600)
        os._exit(0)
time.sleep(3600)
""",
    "flooder": """
import os, time
chunk = b"x" * 65536
while True:
    os.write(1, chunk)
    time.sleep(0.002)
""",
    "echo": """
import sys
for line in sys.stdin:
    sys.stdout.write(line)
    sys.stdout.flush()
""",
    "crasher": "import sys; sys.exit(3)",
    "daemonizer": """
import os, signal, time
if os.fork() == 0:  # a daemon, the classic way (fork, setsid, fork), that only SIGKILL ends
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)
    os._exit(0)
os.wait()
time.sleep(float(os.urandom(1)[0]) / 100)  # then it ends by itself, now and then
""",
    "notifier": """
import os, socket, time
time.sleep(0.05)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.sendto(b"READY=1\\nSTATUS=up", os.environ["NOTIFY_SOCKET"])
for _ in range(int.from_bytes(os.urandom(1), "big")):  # a watchdog that falls silent after a while
    sock.sendto(b"WATCHDOG=1", os.environ["NOTIFY_SOCKET"])
    time.sleep(0.02)
time.sleep(3600)
""",
}
READY = {  # the readiness check of each kind: every form that needs no port
    "sleeper": lambda process: True, "stubborn": "delay:0.1", "flooder": "output:x", "echo": "delay:0",
    "notifier": "notify", "crasher": "delay:0.5", "daemonizer": "delay:0",
}
MAX_JOBS, MAX_PER_JOB, MAX_COMMITS = 10, 3, 10
LOG_DIR = tempfile.mkdtemp(prefix="gaffer-chaos-")  # removed at the end of main()
EXPECTED = (gaffer.ProcessError, ValueError, TimeoutError)  # what a random call may fairly be refused with


def config(kind, name, **extra):
    settings = dict(args=["-c", CHILDREN[kind]], numprocesses=random.randint(0, MAX_PER_JOB),
                    graceful_timeout=GRACEFUL, ready=READY.get(kind), ready_timeout=2.0)
    if kind in ("flooder", "echo"):
        settings["redirect_output"] = ["out"]
        if random.random() < 0.5:  # a log file that rotates all the time, shared by the job's processes
            settings.update(log_file=os.path.join(LOG_DIR, "{session}.{name}.log"), log_max_bytes=4096,
                            log_backups=2, log_timestamps=random.random() < 0.5)
    if kind == "echo":
        settings["redirect_input"] = True
    if kind == "sleeper":  # recycled by age now and then, on the shared sampler
        settings.update(max_age=random.uniform(1.0, 3.0), max_age_variance=1.0)
    if kind == "notifier":  # its watchdog pings stop at random: replaced as unhealthy
        settings.update(health="notify", health_interval=0.1, health_retries=2)
    if kind == "sleeper":  # a health check that fails now and then, or hangs past its timeout
        settings.update(health=_random_health, health_interval=0.05, health_timeout=0.1, health_retries=2)
    if kind == "crasher":  # the default backoff keeps the crash loop off the CPU; the policy varies
        settings["restart"] = random.choice(["always", "on-failure", "never"])
    settings.update(extra)
    return gaffer.ProcessConfig(name, PY, **settings)


def _random_health(process):
    roll = random.random()
    if roll < 0.05:
        time.sleep(0.3)  # past health_timeout: counted as a failure, its thread held a while
    return roll > 0.2


class Chaos:
    def __init__(self, seconds, seed):
        self.seconds = seconds
        self.random = random.Random(seed)
        self.violations = []
        self.counts = collections.Counter()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.sessions = set()  # os pids of spawned processes: each leads a session of its own
        self.manager = gaffer.Manager(stats_interval=0.2)
        self.http = gaffer.HttpHandler("127.0.0.1:0", request_timeout=2.0, max_connections=16)
        self.names = collections.deque()  # of loaded jobs, as the callers believe them
        self.half_open = collections.deque()  # (time sent, socket) of requests left unfinished
        self.commits = 0

    # -- bookkeeping (any thread)

    def count(self, what, n=1):
        with self.lock:
            self.counts[what] += n

    def violation(self, text):
        with self.lock:
            self.violations.append("%.1fs %s" % (time.monotonic() - self.started, text))
            print("VIOLATION:", text, file=sys.stderr, flush=True)

    def pick(self, rng):
        with self.lock:
            return rng.choice(self.names) if self.names else "nojob"

    # -- the run

    def run(self):
        self.started = time.monotonic()
        log = _ViolationLog(self)
        logging.getLogger("gaffer").addHandler(log)
        logging.getLogger("gaffer").setLevel(logging.WARNING)
        self.fds_before = len(os.listdir("/proc/self/fd"))
        self.threads_before = threading.active_count()
        self.manager.events.subscribe("spawn", self.on_spawn)
        self.manager.events.subscribe("exit", lambda e, m: self.count("exits"))
        for event in ("recycle", "backoff", "rollout", "rollout_failed", "ready_timeout", "unhealthy"):
            self.manager.events.subscribe(event, lambda e, m: self.count("event " + e))
        self.manager.start([self.http])
        for kind in CHILDREN:
            self.load(self.random, kind)
        workers = [threading.Thread(target=self.caller, args=(i,), name="caller-%d" % i) for i in range(8)]
        workers.append(threading.Thread(target=self.killer, name="killer"))
        workers += [threading.Thread(target=self.http_client, args=(i,), name="http-%d" % i) for i in range(3)]
        for worker in workers:
            worker.start()
        self.checker()
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                self.violation("thread %s did not finish its last call within 30 s" % worker.name)
        self.finish()
        logging.getLogger("gaffer").removeHandler(log)
        return self.report()

    def on_spawn(self, evtype, msg):
        with self.lock:
            self.sessions.add(msg["os_pid"])
        self.count("spawns")

    def load(self, rng, kind=None):
        kind = kind or rng.choice(list(CHILDREN))
        name = "%s-%d" % (kind, rng.randrange(10 ** 6))
        with self.lock:
            if len(self.names) >= MAX_JOBS:
                return
        self.manager.load(config(kind, name), start=rng.random() < 0.9)
        with self.lock:
            self.names.append(name)

    def unload(self, rng):
        with self.lock:
            if len(self.names) <= 3:
                return
            name = self.names.popleft()
        self.manager.unload(name)

    def caller(self, index):
        rng = random.Random(self.random.random())
        m = self.manager
        calls = [
            ("load", lambda: self.load(rng)),
            ("unload", lambda: self.unload(rng)),
            ("scale", lambda: m.scale(self.pick(rng), rng.choice(["+1", "-1", "=%d" % rng.randint(0, MAX_PER_JOB)]))),
            ("start_job", lambda: m.start_job(self.pick(rng))),
            ("stop_job", lambda: m.stop_job(self.pick(rng))),
            ("reload", lambda: m.reload(self.pick(rng))),
            ("update", lambda: self.update(rng)),
            ("commit", lambda: self.commit(rng)),
            ("kill", lambda: m.kill(rng.choice(m.pids() or [0]), rng.choice(["TERM", "HUP", "USR1", "KILL"]))),
            ("stop_process", lambda: m.stop_process(rng.choice(m.pids() or [0]))),
            ("stopall", lambda: m.stopall(self.pick(rng))),
            ("killall", lambda: m.killall(self.pick(rng), "TERM")),
            ("info", lambda: m.info(self.pick(rng))),
            ("stats", lambda: m.stats(self.pick(rng))),
            ("process info", lambda: m.get_process(rng.choice(m.pids() or [0])).info),
            ("send", lambda: m.send(rng.choice(m.pids() or [0]), "hello\n")),
            ("channel", lambda: self.channel(rng)),
            ("monitor", lambda: self.monitor(rng)),
            ("restart", lambda: m.restart() if rng.random() < 0.05 else None),
            ("jobs", lambda: m.jobs()),
            ("wait_ready", lambda: m.wait_ready(self.pick(rng), timeout=rng.uniform(0, 0.5))),
            ("not_ready", lambda: m.not_ready()),
        ]
        while not self.done.is_set():
            what, call = rng.choice(calls)
            try:
                call()
            except EXPECTED:
                self.count("refused")
            except Exception as exc:
                self.violation("%s raised %r" % (what, exc))
            self.count("calls")
            time.sleep(rng.uniform(0, 0.01))

    def update(self, rng):
        name = self.pick(rng)
        kind = name.split("-")[0]
        self.manager.update(config(kind if kind in CHILDREN else "sleeper", name))

    def commit(self, rng):
        with self.lock:
            if self.commits >= MAX_COMMITS:
                return
            self.commits += 1
        self.manager.commit(self.pick(rng), graceful_timeout=GRACEFUL)

    def channel(self, rng):
        pids = self.manager.pids()
        topic = rng.choice(["EVENTS", "JOB:default.%s" % self.pick(rng)] +
                           (["STREAM:%d" % rng.choice(pids), "PROCESS:%d" % rng.choice(pids)] if pids else []))
        channel = self.manager.subscribe(topic, max_bytes=1 << 16)
        try:
            for _ in range(rng.randint(0, 5)):
                channel.get(timeout=0.05)
        except (EOFError, queue.Empty):
            pass
        finally:
            channel.close()

    def monitor(self, rng):
        name = self.pick(rng)
        listener = lambda evtype, msg: None  # noqa: E731
        self.manager.monitor(listener, name)
        self.manager.unmonitor(listener, name)

    def killer(self):
        rng = random.Random(self.random.random())
        while not self.done.wait(rng.uniform(0.05, 0.3)):
            try:
                processes = self.manager.list()
            except RuntimeError as exc:
                self.violation("list() raised %r" % exc)
                continue
            if processes:
                try:
                    os.kill(rng.choice(processes).os_pid, signal.SIGKILL)
                    self.count("sigkills")
                except ProcessLookupError:
                    pass

    # -- HTTP clients

    def http_client(self, index):
        rng = random.Random(self.random.random())
        requests = [self.http_valid, self.http_invalid, self.http_rude]
        while not self.done.is_set():
            try:
                rng.choice(requests)(rng)
            except Exception as exc:
                self.violation("HTTP client: %r" % exc)
            time.sleep(rng.uniform(0, 0.02))

    def request(self, method, path, body=None, headers=None, expect=(200,)):
        conn = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.count("http %d" % resp.status)
        if resp.status not in expect:
            self.violation("%s %s answered %d, expected %s: %r" % (method, path, resp.status, expect, data[:200]))
        elif resp.status >= 400 and "errno" not in json.loads(data):
            self.violation("%s %s: an error without the JSON shape: %r" % (method, path, data[:200]))

    def http_valid(self, rng):
        job = "/jobs/default/%s" % self.pick(rng)
        json_type = {"Content-Type": "application/json"}
        choice = rng.randrange(5)
        if choice == 0:
            self.request("GET", rng.choice(["/", "/ping", "/jobs", "/pids", "/sessions", "/ready"]), expect=(200, 503))
        elif choice == 1:
            self.request("GET", job, expect=(200, 404))
        elif choice == 2:
            self.request("POST", job + "/numprocesses", json.dumps({"scale": rng.choice(["+1", "-1"])}), json_type,
                         expect=(200, 404))
        elif choice == 3:
            self.request("GET", job + "/stats", expect=(200, 404))
        else:
            self.request("POST", job + "/state", json.dumps({"state": rng.choice(["start", "stop"])}), json_type,
                         expect=(202, 404))

    def http_invalid(self, rng):
        body = json.dumps({"name": "evil", "cmd": "/bin/true"})
        cases = [
            ("POST", "/jobs/default", body, {"Content-Type": "text/plain"}, (415,)),
            ("POST", "/jobs/default", body, {"Content-Type": "application/json", "Origin": "http://evil.example"},
             (403,)),
            ("GET", "/jobs", None, {"Host": "evil.example"}, (403,)),
            ("POST", "/jobs/default", "[" * 50000, {"Content-Type": "application/json"}, (400, 413)),
            ("PATCH", "/jobs", None, None, (405,)),
            ("GET", "/%D9%A1", None, None, (404,)),
            ("POST", "/jobs/default", "{bad json", {"Content-Type": "application/json"}, (400,)),
        ]
        method, path, data, headers, expect = rng.choice(cases)
        self.request(method, path, data, headers, expect)

    def http_rude(self, rng):
        """Half a request, a reset mid-answer, or garbage: the server must shrug them off."""
        sock = socket.create_connection(("127.0.0.1", self.http.port), timeout=10)
        try:
            choice = rng.randrange(3)
            if choice == 0:
                sock.sendall(b"GET /jobs HTT")  # and stay silent, the socket open: request_timeout must drop it
                self.count("http half-open")
                with self.lock:
                    self.half_open.append((time.monotonic(), sock))
                    if len(self.half_open) > 40:
                        self.half_open.popleft()[1].close()
                sock = None
            elif choice == 1:
                sock.sendall(b"GET /watch HTTP/1.1\r\nHost: localhost\r\n\r\n")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                self.count("http reset")
            else:
                sock.sendall(b"\x16\x03\x01garbage\r\n\r\n")
                sock.recv(4096)
                self.count("http garbage")
        except OSError:
            pass
        finally:
            if sock is not None:
                sock.close()

    # -- invariants

    def checker(self):
        deadline = self.started + self.seconds
        zombies_seen = set()
        while time.monotonic() < deadline:
            self.done.wait(min(2.0, max(0.0, deadline - time.monotonic())))
            self.count("checks")
            zombies = {pid for pid, (ppid, _, state) in proc_table().items() if ppid == os.getpid() and state == "Z"}
            for pid in zombies & zombies_seen:
                self.violation("child %d has been a zombie for a whole check interval" % pid)
            zombies_seen = zombies
            started = time.monotonic()
            try:
                listed = {p.pid: p.os_pid for p in self.manager.list()}
            except Exception as exc:
                self.violation("list() raised %r" % exc)
                continue
            if time.monotonic() - started > 5:
                self.violation("the manager took %.1fs to answer list()" % (time.monotonic() - started))
            for job in self.manager.status():  # two processes share a slot (and its $PORT) only in a rollout
                slots = [p["slot"] for p in job["processes"] if p["slot"] and p["status"] != "stopping"]
                if len(slots) - len(set(slots)) > 1 or any(slots.count(slot) > 2 for slot in slots):
                    self.violation("%s: processes share slots: %s" % (job["name"], sorted(slots)))
            for pid in self.escaped(listed):
                self.violation("a daemon of process %d, gone over %gs ago, is still alive" % (pid, GRACEFUL + 3))
            dead = {pid for pid, os_pid in listed.items() if not alive(os_pid)}
            if dead:
                time.sleep(1.0)  # an exit a moment ago is fine; one still listed a second later is not
                still = dead & {p.pid for p in self.manager.list()}
                if still:
                    self.violation("processes %s are listed though they exited over a second ago" % sorted(still))
            fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
            processes = len(listed) + 2 * MAX_COMMITS
            if fds > self.fds_before + 6 * processes + 2 * self.http.max_connections + 50:
                self.violation("%d fds open with %d processes listed (%d at the start)"
                               % (fds, len(listed), self.fds_before))
            # ours (12 callers, killer and HTTP clients), the server's, the loop, and the check workers
            if threads > self.threads_before + 12 + self.http.max_connections + 1 + gaffer._CHECK_WORKERS:
                self.violation("%d threads (%d at the start)" % (threads, self.threads_before))
            with self.lock:
                self.counts["max fds"] = max(self.counts["max fds"], fds)
                self.counts["max threads"] = max(self.counts["max threads"], threads)
                self.counts["max processes"] = max(self.counts["max processes"], len(listed))
        self.done.set()

    def marked(self):
        """{os pid: manager pid} of every live process that carries this manager's GAFFER_PROCESS mark."""
        mark, found = ("GAFFER_PROCESS=%s/" % self.manager._containment.token).encode(), {}
        for pid, (_, _, state) in proc_table().items():
            try:
                with open("/proc/%d/environ" % pid, "rb") as f:
                    environ = f.read()
            except OSError:
                continue
            at = environ.find(mark)
            if at >= 0 and state != "Z":
                found[pid] = int(environ[at + len(mark):].split(b"\0")[0])
        return found

    def escaped(self, listed):
        """Manager pids whose process is gone, while something it started (a setsid daemon) lives on
        past graceful_timeout and a margin: what a cgroup, or the sweep without one, must end."""
        now, gone = time.monotonic(), set()
        self.orphaned = getattr(self, "orphaned", {})
        owners = {owner for owner in self.marked().values() if owner not in listed}
        for owner in owners:
            first = self.orphaned.setdefault(owner, now)
            if now - first > GRACEFUL + 3:
                gone.add(owner)
        self.orphaned = {owner: first for owner, first in self.orphaned.items() if owner in owners}
        return gone

    def finish(self):
        for sent, sock in self.half_open:  # each dropped by the server, or about to be
            sock.settimeout(max(0.0, sent + self.http.request_timeout + 2 - time.monotonic()))
            try:
                if sock.recv(100) != b"":
                    self.violation("a half-open request was answered")
            except socket.timeout:
                self.violation("a half-open request still holds its connection after request_timeout")
            except OSError:
                pass
            sock.close()
        started = time.monotonic()
        self.manager.stop()
        runner = threading.Thread(target=self.manager.run, name="stopper")
        runner.start()
        runner.join(GRACEFUL + 15)
        took = time.monotonic() - started
        self.counts["stop seconds"] = round(took, 2)
        if runner.is_alive():
            self.violation("stop() + run() did not finish within %.0fs" % (GRACEFUL + 15))
            return
        with self.lock:
            sessions = set(self.sessions)
        if not wait(lambda: not [pid for pid, (ppid, sid, state) in proc_table().items()
                                 if state != "Z" and (ppid == os.getpid() or sid in sessions)], 10):
            self.violation("processes left after stop: %s" % sorted(
                pid for pid, (ppid, sid, state) in proc_table().items()
                if state != "Z" and (ppid == os.getpid() or sid in sessions)))
        if not wait(lambda: not self.marked(), 10):
            self.violation("processes that carry the manager's mark left after stop: %s" % sorted(self.marked()))
        if not wait(lambda: len(os.listdir("/proc/self/fd")) <= self.fds_before, 10):
            self.violation("%d fds open after stop, %d before" % (len(os.listdir("/proc/self/fd")), self.fds_before))
        if not wait(lambda: threading.active_count() <= self.threads_before, 10):
            self.violation("threads left after stop: %s" % [t.name for t in threading.enumerate()])
        logs = collections.Counter(name.split(".log")[0] for name in os.listdir(LOG_DIR))
        self.count("log files", sum(logs.values()))
        for name, count in logs.items():  # each job's file and its log_backups (2) rotated ones, no more
            if count > 3:
                self.violation("%d log files for %s: %s" % (count, name, sorted(os.listdir(LOG_DIR))))
        for name in os.listdir(LOG_DIR):
            if os.path.getsize(os.path.join(LOG_DIR, name)) > max(4096, 65537 + 64):  # one cut line may pass
                self.violation("log file %s is %d bytes (log_max_bytes 4096)" % (name, os.path.getsize(
                    os.path.join(LOG_DIR, name))))

    def report(self):
        mode = "pidfd" if self.manager.use_pidfd else "poll"
        print("chaos: %.0fs, %s reaper, seed %s" % (self.seconds, mode, self.seed))
        for key in sorted(self.counts):
            print("  %-16s %s" % (key, self.counts[key]))
        if self.violations:
            print("%d violations:" % len(self.violations))
            for text in self.violations[:50]:
                print("  " + text)
            return 1
        print("no violation")
        return 0


class _ViolationLog(logging.Handler):
    """A crash, or a callback, timer, command or listener that raised inside the loop, is a violation."""

    def __init__(self, chaos):
        super().__init__(logging.ERROR)
        self.chaos = chaos

    def emit(self, record):
        if record.exc_info or record.levelno >= logging.CRITICAL:
            self.chaos.violation("gaffer logged: %s" % record.getMessage())


def proc_table():
    """{pid: (ppid, sid, state)} of every process on the machine."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), int(fields[3]), fields[0])
    return table


def alive(os_pid):
    entry = proc_table().get(os_pid)
    return entry is not None and entry[2] != "Z"


def wait(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    args = parser.parse_args()
    if not os.path.isdir("/proc/self/fd"):
        print("chaos: needs /proc (Linux); skipped")
        return 0
    seed = args.seed if args.seed is not None else int(time.time())
    faulthandler.dump_traceback_later(args.seconds + 120, exit=True)  # a hang is a failure, never a stuck CI
    chaos = Chaos(args.seconds, seed)
    chaos.seed = seed
    try:
        return chaos.run()
    finally:
        shutil.rmtree(LOG_DIR, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
