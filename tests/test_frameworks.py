"""Cross-framework semantics (docs/frameworks.md): Keras's AdamW against a NumPy reference of its documented update.

Keras 3 (``keras.optimizers.AdamW``; ``keras/src/optimizers/adam.py`` and ``base_optimizer.py``), one step ``t``
(counted from 1) at learning rate ``lr_t`` (the schedule's value), with ``weight_decay = wd``::

    var -= var * wd * lr_t                               # BaseOptimizer._apply_weight_decay, before the update
    m   += (g - m) * (1 - beta_1)
    v   += (g**2 - v) * (1 - beta_2)
    alpha = lr_t * sqrt(1 - beta_2**t) / (1 - beta_1**t)
    var -= m * alpha / (sqrt(v) + epsilon)              # epsilon added to sqrt(v) *before* bias correction

Ours (``decay="decoupled"``, = torch.optim.AdamW): ``var *= 1 - lr_t * wd`` then
``var -= lr_t / (1 - beta_1**t) * m / (sqrt(v) / sqrt(1 - beta_2**t) + eps)``. Dividing Keras's denominator by
``sqrt(1 - beta_2**t)`` shows the two are the same update when ``eps_t = epsilon / sqrt(1 - beta_2**t)``: a
step-dependent eps (31.6 x Keras's epsilon at t = 1 with beta_2 = 0.999, -> epsilon as t grows). With a constant
``eps = epsilon`` they differ only where sqrt(v_hat) is not large against epsilon / sqrt(1 - beta_2**t).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from zeroadamw import ShardedAdamW

STEPS = 30
B1, B2 = 0.9, 0.999
KERAS_EPS = 1e-7  # Keras's default epsilon


def keras_adamw(var0, grads, lrs, *, weight_decay, beta_1=B1, beta_2=B2, epsilon=KERAS_EPS):
    """NumPy Keras AdamW: every step's variable, following keras.optimizers.AdamW's documented update."""
    var = np.array(var0, dtype=np.float64)
    m = np.zeros_like(var)
    v = np.zeros_like(var)
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        var = var - var * weight_decay * lr
        m = m + (g - m) * (1 - beta_1)
        v = v + (np.square(g) - v) * (1 - beta_2)
        alpha = lr * math.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        var = var - (m * alpha) / (np.sqrt(v) + epsilon)
        out.append(var.copy())
    return out


def ours(var0, grads, lrs, *, weight_decay, decay="decoupled", eps_of_step, dtype=torch.float64, lr_peak=None):
    p = torch.nn.Parameter(torch.tensor(var0, dtype=dtype))
    opt = ShardedAdamW([p], lr=lr_peak or lrs[0], betas=(B1, B2), eps=eps_of_step(1), weight_decay=weight_decay,
                       decay=decay)
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        for group in opt.param_groups:  # what an LR scheduler does; eps per step for the Keras translation
            group["lr"] = lr
            group["eps"] = eps_of_step(t)
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        out.append(p.detach().double().numpy().copy())
    return out


def keras_eps(t, epsilon=KERAS_EPS, beta_2=B2):
    """The eps that makes our update equal Keras's at step t."""
    return epsilon / math.sqrt(1 - beta_2**t)


def problem(grad_scale, seed=0, n=257):
    rng = np.random.default_rng(seed)
    var0 = rng.normal(size=n)
    # per-coordinate scales spread over 3 decades around grad_scale, so eps matters for some coordinates
    scales = grad_scale * 10 ** rng.uniform(-1.5, 1.5, size=n)
    grads = [rng.normal(size=n) * scales for _ in range(STEPS)]
    lr_max = 1e-2
    warm = 5  # linear warm-up + cosine, like a real schedule: the decay reads lr_t every step
    lrs = [lr_max * (t + 1) / warm if t < warm else lr_max * 0.5 * (1 + math.cos(math.pi * (t - warm) / STEPS))
           for t in range(STEPS)]
    return var0, grads, lrs, lr_max


def rel_err(a, b):
    return max(float(np.max(np.abs(x - y))) / float(np.max(np.abs(y))) for x, y in zip(a, b))


def update_rel_err(a, b, var0):
    """max over steps of |difference of the variables| / |total change of the reference| (the update's scale)."""
    return max(float(np.max(np.abs(x - y))) / float(np.max(np.abs(y - var0))) for x, y in zip(a, b))


@pytest.mark.parametrize("grad_scale", [1.0, 1e-6])
def test_decoupled_equals_keras_with_translated_eps(grad_scale):
    """decay='decoupled' + eps_t = epsilon / sqrt(1 - beta_2^t) is Keras's AdamW: float64, 30 steps, 1e-12."""
    var0, grads, lrs, _ = problem(grad_scale)
    ref = keras_adamw(var0, grads, lrs, weight_decay=0.05)
    got = ours(var0, grads, lrs, weight_decay=0.05, eps_of_step=keras_eps)
    assert rel_err(got, ref) <= 1e-12
    assert update_rel_err(got, ref, var0) <= 1e-9


def test_decoupled_equals_keras_float32():
    """The same in float32 (ShardedAdamW's fused kernel): within float32 rounding over 30 steps."""
    var0, grads, lrs, _ = problem(1.0)
    ref = keras_adamw(var0, grads, lrs, weight_decay=0.05)
    got = ours(var0, grads, lrs, weight_decay=0.05, eps_of_step=keras_eps, dtype=torch.float32)
    assert rel_err(got, ref) <= 2e-6


def change_rel_diff(a, b, var0):
    """Per coordinate: |difference of the final variables| / |the reference's total change| (median, max)."""
    d = np.abs(a[-1] - b[-1]) / np.abs(b[-1] - var0)
    return float(np.median(d)), float(np.max(d))


def test_constant_eps_differs_where_gradients_are_small():
    """The naive mapping eps = epsilon. Adam's step is scale-free, so a coordinate whose gradients are small moves
    as far as any other -- and there Keras's larger effective eps (epsilon / sqrt(1 - beta_2^t) early on) matters.
    Observed over 30 steps (coordinate scales spread over 3 decades): gradients ~1: median 1e-6, worst 1.9e-3 of a
    coordinate's total change; gradients ~1e-6 (per-element LLM gradients are often this small): median 0.63."""
    const = lambda t: KERAS_EPS  # noqa: E731
    var0, grads, lrs, _ = problem(1.0)
    med, worst = change_rel_diff(ours(var0, grads, lrs, weight_decay=0.0, eps_of_step=const),
                                 keras_adamw(var0, grads, lrs, weight_decay=0.0), var0)
    assert med <= 1e-5 and worst <= 1e-2
    var0, grads, lrs, _ = problem(1e-6)
    med, worst = change_rel_diff(ours(var0, grads, lrs, weight_decay=0.0, eps_of_step=const),
                                 keras_adamw(var0, grads, lrs, weight_decay=0.0), var0)
    assert med >= 0.1
    # and the translated eps removes the difference at both scales
    for scale in (1.0, 1e-6):
        var0, grads, lrs, _ = problem(scale)
        med, worst = change_rel_diff(ours(var0, grads, lrs, weight_decay=0.0, eps_of_step=keras_eps),
                                     keras_adamw(var0, grads, lrs, weight_decay=0.0), var0)
        assert worst <= 1e-9


class KerasEps:
    """Step pre-hook from docs/frameworks.md: before step t set each group's eps to epsilon / sqrt(1 - beta_2^t),
    which turns decay='decoupled' into Keras's AdamW update."""

    def __init__(self, opt, epsilon=1e-7):
        self.opt, self.epsilon, self.t = opt, epsilon, 0

    def __call__(self, *_):
        self.t += 1
        for g in self.opt.param_groups:
            g["eps"] = self.epsilon / (1 - g["betas"][1] ** self.t) ** 0.5


def test_keras_eps_hook_from_the_page():
    var0, grads, lrs, lr_max = problem(1e-6)
    sched = [lr / lr_max for lr in lrs]
    p = torch.nn.Parameter(torch.tensor(var0, dtype=torch.float64))
    opt = ShardedAdamW([p], lr=lr_max, betas=(B1, B2), weight_decay=0.05)
    opt.register_step_pre_hook(KerasEps(opt, epsilon=KERAS_EPS))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: sched[min(s, STEPS - 1)])
    got = []
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
        lr_sched.step()
        got.append(p.detach().numpy().copy())
    assert rel_err(got, keras_adamw(var0, grads, lrs, weight_decay=0.05)) <= 1e-12


def test_independent_equals_keras_with_wd_over_peak_lr():
    """decay='independent' with lambda equals Keras with weight_decay = lambda / lr_max (lr_max = the peak)."""
    var0, grads, lrs, lr_max = problem(1.0)
    lam = 2e-3
    ref = keras_adamw(var0, grads, lrs, weight_decay=lam / lr_max)
    got = ours(var0, grads, lrs, weight_decay=lam, decay="independent", eps_of_step=keras_eps, lr_peak=lr_max)
    assert rel_err(got, ref) <= 1e-12


def test_l2_is_not_keras_weight_decay():
    """decay='l2' (torch Adam's weight_decay) is a different update from Keras's weight_decay."""
    var0, grads, lrs, _ = problem(1.0)
    ref = keras_adamw(var0, grads, lrs, weight_decay=0.5)
    got = ours(var0, grads, lrs, weight_decay=0.5, decay="l2", eps_of_step=keras_eps)
    assert update_rel_err(got, ref, var0) >= 0.05


def test_hf_training_arguments_defaults_match_the_page():
    """docs/frameworks.md lists TrainingArguments' defaults; keep the table honest."""
    transformers = pytest.importorskip("transformers")
    fields = {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)}
    assert fields["learning_rate"] == 5e-5
    assert fields["weight_decay"] == 0.0
    assert (fields["adam_beta1"], fields["adam_beta2"], fields["adam_epsilon"]) == (0.9, 0.999, 1e-8)
    assert fields["max_grad_norm"] == 1.0


def test_hf_decay_split_from_the_page():
    """The page builds HF's two param groups with Trainer.get_decay_parameter_names(None, model)."""
    transformers = pytest.importorskip("transformers")
    from helpers import tiny_llama

    model = tiny_llama(freeze_norm=False)
    decay_names = set(transformers.Trainer.get_decay_parameter_names(None, model))
    no_decay = {n for n, _ in model.named_parameters()} - decay_names
    assert no_decay and all("norm" in n for n in no_decay)  # Llama has no biases: exactly the RMSNorm gains
    assert "model.embed_tokens.weight" in decay_names and "lm_head.weight" in decay_names
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay_names], "weight_decay": 0.1},
              {"params": [p for n, p in model.named_parameters() if n not in decay_names], "weight_decay": 0.0}]
    ShardedAdamW(groups, lr=1e-4, stage=1)
