"""zeroadamw.diagnostics: every reported number equals the same quantity computed the unsharded way with torch
(full params, the rank-averaged gradient recomputed from all ranks' batches) on 1 process and on N = 2, 3 real
gloo ranks; the JSONL / TensorBoard logger, the HF Trainer callback, and ``zeroadamw plot``."""

from __future__ import annotations

import json
import math

import pytest
import torch

import diag_workers
from distributed import run
from zeroadamw import ShardedAdamW
from zeroadamw.diagnostics import Diagnostics, DiagnosticsLogger, attach

REL = 1e-6  # float64 sums of fp32 values: rounding only


def check(results):
    for step, r in enumerate(results):
        got, want = r["got"], r["want"]
        for k, v in want.items():
            assert k in got, (step, k, sorted(got))
            assert got[k] == pytest.approx(v, rel=REL, abs=1e-12), (step, k, got[k], v)
        assert got["diag/skipped"] == 0.0


@pytest.mark.parametrize("cfg", [{"opt": "sharded", "stage": 1}, {"opt": "sharded", "stage": 2},
                                 {"opt": "sharded", "stage": 2, "decay": "independent"}, {"opt": "sparse"},
                                 {"opt": "torch"}])
def test_one_process_equals_torch(cfg):
    check(diag_workers.diag_vs_unsharded(0, 1, cfg))


@pytest.mark.dist
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("cfg", [{"opt": "sharded", "stage": 1}, {"opt": "sharded", "stage": 2}, {"opt": "sparse"}])
def test_sharded_equals_unsharded(world_size, cfg):
    results = run(diag_workers.diag_vs_unsharded, world_size, cfg)
    for res in results:
        check(res)
    for res in results[1:]:  # and every rank reports the same numbers
        for a, b in zip(res, results[0]):
            assert a["got"] == b["got"]


def test_logger_every_k_keeps_one_step_updates_and_writes_jsonl_and_tensorboard(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = ShardedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, stage=2)
    log = DiagnosticsLogger(opt, tmp_path / "d.jsonl", every=3, tensorboard_dir=str(tmp_path / "tb"))
    prev = None
    for step in range(7):
        if step % 3 == 0:
            prev = [p.detach().clone() for p in model.parameters()]
        elif (step + 1) % 3 == 0 or step == 0:
            pass
        if step % 3 == 0:
            pass
        before = [p.detach().clone() for p in model.parameters()]
        loss = model(torch.randn(4, 6)).square().mean()
        loss.backward()
        opt.step()
        rec = log.log(step, loss=loss.item())
        opt.zero_grad()
        if step % 3 == 0:
            un = math.sqrt(sum((p.detach() - b).double().square().sum().item()
                               for p, b in zip(model.parameters(), before)))
            if step > 0:  # the snapshot was taken one step before, so this is one step's update
                assert rec["diag/group0/update_norm"] == pytest.approx(un, rel=1e-6)
            else:
                assert "diag/group0/update_norm" not in rec  # nothing to compare with yet
        else:
            assert rec is None
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 3, 6] and all("loss" in x for x in lines)
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    pn = [e.value for e in acc.Scalars("diag/group0/param_norm")]
    assert pn == pytest.approx([x["diag/group0/param_norm"] for x in lines], rel=1e-6)


def test_bad_input():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Diagnostics(object())
    opt = ShardedAdamW([torch.nn.Parameter(torch.randn(3))], stage=2)
    with pytest.raises(ValueError, match="every"):
        DiagnosticsLogger(opt, every=0)


def test_hf_trainer_callback_puts_diagnostics_in_the_logs(tmp_path):
    import hf_workers

    trainer = hf_workers.make_trainer(str(tmp_path / "z"), 1, 4, {"stage": 2}, max_steps=3)
    cb = attach(trainer, into_logs=True)
    assert trainer.callback_handler.callbacks[0] is cb  # ahead of the reporters
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    for h in logged:
        assert h["diag/grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-6)  # Trainer's own pre-clip norm
        assert any(k.endswith("/param_norm") for k in h) and h["diag/skipped"] == 0.0
    # the last entry: the param norm of the trained model, over the groups
    last = logged[-1]
    total_sq = sum(v * v for k, v in last.items() if k.endswith("/param_norm"))
    want = sum(p.detach().double().square().sum().item() for p in trainer.model.parameters() if p.requires_grad)
    assert total_sq == pytest.approx(want, rel=1e-6)
    assert all(last[k] > 0 for k in last if k.endswith("/update_ratio"))
    for h in logged:  # the lr the step used (Trainer logs the same), not the one the scheduler moved on to
        assert h["diag/decay/lr"] == pytest.approx(h["learning_rate"], rel=1e-9, abs=1e-15)
        assert h["diag/no_decay/weight_decay"] == 0.0 and h["diag/decay/weight_decay"] == 0.1
    assert [h["diag/no_decay/lr"] for h in logged] == pytest.approx([0.0, 1.5e-3, 3e-3])


def test_plot_writes_a_png_from_jsonl_and_trainer_state(tmp_path):
    from zeroadamw.cli import main

    recs = [{"step": s, "loss": 3.0 / (s + 1), "diag/grad_norm": 1.0 / (s + 1), "diag/g0/param_norm": 10 + s,
             "diag/g0/grad_norm": 0.5, "diag/g0/grad_norm_clipped": 0.4, "diag/g0/update_ratio": 1e-3,
             "diag/g0/effective_decay": 1e-4, "diag/g0/lr": 1e-3} for s in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["plot", str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "d.png")]) == 0
    png = (tmp_path / "d.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    from PIL import Image

    with Image.open(tmp_path / "d.png") as im:
        im.verify()
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": recs, "global_step": 5}))
    assert main(["plot", str(tmp_path / "trainer_state.json")]) == 0
    assert (tmp_path / "trainer_state.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert main(["plot", str(tmp_path / "bad.jsonl")]) == 2


def test_hf_trainer_with_torch_adamw_logs_norms_but_no_stale_grad_norms(tmp_path):
    """With Trainer's own torch AdamW the gradients are gone (zero_grad) when callbacks run: the diagnostics log
    param norms and updates, and leave the gradient norms out rather than logging zeros."""
    import hf_workers

    trainer = hf_workers.make_trainer(str(tmp_path / "t"), 1, 4, None, max_steps=2, plain=True)
    attach(trainer, into_logs=True)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for h in logged:
        assert h["diag/group0/param_norm"] > 0 and "diag/group0/grad_norm" not in h
        assert h["diag/group0/lr"] == pytest.approx(h["learning_rate"], rel=1e-9, abs=1e-15)
    want = sum(p.detach().double().square().sum().item() for p in trainer.model.parameters() if p.requires_grad)
    got = sum(v * v for k, v in logged[-1].items() if k.endswith("/param_norm"))
    assert got == pytest.approx(want, rel=1e-6)
    assert logged[-1]["diag/group0/update_ratio"] > 0


def test_hf_trainer_logs_stay_readable_diagnostics_go_to_their_file(tmp_path, capsys):
    """The default: Trainer's logs (what its progress bar / printer shows, log_history, report_to) carry no diag/*
    keys; OUTPUT_DIR/diagnostics.jsonl has all of them per logging step (with Trainer's loss and the evaluation's
    eval_loss), and the console gets one short summary line per logging step."""
    import hf_workers
    from transformers import TrainerCallback

    seen = []

    class Record(TrainerCallback):  # what every reporter after Trainer's own callbacks receives
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = hf_workers.make_trainer(str(tmp_path / "z"), 1, 4, {"stage": 2}, max_steps=3)
    trainer.args.eval_strategy = "no"
    trainer.add_callback(Record())
    cb = attach(trainer)
    capsys.readouterr()
    trainer.train()
    trainer.eval_dataset = hf_workers.TokenDataset(16)
    trainer.evaluate()
    out = capsys.readouterr().out

    assert cb.file == str(tmp_path / "z" / "diagnostics.jsonl")
    train_logs = [h for h in seen if "loss" in h]
    assert len(train_logs) == 3
    assert not [k for h in seen for k in h if k.startswith("diag/")], seen
    assert not [k for h in trainer.state.log_history for k in h if k.startswith("diag/")]
    recs = [json.loads(x) for x in (tmp_path / "z" / "diagnostics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "diag/grad_norm" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    for r, h in zip(train_recs, train_logs):
        assert sum(k.startswith("diag/") for k in r) == 20  # 4 whole-model + 8 per group x 2 groups
        assert r["loss"] == h["loss"] and r["diag/grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-6)
    assert [r for r in recs if "eval_loss" in r][0]["step"] == 3  # the evaluation, for the plot
    summary = [line for line in out.splitlines() if line.startswith("diagnostics step ")]
    assert [line.split(":")[0] for line in summary] == [f"diagnostics step {s}" for s in (1, 2, 3)]
    assert all(len(line) < 160 and "update/weight decay" in line for line in summary), summary
    assert not [line for line in out.splitlines() if "diag/" in line]  # no dict of diag/* values anywhere


def test_diagnostics_figure_axes(tmp_path):
    """The figure itself: y labels on every panel, log scales said where used, the all-groups line on top and
    thinner (never hiding a group's line), solid before / dashed after clipping, one colour per group in every
    panel, the validation loss next to the train loss."""
    from matplotlib.colors import to_hex

    from zeroadamw.plot import ALL_GROUPS, build_figure, plot

    recs = []
    for s in range(1, 7):
        g = {"step": s, "loss": 3.0 / s, "learning_rate": 1e-3, "diag/grad_norm": 2.0 / s,
             "diag/grad_norm_clipped": min(1.0, 2.0 / s), "diag/clip_coef": min(1.0, s / 2.0)}
        for name, scale in (("decay", 1.0), ("no_decay", 0.1)):
            g.update({f"diag/{name}/param_norm": 10 * scale + s, f"diag/{name}/grad_norm": scale * 2.0 / s,
                      f"diag/{name}/grad_norm_clipped": scale * min(1.0, 2.0 / s), f"diag/{name}/lr": 1e-3,
                      f"diag/{name}/update_ratio": scale * 1e-3, f"diag/{name}/weight_decay": 0.1 * (name == "decay"),
                      f"diag/{name}/effective_decay": 1e-4 * (name == "decay")})  # 0 for no_decay: no log scale
        recs.append(g)
        if s % 3 == 0:
            recs.append({"step": s, "eval_loss": 3.2 / s})
    fig, panels = build_figure(recs, loss_unit="nats/token")
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert list(axes) == ["loss", "learning rate", "parameter L2 norm", "gradient L2 norm (log scale)",
                          "update / weight ratio (log scale)", "effective decay per step"]
    assert panels == ["loss", "learning rate", "parameter L2 norm", "gradient L2 norm", "update / weight ratio",
                      "effective decay per step"]
    for title, ax in axes.items():
        assert ax.get_ylabel(), title
        assert ax.get_xlabel() == "optimizer step"
        assert (ax.get_yscale() == "log") == ("log scale" in title) == ("log scale" in ax.get_ylabel()), title
    assert axes["loss"].get_ylabel() == "loss (nats/token)"
    assert axes["effective decay per step"].get_yscale() == "linear"  # no_decay's zeros: a log axis would drop them

    loss = axes["loss"]
    assert loss.get_legend() is not None
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["train loss", "validation loss"]
    val = [ln for ln in loss.get_lines() if ln.get_label() == "validation loss"][0]
    assert list(val.get_xdata()) == [3, 6] and val.get_marker() == "o"

    grad = axes["gradient L2 norm (log scale)"]
    lines = grad.get_lines()
    by_label = {ln.get_label(): ln for ln in lines if not ln.get_label().startswith("_")}
    assert {"decay", "no_decay", ALL_GROUPS} <= set(by_label)
    legend = [t.get_text() for t in grad.get_legend().get_texts()]
    assert legend[-2:] == ["before clipping (solid)", "after clipping (dashed)"] and ALL_GROUPS in legend
    whole, decay = by_label[ALL_GROUPS], by_label["decay"]
    assert whole.get_zorder() > decay.get_zorder() and whole.get_linewidth() < decay.get_linewidth()
    assert by_label["no_decay"].get_zorder() > decay.get_zorder()  # later groups on top, thinner
    assert by_label["no_decay"].get_linewidth() < decay.get_linewidth()
    assert whole.get_linestyle() == "-" and to_hex(whole.get_color()) == "#000000"
    dashed = [ln for ln in lines if ln.get_linestyle() == "--" and len(ln.get_xdata())]
    assert len(dashed) == 3  # after clipping: both groups and all groups
    assert {to_hex(ln.get_color()) for ln in dashed} == {to_hex(by_label[k].get_color()) for k in
                                                        ("decay", "no_decay", ALL_GROUPS)}

    colours = {}  # group -> the colours it has across panels: exactly one, distinct between groups
    for ax in axes.values():
        for ln in ax.get_lines():
            if ln.get_label() in ("decay", "no_decay"):
                colours.setdefault(ln.get_label(), set()).add(to_hex(ln.get_color()))
    assert all(len(c) == 1 for c in colours.values()) and colours["decay"] != colours["no_decay"], colours
    assert "#000000" not in colours["decay"] | colours["no_decay"]  # black is the whole model only
    import matplotlib.pyplot as plt

    plt.close(fig)
    assert plot(recs, str(tmp_path / "d.png"))[0] == "loss"
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
