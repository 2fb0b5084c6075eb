#!/usr/bin/env python3
"""Benchmark gaffer.Manager against a bare Popen + pidfd loop, in one run, and print a table.

    python3 bench/bench_gaffer.py [--rounds 3] [--processes 200] [--idle 10] [--respawns 20]
                                  [--output-mib 256] [--imports 21] [--readies 15] [--crash-seconds 10]
                                  [--scale 200,2000,5000] [--calls 2000]
                                  [--only manager|scale|calls|output|import|ready|crash]

Each trial runs in a fresh interpreter (so RSS and thread counts are its own);
the variants take turns, round after round, and the table shows medians.
The bare loop is what a careful program would write by hand: one thread,
a selector on pidfds, Popen to respawn.  Standard library only; not a test.
"""

import argparse
import collections
import fcntl
import json
import os
import platform
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SLEEP = [shutil.which("sleep") or "/bin/sleep", "1000"]
WRITER = """
import os, sys
chunk, left = memoryview(b"x" * (1 << 20) if sys.argv[2:] != ["lines"] else (b"x" * 127 + b"\\n") * 8192),\\
    int(sys.argv[1]) << 20
while left:
    left -= os.write(1, chunk[:min(left, len(chunk))])
"""
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


# -- the bare loop -------------------------------------------------------------

class BareLoop:
    """The least a pidfd supervisor does: spawn, watch exits in a selector, respawn."""

    def __init__(self, argv, on_spawn=None):
        self.argv = argv
        self.on_spawn = on_spawn
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.commands = collections.deque()
        self.children = {}  # os pid -> Popen
        self.stopping = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def call(self, fn, *args):
        done = threading.Event()
        result = []
        self.commands.append(lambda: (result.append(fn(*args)), done.set()))
        self.wake_w.send(b"x")
        done.wait()
        return result[0]

    def spawn(self):
        popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
        pidfd = os.pidfd_open(popen.pid)
        self.selector.register(pidfd, selectors.EVENT_READ, popen)
        self.children[popen.pid] = popen
        if self.on_spawn:
            self.on_spawn()

    def start(self, n):
        for _ in range(n):
            self.spawn()

    def stop(self):
        self.stopping = True
        for pid in self.children:
            os.kill(pid, signal.SIGTERM)

    def run(self):
        while not (self.stopping and not self.children):
            for key, _ in self.selector.select():
                if key.data is None:
                    self.wake_r.recv(4096)
                    while self.commands:
                        self.commands.popleft()()
                    continue
                popen = key.data
                popen.wait()
                self.selector.unregister(key.fd)
                os.close(key.fd)
                del self.children[popen.pid]
                if not self.stopping:
                    self.spawn()
        self.stopped.set()


# -- one trial (in its own interpreter) ----------------------------------------

def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1 << 20)


def trial(variant, n, idle, respawns):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 4 * n + 256):  # a pidfd per child, and the bare loop's too
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    spawned = threading.Event()
    stamp = [0.0]

    def mark():
        stamp[0] = time.perf_counter()
        spawned.set()

    threads_before = threading.active_count()
    if variant == "bare":
        bare = BareLoop(SLEEP, on_spawn=mark)
        t0 = time.perf_counter()
        bare.call(bare.start, n)
        start = time.perf_counter() - t0
        victims = lambda: list(bare.children)
    else:
        if variant == "gaffer-poll":
            os.environ["GAFFER_NO_PIDFD"] = "1"
        import gaffer
        plain = variant == "gaffer-plain"
        manager = gaffer.Manager(guardian=not plain, cgroups=False if plain or variant == "gaffer-nocgroup" else "auto")
        manager.start()
        config = gaffer.ProcessConfig("sleep", SLEEP[0], args=SLEEP[1:], numprocesses=n, max_processes=max(n, 1000),
                                       graceful_timeout=5)
        t0 = time.perf_counter()
        manager.load(config)
        start = time.perf_counter() - t0
        manager.events.subscribe("spawn", lambda evtype, msg: mark())
        victims = lambda: [p.os_pid for p in manager.list()]

    latencies = []
    for _ in range(respawns):
        victim = victims()[0]
        spawned.clear()
        t0 = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        if not spawned.wait(10):
            raise SystemExit("%s: no respawn within 10 s" % variant)
        latencies.append(stamp[0] - t0)

    threads = threading.active_count() - threads_before
    cpu0, wall0 = cpu_seconds(), time.monotonic()
    time.sleep(idle)
    idle_cpu = (cpu_seconds() - cpu0) / max(time.monotonic() - wall0, 1e-9) * 100
    rss = rss_mib()
    guardian_rss = 0.0
    if variant != "bare" and manager._containment._guardian is not None:
        with open("/proc/%d/status" % manager._containment._guardian[0].pid) as f:
            guardian_rss = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

    t0 = time.perf_counter()
    if variant == "bare":
        bare.call(bare.stop)
        bare.stopped.wait()
    else:
        manager.stop()
        manager.run()
    stop = time.perf_counter() - t0
    latencies.sort()
    return {
        "start": start, "respawn_median": statistics.median(latencies) * 1000,
        "respawn_p90": latencies[int(0.9 * (len(latencies) - 1))] * 1000,
        "idle_cpu": idle_cpu, "stop": stop, "rss": rss, "threads": threads, "guardian_rss": guardian_rss,
    }


def output_trial(variant, mib):
    """Seconds for one child's `mib` MiB of stdout to be read to the end (from spawn)."""
    argv = [sys.executable, "-c", WRITER, str(mib)]
    t0 = time.perf_counter()
    if variant == "cat":
        subprocess.run(["bash", "-c", "set -o pipefail; %s | cat > /dev/null" % shlex.join(argv)], check=True)
    elif variant in ("file", "gaffer-log"):  # a log is lines: 128 bytes each
        import tempfile
        argv.append("lines")
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(__file__))) as tmp:  # a real disk
            path = os.path.join(tmp, "writer.log")
            if variant == "file":
                with open(path, "wb") as f:
                    t0 = time.perf_counter()
                    subprocess.run(argv, stdout=f, check=True)
                elapsed = time.perf_counter() - t0
            else:
                import gaffer
                done = threading.Event()
                manager = gaffer.Manager()
                manager.start()
                manager.events.subscribe("exit", lambda evtype, msg: done.set())
                t0 = time.perf_counter()
                manager.load(gaffer.ProcessConfig("writer", argv[0], args=argv[1:], redirect_output=["out"],
                                                  log_file=path, log_max_bytes=64 << 20, log_backups=5))
                done.wait()
                elapsed = time.perf_counter() - t0
                manager.stop()
                manager.run()
            written = sum(os.path.getsize(os.path.join(tmp, name)) for name in os.listdir(tmp))
            assert written == mib << 20, written
            return {"seconds": elapsed}
    elif variant.startswith("bare"):
        size = 1 << 20 if variant == "bare-1m" else 1 << 16
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, close_fds=True, start_new_session=True)
        fd = popen.stdout.fileno()
        if variant == "bare-1m":
            fcntl.fcntl(fd, F_SETPIPE_SZ, size)
        os.set_blocking(fd, False)
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        count = 0
        while True:
            selector.select()
            data = os.read(fd, size)
            if not data:
                break
            count += len(data)
        popen.stdout.close()
        popen.wait()
        assert count == mib << 20, count
    else:
        import gaffer
        done, count = threading.Event(), [0]

        def on_spawn(evtype, msg):
            manager.get_process(msg["pid"]).monitor_io("out", lambda label, m: count.__setitem__(
                0, count[0] + len(m["data"])))

        manager = gaffer.Manager()
        manager.start()
        manager.events.subscribe("spawn", on_spawn)
        manager.events.subscribe("exit", lambda evtype, msg: done.set())
        t0 = time.perf_counter()
        manager.load(gaffer.ProcessConfig("writer", argv[0], args=argv[1:], redirect_output=["out"]))
        done.wait()
        elapsed = time.perf_counter() - t0
        manager.stop_job("writer")
        manager.stop()
        manager.run()
        assert count[0] == mib << 20, count
        return {"seconds": elapsed}
    return {"seconds": time.perf_counter() - t0}


# -- the table -----------------------------------------------------------------

METRICS = [
    # key, label, format, target (ratio to bare, absolute bound, or None), lower is better
    ("start", "start {n} sleep processes (s)", "%.3f", ("ratio", 1.3)),
    ("respawn_median", "respawn after SIGKILL, median (ms)", "%.2f", ("ratio", 1.3)),
    ("respawn_p90", "respawn after SIGKILL, p90 (ms)", "%.2f", None),
    ("idle_cpu", "CPU while {n} children idle (% of a core)", "%.3f", ("abs", 0.5)),
    ("stop", "stop {n} processes (s)", "%.3f", ("ratio", 1.5)),
    ("rss", "RSS with {n} children (MiB)", "%.1f", None),
    ("threads", "threads added", "%d", ("extra", 2)),
    ("guardian_rss", "the guardian process's RSS (MiB)", "%.1f", None),
]
# gaffer as it comes (a guardian, a cgroup per process where the system allows), without either, and polling
VARIANTS = [("bare", "bare loop"), ("gaffer", "gaffer"), ("gaffer-plain", "no guardian/cgroup"),
            ("gaffer-poll", "gaffer (poll)")]
OUTPUT_VARIANTS = [
    ("bare-1m", "bare loop, 1 MiB pipe and reads"), ("bare-64k", "bare loop, 64 KiB pipe and reads"),
    ("gaffer", "gaffer, a listener counting"), ("cat", "writer | cat > /dev/null"),
    ("file", "writer > file"), ("gaffer-log", "gaffer, log_file rotating at 64 MiB"),
]


# What an embedder pays: each runs in a fresh interpreter, timed from its first line, RSS read at its end.
IMPORT_VARIANTS = [
    ("bare", "bare interpreter", "pass"),
    ("import", "import gaffer", "import gaffer"),
    ("manager", "import gaffer, Manager started and stopped",
     "import gaffer; m = gaffer.Manager(); m.start(); m.stop(); m.run()"),
    ("http", "the same with HttpHandler started",
     "import gaffer; m = gaffer.Manager(); m.start([gaffer.HttpHandler('127.0.0.1:0')]); m.stop(); m.run()"),
]
IMPORT_PROBE = ("import time, sys; t0 = time.perf_counter(); sys.path.insert(0, %r); {code}; "
                "t1 = time.perf_counter(); print(t1 - t0, open('/proc/self/status').read().split('VmRSS:')[1].split()[0] "
                "if sys.platform.startswith('linux') else __import__('resource').getrusage(0).ru_maxrss // 1024)")


def import_table(args):
    import py_compile
    py_compile.compile(os.path.join(os.path.dirname(HERE), "gaffer.py"))  # measured with bytecode cached
    samples = {variant: ([], []) for variant, _, _ in IMPORT_VARIANTS}
    for _ in range(args.imports):  # the variants take turns, so noise falls on all alike
        for variant, _, code in IMPORT_VARIANTS:
            probe = IMPORT_PROBE.replace("%r", repr(os.path.dirname(HERE))).format(code=code)
            seconds, kib = subprocess.run([sys.executable, "-c", probe], check=True, stdout=subprocess.PIPE,
                                          text=True).stdout.split()
            samples[variant][0].append(float(seconds) * 1000)
            samples[variant][1].append(int(kib) / 1024)
    ms = {v: statistics.median(t) for v, (t, _) in samples.items()}
    mib = {v: statistics.median(r) for v, (_, r) in samples.items()}
    rows = []
    for variant, label, _ in IMPORT_VARIANTS:
        extra_ms, extra_mib = ms[variant] - ms["bare"], mib[variant] - mib["bare"]
        target = "<= +25 ms, +4 MiB" if variant == "import" else ""
        mark = ("ok" if extra_ms <= 25 and extra_mib <= 4 else "MISS") if variant == "import" else ""
        rows.append([label, "%.1f" % ms[variant], "+%.1f" % extra_ms, "%.1f" % mib[variant], "+%.1f" % extra_mib,
                     target, mark])
    print()
    print("import cost: medians of %d fresh interpreters each, bytecode cached" % args.imports)
    print_table(["variant", "ms", "added", "RSS MiB", "added", "target", ""], rows)


# A child that becomes ready after a moment: it writes the monotonic time (one clock for the whole
# machine) at which it opened its port or sent READY=1, and the bench takes the ready event's time.
READY_CHILD = """
import os, socket, sys, time
time.sleep(0.2)
if sys.argv[1] == "tcp":
    server = socket.socket()
    server.bind(("127.0.0.1", int(os.environ["PORT"])))
    server.listen(16)
    opened = time.monotonic()
else:
    opened = time.monotonic()
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(repr(opened))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
time.sleep(60)
"""


def ready_table(args):
    import tempfile
    import gaffer
    targets = {"notify": 20.0, "tcp": 120.0}
    rows = []
    with gaffer.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
        ready_at = {}
        manager.events.subscribe("ready", lambda evtype, msg: ready_at.setdefault(msg["name"], time.monotonic()))
        for kind in ("notify", "tcp"):
            latencies = []
            for n in range(args.readies):
                with socket.socket() as probe:  # a free port for the child
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
                stamp, name = os.path.join(tmp, "%s-%d" % (kind, n)), "%s%d" % (kind, n)
                manager.load(gaffer.ProcessConfig(name, sys.executable, args=["-c", READY_CHILD, kind, stamp],
                                                  env={"PORT": str(port)}, graceful_timeout=1,
                                                  ready="notify" if kind == "notify" else "tcp:$PORT"), wait=30)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # the child may write its stamp after the event
                    with open(stamp, "a+") as f:
                        f.seek(0)
                        text = f.read()
                    if text:
                        break
                    time.sleep(0.001)
                latencies.append((ready_at["default." + name] - float(text)) * 1000)
                manager.unload(name)
            latencies.sort()
            p50, p90 = statistics.median(latencies), latencies[int(0.9 * (len(latencies) - 1))]
            what = "notify: READY=1 sent" if kind == "notify" else "tcp: port opened"
            rows.append(["%s -> ready event" % what, "%.1f" % p50, "%.1f" % p90,
                         "< %.0f ms" % targets[kind], "ok" if p50 < targets[kind] else "MISS"])
    print()
    print("readiness latency: %d children of each kind, ready 0.2 s after their spawn" % args.readies)
    print_table(["check", "p50 ms", "p90 ms", "target", ""], rows)


def crash_table(args):
    """The manager's own CPU while 10 jobs crash-loop with the default settings (their backoff)."""
    import gaffer
    false = shutil.which("false") or "/bin/false"
    with gaffer.Manager() as manager:
        spawns = []
        manager.events.subscribe("spawn", lambda evtype, msg: spawns.append(1))
        before, started = cpu_seconds(), time.monotonic()
        for n in range(10):
            manager.load(gaffer.ProcessConfig("crash%d" % n, false))
        time.sleep(args.crash_seconds)
        cpu = (cpu_seconds() - before) / (time.monotonic() - started) * 100
        count = len(spawns)
    print()
    print("crash loop: 10 jobs running /bin/false with the default settings for %g s" % args.crash_seconds)
    print_table(["metric", "value", "target", ""],
                [["manager CPU (% of a core)", "%.2f" % cpu, "< 2", "ok" if cpu < 2 else "MISS"],
                 ["spawns, all jobs", str(count), "", ""]])


def scale_table(args):
    """Respawn, start and stop at each scale, cgroups on and off (the guardian on), against the bare loop:
    what an event costs must not grow with the processes."""
    sizes = [int(n) for n in args.scale.split(",")]
    variants = [("bare", "bare loop"), ("gaffer", "gaffer (cgroups)"), ("gaffer-nocgroup", "gaffer (no cgroups)")]
    medians = {}
    for n in sizes:
        medians[n] = run_rounds(args, variants, "--trial", ["--processes", str(n), "--idle", "0",
                                                            "--respawns", str(args.respawns)])
    small, large = sizes[0], sizes[-1]
    rows = []
    for key, label, fmt in [("respawn_median", "respawn p50 (ms)", "%.2f"), ("respawn_p90", "respawn p90 (ms)", "%.2f"),
                            ("start", "start (s)", "%.3f"), ("stop", "stop (s)", "%.3f"), ("rss", "RSS (MiB)", "%.1f")]:
        for variant, vlabel in variants:
            rows.append([label, vlabel] + [fmt % medians[n][variant][key] for n in sizes])
    print()
    print("scale: %s sleep processes, %d respawns after SIGKILL each, medians of %d rounds"
          % (", ".join(map(str, sizes)), args.respawns, args.rounds))
    print_table(["metric", "variant"] + ["%d" % n for n in sizes], rows)
    full = {n: medians[n]["gaffer"] for n in sizes}
    checks = [("respawn p50 at %d, cgroups on (ms)" % small, full[small]["respawn_median"], "< 3",
               full[small]["respawn_median"] < 3),
              ("respawn p50 at %d vs at %d" % (large, small), full[large]["respawn_median"] / full[small]["respawn_median"],
               "<= 1.5x", full[large]["respawn_median"] <= 1.5 * full[small]["respawn_median"])]
    if 2000 in full:
        checks += [("stop of 2000 (s)", full[2000]["stop"], "< 0.5", full[2000]["stop"] < 0.5),
                   ("start of 2000 (s)", full[2000]["start"], "< 2", full[2000]["start"] < 2)]
    if large > small:
        per = (full[large]["rss"] - full[small]["rss"]) * 1024 / (large - small)
        checks.append(("manager RSS per process (kB)", per, "<= 10", per <= 10))
    print_table(["target, with the defaults", "value", "target", ""],
                [[what, "%.2f" % value, target, "ok" if ok else "MISS"] for what, value, target, ok in checks])


def calls_table(args):
    """Round trips of a call from another thread, and 8 threads calling at once (pids() each)."""
    import gaffer
    with gaffer.Manager() as manager:
        manager.load(gaffer.ProcessConfig("sleep", SLEEP[0], args=SLEEP[1:], numprocesses=10, graceful_timeout=5))
        rows = []
        for name, call, target in [("pids()", lambda: manager.pids("sleep"), 100),
                                   ("info()", lambda: manager.info("sleep"), 120)]:
            for _ in range(200):  # warm
                call()
            times = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            times.sort()
            p50, p99 = statistics.median(times) * 1e6, times[int(0.99 * (len(times) - 1))] * 1e6
            rows.append(["%s from another thread" % name, "%.0f us" % p50, "%.0f us" % p99, "p50 <= %d us" % target,
                         "ok" if p50 <= target else "MISS"])
        counts, stop_at = [0] * 8, time.monotonic() + 2.0

        def caller(i):
            while time.monotonic() < stop_at:
                manager.pids("sleep")
                counts[i] += 1

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        t0 = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rate = sum(counts) / (time.monotonic() - t0)
        rows.append(["pids() from 8 threads at once", "%.0f calls/s" % rate, "", ">= 15000 calls/s",
                     "ok" if rate >= 15000 else "MISS"])
    print()
    print("cross-thread calls: a manager with 10 processes; %d calls each, then 8 threads for 2 s" % args.calls)
    print_table(["call", "p50", "p99", "target", ""], rows)


def verdict(target, value, base):
    if target is None:
        return ""
    kind = target[0]
    if kind == "ratio":
        return "ok" if value <= target[1] * base else "MISS"
    if kind == "ratio+abs":
        return "ok" if value <= target[1] * base and value < target[2] else "MISS"
    if kind == "abs":
        return "ok" if value < target[1] else "MISS"
    return "ok" if value <= target[1] else "MISS"


def target_text(target):
    if target is None:
        return ""
    return {"ratio": "<= %.1fx" % target[1] if target[0] == "ratio" else "",
            "ratio+abs": "<= %.0fx, < %.0f ms" % target[1:] if target[0] == "ratio+abs" else "",
            "abs": "< %s" % target[1] if target[0] == "abs" else "",
            "extra": "<= %d" % target[1] if target[0] == "extra" else ""}[target[0]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=200)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    parser.add_argument("--respawns", type=int, default=20)
    parser.add_argument("--output-mib", type=int, default=256, help="MiB the writer child writes")
    parser.add_argument("--imports", type=int, default=21, help="fresh interpreters per import variant")
    parser.add_argument("--readies", type=int, default=15, help="children per readiness check")
    parser.add_argument("--crash-seconds", type=float, default=10.0, help="seconds of the crash loop")
    parser.add_argument("--scale", default="200,2000,5000", help="process counts of the scale table")
    parser.add_argument("--calls", type=int, default=2000, help="calls timed per cross-thread call")
    parser.add_argument("--only", choices=["manager", "scale", "calls", "output", "import", "ready", "crash"])
    parser.add_argument("--trial", help=argparse.SUPPRESS)
    parser.add_argument("--output-trial", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(trial(args.trial, args.processes, args.idle, args.respawns)))
        return 0
    if args.output_trial:
        print(json.dumps(output_trial(args.output_trial, args.output_mib)))
        return 0

    import gaffer
    print("gaffer.py %s, %s, %s %s, %d cores, Python %s; medians of %d rounds"
          % (gaffer.__version__, time.strftime("%Y-%m-%d"), platform.system(), platform.machine(),
             os.cpu_count(), platform.python_version(), args.rounds))
    probe = gaffer.Manager(guardian=False)
    probe.start()
    print("containment here: %s" % ("a cgroup per slot" if probe._containment.cgroups is not None else "process groups and /proc"))
    probe.stop()
    probe.run()
    if args.only in (None, "manager"):
        manager_table(args)
    if args.only in (None, "scale"):
        scale_table(args)
    if args.only in (None, "calls"):
        calls_table(args)
    if args.only in (None, "output"):
        output_table(args)
    if args.only in (None, "import"):
        import_table(args)
    if args.only in (None, "ready"):
        ready_table(args)
    if args.only in (None, "crash"):
        crash_table(args)
    return 0


def run_rounds(args, variants, trial_flag, extra):
    """Run each variant once a round, in a fresh interpreter; return {variant: {metric: median}}."""
    results = {variant: collections.defaultdict(list) for variant, _ in variants}
    for round_ in range(args.rounds):
        for variant, _ in variants:
            out = subprocess.run([sys.executable, __file__, trial_flag, variant] + extra,
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            for key, value in json.loads(out).items():
                results[variant][key].append(value)
            print("round %d/%d: %s done" % (round_ + 1, args.rounds, variant), file=sys.stderr)
    return {v: {k: statistics.median(vals) for k, vals in r.items()} for v, r in results.items()}


def print_table(header, rows):
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                        enumerate(zip(row, widths))).rstrip())
    print(line)


def output_table(args):
    medians = run_rounds(args, OUTPUT_VARIANTS, "--output-trial", ["--output-mib", str(args.output_mib)])
    base = medians["bare-1m"]["seconds"]
    rows = []
    for variant, label in OUTPUT_VARIANTS:
        seconds = medians[variant]["seconds"]
        rate = args.output_mib * (1 << 20) / seconds / 1e6
        share = "%.0f%%" % (100 * base / seconds)
        target = {"gaffer": (0.7, base, ">= 70%"), "gaffer-log": (0.6, medians["file"]["seconds"],
                                                                    ">= 60% of writer > file")}.get(variant)
        mark = ("ok" if target[1] / seconds >= target[0] else "MISS") if target else ""
        rows.append([label, "%.3f" % seconds, "%.0f" % rate, share, target[2] if target else "", mark])
    print()
    print("output throughput: one child writes %d MiB to a redirected stdout (to a file: on the disk of bench/)"
          % args.output_mib)
    print_table(["reader", "seconds", "MB/s", "of bare 1 MiB", "target", ""], rows)


def manager_table(args):
    """The targets are for gaffer as it comes (the guardian, a cgroup per slot where the system allows)
    against the bare loop; the last ratio is the manager's own work, without either, against it."""
    medians = run_rounds(args, VARIANTS, "--trial", ["--processes", str(args.processes), "--idle", str(args.idle),
                                                     "--respawns", str(args.respawns)])
    header = (["metric"] + [label for _, label in VARIANTS]
              + ["gaffer vs bare", "target", "", "no guardian/cgroup vs bare"])
    rows = []
    for key, label, fmt, target in METRICS:
        base, plain, full = medians["bare"][key], medians["gaffer-plain"][key], medians["gaffer"][key]
        ratios = ["%.2fx" % (a / b) if b and key not in ("threads", "idle_cpu", "guardian_rss") else ""
                  for a, b in ((full, base), (plain, base))]
        rows.append([label.format(n=args.processes)] + [fmt % medians[v][key] for v, _ in VARIANTS]
                    + [ratios[0], target_text(target), verdict(target, full, base), ratios[1]])
    print_table(header, rows)

if __name__ == "__main__":
    sys.exit(main())
