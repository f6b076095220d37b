import json
import subprocess
import sys


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


def test_env_report_text():
    out = subprocess.run([sys.executable, "-m", "polygrad_fast.env_report"], check=True, capture_output=True,
                         text=True).stdout
    for word in ("torch", "triton", "mujoco", "gymnasium", "native_buffer", "backends"):
        assert word in out
