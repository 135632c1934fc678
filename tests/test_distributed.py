"""Distributed training through the real launcher: torchrun, 2 gloo processes, FSDP2 and DCP on CPU.

Every run is ``configs/tiny-cpu.toml`` on the built-in data (prepared once into a temporary cache), with
a smaller model so that the suite stays fast on two cores.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chameleon_lm import load_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-cpu.toml"
SMALL = ["model_overrides.dim=64", "model_overrides.n_layers=2", "model_overrides.n_heads=2",
         "model_overrides.n_kv_heads=2", "model_overrides.ffn_dim=160", "seq_len=128", "batch_size=4",
         "micro_batch_size=1", "val_every=0", "warmup_steps=4", "log_every=4", "keep_checkpoints=0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    environ = {**os.environ, "CHAMELEON_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    # Prepared once, here, so that no timed run below includes it.
    subprocess.run([sys.executable, "-c", "from chameleon_lm.training.builtin import prepare_shapes; "
                    "prepare_shapes()"], env=environ, check=True, capture_output=True)
    return environ


def command(nproc: int, out: Path, *overrides: str, resume: bool = False) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    return [*launcher, "-m", "chameleon_lm", "train", str(CONFIG), f"out_dir={out}", *SMALL, *overrides,
            "--no-progress", *(["--resume"] if resume else [])]


def train(env, nproc: int, out: Path, *overrides: str, resume: bool = False) -> list[dict]:
    done = subprocess.run(command(nproc, out, *overrides, resume=resume), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return records(out)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """An uninterrupted 2-process run of 12 steps, checkpointed every 4 and exported (consolidated)."""
    out = tmp_path_factory.mktemp("ref")
    train(env, 2, out, "steps=12", "ckpt_every=4", f"export_dir={out / 'model'}")
    return out


def test_two_processes_match_one_and_log_every_step(env, reference, tmp_path):
    ref = records(reference)
    assert [r["step"] for r in ref] == list(range(1, 13))
    assert all(isinstance(r["loss"], float) for r in ref)
    assert ref[-1]["loss"] < ref[0]["loss"]
    one = train(env, 1, tmp_path, "steps=12", "ckpt_every=4")
    got, want = torch.tensor([r["loss"] for r in one[:5]]), torch.tensor([r["loss"] for r in ref[:5]])
    assert (got - want).abs().max() < 1e-5, (got, want)
    assert [r["tokens"] for r in one] == [r["tokens"] for r in ref]  # the same global batches
    assert {"ce_text", "ce_image", "z_loss", "logit_norm", "grad_norm", "mfu", "block_norm/0",
            "tokens_per_s_per_device"} <= set(ref[3])


def test_sigkill_and_resume_reproduces_the_run_bit_for_bit(env, reference, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(2, out, "steps=12", "ckpt_every=4"), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / "checkpoints" / "step_0000004" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    assert marker.exists()
    assert not (out / "checkpoints" / "step_0000012").exists(), "the run ended before it was killed"
    resumed = train(env, 2, out, "steps=12", "ckpt_every=4", resume=True)
    ref = records(reference)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in ref]  # exact, not close
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in ref]


def test_resume_at_another_world_size_and_consolidated_exports(env, reference, tmp_path):
    out = tmp_path / "one"
    shutil.copytree(reference / "checkpoints" / "step_0000008", out / "checkpoints" / "step_0000008")
    shutil.copy(reference / "metrics.jsonl", out / "metrics.jsonl")
    resumed = train(env, 1, out, "steps=12", "ckpt_every=4", resume=True)
    ref = records(reference)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    got, want = torch.tensor([r["loss"] for r in resumed[8:]]), torch.tensor([r["loss"] for r in ref[8:]])
    assert (got - want).abs().max() < 1e-5, (got, want)
    # The sharded checkpoint, read by one process, is the consolidated export.
    ids = torch.randint(0, 200, (2, 17))
    final = load_model(reference / "checkpoints" / "step_0000012").model
    exported = load_model(reference / "model").model
    assert (reference / "model" / "model.safetensors").is_file()
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in final.state_dict().items())
    torch.testing.assert_close(exported(ids), final(ids), rtol=0, atol=0)


def test_image_head_only_with_activation_checkpointing_under_fsdp2(env, reference, tmp_path):
    """Anole-style fine-tuning from a plain model folder, sharded, with AC: only the image rows move."""
    init = reference / "model"
    out = tmp_path / "head"
    train(env, 2, out, "steps=3", "ckpt_every=0", f"init_from={init}", "adapter.mode=image-head",
          "activation_checkpointing=true", 'tokenizers=""', f"export_dir={out / 'model'}")
    before, after = load_model(init), load_model(out / "model")
    vocab = before.text_tokenizer.vocab
    rows = torch.zeros(before.config.vocab_size, dtype=torch.bool)
    rows[vocab.image_start : vocab.image_end] = True
    rows[vocab.eoi_id] = True
    for k, v in before.model.state_dict().items():
        if k == "output.weight":
            assert torch.equal(after.model.state_dict()[k][~rows], v[~rows])
            assert not torch.equal(after.model.state_dict()[k][rows], v[rows])
        else:
            assert torch.equal(after.model.state_dict()[k], v), k
