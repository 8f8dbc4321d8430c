"""The fast BLAS for MLX's Linux CPU backend: core type choice, the environment, the re-exec."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxtune import blas, blas_choice
from mlxtune.blas_choice import Candidate

AVX512 = {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}


@pytest.mark.parametrize("flags, vendor, expected", [
    (AVX512, "GenuineIntel", "SkylakeX"),
    (AVX512, "AuthenticAMD", "SkylakeX"),  # Zen 4 has AVX-512 too
    ({"avx", "avx2", "fma"}, "GenuineIntel", "Haswell"),
    ({"avx", "avx2", "fma"}, "AuthenticAMD", "Zen"),
    ({"avx", "avx512f"}, "GenuineIntel", None),  # partial AVX-512 and no AVX2: OpenBLAS decides
    (set(), "", None),
])
def test_coretype_from_cpu_flags(flags, vendor, expected):
    assert blas.choose_coretype(flags, vendor) == expected


@pytest.fixture
def fake_system(monkeypatch):
    """A Linux box with the MLX CPU wheel and an OpenBLAS at a fake path."""
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.setattr(blas, "_reference_blas_bundled", lambda: True)
    monkeypatch.setattr(blas, "find_blas", lambda environ=None, verify=True: "/x/libopenblas.so.0")
    monkeypatch.setattr(blas, "mkl_candidate", lambda environ=None: None)
    monkeypatch.setattr(blas, "blis_candidate", lambda: None)


CPUINFO_ZEN3 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx avx2 fma\n"


def test_env_preloads_openblas_and_sets_coretype(fake_system):
    env = blas.blas_env({"LD_PRELOAD": "/other.so"}, cpuinfo=CPUINFO_ZEN3)
    assert env == {"LD_PRELOAD": "/x/libopenblas.so.0:/other.so", "OPENBLAS_CORETYPE": "Zen",
                   blas.MARKER_VAR: "/x/libopenblas.so.0", **blas.ALLOCATOR_ENV}


def test_env_never_overrides_users_coretype(fake_system):
    env = blas.blas_env({"OPENBLAS_CORETYPE": "Haswell"}, cpuinfo=CPUINFO_ZEN3)
    assert "OPENBLAS_CORETYPE" not in env and env["LD_PRELOAD"] == "/x/libopenblas.so.0"


@pytest.mark.parametrize("environ", [
    {"MLXTUNE_FAST_BLAS": "0"},  # the escape hatch
    {"MLXTUNE_FAST_BLAS": "off"},
    {blas.MARKER_VAR: "/x/libopenblas.so.0"},  # already re-executed once
    {"LD_PRELOAD": "/usr/lib/libopenblas.so.0", **blas.ALLOCATOR_ENV},  # the user set it all
])
def test_env_is_empty_when_off_or_done(fake_system, environ):
    assert blas.blas_env(environ, cpuinfo=CPUINFO_ZEN3) == {}


def test_allocator_settings_alone_when_the_user_preloads_blas(fake_system):
    """A user's own preloaded OpenBLAS stays; the allocator settings still come, the user's win."""
    env = blas.blas_env({"LD_PRELOAD": "/usr/lib/libopenblas.so.0", "MALLOC_MMAP_MAX_": "8"},
                        cpuinfo=CPUINFO_ZEN3)
    assert env == {"MALLOC_TRIM_THRESHOLD_": blas.ALLOCATOR_ENV["MALLOC_TRIM_THRESHOLD_"]}


def test_env_is_empty_off_linux(fake_system, monkeypatch):
    monkeypatch.setattr(blas.sys, "platform", "darwin")
    assert blas.blas_env({}, cpuinfo=CPUINFO_ZEN3) == {}


MKL = Candidate("mkl", "/x/libmkl_rt.so.3", {"LD_LIBRARY_PATH": "/x", "MKL_THREADING_LAYER": "GNU"})
CPUINFO_ZEN4 = "model name\t: AMD EPYC\nvendor_id\t: AuthenticAMD\nflags\t\t: avx avx2 fma avx512f avx512bw avx512vl avx512dq\n"


def test_the_pick_measured_on_this_cpu_decides(fake_system, monkeypatch):
    """The faster candidate is saved and preloaded with its environment, on this CPU only."""
    monkeypatch.setattr(blas, "mkl_candidate", lambda environ=None: MKL)
    speeds = {"openblas": [40.0, 55.0], "mkl": [70.0, 20.0]}  # each keeps its best round
    monkeypatch.setattr(blas_choice, "measure_in_child",
                        lambda c, env: {"gflops": speeds[c.name].pop(0)})
    saved = blas_choice.pick(blas.candidates({}, CPUINFO_ZEN4), {}, cpuinfo=CPUINFO_ZEN4)
    assert saved["picked"] == "mkl" and saved["candidates"]["openblas"]["gflops"] == 55.0
    env = blas.blas_env({}, cpuinfo=CPUINFO_ZEN4)
    assert env["LD_PRELOAD"] == MKL.library and env["MKL_THREADING_LAYER"] == "GNU"
    assert "OPENBLAS_CORETYPE" not in env
    # Another CPU (here: one without AVX-512) has not been measured: OpenBLAS, the first found.
    assert blas.blas_env({}, cpuinfo=CPUINFO_ZEN3)["LD_PRELOAD"] == "/x/libopenblas.so.0"
    # A candidate can still be asked for by name (the test variants run OpenBLAS by name).
    assert blas.blas_env({}, cpuinfo=CPUINFO_ZEN4, name="openblas")["OPENBLAS_CORETYPE"] \
        == "SkylakeX"


def test_each_environment_keeps_its_own_pick(fake_system, monkeypatch):
    """Two virtual environments (each its own MKL) on one machine: measuring one keeps the
    other's pick, so neither measures again on every setup."""
    other = Candidate("mkl", "/elsewhere/lib/libmkl_rt.so.3", MKL.env)
    speeds = {MKL.library: 70.0, other.library: 10.0, "/x/libopenblas.so.0": 40.0}
    monkeypatch.setattr(blas_choice, "measure_in_child",
                        lambda c, env: {"gflops": speeds[c.library]})
    for mkl in (MKL, other):
        monkeypatch.setattr(blas, "mkl_candidate", lambda environ=None, mkl=mkl: mkl)
        blas_choice.pick(blas.candidates({}, CPUINFO_ZEN4), {}, cpuinfo=CPUINFO_ZEN4)
    for mkl, picked in ((MKL, "mkl"), (other, "openblas")):
        monkeypatch.setattr(blas, "mkl_candidate", lambda environ=None, mkl=mkl: mkl)
        assert blas_choice.saved_choice(blas.candidates({}, CPUINFO_ZEN4),
                                        CPUINFO_ZEN4)["picked"] == picked


def test_the_user_names_a_candidate_or_a_library(fake_system, monkeypatch):
    monkeypatch.setattr(blas, "mkl_candidate", lambda environ=None: MKL)
    assert blas.blas_env({blas.LIB_VAR: "mkl"}, cpuinfo=CPUINFO_ZEN4)["LD_PRELOAD"] == MKL.library
    assert blas.blas_env({blas.LIB_VAR: "nothing-such"}, cpuinfo=CPUINFO_ZEN4).get(
        "LD_PRELOAD") is None
    assert [c.name for c in blas.candidates({blas.LIB_VAR: "/x/libopenblas.so.0"})] == ["user"]


def test_a_candidate_that_fails_is_never_picked(fake_system, monkeypatch):
    monkeypatch.setattr(blas, "mkl_candidate", lambda environ=None: MKL)
    monkeypatch.setattr(blas_choice, "measure_in_child", lambda c, env: (
        {"error": "the library did not load"} if c.name == "mkl" else {"gflops": 1.0}))
    saved = blas_choice.pick(blas.candidates({}, CPUINFO_ZEN4), {}, cpuinfo=CPUINFO_ZEN4)
    assert saved["picked"] == "openblas"
    assert saved["candidates"]["mkl"]["error"] == "the library did not load"


def test_measuring_a_real_library_and_a_missing_one():
    """A child process with the library preloaded measures it; a library that does not load
    is reported as such, never measured as MLX's bundled reference BLAS instead."""
    if not sys.platform.startswith("linux") or not blas._reference_blas_bundled() \
            or blas.find_blas({}) is None:
        pytest.skip("needs Linux, MLX's CPU wheel and a system OpenBLAS")
    base = {k: v for k, v in _clean_env().items() if k not in ("LD_LIBRARY_PATH",)}
    real = blas.candidates({})[0]
    assert blas_choice.measure_in_child(real, base)["gflops"] > 0
    missing = Candidate("missing", "/nonexistent/libopenblas.so.0")
    assert blas_choice.measure_in_child(missing, base) == {"error": "the library did not load"}


def test_users_blas_must_exist(tmp_path):
    assert blas.find_blas({blas.LIB_VAR: str(tmp_path / "missing.so")}) is None


def test_no_reexec_outside_the_cli(monkeypatch, fake_system):
    """A test runner or a library calling main() is never replaced by a new process."""
    monkeypatch.setattr(sys, "argv", ["pytest", "-q"])
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed"))
    blas.preload_fast_blas()


def _doctor(env: dict) -> dict:
    exe = Path(sys.executable).parent / "mlxtune"
    if not exe.is_file():
        pytest.skip("the mlxtune console script is not installed in this environment")
    out = subprocess.run([str(exe), "doctor", "--json"], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout)


def _clean_env() -> dict:
    return {k: v for k, v in blas.without_preload().items()
            if k not in (blas.OFF_VAR, *blas.ALLOCATOR_ENV)}


def test_doctor_reports_openblas_when_installed():
    """`mlxtune doctor` in a fresh process has OpenBLAS loaded for MLX, and it is much faster."""
    if not sys.platform.startswith("linux") or blas.find_blas() is None:
        pytest.skip("no OpenBLAS on this machine")
    if not blas._reference_blas_bundled():
        pytest.skip("not the Linux CPU wheel of MLX")
    fast = _doctor(_clean_env())
    assert any("openblas" in p for p in fast["blas"]), fast["blas"]
    assert fast["fast_blas"]["preloaded"]
    slow = _doctor({**_clean_env(), "MLXTUNE_FAST_BLAS": "0"})
    assert not any("openblas" in p for p in slow["blas"]), slow["blas"]
    # Reference BLAS ~3-4 GFLOP/s, OpenBLAS 50-300 on these machines: a wide margin under load.
    assert fast["cpu_matmul_gflops"] > 3 * slow["cpu_matmul_gflops"]


def test_env_command_prints_exports():
    out = subprocess.run([sys.executable, "-m", "mlxtune.blas", "--env"], env=_clean_env(),
                         capture_output=True, text=True, check=True).stdout
    assert all(line.startswith("export ") for line in out.splitlines())
    if sys.platform.startswith("linux") and blas._reference_blas_bundled() and blas.find_blas():
        # Where a fast BLAS is needed and found, the exports preload it (all() passes on nothing).
        assert f"export LD_PRELOAD='{blas.find_blas()}" in out
        assert "export MALLOC_MMAP_MAX_='0'" in out
