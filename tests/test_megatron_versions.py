"""The core of the suite again under the megatron-core versions of the NGC NeMo containers.

26.04 ships megatron-core 0.17, 26.06 ships 0.18; CI installs both beside the venv
(scripts/setup.sh: .venv/extras/mcore017, mcore018, --no-deps) and this test runs the data
adapter, model parity, loss, converter and CPU-runner tests with each one first on sys.path.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE_TESTS = ["tests/test_data_dataset.py", "tests/test_data_validation.py", "tests/test_model_parity.py",
              "tests/test_loss.py", "tests/test_convert_megatron.py", "tests/test_training_cpu.py"]


@pytest.mark.parametrize("version, folder", [("0.17", "mcore017"), ("0.18", "mcore018")])
def test_core_suite_on_ngc_megatron_core(version, folder):
    site = REPO / ".venv" / "extras" / folder
    if not site.is_dir():
        pytest.skip(f"megatron-core {version} not installed in {site} (scripts/setup.sh installs it)")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    probe = subprocess.run([sys.executable, "-c", "import megatron.core as m; print(m.__version__)"],
                           env=env, capture_output=True, text=True, cwd=REPO)
    assert probe.stdout.strip().startswith(version), probe.stdout + probe.stderr
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
                           *CORE_TESTS], env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
