"""Any model, honest accounting (issue 18): a user's own nn.Module by import path through every stage,
attention whose weights are read functionally made into layers, MACs of every multiply (checked against
torch.utils.flop_counter), float operations named, and one model per torchvision family through every
stage in-process."""

from __future__ import annotations

import copy
import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from torch import nn
from pipelines import REPO, tiny_raw, write_config
from torchvision import models
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from orchestrator.cli import main
from orchestrator.config.loading import load_config
from orchestrator.models.explicit_layers import ExplicitMultiheadAttention, make_weights_explicit
from orchestrator.models.user_module import load_factory, model_code_paths, source_digest
from orchestrator.models.check import STAGES, check_model_stages, stage_check_config
from orchestrator.models.info import build_model, flop_counter_macs, trace_model
from orchestrator.quant.modules import QConv2d, QLinear
from orchestrator.quant.onnx_check import compare_with_torch
from orchestrator.quant.onnx_export import export_onnx
from orchestrator.quant.policy import random_policy, searchable_modules, set_uniform_bits
from orchestrator.quant.surgery import layout_of, quantize_model
from orchestrator.search.costs import cost_table, costs_from_layers
from orchestrator.train.checkpoint import restore_model

# The user's model of the issue: grouped convolutions, a squeeze-excite Linear (on a pooled vector), a Linear
# over tokens and an nn.MultiheadAttention; a second one with torch's own nn.TransformerEncoder.
USER_MODULE = '''
import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduced):
        super().__init__()
        self.fc1 = nn.Linear(channels, reduced)
        self.fc2 = nn.Linear(reduced, channels)

    def forward(self, x):
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * scale[:, :, None, None]


class HybridNet(nn.Module):
    def __init__(self, num_classes, width=16, heads=2, encoder=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=4, bias=False),
                                     nn.BatchNorm2d(width), nn.ReLU())
        self.se = SqueezeExcite(width, 4)
        self.tokens = nn.Linear(width, width)
        if encoder:
            layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=1)
        else:
            self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.se(self.grouped(self.stem(x)))
        t = self.tokens(x.flatten(2).transpose(1, 2))
        if hasattr(self, "encoder"):
            t = self.encoder(t, src_key_padding_mask=torch.zeros(t.shape[:2], dtype=torch.bool))
        else:
            t = self.norm(t + self.attention(t, t, t, need_weights=False)[0])
        return self.head(t.mean(1))


def build(num_classes, width=16):
    return HybridNet(num_classes, width)


def build_encoder(num_classes):
    return HybridNet(num_classes, encoder=True)


def mostly_float(num_classes):
    """A model whose main work is a product of activations, which stays in float."""
    class Gram(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.mixer = nn.Conv2d(8, 8, 1)
            self.head = nn.Linear(8, num_classes)

        def forward(self, x):
            t = self.mixer(self.stem(x)).flatten(2)
            gram = t.transpose(1, 2) @ t
            return self.head((gram @ t.transpose(1, 2)).mean(1))
    return Gram()


def not_a_module(num_classes):
    return {"num_classes": num_classes}


def stem_and_head(num_classes):
    """Only the layers docs/method.md §2.3 fixes by default: nothing to search."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def fails_at_16(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
'''


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the user's module `limpq_test_usernet.py` (its name is unique in the suite:
    Python caches imported modules by name)."""
    directory = tmp_path_factory.mktemp("user")
    (directory / "limpq_test_usernet.py").write_text(USER_MODULE)
    (directory / "limpq_test_broken_import.py").write_text("import limpq_no_such_dependency\n")
    return directory


@pytest.fixture
def in_user_dir(user_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(user_dir)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return user_dir


def _raw_user_model(name: str = "build", **kwargs) -> nn.Module:
    """The user's own model as their code builds it (no swap), for independent references."""
    factory = load_factory(f"limpq_test_usernet:{name}")  # imported from the working directory, as limpq does
    torch.manual_seed(0)
    return factory(10, **kwargs)


# -- the explicit forms compute what torch and torchvision compute ----------------------------------

MHA_CALLS = [{}, {"need_weights": False}, {"key_padding_mask": True}, {"key_padding_mask": True, "need_weights": False},
             {"attn_mask": True}, {"attn_mask": True, "need_weights": False, "is_causal": True},
             {"attn_mask": True, "key_padding_mask": True, "average_attn_weights": False}]


@pytest.mark.parametrize("batch_first", [True, False])
def test_explicit_multihead_attention_matches_torch(batch_first: bool) -> None:
    torch.manual_seed(0)
    original = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    explicit = ExplicitMultiheadAttention(copy.deepcopy(original)).eval()
    x, y = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    if not batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, -2:] = True
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    for call in MHA_CALLS:
        kwargs = {**call, "key_padding_mask": padding if "key_padding_mask" in call else None,
                  "attn_mask": causal if "attn_mask" in call else None}
        expected, got = original(x, x, x, **kwargs), explicit(x, x, x, **kwargs)
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-4, msg=str(call))
        assert (got[1] is None) == (expected[1] is None)
        if expected[1] is not None:
            torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=1e-4, msg=str(call))
    for query, key in ((x, y), (x[0] if batch_first else x[:, 0], y[0] if batch_first else y[:, 0])):  # cross, unbatched
        torch.testing.assert_close(explicit(query, key, key)[0], original(query, key, key)[0], atol=1e-5, rtol=1e-4)
    # the original module's weights (a user's checkpoint) load into the explicit form
    fresh = ExplicitMultiheadAttention(nn.MultiheadAttention(16, 4, batch_first=batch_first)).eval()
    fresh.load_state_dict(original.state_dict())
    torch.testing.assert_close(fresh(x, x, x)[0], original(x, x, x)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch, size", [("swin_t", 32), ("swin_v2_t", 32), ("vit_b_16", 16)])
def test_explicit_attention_of_torchvision_models_computes_the_same(arch: str, size: int) -> None:
    kwargs = {"image_size": size} if arch.startswith("vit") else {}
    torch.manual_seed(0)
    original = models.get_model(arch, num_classes=10, **kwargs).eval()
    with torch.no_grad():  # V2 ignores the key third of its qkv bias: give it values that would show
        for module in original.modules():
            if arch == "swin_v2_t" and isinstance(module, models.swin_transformer.ShiftedWindowAttentionV2):
                module.qkv.bias.normal_()
    explicit = make_weights_explicit(copy.deepcopy(original))
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(explicit(images), original(images), atol=1e-5, rtol=1e-4)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in explicit.modules())


# -- accounting: every multiply, checked against torch.utils.flop_counter ----------------------------

def test_user_model_accounting_names_every_multiply(in_user_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "info", "--arch", "limpq_test_usernet:build", "--input-size", "16", "--num-classes", "10",
                 "--json", "--cross-check"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in info["layers"]}
    width, tokens = 16, 8 * 8
    assert rows["grouped.0"]["macs"] == width * width * 9 // 4 * tokens  # grouped conv: exact
    assert rows["se.fc1"]["macs"] == width * 4  # squeeze-excite on a pooled vector: one token
    assert rows["tokens"]["macs"] == tokens * width * width  # a Linear over T tokens: T * in * out
    assert rows["attention.in_proj"]["macs"] == tokens * width * 3 * width  # the packed in_proj_weight
    assert rows["attention.out_proj"]["macs"] == tokens * width * width
    assert rows["attention.in_proj"]["status"] == rows["attention.out_proj"]["status"] == "searchable"
    assert rows["stem.0"]["status"] == rows["head"]["status"] == "fixed"
    # q @ k^T and attn @ v over both heads, both operands at the output projection's activation bits
    assert rows["attention"] == {"name": "attention", "kind": "attention", "macs": 2 * tokens * tokens * width,
                                 "params": 0, "status": "searchable", "quantized_with": "attention.out_proj"}
    totals = info["totals"]
    assert totals["total_macs"] == totals["searchable_macs"] + totals["fixed_macs"] + totals["float_macs"]
    assert totals["total_macs"] == flop_counter_macs(_raw_user_model(), 16)  # the user's own module, unswapped
    assert totals["flop_counter_macs"] == totals["total_macs"]  # --cross-check: the swapped model, as it runs
    assert totals["float_macs"] == 0 and totals["quantized_share"] == 1.0
    # the search's BitOps count the attention products at the tied layer's activation bits
    costs = cost_table("limpq_test_usernet:build", 16, num_classes=10)
    out_proj = next(layer for layer in costs.searchable if layer.name == "attention.out_proj")
    assert out_proj.act_macs == rows["attention"]["macs"]
    assert out_proj.bitops(4, 2) == rows["attention.out_proj"]["macs"] * 4 * 2 + out_proj.act_macs * 2 * 2


@pytest.mark.parametrize("arch, size, kwargs", [("vit_b_16", 32, {"image_size": 32}), ("swin_t", 32, {})])
def test_transformer_totals_match_flop_counter(arch: str, size: int, kwargs: dict) -> None:
    original = models.get_model(arch, num_classes=10, **kwargs)
    reference = flop_counter_macs(original, size)
    trace = trace_model(make_weights_explicit(original), size)
    assert abs(trace.total_macs - reference) <= 0.02 * reference
    assert {op.kind for op in trace.float_ops} == ({"attention"} if arch.startswith("vit") else {"matmul"})
    costs = costs_from_layers(list(trace.layers), float_ops=trace.float_ops)
    assert costs.total_macs == trace.total_macs
    assert costs.float_macs == 0 and costs.quantized_share == 1.0  # every attention product is tied to a layer


def test_flop_counter_sees_no_attention_on_cpu_without_its_formula() -> None:
    """Why flop_counter_macs registers torch's own attention formula for the CPU kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 2, 8, 4)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 0


# -- everything that multiplies weights is quantized: each quantizer is on the forward path -----------

def _quantizers_on_forward_path(model: nn.Module, size: int) -> None:
    """Joint model at uniform 4 bits, eval and no_grad (as scoring runs it; torch's fused attention
    paths would run then): a forward pass of the whole model calls every searchable layer's module, and
    changing its weight or input step size changes what that call computes. (Its own output, not the
    logits: a ReLU after an all-negative layer, or a head initialised at zero, hides any change.)"""
    model.eval()
    set_uniform_bits(model, 4)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    layers = searchable_modules(model)
    assert layers
    calls: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            calls.setdefault(name, (inputs[0], output))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in layers]
    with torch.no_grad():
        model(images)  # initialise the step sizes
        calls.clear()
        model(images)
        for handle in handles:
            handle.remove()
        for name, module in layers:
            assert name in calls, f"{name} is not called in the model's forward"
            inputs, output = calls[name]
            if not inputs.any():  # a dead ReLU before it: with a zero input no weight can matter
                inputs = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(1))
                output = module(inputs)
            for quantizer in (module.weight_quant, module.act_quant):
                assert _changes(quantizer, functools.partial(module, inputs), output), f"{name} {quantizer.kind}"
        for name, tie in layout_of(model).operand_quant_of.items():
            _operand_quantizers_on_forward_path(model, images, name, tie)


def _operand_quantizers_on_forward_path(model: nn.Module, images: torch.Tensor, name: str, tie: str) -> None:
    """The attention products' operands: changing the step size of q, k, the attention weights or v
    changes what the products compute (the tied projection's input)."""
    attention, projection = model.get_submodule(name), model.get_submodule(tie)
    arguments: list = []
    products: list[torch.Tensor] = []

    def record_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments.append((args, kwargs))

    def record_products(module: nn.Module, inputs: tuple) -> None:
        products.append(inputs[0])

    handles = [attention.register_forward_pre_hook(record_call, with_kwargs=True),
               projection.register_forward_pre_hook(record_products)]
    model(images)
    handles[0].remove()
    args, kwargs = arguments[0]

    def recompute() -> torch.Tensor:
        attention(*args, **kwargs)
        return products[-1]

    operands = attention.operand_quant
    reference = recompute()
    for operand in ("probs", "v"):
        assert _changes(getattr(operands, operand), recompute, reference), f"{name} {operand}"
    # a random model's attention weights are all near 1 / tokens and round to one 4-bit level, which no
    # change of q or k alters: those two are checked with the weights' own quantizer passing through
    operands.probs.active_bits = None
    reference = recompute()
    for operand in ("q", "k"):
        assert _changes(getattr(operands, operand), recompute, reference), f"{name} {operand}"
    operands.probs.active_bits = 4
    handles[1].remove()


def _changes(quantizer, compute, reference: torch.Tensor) -> bool:
    """Whether a larger step size at 4 bits (3 s + 0.01: a step initialised at 0 moves too) changes what
    `compute()` returns."""
    step = quantizer.step["4"]
    kept = step.detach().clone()
    step.mul_(3.0).add_(0.01)
    changed = not torch.equal(compute(), reference)
    step.copy_(kept)
    return changed


@pytest.mark.parametrize("factory", ["build", "build_encoder"])
def test_user_model_quantizers_are_on_the_forward_path(factory: str, in_user_dir: Path) -> None:
    model = build_model(f"limpq_test_usernet:{factory}", 10)
    quantize_model(model, bits=[4, 2], input_size=16)
    names = set(layout_of(model).searchable)
    attention = "attention" if factory == "build" else "encoder.layers.0.self_attn"
    assert {"grouped.0", "se.fc1", "se.fc2", "tokens", f"{attention}.in_proj", f"{attention}.out_proj"} <= names
    _quantizers_on_forward_path(model, 16)


@pytest.mark.parametrize("arch, size, kwargs", [("vit_b_16", 16, {"image_size": 16}), ("swin_t", 32, {})])
def test_transformer_quantizers_are_on_the_forward_path(arch: str, size: int, kwargs: dict) -> None:
    model = build_model(arch, 10, kwargs=kwargs)
    quantize_model(model, bits=[4, 2], input_size=size)
    searchable = [module for _, module in searchable_modules(model)]
    projections = [name for name in layout_of(model).searchable if name.endswith(("in_proj", "out_proj", "qkv", "proj"))]
    assert len(projections) == 24  # 12 blocks (vit_b_16, swin_t) x 2
    assert all(isinstance(module, (QConv2d, QLinear)) for module in searchable)
    _quantizers_on_forward_path(model, size)


def test_fine_tuning_model_runs_attention_products_at_the_tied_layers_bits(in_user_dir: Path, tmp_path: Path) -> None:
    """At a fixed policy the attention's operands take its output projection's activation bits; the ONNX
    QDQ export quantizes them there too (ONNX Runtime computes what PyTorch does) and records them."""
    fp = build_model("limpq_test_usernet:build", 10)
    joint = copy.deepcopy(fp)
    quantize_model(joint, bits=[4, 3, 2], input_size=16)
    policy = {name: (4, 4) for name in layout_of(joint).searchable}
    policy["attention.out_proj"] = (4, 2)
    tuned = copy.deepcopy(fp)
    quantize_model(tuned, policy=policy, input_size=16)
    assert [q.bits for q in tuned.attention.operand_quant.quantizers()] == [(2,)] * 4
    images = torch.randn(8, 3, 16, 16)
    export = export_onnx(tuned, images, tmp_path / "usernet.onnx")
    operands = {q.operand: q for q in export.quantized if q.layer == "attention" and q.kind == "act"}
    assert set(operands) == {"q", "k", "probs", "v"} and {q.bits for q in operands.values()} == {2}
    assert not operands["probs"].signed and operands["probs"].onnx_type == "UINT4"  # softmax output
    agreement = compare_with_torch(tuned, export.path, [(images, torch.zeros(8, dtype=torch.long))])
    assert agreement.agreement == 1.0 and agreement.max_logit_diff < 1e-3, agreement.summary()


TINY_TRANSFORMERS = {  # torchvision's own ViT and swin classes, small enough to export in seconds
    "vit": (lambda: VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                      mlp_dim=32, num_classes=10), 16),
    "swin": (lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                     window_size=[2, 2], num_classes=10), 32),
}


@pytest.mark.parametrize("kind", list(TINY_TRANSFORMERS))
def test_torchvision_attention_products_export_to_onnx_and_agree(kind: str, tmp_path: Path) -> None:
    """A ViT (nn.MultiheadAttention made explicit) and a swin (its window attention) at a fixed policy:
    every attention's q, k, probs and v are QDQ pairs at the output projection's activation bits, and
    ONNX Runtime computes what PyTorch does."""
    build, size = TINY_TRANSFORMERS[kind]
    torch.manual_seed(0)
    model = make_weights_explicit(build())
    for parameter in model.parameters():  # torchvision starts a ViT's head at zero: logits would all be 0
        if parameter.dim() > 1 and not parameter.any():
            nn.init.normal_(parameter, std=0.02)
    joint = copy.deepcopy(model)
    quantize_model(joint, bits=[4, 2], input_size=size)
    policy = {name: (4, 3) for name in layout_of(joint).searchable}
    quantize_model(model, policy=policy, input_size=size)
    images = torch.randn(4, 3, size, size)
    export = export_onnx(model, images, tmp_path / f"{kind}.onnx")
    attentions = {q.layer for q in export.quantized if q.operand}
    assert attentions and attentions == set(layout_of(model).operand_quant_of)
    assert {(q.operand, q.bits) for q in export.quantized if q.operand} == {(o, 3) for o in ("q", "k", "probs", "v")}
    with torch.no_grad():
        assert model.eval()(images).std() > 0
    agreement = compare_with_torch(model, export.path, [(images, torch.zeros(4, dtype=torch.long))])
    assert agreement.agreement == 1.0 and agreement.max_logit_diff < 1e-3, agreement.summary()


def test_random_pass_draws_for_token_wise_linears_only(in_user_dir: Path) -> None:
    """A Linear over tokens is a 1x1 convolution and draws; a Linear on a pooled vector (the
    squeeze-excite) keeps the last uniform pass's bits, as the classifier does in CNNs."""
    model = build_model("limpq_test_usernet:build", 10)
    quantize_model(model, bits=[4, 3, 2], input_size=16)
    assert layout_of(model).token_wise == {"tokens", "attention.in_proj", "attention.out_proj"}
    policies = [random_policy(model, [4, 3, 2], random.Random(seed)) for seed in range(20)]
    assert all(policy["se.fc1"] == policy["se.fc2"] == (2, 2) for policy in policies)
    for name in ("grouped.0", "tokens", "attention.in_proj"):
        assert len({policy[name] for policy in policies}) == 3, name


# -- a user's model by import path: errors, checkpoints, the quantized share --------------------------

def _config(directory: Path, arch: str, data: Path, **model) -> Path:
    raw = tiny_raw(directory, data, "usernet", model={"arch": arch, **model}, fp={"epochs": 1, "train_fraction": 1.0},
                   indicators={"bits": [4, 3, 2]}, search={"budgets": [{"target_wbits": 3, "target_abits": 3}]},
                   finetune={"baselines": [3], "bn_recalibration_batches": 2})
    return write_config(directory / f"{arch.replace(':', '-')}.yaml", raw)


BAD_MODELS = [
    ("limpq_no_such_module:build", "model.arch: no module named 'limpq_no_such_module' (looked in "),
    ("limpq_test_broken_import:build", ("model.arch: importing limpq_test_broken_import failed: ModuleNotFoundError: "
                                        "No module named 'limpq_no_such_dependency' (at limpq_test_broken_import.py:1)")),
    ("limpq_test_usernet:missing", "model.arch: limpq_test_usernet has no attribute 'missing'"),
    ("limpq_test_usernet:not_a_module", ("model.arch: limpq_test_usernet:not_a_module returned a dict, not a "
                                         "torch.nn.Module")),
    ("limpq_test_usernet:fails_at_16", ("model.input_size: limpq_test_usernet:fails_at_16 does not run at 16x16 "
                                        "(RuntimeError: mat1 and mat2 shapes cannot be multiplied")),
    ("limpq_test_usernet:stem_and_head", ("model.fixed_layers: limpq_test_usernet:stem_and_head's only Conv2d/Linear "
                                          "layers are the first convolution and the classifier (0, 3)")),
    ("limpq_test_usernet:build", "model.arch: limpq_test_usernet:build(num_classes=10, depth=3) raised TypeError: "),
]


@pytest.mark.parametrize("arch, message", BAD_MODELS, ids=[arch for arch, _ in BAD_MODELS])
def test_bad_user_models_are_one_line_before_ray(arch: str, message: str, in_user_dir: Path, digits_slice: Path,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kwargs = {"kwargs": {"depth": 3}} if message.endswith("TypeError: ") else {}
    config = _config(tmp_path, arch, digits_slice, **kwargs)
    for command in (["config", "validate", str(config)], ["run", "--config", str(config)]):
        assert main(command) == 2
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and captured.err.startswith(f"limpq: error: {message}"), captured.err
        assert "Traceback" not in captured.err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


def test_quantized_share_is_printed_warned_and_enforced(in_user_dir: Path, digits_slice: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(_config(tmp_path, "limpq_test_usernet:build", digits_slice))]) == 0
    captured = capsys.readouterr()
    assert "quantized share: 100.00%" in captured.out and "warning" not in captured.err
    config = _config(tmp_path, "limpq_test_usernet:mostly_float", digits_slice, min_quantized_share=0.0)
    assert main(["config", "validate", str(config)]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: ") and "stay in float" in captured.err and "(model) (matmul)" in captured.err
    config = _config(tmp_path, "limpq_test_usernet:mostly_float", digits_slice)  # default minimum 0.9
    assert main(["config", "validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("limpq: error: model.min_quantized_share: only ") and err.count("\n") == 1
    assert "in float: (model) (matmul)" in err


def test_user_checkpoint_with_multihead_attention_weights_loads(in_user_dir: Path, digits_slice: Path,
                                                                tmp_path: Path) -> None:
    """`fp.checkpoint` holding the user's own module's state dict (nn.MultiheadAttention's packed keys)."""
    from orchestrator.checks.preflight import preflight
    from orchestrator.train.stages import initial_fp_model

    original = _raw_user_model().eval()
    torch.save(original.state_dict(), tmp_path / "mine.pt")
    config = _config(tmp_path, "limpq_test_usernet:build", digits_slice)
    cfg = preflight(load_config(config, {"fp.source": "checkpoint", "fp.checkpoint": str(tmp_path / "mine.pt")})).config
    model = initial_fp_model(cfg.model, cfg.fp, cfg.seed).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), original(images))
    restore_model(build_model("limpq_test_usernet:build", 10), original.state_dict(), "mine.pt")


def test_user_model_source_is_part_of_its_identity(in_user_dir: Path) -> None:
    digest = source_digest("limpq_test_usernet:build")
    assert digest and digest == source_digest("limpq_test_usernet:build_encoder")  # one file, one digest
    model = build_model("limpq_test_usernet:build", 10)
    assert model_code_paths(model) == [str(in_user_dir / "limpq_test_usernet.py")]


def test_model_check_runs_every_stage_or_names_the_one_that_fails(in_user_dir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "check", "--arch", "limpq_test_usernet:build", "--input-size", "16", "--json"]) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["passed"] == list(STAGES) and check["failed"] is None and check["quantized_share"] == 1.0
    assert main(["model", "check", "--arch", "limpq_test_usernet:fails_at_16", "--input-size", "16"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("trace          FAILED RuntimeError: mat1 and mat2 shapes cannot be multiplied")


# -- the whole pipeline from the user's directory -------------------------------------------------

@pytest.mark.timeout(2400)
def test_user_model_runs_the_pipeline_from_its_directory(user_dir: Path, digits_slice: Path, tmp_path: Path) -> None:
    """`limpq run` started where `limpq_test_usernet.py` lives (not on PYTHONPATH): the FP model built and
    logged by the driver, joint training in Ray Train workers, one-shot scoring in a Ray Tune trial; the
    logged model loads elsewhere."""
    # the smallest run that still has every process import the module: an untrained FP model (FP
    # training would build it in a Ray Train worker as joint training does), one searched budget
    raw = tiny_raw(tmp_path, digits_slice, "usernet", model={"arch": "limpq_test_usernet:build"},
                   indicators={"bits": [4, 3, 2]}, search={"budgets": [{"target_wbits": 3, "target_abits": 3}]},
                   finetune={"bn_recalibration_batches": 2})
    config = write_config(tmp_path / "usernet.yaml", raw)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    limpq = Path(sys.executable).with_name("limpq")
    result = subprocess.run([str(limpq), "run", "--config", str(config)], cwd=user_dir, env=env, capture_output=True,
                            text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    indicators = json.loads(next((tmp_path / "runs" / "usernet").rglob("indicators.json")).read_text())
    names = [layer["name"] for layer in indicators["layers"]]
    assert {"grouped.0", "se.fc1", "tokens", "attention.in_proj", "attention.out_proj"} <= set(names)
    assert indicators["model"] == "limpq_test_usernet:build"
    policy = json.loads(next(path for path in (tmp_path / "runs" / "usernet").rglob("policy.json")
                             if path.parent.name == "W3A3").read_text())
    assert [layer["name"] for layer in policy["layers"]] == names
    assert policy["bitops_g_total"] == policy["bitops_g_with_fixed"]  # nothing left in float
    # the registered model loads in a fresh process that cannot import the user's module
    script = ("import sys, mlflow, torch\n"
              f"mlflow.set_tracking_uri('sqlite:///{tmp_path / 'mlflow.db'}')\n"
              "model = mlflow.pytorch.load_model('models:/usernet-limpq_test_usernet.build@budget-w3a3').eval()\n"
              "print(type(model).__module__, tuple(model(torch.zeros(1, 3, 16, 16)).shape))\n")
    clean_env = {key: value for key, value in env.items() if key != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=clean_env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split()[-3:] == ["limpq_test_usernet", "(1,", "10)"]


# -- one model per torchvision family through every stage, in-process -------------------------------

FAMILIES = [  # the smallest variant of each family, at the smallest input it accepts
    ("resnet18", 16, {}), ("mobilenet_v3_small", 16, {}), ("efficientnet_b0", 16, {}), ("regnet_x_400mf", 16, {}),
    ("convnext_tiny", 32, {}), ("shufflenet_v2_x0_5", 16, {}), ("densenet121", 32, {}), ("googlenet", 16, {}),
    ("vit_b_16", 16, {"image_size": 16}), ("swin_t", 32, {}),
]


@pytest.mark.parametrize("arch, size, kwargs", FAMILIES, ids=[arch for arch, _, _ in FAMILIES])
def test_each_family_goes_through_every_stage(arch: str, size: int, kwargs: dict) -> None:
    check = check_model_stages(stage_check_config(arch, size, kwargs=kwargs))
    assert check.ok, f"{check.failed}: {check.error}"
    assert check.passed == list(STAGES) and check.quantized_share >= 0.95 and check.policy_bitops_g > 0


HEAVIER = [("inception_v3", 75, {}), ("maxvit_t", 224, {}), ("swin_v2_t", 32, {}), ("mnasnet0_5", 16, {}),
           ("squeezenet1_0", 32, {}), ("alexnet", 64, {}), ("vgg11_bn", 32, {}), ("vit_b_32", 32, {"image_size": 32})]


@pytest.mark.slow
@pytest.mark.parametrize("arch, size, kwargs", HEAVIER, ids=[arch for arch, _, _ in HEAVIER])
def test_other_families_go_through_every_stage(arch: str, size: int, kwargs: dict) -> None:
    check = check_model_stages(stage_check_config(arch, size, kwargs=kwargs))
    assert check.ok, f"{check.failed}: {check.error}"
    assert check.quantized_share >= 0.95
