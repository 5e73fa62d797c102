"""The training loop: exact resume from safetensors checkpoints, DDP equivalence, NaN reporting."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqzoo.bench.train import NonFiniteLoss, TrainConfig, lr_at, train

TINY_TASK = {"vocab_size": 32, "train": [[16, 2, 256]], "test": [[16, 2, 32]]}


def _cfg(**kw) -> TrainConfig:
    base = dict(
        layer="rnn",
        task="mqar",
        task_config=TINY_TASK,
        d_model=16,
        n_layers=1,
        steps=10,
        batch_size=8,
        lr=1e-2,
        warmup_steps=3,
        seed=0,
        log_every=1,
        eval_batch_size=32,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_schedule_warmup_then_cosine():
    cfg = _cfg(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = train(_cfg(), out=tmp_path / "full", cache_dir=tmp_path / "cache")
    part = train(_cfg(), out=tmp_path / "part", stop_after=4, cache_dir=tmp_path / "cache")
    assert part.steps == 4 and part.metrics == {}
    rest = train(_cfg(), out=tmp_path / "part", resume=True, cache_dir=tmp_path / "cache")
    assert rest.resumed_from == 4 and rest.steps == 10
    assert rest.losses == full.losses  # bit-identical: same batches, restored AdamW state and RNG
    assert rest.metrics["accuracy"] == full.metrics["accuracy"]
    logged = [json.loads(line)["step"] for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 11))
    ckpt = tmp_path / "part" / json.loads((tmp_path / "part" / "latest.json").read_text())["checkpoint"]
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng.safetensors",
        "trainer.json",
    ]
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    with pytest.raises(ValueError, match="config differs"):
        train(_cfg(lr=5e-3), out=tmp_path / "part", resume=True, cache_dir=tmp_path / "cache")


def test_training_learns(tmp_path):
    res = train(_cfg(steps=30), cache_dir=tmp_path)
    assert res.losses[-1] < res.losses[0] - 0.3


def test_nan_loss_is_reported(tmp_path):
    import seqzoo

    class NaNLayer(seqzoo.SequenceLayer):
        def __init__(self, d_model: int):
            super().__init__(d_model)
            self.w = torch.nn.Linear(d_model, d_model)

        def init_state(self, batch_size, *, device=None, dtype=None):
            return {"s": torch.zeros(batch_size, 1, device=device, dtype=dtype)}

        def state_size(self, seq_len):
            return 1

        def forward(self, x, state=None):
            state = self.check_input(x, state)
            return self.w(x) * float("nan"), state

        def step(self, x, state):
            return self.w(x) * float("nan"), state

    class Plugin:
        @staticmethod
        @seqzoo.hookimpl
        def register_layers(register):
            register("nan_layer_train_test", NaNLayer)

    seqzoo.register_plugin(Plugin, name="nan-train-test")
    try:
        with pytest.raises(NonFiniteLoss, match="at step 0"):
            train(_cfg(layer="nan_layer_train_test"), cache_dir=tmp_path)
    finally:
        seqzoo.unregister_plugin("nan-train-test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_ddp_two_processes_equal_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo): the losses equal one process on the same global batch."""
    steps = 5
    args = [
        "--layer",
        "rnn",
        "--task",
        "mqar",
        "--task-config",
        "vocab_size=32",
        "train=[[16,2,256]]",
        "test=[[16,2,32]]",
        "--d-model",
        "16",
        "--n-layers",
        "1",
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--warmup",
        "3",
        "--log-every",
        "1",
        "--seed",
        "0",
    ]
    env = {**os.environ, "SEQZOO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        f"--master_port={_free_port()}",
        "-m",
        "seqzoo",
        "train",
        *args,
        "--out",
        str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ddp = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    single = train(_cfg(steps=steps), cache_dir=tmp_path / "cache").losses
    assert len(ddp) == steps
    assert ddp[0] == pytest.approx(single[0], rel=1e-6)  # same model on the same batch before any update
    assert ddp == pytest.approx(single, rel=1e-5)  # the updates match too (gradient all-reduce)
    assert Path(tmp_path / "ddp" / "metrics.json").exists()


def test_sigterm_checkpoints_then_resume_completes(tmp_path):
    import signal
    import time

    args = [
        "--layer",
        "rnn",
        "--task",
        "mqar",
        "--task-config",
        "vocab_size=32",
        "train=[[16,2,256]]",
        "test=[[16,2,32]]",
        "--d-model",
        "16",
        "--n-layers",
        "1",
        "--steps",
        "400",
        "--batch-size",
        "8",
        "--log-every",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "SEQZOO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "seqzoo", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (not log.exists() or log.stat().st_size < 200):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    latest = json.loads((tmp_path / "run" / "latest.json").read_text())
    assert 0 < latest["step"] < 400
    logged = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert logged[-1] == latest["step"]  # the checkpoint is at the last completed step


def test_optimizer_skips_weight_decay_where_a_layer_says_so():
    """Matrices decay, vectors do not, nor Mamba's A_log and D (mamba-ssm's ``_no_weight_decay``)."""
    import seqzoo
    from seqzoo.bench.train import make_optimizer

    model = seqzoo.create_model("mamba", backbone="transformer", mlp=False, vocab_size=16, d_model=16, n_layers=1)
    opt = make_optimizer(model, TrainConfig(layer="mamba", weight_decay=0.1))
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    mixer = model.layers[0].seq_modeling_block
    assert mixer.A_log.ndim == 2 and decay_of[id(mixer.A_log)] == 0.0
    assert decay_of[id(mixer.D)] == 0.0
    assert decay_of[id(mixer.in_proj.weight)] == 0.1
    assert decay_of[id(model.norm.weight)] == 0.0
    assert len(decay_of) == sum(1 for _ in model.parameters())
    import copy

    twin = copy.deepcopy(model)  # deepcopy loses the marks on the tensors; the names still count
    assert not getattr(twin.layers[0].seq_modeling_block.A_log, "_no_weight_decay", False)
    opt = make_optimizer(twin, TrainConfig(layer="mamba", weight_decay=0.1))
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay_of[id(twin.layers[0].seq_modeling_block.A_log)] == 0.0


@pytest.mark.parametrize("layer", ["self_attention", "ttt_linear", "mamba"])
def test_fused_optimizer_gives_the_for_loop_loss_curve(layer):
    """make_optimizer's default on a CPU (fused AdamW) against the for-loop AdamW on the same model and
    batches: after one step the parameters agree to float32 rounding, and over 20 steps the two loss
    curves stay as close as the for-loop's own curve stays to itself from weights moved by one float32
    ulp (training amplifies rounding; the fused update adds no more than rounding does)."""
    from seqzoo.bench.train import build_model, make_optimizer

    cfg = TrainConfig(layer=layer, d_model=32, n_layers=2, batch_size=8, lr=3e-3)
    ids = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))

    def run(implementation, nudge=False):
        model = build_model(cfg, 64)
        if nudge:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
        opt = make_optimizer(model, cfg, implementation=implementation)
        assert opt.defaults.get("fused") is (True if implementation == "auto" else None)
        losses, first = [], None
        for step in range(20):
            logits, _ = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step == 0:
                first = [p.detach().clone() for p in model.parameters()]
        return torch.tensor(losses, dtype=torch.float64), first

    fused, fused_first = run("auto")
    loop, loop_first = run("for-loop")
    nudged, _ = run("for-loop", nudge=True)
    for a, b in zip(fused_first, loop_first):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert fused[-1] < fused[0]  # it trains
    rounding = (nudged - loop).abs().max().item()
    assert (fused - loop).abs().max().item() <= 10 * rounding + 1e-6, ((fused - loop).abs().max(), rounding)


def test_make_optimizer_refuses_an_unknown_implementation():
    from seqzoo.bench.train import build_model, make_optimizer

    cfg = TrainConfig(layer="rnn", d_model=16, n_layers=1)
    with pytest.raises(ValueError, match="expected implementation"):
        make_optimizer(build_model(cfg, 16), cfg, implementation="turbo")
