"""Shared helpers of the oracle tests: where qtune's build and the shared data are, running
qtune's programs and qtune_oracle_helper, comparing numbers, and the pass/fail bookkeeping.

Every check is recorded; the script exits non-zero (and says which checks failed) when any did.
Nothing here skips: missing data, programs or libraries are failures."""

import atexit
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback

import numpy as np

SRC = os.environ.get("QTUNE_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("QTUNE_BUILD_DIR") or os.path.join(SRC, "build")
BIN = os.path.join(BUILD, "bin")


def data_path(name=""):
    """A file of ../shared/data (QTUNE_DATA overrides); missing data is a failure."""
    root = os.environ.get("QTUNE_DATA") or os.environ.get("QTUNE_DEFAULT_DATA") or os.path.join(
        SRC, "..", "shared", "data")
    p = os.path.join(root, name)
    if not os.path.exists(p):
        raise SystemExit(f"oracle: FAILED: shared data {p} is missing")
    return p


def tmpdir(tag):
    """A fresh temporary directory, removed at exit unless QTUNE_ORACLE_KEEP is set."""
    d = tempfile.mkdtemp(prefix=f"qtune-oracle-{tag}-")
    if not os.environ.get("QTUNE_ORACLE_KEEP"):
        atexit.register(shutil.rmtree, d, True)
    return d


def run(program, *args, cwd=None):
    """Runs build/bin/<program>; a non-zero exit raises with the program's output."""
    exe = os.path.join(BIN, program)
    if not os.path.exists(exe):
        raise RuntimeError(f"{exe} is missing: build qtune first (scripts/build.sh)")
    r = subprocess.run([exe, *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{program} {' '.join(map(str, args))} exited {r.returncode}:\n"
                           f"{r.stdout}{r.stderr}")
    return r.stdout


def helper(**request):
    """Runs qtune_oracle_helper with `request` (see tests/oracle/oracle_helper.cpp)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    try:
        out = run("qtune_oracle_helper", f.name)
    finally:
        os.unlink(f.name)
    return json.loads(out.strip().splitlines()[-1])


def versions(*modules):
    """Prints qtune's LibTorch and each library's version (both sides of every comparison)."""
    info = helper(cmd="version")
    plugins = " ".join(f"{k} {v}" for k, v in sorted(info["plugins"].items()))
    line = [f"qtune (LibTorch {info['libtorch']}; plugins {plugins})",
            f"python {sys.version.split()[0]}"]
    for m in modules:  # the installed distribution's version (hqq has no __version__)
        importlib.import_module(m)
        line.append(f"{m} {importlib.metadata.version(m)}")
    print("oracle versions: " + ", ".join(line), flush=True)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False)
    return path


class Checks:
    """Named checks; `done()` prints the tally and exits 1 when any failed."""

    def __init__(self, name):
        self.name, self.passed, self.failed = name, 0, []

    def check(self, what, ok, detail=""):
        tag = "ok  " if ok else "FAIL"
        print(f"  {tag} {what}" + (f"  ({detail})" if detail else ""), flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed.append(what)
        return ok

    def equal(self, what, a, b):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return self.check(what, False, f"shapes {a.shape} vs {b.shape}")
        diff = int(np.count_nonzero(a != b))
        return self.check(what, diff == 0, f"{a.size} values, {diff} differ")

    def close(self, what, a, b, atol, rtol=0.0):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return self.check(what, False, f"shapes {a.shape} vs {b.shape}")
        err = np.abs(a - b)
        bound = atol + rtol * np.abs(b)
        worst = float(err.max()) if err.size else 0.0
        ok = bool(np.all(err <= bound)) and np.isfinite(a).all() == np.isfinite(b).all()
        return self.check(what, ok, f"max |diff| {worst:.3g}, atol {atol:g}, rtol {rtol:g}, "
                                    f"max |ref| {float(np.abs(b).max()) if b.size else 0:.3g}")

    def run(self, what, fn, *args):
        """Runs one group of checks; an exception is a failed check, not a crash."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - any error is a failed check, reported in full
            traceback.print_exc()
            self.check(f"{what} raised", False)

    def done(self):
        if self.failed:
            print(f"oracle {self.name}: {len(self.failed)} of {self.passed + len(self.failed)} "
                  f"checks FAILED: {'; '.join(self.failed)}", flush=True)
            sys.exit(1)
        if self.passed == 0:
            print(f"oracle {self.name}: FAILED: no check ran", flush=True)
            sys.exit(1)
        print(f"oracle {self.name}: all {self.passed} checks passed", flush=True)


def bnb_generic_cpu_path():
    """On CPUs with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight for a fused kernel
    in its first inference forward, and that repacking requires out_features % 32 == 0, which
    stories260K's projections are not (an AssertionError on such machines only). The tests
    compare against bitsandbytes' generic path (dequantize the same NF4 codes, then matmul), so
    they keep it on every CPU."""
    import bitsandbytes.nn.modules as bnb_modules
    bnb_modules.has_avx512bf16 = lambda: False
