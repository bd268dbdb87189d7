"""Compiled training steps (torch.compile) against the eager ones: the quantized forward compiles to
one graph, without breaks and without a recompile per policy; compiled joint and fine-tuning steps
give the eager steps' losses, gradients, step sizes and BatchNorm statistics; the `training.compile`
switch and its errors."""

from __future__ import annotations

import copy
import functools
import random

import pytest
import torch
import torch._inductor.config
from torch import nn

from orchestrator.config.schema import PipelineConfig
from orchestrator.common.errors import ConfigError, UserError
from orchestrator.models.info import build_model
from orchestrator.checks.preflight import preflight
from orchestrator.quant.policy import random_policy, set_policy, set_uniform_bits
from orchestrator.quant.surgery import quantize_model
from orchestrator.train.compiled import CompiledPass, decide_compile
from orchestrator.train.steps import forward_loss, joint_step, plain_step

BITS = [4, 3, 2]


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from scratch (dynamo's in-process caches and counters are global)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny_net() -> nn.Module:
    """Searchable: a conv reading a ReLU, a conv reading a linear (signed) output, a hidden Linear;
    fixed: the first conv and the classifier. BatchNorm's affine parameters are drawn at random: at
    their init (weight 1, bias 0), a quantized conv's output that equals its channel mean exactly
    (likely: quantized operands take few values) leaves BatchNorm with a rounding error for a value,
    whose sign, and so the next ReLU's gradient, differs between any two summation orders."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10),
    )
    for bn in (net[1], net[4], net[6]):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    return net


def _batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(size, 3, 8, 8, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def _compiled(model: nn.Module, criterion: nn.Module) -> CompiledPass:
    return CompiledPass(model, functools.partial(forward_loss, model, criterion=criterion, bf16=False))


def _assert_same_training_state(eager: nn.Module, compiled: nn.Module) -> None:
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is None:  # an all-zero gradient is dropped in both (none vs zeros before the drop)
            assert q.grad is None or not q.grad.any(), name
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    compiled_state = compiled.state_dict()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_compiled_joint_step_matches_eager_without_recompiling() -> None:
    torch.manual_seed(0)
    eager = _tiny_net()
    layout = quantize_model(eager, bits=BITS, input_size=8)
    assert len(layout.searchable) == 3
    twin = copy.deepcopy(eager)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    compiled = _compiled(twin, criterion)
    images, labels = _batch()
    for step in range(3):
        if step == 1:  # compiled once (the first step's random pass); from here on, no policy recompiles
            torch.compiler.set_stance("fail_on_recompile")
        try:
            expected = joint_step(eager, images, labels, BITS, criterion, eager_opt, random.Random(step))
            got = joint_step(twin, images, labels, BITS, criterion, twin_opt, random.Random(step), compiled=compiled)
        finally:
            torch.compiler.set_stance("default")
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (step, key)
        _assert_same_training_state(eager, twin)
    # step 1 initialised the step sizes eagerly, then compiled its random pass; steps 2-3: every pass
    assert compiled.calls == 1 + 2 * (len(BITS) + 1)
    assert compiled.compile_seconds is not None and compiled.compile_seconds > 0
    signs = {name: twin.get_submodule(name).act_quant.signed for name in layout.searchable}
    assert sorted(signs.values()) == [False, False, True]  # the conv after the linear BN reads signed input


def test_compiled_finetune_step_matches_eager_and_serves_only_its_batch_shape() -> None:
    torch.manual_seed(1)
    joint = _tiny_net()
    layout = quantize_model(copy.deepcopy(joint), bits=BITS, input_size=8)
    policy = dict(zip(layout.searchable, [(4, 2), (3, 3), (2, 4)]))
    eager = joint
    quantize_model(eager, policy=policy, input_size=8)  # fixed layers at 8 bits
    twin = copy.deepcopy(eager)
    criterion = nn.CrossEntropyLoss()
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    compiled = _compiled(twin, criterion)
    images, labels = _batch()
    for _ in range(3):
        expected = plain_step(eager, images, labels, criterion, eager_opt, grad_clip=1.0)
        got = plain_step(twin, images, labels, criterion, twin_opt, grad_clip=1.0, compiled=compiled)
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5) and got["top1"] == expected["top1"]
        _assert_same_training_state(eager, twin)
    assert compiled.calls == 2  # the first step initialised the fixed layers' 8-bit step sizes eagerly
    partial_images, partial_labels = images[:5], labels[:5]  # an epoch's last partial batch: eager, no recompile
    assert not compiled.serves(partial_images)
    plain_step(twin, partial_images, partial_labels, criterion, twin_opt, compiled=compiled)
    assert compiled.calls == 2


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_quantized_forward_is_one_graph_for_every_policy(arch: str) -> None:
    """fullgraph=True fails on any graph break; AOTAutograd (aot_eager) also traces the backward, where
    a data-dependent op (a tensor read as a Python number) would fail; fail_on_recompile: a new policy
    or bit-width reuses the graph."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10)
    quantize_model(model, bits=BITS, input_size=16)
    images = torch.randn(2, 3, 16, 16)
    for b in BITS:  # lazy init and sign detection run eagerly, as in training
        set_uniform_bits(model, b)
        model(images)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    set_policy(model, random_policy(model, BITS, random.Random(0)))
    compiled(images).sum().backward()
    with torch.compiler.set_stance("fail_on_recompile"):
        for policy_seed in (1, 2):
            set_policy(model, random_policy(model, BITS, random.Random(policy_seed)))
            compiled(images).sum().backward()
        set_uniform_bits(model, BITS[0])
        compiled(images).sum().backward()


def test_compile_switch_and_its_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not decide_compile("off", "cpu").enabled
    auto = decide_compile("auto", "cpu")
    assert not auto.enabled and "eager on cpu" in auto.reason
    assert decide_compile("on", "cpu").enabled  # this machine has a C++ compiler
    cfg = PipelineConfig.model_validate({"data": {"demo": True}, "training": {"compile": "on"}})
    # a machine without a C++ compiler: inductor's own compiler setting points nowhere
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    with pytest.raises(UserError, match=r"^training.compile: on, but no C\+\+ compiler"):
        decide_compile("on", "cpu")
    assert not decide_compile("auto", "cpu").enabled
    with pytest.raises(ConfigError, match=r"^training.compile: on, but no C\+\+ compiler .*; install it or set "
                                          r"training.compile: auto or off$"):
        preflight(cfg)
