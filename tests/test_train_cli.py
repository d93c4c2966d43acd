"""`prolong-nemo train` as a user calls it: options that do not apply are refused, flag mode
reads packed MDS folders, `--cfg job` shows what would be built without training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from prolong_nemo.cli import main as cli_main
from prolong_nemo.recipes.config import RecipeConfig
from prolong_nemo.recipes.stages import load_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags, named", [
    (["--lr", "1e-3"], "--lr (the recipe's optim.lr)"),
    (["--train-iters", "3", "--save", "/tmp/x"], "--train-iters (the recipe's train.steps), --save (the recipe's "
                                                 "checkpoint.dir)"),
    (["--data", "/data/mds"], "--data (the recipe's data.root / data.mixture)"),
])
def test_recipe_mode_refuses_flag_mode_options(flags, named, capsys):
    assert cli_main(["train", "stage_64k_cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named}: flag-mode options, which a recipe does not read; set the recipe key as "
                          "a Hydra override instead") and err.count("\n") == 1


def test_flag_mode_refuses_recipe_mode_options(capsys):
    assert cli_main(["train", "--backend", "cpu", "--cfg", "job"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --backend, --cfg: recipe-mode options; name a recipe first (prolong-nemo train <recipe> ...)\n"


def test_synthetic_data_is_refused_on_the_bridge_backend():
    from prolong_nemo.recipes.config import RecipeError
    from prolong_nemo.training.bridge.torchrun import run_recipe

    with pytest.raises(RecipeError, match="^--synthetic-data is a CPU-runner option"):
        run_recipe("stage_64k", [], log=print, exit_after=None, synthetic_data=True)


def test_cfg_job_shows_the_recipe_and_the_config_container_it_builds(capsys, tmp_path):
    from prolong_nemo.training.bridge.sections import bridge_sections
    from prolong_nemo.training.start import StartPoint

    overrides = [f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.init=none", "bridge.ddp.bucket_size=100000000"]
    assert cli_main(["train", "stage_64k", "--cfg", "job", *overrides]) == 0
    out = capsys.readouterr().out
    recipe_yaml, container = out.split("# Megatron-Bridge ConfigContainer, flattened (starting from random "
                                       "initialization)")
    recipe = load_recipe("stage_64k", overrides)
    assert RecipeConfig.from_dict(yaml.safe_load(recipe_yaml)) == recipe
    lines = dict(line.split(": ", 1) for line in container.strip().splitlines()[1:])
    expected = bridge_sections(recipe, StartPoint("fresh", load=recipe.checkpoint.dir))
    assert lines["checkpoint.save"] == repr(str(tmp_path / "ckpt")) == repr(expected["checkpoint"]["save"])
    assert lines["optimizer.lr"] == "1e-05" and lines["train.global_batch_size"] == "64"
    assert lines["model.tensor_model_parallel_size"] == "2" and lines["model.rotary_base"] == "8000000.0"
    assert lines["model.activation_func"] == "silu" and lines["dataset.dataloader_type"] == "'single'"
    assert lines["ddp.bucket_size"] == "100000000"  # the bridge.* pass-through, applied last
    assert not (tmp_path / "ckpt").exists()  # nothing ran


def _write_mds(folder: Path, n: int, length: int, vocab: int = 512) -> None:
    from prolong_nemo.data.mds import write_domain

    rng = np.random.default_rng(3)
    samples = []
    for _ in range(n):
        cuts = np.sort(rng.choice(np.arange(1, length), size=3, replace=False))
        bounds = np.concatenate([[0], cuts, [length]])
        samples.append({"input_ids": rng.integers(0, vocab, length).astype(np.uint32),
                        "indices": np.stack([bounds[:-1], bounds[1:]], 1).astype(np.uint32),
                        "length": length, "domain": folder.name})
    write_domain(str(folder), samples)


@pytest.mark.timeout(600)
def test_flag_mode_trains_a_packed_mds_folder_through_the_data_adapter(tmp_path):
    """`--data <MDS folder>` (the help's promise): the same losses as the CPU runner fed the
    data adapter's rows of that folder in this process."""
    from model_fixtures import _free_port

    from prolong_nemo.data.dataset import collate
    from prolong_nemo.training.cpu.runner import TrainConfig, train
    from prolong_nemo.training.data import build_prolong_datasets

    _write_mds(tmp_path / "mds", n=12, length=128)
    metrics = tmp_path / "m.jsonl"
    env = dict(os.environ, MASTER_PORT=str(_free_port()), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "prolong_nemo.cli", "train", "--data", str(tmp_path / "mds"), "--seq-length", "128",
           "--train-iters", "3", "--warmup-iters", "1", "--micro-batches", "2", "--metrics-file", str(metrics)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[prolong] step 3/3 (100.0%) | lm loss " in proc.stdout
    got = {r["step"]: r["loss"] for r in map(json.loads, metrics.read_text().splitlines())}
    cfg = TrainConfig(seq_length=128, train_iters=3, warmup_iters=1, micro_batches=2)
    rows, _, _ = build_prolong_datasets(
        domains=[{"path": str(tmp_path / "mds"), "proportion": 1.0}], seq_length=128, seed=cfg.seed,
        document_masking=True, cp_size=1, tp_size=1, sequence_parallel=False, vocab_size=512, cache_dir=None,
        train_samples=6)
    reference = train(cfg, rows, collate, log=lambda _: None)
    assert sorted(got) == [1, 2, 3]
    for record in reference.history:
        assert abs(got[record.step] - record.loss) <= 1e-6, (record.step, got[record.step], record.loss)


@pytest.mark.timeout(600)
def test_cpu_recipe_path_writes_metrics_where_bridge_writes_tensorboard(tmp_path):
    """logging.tensorboard_dir is not ignored on the CPU backend: one JSON line per step there,
    with the same losses the run returns."""
    from prolong_nemo.training.cpu.config import METRICS_FILE
    from prolong_nemo.training.cpu.main import run_cpu

    recipe = load_recipe("stage_64k_cpu", [f"checkpoint.dir={tmp_path / 'ckpt'}", "train.steps=3",
                                           "optim.warmup_fraction=0.3"])
    assert recipe.logging.tensorboard_dir == str(tmp_path / "ckpt" / "tensorboard")
    state = run_cpu(recipe, log=lambda _: None, synthetic_data=True)
    records = [json.loads(line) for line in (Path(recipe.logging.tensorboard_dir) / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["loss"] for r in records] == [r.loss for r in state.history]


def test_a_start_checkpoint_of_another_architecture_is_refused_naming_what_differs(tmp_path, capsys):
    """Before any loader sees it (a raw CheckpointingException on one rank otherwise): the
    recorded architecture is compared with the recipe's, for every start kind, both backends."""
    from test_convert import make_hf_model

    from prolong_nemo.convert import hf_to_megatron
    from prolong_nemo.recipes.config import RecipeError
    from prolong_nemo.training.run import Run
    from prolong_nemo.training.start import check_start

    hf = make_hf_model(tmp_path / "hf", hidden_size=96, intermediate_size=192, num_hidden_layers=3)
    hf_to_megatron(hf, tmp_path / "mg", show_progress=False)
    weights = ["checkpoint.init=weights", f"checkpoint.init_from={tmp_path / 'mg'}", f"checkpoint.dir={tmp_path / 'c'}"]
    with pytest.raises(RecipeError) as e:
        run = Run.of(load_recipe("stage_64k_cpu", weights))
        check_start(run.recipe, run.start)
    message = str(e.value)
    assert message.startswith(f"stage_64k_cpu: the weights checkpoint {tmp_path / 'mg'} holds another model than "
                              "model.preset=llama3-tiny: num_layers 3 (checkpoint) vs 2 (recipe); hidden_size 96 "
                              "(checkpoint) vs 64 (recipe); ffn_hidden_size 192 (checkpoint) vs 224 (recipe)")
    # the CPU backend's start, through the CLI: one line, nothing trained
    assert cli_main(["train", "stage_64k_cpu", "--synthetic-data", *weights]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n" and not (tmp_path / "c" / "latest_checkpointed_iteration.txt").exists()
    # the same model loads (and rope_theta / context length may differ between stages)
    same = make_hf_model(tmp_path / "hf2", **_tiny_preset_as_hf())
    hf_to_megatron(same, tmp_path / "mg2", rope_theta=8e6, show_progress=False)
    run = Run.of(load_recipe("stage_64k_cpu", ["checkpoint.init=weights", f"checkpoint.init_from={tmp_path / 'mg2'}",
                                               f"checkpoint.dir={tmp_path / 'c2'}"]))
    check_start(run.recipe, run.start)
    assert run.start.kind == "weights"


def _tiny_preset_as_hf() -> dict:
    from prolong_nemo.model.config import preset

    a = preset("llama3-tiny")
    return dict(hidden_size=a.hidden_size, intermediate_size=a.ffn_hidden_size, num_hidden_layers=a.num_layers,
                num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_query_groups,
                vocab_size=a.vocab_size, tie_word_embeddings=a.tie_word_embeddings)
