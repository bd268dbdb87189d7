"""Indicator training as the reference does it (docs/method.md §2.1-§3): the step-size clamp, no decay on 1-D
parameters, the per-epoch cosine, the random pass and the optimizer step that skips all-zero gradients."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from orchestrator.config.schema import FinetuneConfig, IndicatorConfig
from orchestrator.models.info import build_model
from orchestrator.quant.lsq import LsqQuantizer, lsq_fake_quant
from orchestrator.quant.modules import QConv2d, QLinear
from orchestrator.quant.policy import extract_indicators, random_policy
from orchestrator.quant.surgery import quantize_model
from orchestrator.train.recipe import lr_factor, make_optimizer, make_scheduler
from orchestrator.train.steps import NanLossError, joint_step


def test_step_size_gradient_is_zero_outside_the_clamp_range() -> None:
    x = torch.linspace(-3, 3, 50)
    for value, expect_zero in ((1.5, True), (0.5, False), (1e-7, True)):
        step = torch.tensor(value, requires_grad=True)
        lsq_fake_quant(x, step, 2, True).square().sum().backward()
        assert (float(step.grad) == 0.0) == expect_zero, value


def test_activation_init_above_one_is_kept_and_reported_raw() -> None:
    quantizer = LsqQuantizer([2], "act")
    relu_out = torch.full((4, 8), 2.0)  # init 2 * mean|x| / sqrt(3) = 2.31, above the clamp's 1
    quantizer(relu_out)
    assert quantizer.step_size(2) == pytest.approx(4 / math.sqrt(3), rel=1e-6)
    assert quantizer.effective_step_size(2) == 1.0
    torch.testing.assert_close(quantizer(relu_out), lsq_fake_quant(relu_out, torch.tensor(1.0), 2, False))


def test_no_weight_decay_on_step_sizes_bn_and_biases() -> None:
    model = build_model("resnet18", num_classes=10)
    quantize_model(model, bits=[4, 2], input_size=32)
    optimizer = make_optimizer(model, IndicatorConfig(weight_decay=1e-3))
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        expected = 1e-3 if parameter.dim() > 1 else 0.0
        assert decay_of[id(parameter)] == expected, name
    assert all(group["nesterov"] for group in optimizer.param_groups)  # the indicator default


def test_indicator_cosine_steps_per_epoch_down_to_min_lr() -> None:
    recipe = IndicatorConfig(epochs=4, lr=0.01)
    factors = [lr_factor(recipe, 3, step) for step in range(12)]
    per_epoch = [factors[i * 3:(i + 1) * 3] for i in range(4)]
    assert all(len(set(epoch)) == 1 for epoch in per_epoch)  # constant within an epoch
    expected = [1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert [epoch[0] for epoch in per_epoch] == pytest.approx(expected)
    assert lr_factor(recipe, 3, 12) == pytest.approx(1e-3)  # 1e-5 / 0.01 after the last epoch
    warm = IndicatorConfig(epochs=3, lr=0.01, warmup_epochs=1)
    assert [lr_factor(warm, 2, s) for s in range(2)] == [0.5, 1.0]  # warm-up stays per step
    assert lr_factor(warm, 2, 2) == lr_factor(warm, 2, 3) == 1.0
    # other stages keep the per-step cosine to 0 unless configured
    finetune = FinetuneConfig(epochs=2, lr=0.01)
    assert len({lr_factor(finetune, 4, s) for s in range(4)}) == 4
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = make_scheduler(optimizer, recipe, 3)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * expected[1])


def test_random_pass_draws_for_convolutions_only() -> None:
    model = build_model("resnet18", num_classes=10)
    quantize_model(model, bits=[4, 3, 2], input_size=32, fixed_layers=["conv1"])  # fc becomes searchable
    assert isinstance(model.get_submodule("fc"), QLinear)
    policies = [random_policy(model, [4, 3, 2], random.Random(seed)) for seed in range(20)]
    assert all(policy["fc"] == (2, 2) for policy in policies)  # keeps the last uniform pass's bits
    assert len({policy["layer1.0.conv1"] for policy in policies}) == 3


def _tiny_joint_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    quantize_model(model, bits=[4, 2], input_size=8)
    return model


def test_joint_step_leaves_frozen_step_sizes_out_of_the_optimizer_step() -> None:
    model = _tiny_joint_model()
    images, labels = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    joint_step(model, images, labels, [4, 2], criterion, optimizer, random.Random(0))
    conv = model.get_submodule("3")
    assert isinstance(conv, QConv2d)
    frozen = conv.act_quant.step["2"]
    with torch.no_grad():
        frozen.fill_(1.3)  # outside [1e-5, 1]: clamp's gradient is zero
    moving = conv.act_quant.step["4"].detach().clone()
    joint_step(model, images, labels, [4, 2], criterion, optimizer, random.Random(1))
    assert float(frozen.detach()) == pytest.approx(1.3)  # momentum from step one did not move it
    assert float(conv.act_quant.step["4"].detach()) != float(moving)
    assert extract_indicators(model, "tiny").act["3"][2] == pytest.approx(1.3)


def test_nan_loss_is_one_clear_error() -> None:
    model = _tiny_joint_model()
    images, labels = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    images[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NanLossError, match=r"indicators: loss is NaN at step 1 .*W4A4 pass.*lower indicators.lr"):
        joint_step(model, images, labels, [4, 2], nn.CrossEntropyLoss(), optimizer, random.Random(0))
    for key, value in model.state_dict().items():
        if value.is_floating_point() and "running" not in key and "step" not in key:
            torch.testing.assert_close(value, before[key], equal_nan=True)
