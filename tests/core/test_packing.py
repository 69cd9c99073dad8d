"""Tests for packing low-bit integer codes into uint8 bytes."""

from __future__ import annotations

import math
import re

import pytest
import torch

from mono_quant.core.packing import pack_bits, packed_numel, unpack_bits

BITS = [1, 2, 4, 8]

SHAPES = [
    pytest.param((), id="0d"),
    pytest.param((0,), id="empty"),
    pytest.param((2, 0, 3), id="empty_3d"),
    pytest.param((1,), id="1"),
    pytest.param((7,), id="7"),
    pytest.param((9,), id="9"),
    pytest.param((3, 5), id="3x5"),
    pytest.param((2, 3, 5), id="2x3x5"),
    pytest.param((13, 11), id="13x11"),
    pytest.param((1001,), id="1001"),
]


def random_codes(
    shape: tuple[int, ...], bits: int, seed: int, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Draw codes uniformly from [0, 2**bits - 1] with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=generator, dtype=dtype)


def reference_pack(values: list[int], bits: int) -> list[int]:
    """Pack Python ints one at a time: code i goes to bit offset i * bits, LSB first."""
    packed = [0] * ((len(values) * bits + 7) // 8)
    for index, value in enumerate(values):
        bit_offset = index * bits
        packed[bit_offset // 8] |= value << (bit_offset % 8)
    return packed


@pytest.mark.parametrize("bits", BITS, ids=lambda bits: f"bits{bits}")
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_shapes(shape: tuple[int, ...], bits: int) -> None:
    codes = random_codes(shape, bits, seed=1234 + bits)

    packed = pack_bits(codes, bits)
    unpacked = unpack_bits(packed, bits, codes.shape)

    assert packed.dtype == torch.uint8
    assert packed.dim() == 1
    assert unpacked.dtype == torch.uint8
    assert unpacked.shape == codes.shape
    assert torch.equal(unpacked.to(torch.int64), codes)


@pytest.mark.parametrize("bits", BITS, ids=lambda bits: f"bits{bits}")
@pytest.mark.parametrize(
    "make_view",
    [
        pytest.param(lambda codes: codes.t(), id="transpose"),
        pytest.param(lambda codes: codes[:, ::2], id="column_stride"),
        pytest.param(lambda codes: codes.t()[1:, :3], id="transpose_slice"),
    ],
)
def test_round_trip_non_contiguous(bits: int, make_view) -> None:
    view = make_view(random_codes((6, 9), bits, seed=99))
    assert not view.is_contiguous()

    unpacked = unpack_bits(pack_bits(view, bits), bits, view.shape)

    assert torch.equal(unpacked.to(torch.int64), view)


@pytest.mark.parametrize("bits", BITS, ids=lambda bits: f"bits{bits}")
def test_non_contiguous_packs_in_row_major(bits: int) -> None:
    view = random_codes((6, 9), bits, seed=7).t()

    assert torch.equal(pack_bits(view, bits), pack_bits(view.contiguous(), bits))


@pytest.mark.parametrize("bits", BITS, ids=lambda bits: f"bits{bits}")
def test_round_trip_every_code(bits: int) -> None:
    # Every value from 0 to 2**bits - 1 appears, so both ends of the range are covered.
    codes = torch.arange(1 << bits, dtype=torch.int64).flip(0)

    unpacked = unpack_bits(pack_bits(codes, bits), bits, codes.shape)

    assert torch.equal(unpacked.to(torch.int64), codes)


@pytest.mark.parametrize(
    "dtype",
    [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64],
    ids=lambda dtype: str(dtype).removeprefix("torch."),
)
@pytest.mark.parametrize("bits", BITS, ids=lambda bits: f"bits{bits}")
def test_round_trip_dtypes(dtype: torch.dtype, bits: int) -> None:
    # int8 stores codes up to 127 only, so 8-bit int8 codes stay in [0, 127].
    code_bits = 7 if (dtype == torch.int8 and bits == 8) else bits
    codes = random_codes((4, 7), code_bits, seed=5, dtype=dtype)

    unpacked = unpack_bits(pack_bits(codes, bits), bits, codes.shape)

    assert torch.equal(unpacked, codes.to(torch.uint8))


@pytest.mark.parametrize("bits", BITS, ids=lambda bits: f"bits{bits}")
@pytest.mark.parametrize("numel", [0, 1, 3, 8, 13, 64, 101])
def test_layout_matches_reference(bits: int, numel: int) -> None:
    codes = random_codes((numel,), bits, seed=2024 + numel)

    packed = pack_bits(codes, bits)

    assert packed.tolist() == reference_pack(codes.tolist(), bits)


def test_layout_docstring_example() -> None:
    four_bit = pack_bits(torch.tensor([3, 10]), bits=4)
    four_bit_padded = pack_bits(torch.tensor([3, 10, 7]), bits=4)
    two_bit = pack_bits(torch.tensor([1, 2, 3, 0]), bits=2)

    assert four_bit.tolist() == [0xA3]
    assert four_bit_padded.tolist() == [0xA3, 0x07]
    assert two_bit.tolist() == [0x39]


@pytest.mark.parametrize("bits", BITS, ids=lambda bits: f"bits{bits}")
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_length(shape: tuple[int, ...], bits: int) -> None:
    codes = random_codes(shape, bits, seed=3)
    expected_bytes = math.ceil(codes.numel() * bits / 8)

    assert pack_bits(codes, bits).numel() == expected_bytes
    assert packed_numel(codes.numel(), bits) == expected_bytes


def test_pack_returns_new_tensor() -> None:
    codes = random_codes((16,), 8, seed=11, dtype=torch.uint8)
    original = codes.clone()

    packed = pack_bits(codes, 8)
    packed.zero_()

    assert torch.equal(codes, original)


def test_signed_int4_round_trip() -> None:
    quant_min, quant_max = -8, 7
    generator = torch.Generator().manual_seed(42)
    signed = torch.randint(quant_min, quant_max + 1, (5, 7), generator=generator).to(torch.int8)

    packed = pack_bits(signed - quant_min, bits=4)
    restored = unpack_bits(packed, 4, signed.shape).to(torch.int8) + quant_min

    assert packed.numel() == math.ceil(signed.numel() / 2)
    assert restored.dtype == torch.int8
    assert torch.equal(restored, signed)


@pytest.mark.parametrize("bits", [0, 3, 16, -4, True], ids=lambda bits: f"bits_{bits}")
def test_invalid_bits(bits: int) -> None:
    codes = torch.zeros(4, dtype=torch.int64)
    packed = torch.zeros(1, dtype=torch.uint8)
    message = rf"bits={bits!r}.*\[1, 2, 4, 8\]"

    with pytest.raises(ValueError, match=message):
        pack_bits(codes, bits)
    with pytest.raises(ValueError, match=message):
        unpack_bits(packed, bits, (4,))
    with pytest.raises(ValueError, match=message):
        packed_numel(4, bits)


@pytest.mark.parametrize(
    ("bits", "values", "found"),
    [
        pytest.param(4, [0, 16, 3], "min=0 and max=16", id="above_max_bits4"),
        pytest.param(1, [0, 2], "min=0 and max=2", id="above_max_bits1"),
        pytest.param(4, [-8, 7], "min=-8 and max=7", id="signed_int4"),
        pytest.param(8, [-1, 255], "min=-1 and max=255", id="negative_bits8"),
    ],
)
def test_codes_out_of_range(bits: int, values: list[int], found: str) -> None:
    codes = torch.tensor(values, dtype=torch.int16)

    with pytest.raises(ValueError, match=found):
        pack_bits(codes, bits)
    with pytest.raises(ValueError, match="offset by -quant_min"):
        pack_bits(codes, bits)


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.bool],
    ids=lambda dtype: str(dtype).removeprefix("torch."),
)
def test_pack_rejects_dtype(dtype: torch.dtype) -> None:
    codes = torch.zeros(4, dtype=dtype)

    with pytest.raises(TypeError, match=re.escape(f"dtype {dtype}")):
        pack_bits(codes, 4)


def test_pack_rejects_non_tensor() -> None:
    with pytest.raises(TypeError, match=r"codes must be a torch\.Tensor"):
        pack_bits([1, 2, 3], 4)


@pytest.mark.parametrize(
    ("num_bytes", "bits", "shape"),
    [
        pytest.param(3, 4, (3,), id="too_many"),
        pytest.param(1, 4, (3,), id="too_few"),
        pytest.param(2, 8, (), id="scalar_extra"),
        pytest.param(1, 1, (0,), id="empty_extra"),
        pytest.param(2, 2, (3, 3), id="missing_last"),
    ],
)
def test_unpack_wrong_byte_count(num_bytes: int, bits: int, shape: tuple[int, ...]) -> None:
    packed = torch.zeros(num_bytes, dtype=torch.uint8)
    expected_bytes = math.ceil(math.prod(shape) * bits / 8)

    with pytest.raises(ValueError, match=rf"expected {expected_bytes} bytes.*got {num_bytes}"):
        unpack_bits(packed, bits, shape)


def test_unpack_rejects_dtype() -> None:
    packed = torch.zeros(2, dtype=torch.int32)

    with pytest.raises(TypeError, match=r"torch\.uint8, got torch\.int32"):
        unpack_bits(packed, 4, (4,))


def test_unpack_rejects_2d() -> None:
    packed = torch.zeros(2, 2, dtype=torch.uint8)

    with pytest.raises(ValueError, match=r"1-D, got shape \(2, 2\)"):
        unpack_bits(packed, 4, (8,))


def test_unpack_rejects_bad_shape() -> None:
    packed = torch.zeros(1, dtype=torch.uint8)

    with pytest.raises(ValueError, match="non-negative, got -2"):
        unpack_bits(packed, 4, (-2,))
    with pytest.raises(TypeError, match="must be an int, got float"):
        unpack_bits(packed, 4, (2.0,))


def test_packed_numel_rejects_negative() -> None:
    with pytest.raises(ValueError, match="numel must be non-negative, got -1"):
        packed_numel(-1, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", BITS, ids=lambda bits: f"bits{bits}")
def test_round_trip_cuda(bits: int) -> None:
    codes = random_codes((3, 17), bits, seed=8).cuda()

    packed = pack_bits(codes, bits)
    unpacked = unpack_bits(packed, bits, codes.shape)

    assert packed.device == codes.device
    assert unpacked.device == codes.device
    assert packed.cpu().tolist() == reference_pack(codes.flatten().tolist(), bits)
    assert torch.equal(unpacked.to(torch.int64), codes)
