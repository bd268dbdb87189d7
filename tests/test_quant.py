"""LSQ quantizer, quantized layers, switchable BN and model surgery against hand-computed references."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from orchestrator.models.info import build_model
from orchestrator.quant.lsq import LsqQuantizer, levels, lsq_fake_quant
from orchestrator.quant.modules import QConv2d, QLinear, SwitchableBatchNorm2d
from orchestrator.quant.policy import random_policy, set_policy, set_uniform_bits
from orchestrator.quant.surgery import quantize_model
from orchestrator.train.steps import joint_step


@pytest.mark.parametrize("bits,signed", [(2, False), (3, True), (4, False), (8, True)])
def test_output_takes_every_level_and_clips(bits: int, signed: bool) -> None:
    qn, qp = levels(bits, signed)
    s = torch.tensor(0.25)
    codes = torch.arange(qn - 3, qp + 4, dtype=torch.float32)
    x = codes * s + 0.01  # just above each level, and three levels beyond each end
    out = lsq_fake_quant(x, s, bits, signed)
    expected = codes.clamp(qn, qp) * s
    torch.testing.assert_close(out, expected)
    assert set((out / s).round().int().tolist()) == set(range(qn, qp + 1))


def _reference_grads(x: torch.Tensor, s: float, bits: int, signed: bool, grad_out: torch.Tensor):
    """LSQ's published gradients written out element by element."""
    qn, qp = levels(bits, signed)
    g = 1.0 / math.sqrt(x.numel() * qp)
    grad_x, grad_s = torch.zeros_like(x), 0.0
    for i, xi in enumerate(x.tolist()):
        v = xi / s
        if v < qn:
            ds, dx = qn, 0.0
        elif v > qp:
            ds, dx = qp, 0.0
        else:
            ds, dx = round(v) - v, 1.0
        grad_x[i] = dx * grad_out[i]
        grad_s += ds * float(grad_out[i])
    return grad_x, grad_s * g


@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (5, True), (6, False)])
def test_gradients_match_lsq_reference(bits: int, signed: bool) -> None:
    torch.manual_seed(bits)
    x = (torch.randn(257, dtype=torch.float64) * 2).requires_grad_()
    s = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(257, dtype=torch.float64)
    lsq_fake_quant(x, s, bits, signed).backward(grad_out)
    ref_x, ref_s = _reference_grads(x.detach(), 0.37, bits, signed, grad_out)
    torch.testing.assert_close(x.grad, ref_x)
    assert float(s.grad) == pytest.approx(ref_s, rel=1e-9)


def test_gradient_scale_is_one_over_sqrt_numel_qp() -> None:
    x = torch.full((100,), 10.0)  # all above Qp: d q / d s = Qp for every element
    s = torch.tensor(0.5, requires_grad=True)
    lsq_fake_quant(x, s, 4, False).sum().backward()
    qp = 15
    assert float(s.grad) == pytest.approx(100 * qp / math.sqrt(100 * qp))


def test_step_size_is_clamped_when_used() -> None:
    x = torch.linspace(-3, 3, 50)
    out = lsq_fake_quant(x, torch.tensor(5.0), 3, True)
    torch.testing.assert_close(out, lsq_fake_quant(x, torch.tensor(1.0), 3, True))


def test_weight_init_formula() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3) * 0.1 + 0.02
    quantizer = LsqQuantizer([4, 2], "weight")
    for b in (4, 2):
        quantizer.active_bits = b
        quantizer(w)
        mean, std = w.mean(), w.std()
        expected = max(abs(mean - 3 * std), abs(mean + 3 * std)) / 2 ** (b - 1)
        assert quantizer.step_size(b) == pytest.approx(float(expected), rel=1e-5)


def test_an_8_bit_weight_step_starts_with_every_weight_inside_the_levels() -> None:
    """A fixed layer's 8-bit weights: heavy tails (a classifier's) stay unclipped, whose gradients
    threw the step size below zero in fine-tuning's first steps (docs/method.md §2.1)."""
    torch.manual_seed(0)
    w = torch.randn(10, 512) * 0.05
    w[0, :4] = 0.6  # the tail a trained classifier has
    quantizer = LsqQuantizer([8], "weight")
    quantizer(w)
    assert quantizer.step_size(8) == pytest.approx(0.6 / 127, rel=1e-5)
    codes = (w / quantizer.step_size(8)).round()
    assert codes.abs().max() <= 127  # not one weight clipped


def test_activation_init_formula_and_sign_detection() -> None:
    torch.manual_seed(0)
    relu_out = torch.relu(torch.randn(8, 16, 5, 5))
    unsigned = LsqQuantizer([3], "act")
    unsigned(relu_out)
    assert not unsigned.signed
    assert unsigned.step_size(3) == pytest.approx(float(2 * relu_out.abs().mean() / math.sqrt(7)), rel=1e-5)
    signed = LsqQuantizer([3], "act")
    signed(torch.randn(8, 16, 5, 5) * 0.5)
    assert signed.signed  # Qp = 3 for signed 3-bit
    codes = (signed(torch.randn(1000) * 0.5) / signed.step_size(3)).round()
    assert codes.min() == -4 and codes.max() == 3


def test_low_precision_input_is_quantized_in_float32() -> None:
    """Under bf16 autocast a quantizer receives bf16 activations: x / s, its rounding and code * s run
    in float32 (in bf16, with 8 significant bits, code * s for codes above 128 is off by up to s / 2)."""
    torch.manual_seed(0)
    x = (torch.rand(4096) * 200).to(torch.bfloat16)
    quantizer = LsqQuantizer([8], "act")
    quantizer(x)
    with torch.no_grad():
        quantizer.step["8"].fill_(0.75)  # codes up to 255
    out = quantizer(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, lsq_fake_quant(x.float(), quantizer.step["8"], 8, False), rtol=0, atol=0)


def test_step_at_one_bit_leaves_other_step_sizes_unchanged() -> None:
    torch.manual_seed(0)
    conv = QConv2d.from_float(nn.Conv2d(4, 8, 3, padding=1), [5, 3], [5, 3])
    x = torch.relu(torch.randn(2, 4, 6, 6))
    for b in (5, 3):  # initialise both
        conv.set_bits(b, b)
        conv(x)
    before = {b: (conv.weight_quant.step_size(b), conv.act_quant.step_size(b)) for b in (5, 3)}
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    conv.set_bits(3, 3)
    conv(x).square().mean().backward()
    optimizer.step()
    assert (conv.weight_quant.step_size(5), conv.act_quant.step_size(5)) == before[5]
    assert conv.weight_quant.step_size(3) != before[3][0]
    assert conv.act_quant.step_size(3) != before[3][1]


def test_switchable_bn_keeps_one_copy_per_bit() -> None:
    bn = SwitchableBatchNorm2d(nn.BatchNorm2d(4), [4, 2])
    bn.active_bits = 4
    bn(torch.randn(8, 4, 3, 3) + 5)
    assert bn.copies["4"].running_mean.mean() > 0.4
    assert torch.count_nonzero(bn.copies["2"].running_mean) == 0
    assert bn.copies["4"].weight is not bn.copies["2"].weight


@pytest.mark.parametrize("arch,searchable,fixed", [
    ("resnet18", 19, ("conv1", "fc")),
    ("resnet34", 35, ("conv1", "fc")),
    ("resnet50", 52, ("conv1", "fc")),
    ("mobilenet_v2", 51, ("features.0.0", "classifier.1")),
])
def test_surgery_lists_searchable_layers_in_forward_order(arch: str, searchable: int, fixed: tuple) -> None:
    model = build_model(arch, num_classes=10)
    layout = quantize_model(model, bits=[4, 2], input_size=32)
    assert len(layout.searchable) == searchable and layout.fixed == fixed
    assert not any(name.startswith("module.") for name in layout.searchable)
    assert all(isinstance(model.get_submodule(n), (QConv2d, QLinear)) for n in layout.searchable)
    assert all(isinstance(model.get_submodule(bn), SwitchableBatchNorm2d) for bn in layout.bn_of.values())
    # fixed layers stay full precision in the joint model (the reference gives them no quantizer)
    assert not any(isinstance(model.get_submodule(n), (QConv2d, QLinear)) for n in layout.fixed)
    order = []
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: order.append(n))
             for n in layout.searchable]
    set_uniform_bits(model, 4)
    model.eval()(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert order == list(layout.searchable)


def test_mobilenet_expansion_conv_reads_signed_input() -> None:
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_classes=10)
    quantize_model(model, bits=[4], input_size=32)
    set_uniform_bits(model, 4)
    model.train()(torch.randn(4, 3, 32, 32))
    assert model.get_submodule("features.2.conv.0.0").act_quant.signed  # reads block 1's linear bottleneck
    assert not model.get_submodule("features.2.conv.1.0").act_quant.signed  # reads a ReLU6


def test_custom_fixed_layers_and_policy_sets_bits() -> None:
    model = build_model("resnet18", num_classes=10)
    layout = quantize_model(model, bits=[6, 4, 2], input_size=32, fixed_layers=["conv1", "layer1.0.conv1", "fc"])
    assert "layer1.0.conv1" not in layout.searchable
    policy = random_policy(model, [6, 4, 2], random.Random(1))
    policy[layout.searchable[0]] = (6, 2)
    set_policy(model, policy)
    layer = model.get_submodule(layout.searchable[0])
    assert (layer.weight_quant.active_bits, layer.act_quant.active_bits) == (6, 2)
    assert model.get_submodule(layout.bn_of[layout.searchable[0]]).active_bits == 6
    assert random_policy(model, [6, 4, 2], random.Random(7)) == random_policy(model, [6, 4, 2], random.Random(7))


def test_joint_step_equals_accumulated_gradients_of_all_passes() -> None:
    torch.manual_seed(0)
    bits = [4, 3, 2]
    model = build_model("resnet18", num_classes=10)
    quantize_model(model, bits=bits, input_size=32)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    for b in bits:  # initialise every step size once, outside the comparison
        set_uniform_bits(model, b)
        model(images)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    model.zero_grad()
    for b in bits:
        set_uniform_bits(model, b)
        criterion(model(images), labels).backward()
    set_policy(model, random_policy(model, bits, random.Random(5)))
    criterion(model(images), labels).backward()
    nn.utils.clip_grad_value_(model.parameters(), 1.0)
    by_hand = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}

    model.load_state_dict(state)
    probe = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: leaves weights as they are, keeps .grad
    metrics = joint_step(model, images, labels, bits, criterion, probe, random.Random(5), grad_clip=1.0)
    joint = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert joint.keys() == by_hand.keys()
    for name in by_hand:
        torch.testing.assert_close(joint[name], by_hand[name], msg=name)
    assert set(metrics) == {f"{k}_w{b}" for b in bits for k in ("loss", "top1")} | {"loss_random", "top1_random"}
    step_grads = [k for k in by_hand if ".step." in k]
    assert {k.rsplit(".", 1)[1] for k in step_grads} == {"4", "3", "2"}  # fixed layers: no quantizer
