"""The plugin's data and recipe modules import with transformers 5, as in NGC NeMo containers.

Our CPU environment pins transformers 4 (mosaicml-streaming declares `transformers<5`), while
Megatron-Bridge 0.6 needs 5.8 - 5.12. transformers 5.12.1 and huggingface-hub 1.x go into a side
folder without dependency resolution (about 12 MB) and a subprocess imports our modules with that
folder first on the path: the real import graph (mosaicml-streaming imports transformers too)
under transformers 5, without a second virtual environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("PROLONG_TF5_SITE", REPO / ".venv" / "extras" / "transformers5"))
PACKAGES = ["transformers==5.12.1", "huggingface-hub==1.5.0", "typer", "click", "shellingham", "annotated-doc"]

CHECK = textwrap.dedent("""
    import transformers
    assert transformers.__file__.startswith(SITE), transformers.__file__
    from transformers import LlamaConfig
    import streaming
    from streaming import MDSWriter
    import prolong_nemo.data.dataset, prolong_nemo.data.mds, prolong_nemo.data.mixture, prolong_nemo.data.packing
    import prolong_nemo.recipes.launch, prolong_nemo.training.start, prolong_nemo.training.train
    import prolong_nemo.recipes.plan, prolong_nemo.recipes.stages
    import prolong_nemo.training.forward_step
    from prolong_nemo.recipes.stages import load_recipe
    from prolong_nemo.recipes.plan import make_plan
    assert make_plan(load_recipe("stage_512k"), env={"megatron-core": "0.19.2"}).ok
    print("transformers", transformers.__version__)
""")


def ensure_site() -> None:
    if (SITE / "transformers" / "__init__.py").is_file():
        return
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SITE), *PACKAGES],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"could not install transformers 5 into {SITE}: {proc.stderr[-500:]}")


def test_data_and_recipe_modules_import_with_transformers_5():
    ensure_site()
    env = dict(os.environ, PYTHONPATH=str(SITE))
    proc = subprocess.run([sys.executable, "-c", f"SITE = {str(SITE)!r}\n" + CHECK], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "transformers 5.12.1"
