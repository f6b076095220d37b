import json
import os
import subprocess
import sys

from polygrad_fast import bf16_layout


def test_env_report_json():
    out = subprocess.run([sys.executable, "-m", "polygrad_fast.env_report", "--json"], check=True,
                         capture_output=True, text=True).stdout
    report = json.loads(out)
    assert set(report["packages"]) == {"torch", "numpy", "triton", "mujoco", "gymnasium"}
    assert report["python"] == sys.version.split()[0]
    assert report["backends"]["sampler_cpu"] in ("torch", "reference")
    native = report["native_buffer"]
    assert native["available"] is (report["backends"]["trajectory_buffer"] == "native C++")
    assert "build" in native
    ops = report["native_cpu_ops"]
    assert ops["available"] is (report["backends"]["cpu_kernels_and_noise"] == "native C++")
    if ops["available"]:
        assert ops["layer_norm_act_isa"] and isinstance(ops["openmp"], bool)
        assert ops["bf16_kernels"] == bf16_layout.isa()
    else:
        assert ops["error"]


def test_env_report_says_why_native_is_off():
    env = {**os.environ, "POLYGRAD_FAST_NO_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-m", "polygrad_fast.env_report", "--json"], check=True,
                         capture_output=True, text=True, env=env).stdout
    report = json.loads(out)
    assert report["native_cpu_ops"] == {"available": False, "error": "disabled by POLYGRAD_FAST_NO_NATIVE"}
    assert report["backends"]["cpu_kernels_and_noise"] == "torch"


def test_env_report_text():
    out = subprocess.run([sys.executable, "-m", "polygrad_fast.env_report"], check=True, capture_output=True,
                         text=True).stdout
    for word in ("torch", "triton", "mujoco", "gymnasium", "native_buffer", "backends"):
        assert word in out
