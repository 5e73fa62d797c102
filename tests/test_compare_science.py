"""How ``seqzoo compare`` spends its budget and what it concludes: the learning-rate sweep with early
stopping, the seeds, the noise verdicts, the computed claims, the ablation ladder."""

from __future__ import annotations

import json
import math

import pytest
import torch

import seqzoo
from seqzoo.bench import claims as cl
from seqzoo.bench.compare import Series, compare, run_key, spread
from seqzoo.bench.presets import LADDER_PAPER_PERPLEXITY, preset, widths
from seqzoo.bench.tasks import make_task
from seqzoo.bench.train import TrainConfig, train
from seqzoo.cli import main

MQAR = {"lrs": [3e-3, 1e-3, 3e-4], "stop_at": 0.99, "eval_every": 10, "seeds": 3,
        "seeds_when": "unsolved_at_largest"}


def _series(tcfg: dict, largest: bool = True) -> Series:
    cell = {"layer": "rnn", "backbone": "mamba", "tasks": {}}
    return Series(cell, "mqar", 32, tcfg, [0, 1, 2], largest, score_key="accuracy", score_sign=1.0)


def _ok(s: Series, lr: float, seed: int, acc: float) -> None:
    s.entry()["runs"][run_key(lr, seed)] = {"status": "ok", "lr": lr, "seed": seed, "metrics": {"accuracy": acc}}


def test_sweep_runs_rates_in_order_and_a_solved_rate_ends_it():
    s = _series(MQAR)
    assert s.wanted() == [(3e-3, 0)]
    _ok(s, 3e-3, 0, 0.995)
    assert s.wanted() == []  # solved at the first rate: no other rate, no further seed
    s.summarise()
    assert s.entry()["best"]["lr"] == 3e-3 and s.entry()["best"]["seeds"] == [0]


def test_unsolved_sweep_tries_every_rate_then_seeds_at_the_best():
    s = _series(MQAR)
    _ok(s, 3e-3, 0, 0.40)
    assert s.wanted() == [(1e-3, 0)]
    _ok(s, 1e-3, 0, 0.70)
    assert s.wanted() == [(3e-4, 0)]
    _ok(s, 3e-4, 0, 0.50)
    assert s.wanted() == [(1e-3, 1), (1e-3, 2)]  # the further seeds side by side, at the winning rate
    _ok(s, 1e-3, 1, 0.60)
    assert s.wanted() == [(1e-3, 2)]
    _ok(s, 1e-3, 2, 0.80)
    assert s.wanted() == []
    s.summarise()
    best = s.entry()["best"]
    assert best["lr"] == 1e-3 and best["seeds"] == [0, 1, 2] and best["n"] == 3
    acc = best["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.7) and (acc["min"], acc["max"]) == (0.6, 0.8)
    assert acc["std"] == pytest.approx(math.sqrt(((0.1) ** 2 + 0 + 0.1**2) / 3))


def test_unsolved_below_the_largest_width_runs_one_seed():
    s = _series(MQAR, largest=False)
    for lr, acc in zip(MQAR["lrs"], (0.1, 0.2, 0.3)):
        _ok(s, lr, 0, acc)
    assert s.wanted() == []


def test_seeds_always_and_failed_runs():
    s = _series({**MQAR, "seeds_when": "always", "lrs": [3e-3, 1e-3]})
    s.entry()["runs"][run_key(3e-3, 0)] = {"status": "failed", "lr": 3e-3, "seed": 0, "error": "x"}
    assert s.wanted() == [(1e-3, 0)]  # a failed rate is recorded and the sweep goes on
    _ok(s, 1e-3, 0, 0.999)
    assert s.wanted() == [(1e-3, 1), (1e-3, 2)]  # "always": further seeds even when solved
    bad = _series({**MQAR, "seeds_when": "sometimes"})
    for lr in MQAR["lrs"]:
        _ok(bad, lr, 0, 0.1)
    with pytest.raises(ValueError, match="seeds_when"):
        bad.wanted()


def test_lower_is_better_metric_picks_the_lowest():
    cell = {"layer": "rnn", "backbone": "mamba", "tasks": {}}
    s = Series(cell, "lm", 32, {"lrs": [1e-2, 3e-3], "seeds": 1}, [0], True, score_key="loss", score_sign=-1.0)
    for lr, loss in ((1e-2, 2.0), (3e-3, 1.5)):
        s.entry()["runs"][run_key(lr, 0)] = {"status": "ok", "lr": lr, "seed": 0, "metrics": {"loss": loss}}
    assert s.best_lr() == 3e-3


def test_early_stopping_stops_at_the_first_evaluation_that_reaches_the_threshold():
    task = make_task("mqar", vocab_size=64, train=[[32, 2, 512]], test=[[32, 2, 64]])
    base = dict(layer="self_attention", backbone="mamba", d_model=32, n_layers=1, steps=60, batch_size=16,
                lr=3e-3, warmup_steps=2, eval_every=20, eval_batch_size=64)
    free = train(TrainConfig(**base), task=task)
    assert [s for s, _ in free.evals] == [20, 40, 60] and free.stopped_at is None and free.steps == 60
    # a threshold an evaluation reaches: the run ends at the first that does, reporting that evaluation
    thr = max(a for _, a in free.evals[:2])
    at = next(s for s, a in free.evals if a >= thr)
    stopped = train(TrainConfig(**base, stop_at=thr), task=task)
    assert stopped.stopped_at == at and stopped.steps == at and len(stopped.losses) == at
    assert stopped.metrics["accuracy"] == pytest.approx(thr)
    assert stopped.losses == free.losses[:at]
    never = train(TrainConfig(**base, stop_at=1.01), task=task)
    assert never.stopped_at is None and never.losses == free.losses and never.evals == free.evals
    with pytest.raises(ValueError, match="eval_every > 0"):
        train(TrainConfig(**{**base, "eval_every": 0}, stop_at=0.5), task=task)


def test_data_orders_differ_and_order_0_is_the_task_order():
    task = make_task("mqar", vocab_size=64, train=[[32, 2, 64]], test=[[32, 2, 16]])
    x0, _ = task.train_batch(3, 8)
    assert torch.equal(task.train_batch(3, 8, order=0)[0], x0)
    x1, _ = task.train_batch(3, 8, order=1)
    assert not torch.equal(x1, x0)
    assert torch.equal(task.train_batch(3, 8, order=1)[0], x1)
    # every order is a permutation of the same training set
    for order in (0, 1):
        seen = torch.cat([task.train_batch(s, 8, order=order)[0] for s in range(8)])
        assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, task.train_inputs.tolist()))
    lm = make_task("lm", seq_len=16, max_train_bytes=20_000, num_eval=4)
    assert not torch.equal(lm.train_batch(0, 4, order=2)[0], lm.train_batch(0, 4)[0])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="data order"):
            task.train_batch(0, 4, order=bad)


def test_lm_context_gain_is_early_minus_second_half():
    lm = make_task("lm", seq_len=64, max_train_bytes=50_000, num_eval=4)

    class Fixed(torch.nn.Module):  # loss rises linearly with position: a known per-position curve
        def forward(self, ids):
            B, T = ids.shape
            logits = torch.zeros(B, T, 256)
            logits[..., :] = -torch.arange(T, dtype=torch.float32)[None, :, None] * 0.0
            scale = torch.linspace(0.0, 1.0, T)[None, :, None]
            return logits + scale * torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(0)), None

    m = lm.evaluate(Fixed(), batch_size=4)
    pos = m["loss_by_position"]
    assert m["loss_early"] == pytest.approx(sum(pos[16:32]) / 16)
    assert m["loss_late"] == pytest.approx(sum(pos[32:]) / 32)
    assert m["context_gain"] == pytest.approx(m["loss_early"] - m["loss_late"])


def test_spread_and_noise_verdicts():
    a, b = spread([0.5, 0.7]), spread([0.65, 0.9])
    assert a == {"mean": pytest.approx(0.6), "min": 0.5, "max": 0.7, "std": pytest.approx(0.1), "n": 2}
    assert cl.difference(a, b) == "within noise"
    c = spread([0.95, 0.97])
    assert cl.difference(c, a) == "better" and cl.difference(a, c) == "worse"
    assert cl.difference(a, c, sign=-1.0) == "better"  # lower is better
    solved = spread([0.995]), spread([0.991, 1.0])
    assert cl.difference(*solved, solved_at=0.99) == "both solved"
    assert cl.difference(*solved) == "within noise"


def _results(cells: dict, *, tasks=("mqar", "lm"), backbones=("transformer", "mamba")) -> dict:
    cfg = preset("default")
    return {"run_config": {"preset_config": cfg, "tasks": list(tasks), "backbones": list(backbones),
                           "layers": sorted({k.split("/")[0] for k in cells})},
            "cells": cells}


def _mqar(accs_by_width: dict[int, list[float]], state: dict[int, int] | None = None) -> dict:
    out = {}
    for w, accs in accs_by_width.items():
        runs = {run_key(1e-3, s): {"status": "ok", "lr": 1e-3, "seed": s, "state_size": (state or {}).get(w, w),
                                   "metrics": {"accuracy": a}} for s, a in enumerate(accs)}
        out[f"d{w}"] = {"runs": runs, "best": {"lr": 1e-3, "seeds": list(range(len(accs))), "n": len(accs),
                                               "metrics": {"accuracy": spread(accs)}}}
    return out


def _lm(curves: list[list[float]]) -> dict:
    runs, bpb = {}, []
    for s, pos in enumerate(curves):
        T = len(pos)
        early, late = sum(pos[16:32]) / 16, sum(pos[T // 2 :]) / (T - T // 2)
        loss = sum(pos) / T
        bpb.append(loss / math.log(2))
        runs[run_key(3e-3, s)] = {"status": "ok", "lr": 3e-3, "seed": s, "metrics": {
            "loss": loss, "bits_per_byte": loss / math.log(2), "loss_by_position": pos,
            "loss_early": early, "loss_late": late, "context_gain": early - late}}
    return {"d64": {"runs": runs, "best": {"lr": 3e-3, "seeds": list(range(len(curves))), "n": len(curves),
                                           "metrics": {"bits_per_byte": spread(bpb)}}}}


def _cell(layer, backbone, **tasks):
    return {f"{layer}/{backbone}": {"layer": layer, "backbone": backbone, "tasks": tasks}}


def test_claims_reproduced_on_results_that_show_them():
    falling = [[3.0 - 1.5 * min(t, 400) / 400 + 0.01 * s for t in range(512)] for s in range(2)]
    plateau = [[3.0 - 1.0 * min(t, 40) / 40 + 0.01 * s for t in range(512)] for s in range(2)]
    cells = {}
    for b in ("transformer", "mamba"):
        cells |= _cell("self_attention", b, mqar=_mqar({16: [1.0], 32: [1.0], 64: [0.995]}), lm=_lm(falling))
        cells |= _cell("ttt_nw", b, mqar=_mqar({16: [1.0], 32: [0.999], 64: [1.0]}), lm=_lm(falling))
        cells |= _cell("ttt_linear", b, mqar=_mqar({16: [0.3], 32: [0.6], 64: [0.8, 0.9]}), lm=_lm(falling))
        cells |= _cell("rnn", b, mqar=_mqar({16: [0.1], 32: [0.1], 64: [0.11, 0.12]}), lm=_lm(plateau))
    got = {c["claim"]: c for c in cl.evaluate_claims(_results(cells))}
    assert [c["verdict"] for c in got.values()] == ["reproduced"] * 5, json.dumps(got, indent=1)
    grows = next(c for k, c in got.items() if "grows" in k)
    assert any("ttt_linear/mamba: grows" in e for e in grows["evidence"])
    assert any("rnn/mamba: flat" in e for e in grows["evidence"])


def test_claims_not_reproduced_when_the_numbers_say_otherwise():
    flat = [[2.0 + 0.01 * s for _ in range(512)] for s in range(2)]
    cells = {}
    for b in ("transformer", "mamba"):
        cells |= _cell("self_attention", b, mqar=_mqar({16: [0.3], 32: [0.3], 64: [0.27, 0.3]}), lm=_lm(flat))
        cells |= _cell("ttt_nw", b, mqar=_mqar({16: [0.9], 32: [0.9], 64: [0.95, 0.97]}), lm=_lm(flat))
        cells |= _cell("ttt_linear", b, mqar=_mqar({16: [0.9], 32: [0.6], 64: [0.5, 0.55]}), lm=_lm(flat))
        cells |= _cell("rnn", b, mqar=_mqar({16: [0.1], 32: [0.1], 64: [0.1, 0.1]}), lm=_lm(flat))
    verdicts = [c["verdict"] for c in cl.evaluate_claims(_results(cells))]
    assert verdicts == ["not reproduced"] * 5


def test_claims_not_tested_without_their_layers():
    cells = _cell("rnn", "mamba", mqar=_mqar({16: [0.1]}))
    verdicts = {c["claim"].split(" (")[0]: c["verdict"] for c in cl.evaluate_claims(_results(cells, tasks=("mqar",)))}
    assert set(verdicts.values()) == {"not tested"}


def test_state_grows_reads_the_layers():
    assert cl.state_grows("self_attention") is True and cl.state_grows("ttt_nw") is True
    for name in ("rnn", "linear_attention", "mamba", "ttt_linear", "ttt_mlp"):
        assert cl.state_grows(name) is False, name


def test_default_preset_budget_as_the_comparison_needs_it():
    p = preset("default")
    mq, lm = p["tasks"]["mqar"], p["tasks"]["lm"]
    assert len(widths(mq, "mamba")) >= 3 and len(mq["lrs"]) >= 2 and mq["stop_at"] == 0.99
    assert mq["seeds"] >= 2 and mq["seeds_when"] == "unsolved_at_largest"
    train_kv = max(s[1] for s in mq["task_config"]["train"])
    assert train_kv > 4 and max(s[0] for s in mq["task_config"]["test"]) > 32  # harder than 4 pairs in 32
    assert lm["task_config"]["seq_len"] >= 512 and lm["seeds"] >= 2 and lm["seeds_when"] == "always"
    with pytest.raises(ValueError, match="d_models for backbone"):
        widths({"d_models": {"mamba": [16]}}, "transformer")
    with pytest.raises(ValueError, match="positive widths"):
        widths({"d_models": [0]}, "mamba")


def test_ladder_rows_change_one_switch_each():
    rows = preset("ladder")["variants"]
    assert len(rows) == len(LADDER_PAPER_PERPLEXITY) == 7
    assert rows[0]["layer"] == "linear_attention" and all(r["layer"] == "ttt_linear" for r in rows[1:])
    changes = []
    for a, b in zip(rows[1:], rows[2:]):
        diff = {k for k in set(a["layer_config"]) | set(b["layer_config"])
                if a["layer_config"].get(k) != b["layer_config"].get(k)}
        changes.append((sorted(diff), a["backbone"] != b["backbone"]))
    assert changes == [(["learnable_w0"], False), (["inner_norm"], False), (["mini_batch_size"], False),
                       (["learnable_lr"], False), ([], True)]
    # row 2 is Theorem 1's form of TTT-Linear: η = ttt_base_lr / head width = 1, batch GD over the window
    t1 = rows[1]["layer_config"]
    assert t1["ttt_base_lr"] == 64 / 4 and t1["mini_batch_size"] >= preset("ladder")["tasks"]["lm"]["task_config"][
        "seq_len"]


def test_ladder_rows_one_and_two_compute_the_same_function():
    """The ladder's first two rows are Theorem 1's pair: with the same weights, the same outputs."""
    rows = preset("ladder")["variants"]
    torch.manual_seed(0)
    lin = seqzoo.create_layer("linear_attention", 64, **rows[0]["layer_config"]).double()
    ttt = seqzoo.create_layer("ttt_linear", 64, **{**rows[1]["layer_config"], "mini_batch_size": 64}).double()
    own = ttt.state_dict()
    ttt.load_state_dict({k: v for k, v in lin.state_dict().items() if k in own}, strict=False)
    x = torch.randn(2, 40, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ttt(x)[0], lin(x)[0], rtol=1e-9, atol=1e-9)


def test_ladder_preset_end_to_end(tmp_path, caplog):
    tiny = {"tasks": {"lm": {"steps": 2, "d_models": [32], "n_layers": 1, "batch_size": 2,
                             "task_config": {"seq_len": 64, "max_train_bytes": 30_000, "num_eval": 2},
                             "eval_batch_size": 2}}}
    res = compare(preset_name="ladder", out=tmp_path, overrides=tiny)
    names = [v["name"] for v in preset("ladder")["variants"]]
    assert list(res["cells"]) == names
    for c in res["cells"].values():
        assert c["status"] == "ok", c.get("errors")
        assert c["tasks"]["lm"]["d32"]["best"]["seeds"] == [0, 1]
    (claim,) = res["claims"]
    assert "ablation ladder" in claim["claim"] and claim["verdict"] in ("reproduced", "not reproduced")
    rows = cl.ladder_steps(res)
    assert [r["paper_perplexity"] for r in rows] == LADDER_PAPER_PERPLEXITY
    assert all(r["change"] in ("improved", "worse", "within noise") for r in rows[1:])
    import logging

    from seqzoo.bench.report import write_plots, write_report

    with caplog.at_level(logging.WARNING):
        plots = write_plots(res, tmp_path)
    assert "failed" not in caplog.text and set(plots.values()) == {"lm_loss_by_position.png"}  # no speed sweep, no MQAR
    text = write_report(res, tmp_path, plots).read_text()
    assert "## The ablation ladder" in text and "15.23" in text and "## What this run reproduces" in text
    with pytest.raises(ValueError, match="lists its own rows"):
        compare(preset_name="ladder", layers=["rnn"], out=tmp_path / "x", overrides=tiny)


def test_plain_progress_lines_off_a_terminal(tmp_path, capsys):
    rc = main(["compare", "--preset", "quick", "--layers", "rnn", "--backbones", "mamba", "--tasks", "mqar",
               "--no-speed", "--out", str(tmp_path), "--override", json.dumps({"tasks": {"mqar": {"steps": 2}}})])
    assert rc == 0
    text = capsys.readouterr().out
    assert "[1 done, " in text and "rnn/mamba mqar d32 lr 0.003 seed 0: accuracy" in text
    assert "What this run reproduces" in text and "wall time" in text
    report = (tmp_path / "report.md").read_text()
    assert "## What this run reproduces" in report and "not tested" in report


def test_a_task_without_data_orders_refuses_a_further_seed_clearly():
    base = make_task("mqar", vocab_size=64, train=[[32, 2, 64]], test=[[32, 2, 16]])

    class OldTask:  # a task written before data orders: train_batch(step, batch_size) only
        name, vocab_size, seq_len, score_key, score_sign = "old", base.vocab_size, base.seq_len, "accuracy", 1.0

        def train_batch(self, step, batch_size):
            return base.train_batch(step, batch_size)

        def evaluate(self, model, *, batch_size=64, device="cpu"):
            return base.evaluate(model, batch_size=batch_size, device=device)

    cfg = dict(layer="rnn", d_model=16, n_layers=1, steps=2, batch_size=4, warmup_steps=0)
    assert train(TrainConfig(**cfg), task=OldTask()).steps == 2  # its own order: works as before
    with pytest.raises(TypeError, match="order=k"):
        train(TrainConfig(**cfg, data_order=1), task=OldTask())


def test_ladder_verdicts_follow_the_paper_directions():
    cfg = preset("ladder")
    names = [v["name"] for v in cfg["variants"]]
    # bits/byte per row (two seeds each): equal, equal, better, better, better, better — the paper's path
    values = [[3.0, 3.02], [3.01, 3.03], [3.0, 3.04], [2.8, 2.82], [2.6, 2.62], [2.5, 2.52], [2.3, 2.32]]
    cells = {}
    for name, v in zip(names, values):
        runs = {run_key(3e-3, s): {"status": "ok", "lr": 3e-3, "seed": s, "metrics": {"bits_per_byte": x}}
                for s, x in enumerate(v)}
        cells[name] = {"layer": "ttt_linear", "backbone": "transformer", "variant": name, "tasks": {"lm": {"d64": {
            "runs": runs, "best": {"lr": 3e-3, "seeds": [0, 1], "n": 2, "metrics": {"bits_per_byte": spread(v)}}}}}}
    res = {"run_config": {"preset_config": cfg, "tasks": ["lm"], "backbones": ["transformer", "mamba"]},
           "cells": cells}
    rows = cl.ladder_steps(res)
    assert [r.get("change") for r in rows] == [None, "within noise", "within noise", "improved", "improved",
                                                "improved", "improved"]
    # the paper: 15.23 -> 15.23 -> 15.27 (< 1 %: within noise), then 14.05, 12.35, 11.99, 11.09 (improved)
    assert [r.get("paper_change") for r in rows] == [None, "within noise", "within noise", "improved",
                                                      "improved", "improved", "improved"]
    (claim,) = cl.evaluate_claims(res)
    assert claim["verdict"] == "reproduced" and claim["evidence"][-1] == "6 of 6 steps move as in the paper"
    cells[names[4]]["tasks"]["lm"]["d64"]["best"]["metrics"]["bits_per_byte"] = spread([2.9, 2.95])
    assert cl.evaluate_claims(res)[0]["verdict"] == "not reproduced"


def test_report_only_renders_an_interrupted_run_again(tmp_path, capsys):
    compare(layers=["rnn"], backbones=["mamba"], tasks=["mqar"], preset_name="quick", out=tmp_path, speed=False,
            overrides={"tasks": {"mqar": {"steps": 2}}})
    path = tmp_path / "results.json"
    res = json.loads(path.read_text())
    entry = res["cells"]["rnn/mamba"]["tasks"]["mqar"]["d32"]
    del res["finished"], res["claims"], entry["best"]  # as an interrupted run leaves it
    path.write_text(json.dumps(res))
    assert main(["compare", "--out", str(tmp_path), "--report-only"]) == 0
    again = json.loads(path.read_text())
    got = again["cells"]["rnn/mamba"]["tasks"]["mqar"]["d32"]["best"]
    assert got["lr"] == 3e-3 and got["seeds"] == [0] and again["claims"]
    text = capsys.readouterr().out
    assert "unfinished run" in text and "--resume" in text and (tmp_path / "report.md").exists()
    assert main(["compare", "--out", str(tmp_path / "none"), "--report-only"]) == 2


def test_runs_go_breadth_first_across_cells(tmp_path, monkeypatch):
    """Every cell's first run comes before any cell's second, so an interrupted comparison covers the grid."""
    import seqzoo.bench.runs as cmp  # where a run trains

    order = []
    real = cmp.train

    def recording(cfg, **kw):
        order.append((cfg.layer, cfg.backbone, cfg.lr, cfg.seed))
        return real(cfg, **kw)

    monkeypatch.setattr(cmp, "train", recording)
    over = {"tasks": {"mqar": {"steps": 2, "lrs": [3e-3, 1e-2], "seeds": 2, "eval_every": 1, "stop_at": 1.01}}}
    res = compare(layers=["rnn", "self_attention"], tasks=["mqar"], preset_name="quick", out=tmp_path, speed=False,
                  overrides=over)
    assert len(order) == 4 * 3  # four cells, each: two rates (none solves), then a second seed
    assert {o[2] for o in order[:4]} == {3e-3} and {o[2] for o in order[4:8]} == {1e-2}
    assert all(o[3] == 1 for o in order[8:])
    for cell in res["cells"].values():
        assert cell["tasks"]["mqar"]["d32"]["best"]["n"] == 2


def test_rnn_plateau_is_judged_against_attention():
    # every curve shares the data's own fall with position; attention's keeps falling where the RNN's stops
    data = [0.3 * t / 512 for t in range(512)]
    att = [[3.0 - d - 1.0 * t / 512 + 0.01 * s for t, d in enumerate(data)] for s in range(2)]
    rnn = [[3.0 - d - 1.0 * min(t, 64) / 512 + 0.01 * s for t, d in enumerate(data)] for s in range(2)]
    cells = _cell("rnn", "mamba", lm=_lm(rnn)) | _cell("self_attention", "mamba", lm=_lm(att))

    def verdict(cells):
        (c,) = [c for c in cl.evaluate_claims(_results(cells, tasks=("lm",))) if "naive RNN" in c["claim"]]
        return c

    c = verdict(cells)
    assert c["verdict"] == "reproduced" and "plateaus first" in c["evidence"][0]
    same = _cell("rnn", "mamba", lm=_lm(att)) | _cell("self_attention", "mamba", lm=_lm(att))
    c = verdict(same)
    assert c["verdict"] == "not reproduced" and "no difference beyond noise" in c["evidence"][0]
    alone = _cell("rnn", "mamba", lm=_lm(rnn))
    assert verdict(alone)["verdict"] == "not tested"
    one_seed = _cell("rnn", "mamba", lm=_lm(rnn[:1])) | _cell("self_attention", "mamba", lm=_lm(att))
    assert verdict(one_seed)["verdict"] == "not tested"


def test_a_resumed_part_of_the_grid_is_not_called_finished(tmp_path):
    over = {"tasks": {"mqar": {"steps": 2}}}
    kw = dict(tasks=["mqar"], backbones=["mamba"], preset_name="quick", out=tmp_path, speed=False, overrides=over)
    with pytest.raises(KeyboardInterrupt):  # a comparison of two layers, stopped before the second
        import seqzoo.bench.runs as cmp  # where a run trains

        real, calls = cmp.train, []

        def once(*a, **k):
            calls.append(1)
            if len(calls) > 1:
                raise KeyboardInterrupt
            return real(*a, **k)

        cmp.train = once
        try:
            compare(layers=["rnn", "self_attention"], **kw)
        finally:
            cmp.train = real
    part = compare(layers=["rnn"], resume=True, **kw)  # the first layer only: the grid is not complete
    assert "finished" not in part
    assert rerender_ok(tmp_path) is False
    whole = compare(layers=["self_attention"], resume=True, **kw)
    assert "finished" in whole and rerender_ok(tmp_path) is True


def rerender_ok(out) -> bool:
    from seqzoo.bench.compare import rerender

    return "finished" in rerender(out)


def test_claims_are_the_presets_data(tmp_path):
    """A comparison checks the claims its preset lists (the evaluation names no layer): a claim about any
    pair of layers works, an unknown kind is "not tested" with the reason; a resumed comparison may change
    the claims (they change no run) and takes the new ones."""
    claims = [
        {"kind": "equal", "layers": ["rnn", "self_attention"], "text": "rnn equals self_attention"},
        {"kind": "solves", "layer": "rnn", "task": "mqar", "text": "rnn solves mqar"},
        {"kind": "telepathy", "text": "layers read minds"},
    ]
    over = {"tasks": {"mqar": {"steps": 2}}, "claims": claims}
    kw = dict(layers=["rnn", "self_attention"], backbones=["transformer"], tasks=["mqar"], preset_name="quick",
              out=tmp_path, speed=False)
    res = compare(overrides=over, **kw)
    verdicts = {c["claim"]: c for c in res["claims"]}
    assert set(verdicts) == {c["text"] for c in claims}
    assert verdicts["rnn equals self_attention"]["verdict"] in ("reproduced", "not reproduced")
    assert "rnn/transformer: accuracy" in verdicts["rnn solves mqar"]["evidence"][0]
    assert verdicts["layers read minds"]["verdict"] == "not tested"
    assert "unknown kind of claim 'telepathy'" in verdicts["layers read minds"]["evidence"][0]
    again = compare(overrides={**over, "claims": claims[:1]}, resume=True, **kw)
    assert [c["claim"] for c in again["claims"]] == ["rnn equals self_attention"]
    assert again["run_config"]["preset_config"]["claims"] == claims[:1]
