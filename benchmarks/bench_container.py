#!/usr/bin/env python3
"""Side-by-side benchmark of modelseal against its peers (``make bench``).

Peers run in the same process run as modelseal, interleaved sample by sample
(the order alternates every repetition), and every number reported is a median
over several repetitions, so a slow spell on a shared machine hits both sides.

    a. seal:     ``modelseal seal`` (CLI, whole process) and ``modelseal.seal()``
                 (in process) vs ``age -r`` (X25519 recipient from age-keygen)
    b. open:     ``modelseal open -o`` vs ``age -d -o`` (decrypt to a file)
    c. memory:   ``modelseal.open(...).read()`` vs a plain read of the plaintext
                 file (``open(p, 'rb').read()`` and ``readinto`` a preallocated buffer)
    d. signer:   ``modelseal.open(..., require_signer=key).read()`` vs the same without it
    e. verify:   keyless ``modelseal.verify()`` throughput (vs a plain read of the container)
    f. memory:   peak RSS of a sealing process at several input sizes

Before every timed sample, for both sides alike: the previous sample's outputs are
removed, ``sync`` flushes dirty pages (so write-back of one sample does not run
into the next), every input file is read through once (page cache warm; dropping
the cache needs root and is not attempted), and ``--prefault-mib`` of anonymous
memory is touched and freed. The last step matters on VMs with free-page
reporting (virtio-balloon): memory the guest freed a few seconds ago goes back to
the host, and touching it again costs several times more than the work measured.

Usage::

    python benchmarks/bench_container.py                 # 1 GiB, RSS at 1 and 4 GiB
    python benchmarks/bench_container.py --quick         # 64 MiB smoke test
    python benchmarks/bench_container.py --json out.json # also write every sample
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import cryptography
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import modelseal

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 8 * MiB


# --- samples and measurements -----------------------------------------------------------


@dataclass
class Sample:
    wall_s: float
    cpu_s: float  # user + system CPU time of the measured work (all its threads)
    maxrss_kib: int | None = None  # child processes only


@dataclass
class Side:
    """One thing being timed: a callable that runs it once and returns a Sample."""

    key: str
    label: str
    run: Callable[[], Sample]
    inputs: Sequence[Path] = ()  # files read through before every sample
    outputs: Sequence[Path] = ()  # files removed before every sample
    samples: list[Sample] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(s.wall_s for s in self.samples)


@dataclass
class Row:
    measurement: str
    ours: str
    peer: str
    ratio: float | None
    target: str
    passed: bool | None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def result(self) -> str:
        return "-" if self.passed is None else ("PASS" if self.passed else "FAIL")


def run_process(cmd: Sequence[str | os.PathLike[str]]) -> Sample:
    """Run a command to completion: its wall time and CPU time (user + system)."""
    with tempfile.TemporaryFile() as errlog:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            errlog.seek(0)
            message = errlog.read().decode(errors="replace").strip()
            raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{message}")
    # ru_maxrss is not reported here: Linux seeds a child's peak RSS with its parent's at
    # exec time, and this process holds far more than the tools measured (see run_for_rss).
    return Sample(wall, usage.ru_utime + usage.ru_stime)


TIME_BIN = "/usr/bin/time"
# A small process in between, so the measured child's peak RSS starts from that
# process's (exec copies the parent's high-water mark into the child's ru_maxrss).
_RSS_HELPER = (
    "import os,sys;p=os.posix_spawn(sys.argv[2],sys.argv[2:],os.environ);_,s,r=os.wait4(p,0);"
    "open(sys.argv[1],'w').write(str(r.ru_maxrss));sys.exit(os.waitstatus_to_exitcode(s))"
)


def rss_method() -> str:
    return "/usr/bin/time -f %M" if os.access(TIME_BIN, os.X_OK) else "python -I -S helper (about 8 MiB floor)"


def run_for_rss(cmd: Sequence[str | os.PathLike[str]]) -> Sample:
    """Run a command through a small parent and return its peak RSS (KiB) with its times."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as report:
        if os.access(TIME_BIN, os.X_OK):
            sample = run_process([TIME_BIN, "-f", "%M", "-o", report.name, *cmd])
        else:
            sample = run_process([sys.executable, "-I", "-S", "-c", _RSS_HELPER, report.name, *cmd])
        sample.maxrss_kib = int(Path(report.name).read_text().strip().splitlines()[-1])
    return sample


@contextlib.contextmanager
def timed_in_process(box: list[Sample]) -> Iterator[None]:
    """Time a block of this process's work (CPU time counts every thread of the process)."""
    gc.collect()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    yield
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    box.append(Sample(wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)))


def in_process(fn: Callable[[], object]) -> Callable[[], Sample]:
    def run() -> Sample:
        box: list[Sample] = []
        with timed_in_process(box):
            result = fn()
        del result
        return box[0]

    return run


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.size = args.size_mib * MiB
        self.prefault = args.prefault_mib * MiB
        self._block = bytearray(BLOCK)

    # environment, the same for both sides --------------------------------------------------
    def read_through(self, path: Path) -> None:
        view = memoryview(self._block)
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass

    @staticmethod
    def remove_outputs(side: Side) -> None:
        for p in side.outputs:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    def prepare(self, side: Side) -> None:
        self.remove_outputs(side)
        gc.collect()
        os.sync()
        for p in side.inputs:
            self.read_through(p)
        if self.prefault:
            touched = bytearray(self.prefault)  # zero-filled: every page is touched
            del touched

    def compare(self, sides: Sequence[Side], repeat: int, warmup: bool = True) -> None:
        """Interleave the sides, alternating their order every repetition."""
        if warmup:
            for side in sides:
                self.prepare(side)
                side.run()
        for rep in range(repeat):
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for side in order:
                self.prepare(side)
                side.samples.append(side.run())
            line = "  ".join(f"{s.key}={s.samples[-1].wall_s:.3f}s" for s in sides)
            log(f"    rep {rep + 1}/{repeat}: {line}")
        for side in sides:
            self.remove_outputs(side)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- helpers ---------------------------------------------------------------------------


def make_random_file(path: Path, size: int) -> None:
    """Incompressible bytes, fast: an AES-256-CTR keystream under a random key."""
    enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    zeros = bytes(BLOCK)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(BLOCK, left)
            fh.write(enc.update(zeros[:n]))
            left -= n


def same_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(BLOCK), fb.read(BLOCK)
            if x != y:
                return False
            if not x:
                return True


def readinto_full(path: Path, buf: bytearray) -> int:
    view = memoryview(buf)
    done = 0
    with open(path, "rb", buffering=0) as fh:
        while done < len(view):
            n = fh.readinto(view[done:])
            if not n:
                break
            done += n
    return done


def modelseal_cli() -> list[str]:
    exe = Path(sys.executable).with_name("modelseal")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("modelseal")
    return [found] if found else [sys.executable, "-m", "modelseal"]


def tool_version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=10)
    except OSError:
        return "unknown"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "unknown"


def machine_info(age: str) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "blake3": getattr(blake3, "__version__", "unknown"),
        "modelseal": modelseal.__version__,
        "age": "age " + tool_version([age, "--version"]),
        "loadavg_start": os.getloadavg(),
        "git": git_state(),
    }


def git_state() -> str:
    """The commit measured, and whether the library source differed from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes under src/" if dirty.stdout.strip() else "")


def meminfo_kib(field_name: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def fmt_s(x: float) -> str:
    return f"{x:.3f} s"


def ratio_row(
    measurement: str, ours: Side, peer: Side, target: float | None, target_text: str, bytes_: int | None = None
) -> Row:
    """ratio = modelseal median / peer median (time: below 1 means modelseal is faster)."""
    r = ours.median / peer.median
    o, p = fmt_s(ours.median), fmt_s(peer.median)
    if bytes_:
        o += f" ({bytes_ / GiB / ours.median:.2f} GiB/s)"
        p += f" ({bytes_ / GiB / peer.median:.2f} GiB/s)"
    return Row(
        measurement,
        o,
        p,
        r,
        target_text,
        None if target is None else r <= target,
        {"ours": ours.key, "peer": peer.key},
    )


# --- the measurements ------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path, age: str, age_keygen: str) -> tuple[list[Row], dict[str, Any]]:
    b = Bench(args, work)
    size = b.size
    cli = modelseal_cli()
    raw: dict[str, Any] = {"modelseal_cli": cli}
    rows: list[Row] = []

    log(f"setup: {args.size_mib} MiB random input, keys, containers in {work}")
    plain = work / "model.bin"
    make_random_file(plain, size)

    identity = modelseal.Identity.generate()
    id_file = work / "device.key"
    identity.save(id_file)
    recipient = str(identity.recipient)
    signer = modelseal.SigningKey.generate()
    verify_key = signer.verify_key

    age_key = work / "age.key"
    subprocess.run([age_keygen, "-o", str(age_key)], check=True, capture_output=True)
    age_recipient = subprocess.run(
        [age_keygen, "-y", str(age_key)], check=True, capture_output=True, text=True
    ).stdout.strip()

    sealed = work / "model.mseal"  # unsigned, for b and c
    signed = work / "signed.mseal"  # signed, for d and e
    aged = work / "model.age"
    modelseal.seal(plain, sealed, recipients=[recipient])
    modelseal.seal(plain, signed, recipients=[recipient], signer=signer)
    run_process([age, "-r", age_recipient, "-o", aged, plain])

    # a. seal -------------------------------------------------------------------------
    log("a. seal")
    out_cli, out_lib, out_age, out_age_sync = (work / n for n in ("a-cli.mseal", "a-lib.mseal", "a.age", "a-sync.age"))

    def age_seal_fsync() -> Sample:
        t0 = time.perf_counter()
        s = run_process([age, "-r", age_recipient, "-o", out_age_sync, plain])
        fd = os.open(out_age_sync, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return Sample(time.perf_counter() - t0, s.cpu_s)

    seal_cli = Side(
        "modelseal-cli",
        "modelseal seal (CLI)",
        lambda: run_process([*cli, "seal", plain, "-o", out_cli, "-r", recipient]),
        [plain],
        [out_cli],
    )
    seal_lib = Side(
        "modelseal.seal",
        "modelseal.seal() in process",
        in_process(lambda: modelseal.seal(plain, out_lib, recipients=[recipient])),
        [plain],
        [out_lib],
    )
    seal_age = Side(
        "age", "age -r", lambda: run_process([age, "-r", age_recipient, "-o", out_age, plain]), [plain], [out_age]
    )
    seal_age_sync = Side("age+fsync", "age -r, then fsync(OUT)", age_seal_fsync, [plain], [out_age_sync])
    a_sides = [seal_cli, seal_age, seal_lib, seal_age_sync]
    b.compare(a_sides, args.repeat)
    rows.append(ratio_row("a. seal: modelseal CLI vs age", seal_cli, seal_age, 0.5, "<= 0.50 (2x faster)", size))
    rows.append(ratio_row("a. seal: modelseal.seal() vs age", seal_lib, seal_age, 0.5, "<= 0.50 (2x faster)", size))
    rows.append(ratio_row("a. (info) seal: modelseal CLI vs age+fsync", seal_cli, seal_age_sync, None, "info", size))

    # b. open to a file ----------------------------------------------------------------
    log("b. open to a file")
    out_ms_plain, out_age_plain = work / "b-modelseal.bin", work / "b-age.bin"
    open_cli = Side(
        "modelseal-cli",
        "modelseal open -o (CLI)",
        lambda: run_process([*cli, "open", sealed, "-i", id_file, "-o", out_ms_plain]),
        [sealed],
        [out_ms_plain],
    )
    open_age = Side(
        "age",
        "age -d -o",
        lambda: run_process([age, "-d", "-i", age_key, "-o", out_age_plain, aged]),
        [aged],
        [out_age_plain],
    )
    # one checked run of each first (also the warm-up)
    for side, out in ((open_cli, out_ms_plain), (open_age, out_age_plain)):
        b.prepare(side)
        side.run()
        if not same_content(out, plain):
            raise RuntimeError(f"{side.label} did not reproduce the input")
    b.compare([open_cli, open_age], args.repeat, warmup=False)
    rows.append(
        ratio_row("b. open to file: modelseal CLI vs age -d", open_cli, open_age, 0.5, "<= 0.50 (2x faster)", size)
    )

    # c. open into memory ----------------------------------------------------------------
    log("c. open into memory")

    def ms_read() -> bytearray:
        with modelseal.open(sealed, identity=identity) as model:
            return model.read()

    prealloc = bytearray(size)  # allocated (and every page touched) before any timing

    def ms_read_into() -> int:
        with modelseal.open(sealed, identity=identity) as model:
            return model.read_into(None, prealloc)

    def plain_read() -> bytes:
        with open(plain, "rb") as fh:
            return fh.read()

    with modelseal.open(sealed, identity=identity) as model:  # a correctness check, untimed
        if blake3.blake3(model.read()).digest() != blake3.blake3(plain.read_bytes()).digest():
            raise RuntimeError("modelseal.open().read() did not reproduce the input")

    c_ms = Side("modelseal.read", "modelseal.open().read()", in_process(ms_read), [sealed, plain])
    c_plain = Side("plain.read", "open(p,'rb').read()", in_process(plain_read), [sealed, plain])
    c_ms_into = Side("modelseal.read_into", "modelseal read_into(prealloc)", in_process(ms_read_into), [sealed, plain])
    c_plain_into = Side(
        "plain.readinto", "readinto(prealloc)", in_process(lambda: readinto_full(plain, prealloc)), [sealed, plain]
    )
    b.compare([c_ms, c_plain, c_ms_into, c_plain_into], args.repeat)
    prealloc = bytearray()  # free it; the closures above are done
    rows.append(ratio_row("c. in memory: .read() vs open().read()", c_ms, c_plain, 1.5, "<= 1.50", size))
    rows.append(ratio_row("c. in memory: .read() vs readinto(prealloc)", c_ms, c_plain_into, 1.5, "<= 1.50", size))
    rows.append(
        ratio_row("c. (info) read_into(prealloc) vs readinto(prealloc)", c_ms_into, c_plain_into, None, "info", size)
    )

    # d. verify + open -------------------------------------------------------------------
    log("d. open with require_signer")

    def signed_read(require: bool) -> Callable[[], bytearray]:
        def read() -> bytearray:
            kwargs: dict[str, Any] = {"require_signer": verify_key} if require else {}
            with modelseal.open(signed, identity=identity, **kwargs) as model:
                return model.read()

        return read

    d_req = Side("require_signer", "open(require_signer=key).read()", in_process(signed_read(True)), [signed])
    d_plain = Side("no_signer_check", "open().read() (same container)", in_process(signed_read(False)), [signed])
    b.compare([d_req, d_plain], args.repeat * 2)
    rows.append(ratio_row("d. read with require_signer vs without", d_req, d_plain, 1.05, "<= 1.05", size))

    # e. keyless verify ------------------------------------------------------------------
    log("e. keyless verify")
    signed_size = signed.stat().st_size

    def read_container() -> int:
        view = memoryview(b._block)[: 1 * MiB]
        total = 0
        with open(signed, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
        return total

    e_verify = Side(
        "modelseal.verify", "modelseal.verify()", in_process(lambda: modelseal.verify(signed, verify_key)), [signed]
    )
    e_read = Side("plain.read-1MiB", "read container, 1 MiB blocks", in_process(read_container), [signed])
    b.compare([e_verify, e_read], args.repeat)
    rows.append(ratio_row("e. verify() vs plain read of container", e_verify, e_read, None, "info", signed_size))

    raw["sections"] = {
        name: [
            {"key": s.key, "label": s.label, "samples": [vars(x) for x in s.samples], "median_wall_s": s.median}
            for s in sides
        ]
        for name, sides in (
            ("a_seal", a_sides),
            ("b_open_file", [open_cli, open_age]),
            ("c_open_memory", [c_ms, c_plain, c_ms_into, c_plain_into]),
            ("d_require_signer", [d_req, d_plain]),
            ("e_verify", [e_verify, e_read]),
        )
    }

    # f. peak RSS of a seal --------------------------------------------------------------
    log("f. seal peak RSS")
    for p in (sealed, signed, aged):
        p.unlink()
    rss: dict[int, dict[str, Any]] = {}
    for mib in args.rss_sizes:
        src = plain if mib == args.size_mib else work / f"rss-{mib}.bin"
        if src != plain:
            if plain.exists() and (mib * MiB + plain.stat().st_size) * 2 > shutil.disk_usage(work).free:
                plain.unlink()
            log(f"  making {mib} MiB input")
            make_random_file(src, mib * MiB)
        out_ms, out_a = work / "f.mseal", work / "f.age"
        ms_cmd = [*cli, "seal", src, "-o", out_ms, "-r", recipient]
        age_cmd = [age, "-r", age_recipient, "-o", out_a, src]
        ms_side = Side("modelseal-cli", "modelseal seal (CLI)", lambda c=ms_cmd: run_for_rss(c), [src], [out_ms])
        age_side = Side("age", "age -r", lambda c=age_cmd: run_for_rss(c), [src], [out_a])
        b.compare([ms_side, age_side], args.rss_repeat, warmup=False)
        rss[mib] = {
            "modelseal_kib": max(s.maxrss_kib or 0 for s in ms_side.samples),
            "age_kib": max(s.maxrss_kib or 0 for s in age_side.samples),
            "modelseal_samples": [vars(x) for x in ms_side.samples],
            "age_samples": [vars(x) for x in age_side.samples],
        }
        ms_mib, age_mib = rss[mib]["modelseal_kib"] / 1024, rss[mib]["age_kib"] / 1024
        log(f"  {mib} MiB: modelseal {ms_mib:.1f} MiB, age {age_mib:.1f} MiB")
        if src != plain:
            src.unlink()
    raw["rss"] = rss
    raw["rss_method"] = rss_method()
    for mib, r in rss.items():
        ms_mib, age_mib = r["modelseal_kib"] / 1024, r["age_kib"] / 1024
        rows.append(
            Row(
                f"f. seal peak RSS, {mib} MiB input (CLI vs age)",
                f"{ms_mib:.1f} MiB",
                f"{age_mib:.1f} MiB",
                ms_mib / age_mib,
                "info",
                None,
            )
        )
    lo, hi = min(rss), max(rss)
    if hi != lo:
        growth_ms = rss[hi]["modelseal_kib"] / rss[lo]["modelseal_kib"]
        growth_age = rss[hi]["age_kib"] / rss[lo]["age_kib"]
        rows.append(
            Row(
                f"f. seal RSS growth {lo}->{hi} MiB input",
                f"x{growth_ms:.3f}",
                f"x{growth_age:.3f}",
                growth_ms,
                "<= 1.10 (flat)",
                growth_ms <= 1.10,
            )
        )
    return rows, raw


# --- output ------------------------------------------------------------------------------


def print_table(rows: Sequence[Row]) -> str:
    head = ("measurement", "modelseal (median)", "peer (median)", "ratio", "target", "result")
    cells = [head] + [
        (r.measurement, r.ours, r.peer, "-" if r.ratio is None else f"{r.ratio:.2f}", r.target, r.result) for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = []
    for k, c in enumerate(cells):
        lines.append(" | ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip())
        if k == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-mib", type=int, default=None, help="input size for a-e (default 1024; 64 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 MiB, 3 repetitions, RSS at 64 and 256 MiB")
    p.add_argument("--repeat", type=int, default=None, help="timed repetitions per side (default 5; 3 with --quick)")
    p.add_argument("--rss-sizes-mib", default=None, help='input sizes for the RSS check (default "1024,4096")')
    p.add_argument("--rss-repeat", type=int, default=1, help="runs per side and size for the RSS check (default 1)")
    p.add_argument(
        "--prefault-mib",
        type=int,
        default=None,
        help="anonymous memory touched before every sample (default size + 512; 0 turns it off)",
    )
    p.add_argument("--tmpdir", default="/tmp", help="where the scratch directory goes (default /tmp)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write all results and samples here")
    args = p.parse_args(argv)
    if args.size_mib is None:
        args.size_mib = 64 if args.quick else 1024
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.rss_sizes_mib is None:
        args.rss_sizes_mib = "64,256" if args.quick else "1024,4096"
    args.rss_sizes = sorted({int(x) for x in args.rss_sizes_mib.split(",") if x.strip()})
    if args.prefault_mib is None:
        args.prefault_mib = args.size_mib + 512
    if args.size_mib < 1 or args.repeat < 1 or args.rss_repeat < 1 or not args.rss_sizes or min(args.rss_sizes) < 1:
        p.error("sizes and repetitions must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    age, age_keygen = shutil.which("age"), shutil.which("age-keygen")
    if not age or not age_keygen:
        sys.exit("error: `age` and `age-keygen` must be on PATH (Debian/Ubuntu: apt-get install age)")

    size = args.size_mib * MiB
    # a-e: input, three containers, two plaintext outputs at once; f: an input and an output
    need = max(6 * size, 2 * max(args.rss_sizes) * MiB + 2 * size) + 512 * MiB
    free = shutil.disk_usage(args.tmpdir).free
    if free < need:
        sys.exit(f"error: {args.tmpdir} has {free / GiB:.1f} GiB free, this run needs about {need / GiB:.1f} GiB")
    avail = meminfo_kib("MemAvailable")
    if avail is not None and avail * 1024 < 4 * size + args.prefault_mib * MiB:
        log(f"warning: only {avail // 1024} MiB of memory available; files may fall out of the page cache")

    info = machine_info(age)
    info["command"] = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv)
    log(
        f"machine: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"cryptography {info['cryptography']}, {info['age']}; load {info['loadavg_start']}"
    )
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="modelseal-bench-", dir=args.tmpdir))
    try:
        rows, raw = run(args, work, age, age_keygen)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    info["elapsed_s"] = round(time.perf_counter() - started, 1)

    table = print_table(rows)
    print()
    print(
        f"modelseal benchmark: {args.size_mib} MiB random input, median of {args.repeat} interleaved runs "
        f"({args.repeat * 2} for d), RSS at {', '.join(map(str, args.rss_sizes))} MiB"
    )
    print("ratio = modelseal / peer (time or memory: below 1 means modelseal is faster or smaller)")
    print()
    print(table)
    print()
    print(
        f"{info['nproc']} CPUs, {info['cpu_model']}; Python {info['python']}, cryptography {info['cryptography']}, "
        f"{info['age']}; load average {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}; "
        f"{info['elapsed_s']} s in all; git {info['git']}; peak RSS via {raw['rss_method']}"
    )
    if args.json:
        results = [{**vars(r), "result": r.result} for r in rows]
        args.json.write_text(
            json.dumps(
                {"machine": info, "args": vars(args) | {"json": str(args.json)}, "results": results, "raw": raw},
                indent=2,
                default=str,
            )
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
