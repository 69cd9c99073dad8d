"""Building blocks of the fast paths: mode switch, CPU flags, cache, workspace, packing."""

from __future__ import annotations

import copy
import pickle
import threading
import warnings

import pytest
import torch

import mono_quant.core.kernels.cpu as cpu
import mono_quant.core.kernels.fbgemm as fbgemm
import mono_quant.core.kernels.workspace as workspace_module
from mono_quant.core.kernels import fast_kernels_enabled, reference_kernels
from mono_quant.core.kernels.cache import KernelCache
from mono_quant.core.kernels.int4pack import (
    has_int4pack_mm,
    int4pack_group_size,
    int4pack_linear,
    pack_int4_weight,
)
from mono_quant.core.kernels.workspace import (
    release_workspaces,
    scale_rows_into,
    unpack_codes_into,
    workspace,
)
from mono_quant.core.packing import pack_bits
from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.quantize import dequantize, quantize
from mono_quant.core.spec import QuantSpec

BFLOAT16_EPS = torch.finfo(torch.bfloat16).eps

# ---------------------------------------------------------------------------------------------
# Mode switch


def test_reference_kernels_nests() -> None:
    before = fast_kernels_enabled()
    with reference_kernels():
        inside = fast_kernels_enabled()
        with reference_kernels():
            nested = fast_kernels_enabled()
        after_nested = fast_kernels_enabled()
    after = fast_kernels_enabled()

    assert before
    assert not inside
    assert not nested
    assert not after_nested
    assert after


def test_reference_kernels_per_thread() -> None:
    seen = []
    with reference_kernels():
        thread = threading.Thread(target=lambda: seen.append(fast_kernels_enabled()))
        thread.start()
        thread.join()

    assert seen == [True]


@pytest.mark.parametrize(
    ("value", "enabled"),
    [("reference", False), ("REFERENCE", False), ("auto", True), ("", True)],
    ids=["reference", "upper_case", "auto", "empty"],
)
def test_environment_switch(monkeypatch: pytest.MonkeyPatch, value: str, enabled: bool) -> None:
    monkeypatch.setenv("MONO_QUANT_KERNELS", value)

    assert fast_kernels_enabled() == enabled


# ---------------------------------------------------------------------------------------------
# CPU flags


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """Point the flag reader at a file the test writes; return a function that writes it."""

    def write(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(cpu, "_CPUINFO", path)
        cpu.cpu_flags.cache_clear()

    yield write
    cpu.cpu_flags.cache_clear()


def test_cpu_flags_vnni(cpuinfo) -> None:
    cpuinfo("processor\t: 0\nflags\t\t: fpu sse avx2 avx512_vnni avx512_bf16\n")

    assert cpu.has_vnni()
    assert cpu.has_native_bfloat16()


def test_cpu_flags_avx2_only(cpuinfo) -> None:
    cpuinfo("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")

    assert not cpu.has_vnni()
    assert not cpu.has_native_bfloat16()


def test_cpu_flags_missing_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_CPUINFO", tmp_path / "absent")
    cpu.cpu_flags.cache_clear()
    try:
        flags = cpu.cpu_flags()
    finally:
        cpu.cpu_flags.cache_clear()

    assert flags == frozenset()


# ---------------------------------------------------------------------------------------------
# Kernel cache


def test_cache_builds_once() -> None:
    cache = KernelCache()
    source = torch.ones(3)
    calls = []

    def build() -> int:
        calls.append(1)
        return len(calls)

    first = cache.get("kernel", (source, None), build)
    second = cache.get("kernel", (source, None), build)

    assert first == 1
    assert second == 1
    assert len(calls) == 1


def test_cache_rebuilds_after_in_place_write() -> None:
    cache = KernelCache()
    source = torch.ones(3)
    cache.get("kernel", (source,), lambda: "old")

    source.add_(1)

    assert cache.get("kernel", (source,), lambda: "new") == "new"


def test_cache_rebuilds_for_new_tensor() -> None:
    cache = KernelCache()
    cache.get("kernel", (torch.ones(3),), lambda: "old")

    assert cache.get("kernel", (torch.ones(3),), lambda: "new") == "new"


def test_cache_rebuilds_when_optional_source_appears() -> None:
    cache = KernelCache()
    codes = torch.ones(3)
    cache.get("kernel", (codes, None), lambda: "without bias")

    assert cache.get("kernel", (codes, torch.ones(1)), lambda: "with bias") == "with bias"


def test_cache_keeps_none_answer() -> None:
    cache = KernelCache()
    source = torch.ones(3)
    cache.get("kernel", (source,), lambda: None)

    assert cache.get("kernel", (source,), lambda: "rebuilt") is None


def test_cache_inference_tensors() -> None:
    cache = KernelCache()
    with torch.inference_mode():
        source = torch.ones(3)
    cache.get("kernel", (source,), lambda: "packed")

    assert cache.get("kernel", (source,), lambda: "rebuilt") == "packed"


@pytest.mark.parametrize(
    "duplicate",
    [
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(lambda cache: pickle.loads(pickle.dumps(cache)), id="pickle"),
    ],
)
def test_cache_copies_start_empty(duplicate) -> None:
    cache = KernelCache()
    cache.get("kernel", (torch.ones(3),), lambda: "packed")

    copied = duplicate(cache)

    assert len(cache) == 1
    assert len(copied) == 0


# ---------------------------------------------------------------------------------------------
# Workspace


def test_workspace_reuses_buffer() -> None:
    release_workspaces()
    first = workspace((4, 8), torch.float32, torch.device("cpu"))
    second = workspace((2, 3), torch.float32, torch.device("cpu"))
    other_dtype = workspace((2, 3), torch.bfloat16, torch.device("cpu"))

    assert first.data_ptr() == second.data_ptr()
    assert other_dtype.data_ptr() != first.data_ptr()
    assert second.shape == (2, 3)
    assert second.is_contiguous()


def test_workspace_grows() -> None:
    release_workspaces()
    small = workspace((4,), torch.float32, torch.device("cpu"))
    large = workspace((1000,), torch.float32, torch.device("cpu"))
    again = workspace((4,), torch.float32, torch.device("cpu"))

    assert large.numel() == 1000
    assert again.data_ptr() == large.data_ptr()
    assert small.numel() == 4


@pytest.mark.parametrize("little_endian", [True, False], ids=["spread", "strided"])
@pytest.mark.parametrize("width", [2, 4], ids=["2bit", "4bit"])
@pytest.mark.parametrize("offset", [0, -8], ids=["unsigned", "signed"])
def test_unpack_codes_into(
    width: int, offset: int, little_endian: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The strided branch serves big-endian machines; both must give the same values.
    monkeypatch.setattr(workspace_module, "_LITTLE_ENDIAN", little_endian)
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**width, (6, 32), generator=generator)
    out = torch.empty(6, 32)

    unpack_codes_into(out, pack_bits(codes, width), width, offset)

    assert torch.equal(out, (codes + offset).float())


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(QuantSpec(bits=8, granularity="per_tensor"), id="per_tensor"),
        pytest.param(QuantSpec(bits=8, granularity="per_channel"), id="per_channel"),
        pytest.param(QuantSpec(bits=8, symmetric=False, granularity="per_channel"), id="affine"),
        pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=32), id="g32"),
        pytest.param(
            QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=32),
            id="affine_g32",
        ),
    ],
)
@pytest.mark.parametrize("columns", [96, 100], ids=["even_groups", "ragged_groups"])
def test_scale_rows_into_equals_dequantize(spec: QuantSpec, columns: int) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(12, columns, generator=generator)
    scale, zero_point = choose_qparams(*min_max(weight, spec), spec)
    codes = quantize(weight, scale, zero_point, spec)
    out = codes.float()

    group_size = spec.group_size if spec.granularity == "per_group" else None
    scale_rows_into(out, scale, None if spec.symmetric else zero_point, group_size)

    assert torch.equal(out, dequantize(codes, scale, zero_point, spec))


# ---------------------------------------------------------------------------------------------
# fbgemm


needs_fbgemm = pytest.mark.skipif(not fbgemm.has_fbgemm_linear(), reason="no fbgemm linear")


@needs_fbgemm
def test_fbgemm_dynamic_range_exact() -> None:
    assert fbgemm.fbgemm_exact(127)


def test_fbgemm_static_needs_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fbgemm, "has_vnni", lambda: False)
    # The result is cached per engine, so clear it to keep this CPU's result out of the test.
    fbgemm._exact.cache_clear()
    try:
        exact = fbgemm.fbgemm_exact(255)
    finally:
        fbgemm._exact.cache_clear()

    assert not exact


@needs_fbgemm
def test_fbgemm_self_check_rejects_wrong_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def saturating(x, input_scale, input_zero_point, packed):
        # What an int16 pair sum does to large products: the magnitude is capped.
        exact = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x.contiguous(), input_scale, input_zero_point, packed
        )
        return exact.clamp(-1.0, 1.0)

    monkeypatch.setattr(fbgemm, "fbgemm_linear", saturating)
    fbgemm._self_check.cache_clear()
    try:
        accepted = fbgemm._self_check("test-engine", 255)
    finally:
        fbgemm._self_check.cache_clear()

    assert not accepted


def test_fbgemm_other_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fbgemm, "fbgemm_engine", lambda: None)

    codes = torch.zeros(4, 8, dtype=torch.int8)

    assert not fbgemm.fbgemm_exact(127)
    assert fbgemm.pack_int8_weight(codes, torch.ones(4), None, None) is None


@needs_fbgemm
def test_fbgemm_pack_rejects_wide_codes() -> None:
    codes = torch.zeros(4, 8, dtype=torch.int16)

    assert fbgemm.pack_int8_weight(codes, torch.ones(4), None, None) is None


@needs_fbgemm
def test_fbgemm_pack_emits_no_warning() -> None:
    codes = torch.randint(-128, 128, (8, 16), dtype=torch.int8)

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        packed = fbgemm.pack_int8_weight(codes, torch.rand(8) + 0.1, None, torch.zeros(8))

    assert packed is not None
    assert [str(record.message) for record in records] == []


# ---------------------------------------------------------------------------------------------
# int4 packing


@pytest.mark.parametrize(
    ("out_features", "in_features", "block", "expected"),
    [
        (32, 256, 32, 32),
        (32, 256, 128, 128),
        (32, 512, 512, 256),
        (32, 192, 96, 32),
        (32, 64, 16, None),
        (32, 100, 100, None),
        (24, 256, 32, None),
    ],
    ids=["g32", "g128", "row512", "g96", "g16", "row100", "out24"],
)
def test_int4pack_group_size(out_features, in_features, block, expected) -> None:
    assert int4pack_group_size(out_features, in_features, block) == expected


@pytest.mark.skipif(not has_int4pack_mm(), reason="no int4pack kernel")
def test_int4pack_rejects_out_of_range_codes() -> None:
    codes = torch.full((16, 32), 9, dtype=torch.int8)

    assert pack_int4_weight(codes, torch.ones(16, 1), None, 32) is None


@pytest.mark.skipif(not has_int4pack_mm(), reason="no int4pack kernel")
@pytest.mark.parametrize(
    ("bits", "zero_is_zero"), [(2, True), (3, True), (4, False)], ids=["2bit", "3bit", "4bit"]
)
def test_int4pack_affine_zero_term(bits: int, zero_is_zero: bool) -> None:
    spec = QuantSpec(bits=bits, symmetric=False, granularity="per_group", group_size=32)
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 64, generator=generator) + 0.3
    scale, zero_point = choose_qparams(*min_max(weight, spec), spec)
    codes = quantize(weight, scale, zero_point, spec)
    x = torch.randn(3, 64, generator=generator).to(torch.bfloat16)

    packed = pack_int4_weight(codes, scale, zero_point, 32)
    output = int4pack_linear(x, packed).float()

    expected = x.float() @ dequantize(codes, scale, zero_point, spec).T
    zeros = packed.scales_and_zeros[..., 1]
    assert bool((zeros == 0).all()) == zero_is_zero
    tolerance = 4 * BFLOAT16_EPS * (x.float().abs() @ weight.abs().T + expected.abs())
    assert bool(((output - expected).abs() <= tolerance).all())
