"""lora_lab.nf4 against the QLoRA paper's construction and against bitsandbytes, byte for byte."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab import nf4, nf4_fast

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    # bitsandbytes wraps its pure-PyTorch kernels in torch.compile; eager gives the same numbers without
    # compiling once per shape, which would take most of the suite's time budget.
    with torch._dynamo.config.patch(disable=True):
        yield


def bitsandbytes_functional():
    """``bitsandbytes.functional``, imported by each test that compares with it.

    bitsandbytes is a hard dependency, so a broken install fails those tests (and `test_bitsandbytes_imports`
    says why); it does not skip them, and the tests of lora_lab's own math run either way.
    """
    import bitsandbytes.functional

    return bitsandbytes.functional


def bnb_quantize(w, blocksize, quant_type="nf4", double_quant=True):
    packed, state = bitsandbytes_functional().quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                            compress_statistics=double_quant)
    return packed.reshape(-1), state


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantized weight.

    Its CPU C++ kernel assumes every row of the weight is a whole number of blocks (it indexes the scale as
    ``row * (cols // blocksize) + col // blocksize``); for other even row lengths it applies the wrong block's
    absmax. bitsandbytes' own pure-PyTorch kernel (the flat layout its quantizer and CUDA use) is then the
    reference; where the C++ kernel's assumption holds, both are compared.
    """
    bnb_functional = bitsandbytes_functional()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = _dequantize_4bit_compute(packed, absmax, state.code, state.blocksize, state.shape, state.dtype)
    cols = state.shape[-1]
    if cols % 2 or cols % state.blocksize == 0:
        torch.testing.assert_close(bnb_functional.dequantize_4bit(packed.reshape(-1, 1), state), flat,
                                   rtol=0, atol=0)
    return flat


def assert_matches_bnb(w, blocksize, quant_type="nf4", double_quant=True):
    packed, state = bnb_quantize(w, blocksize, quant_type, double_quant)
    q = nf4.quantize(w, quant_type, blocksize, double_quant)
    assert torch.equal(q.packed, packed)
    if double_quant:
        assert torch.equal(q.absmax, state.absmax) and torch.equal(q.offset, state.offset)
        assert torch.equal(q.nested_absmax, state.state2.absmax)
    else:
        assert torch.equal(q.absmax, state.absmax)
    # Exact equality, no tolerance: the same float32 products, rounded once to the same dtype.
    torch.testing.assert_close(q.dequantize(), bnb_dequantize(packed, state), rtol=0, atol=0)


def test_bitsandbytes_imports():
    try:
        bitsandbytes_functional()
    except Exception as err:  # ImportError, or a native library that fails to load
        pytest.fail(f"bitsandbytes does not import ({type(err).__name__}: {err}). It is a dependency of lora_lab "
                    "(the reference for NF4 and the second QLoRA backend): reinstall it with "
                    "pip install 'bitsandbytes>=0.45'.", pytrace=False)


# ------------------------------------------------------------------------------------------- codebooks


def test_nf4_codebook_is_built_from_normal_quantiles_and_equals_bitsandbytes():
    built = nf4.nf4_codebook()  # ndtri of float32 probabilities; nothing pasted
    assert torch.equal(built, bitsandbytes_functional().get_4bit_type("nf4", device="cpu"))


def test_nf4_codebook_has_7_negative_values_a_zero_and_8_positive():
    code = nf4.nf4_codebook()
    assert (code < 0).sum() == 7 and (code == 0).sum() == 1 and (code > 0).sum() == 8
    assert code.min() == -1 and code.max() == 1 and torch.all(code[1:] > code[:-1])


def test_nf4_offset_moves_the_inner_values():
    # A smaller offset puts the outermost quantile closer to the centre, so after dividing by it the
    # inner values grow; the ends stay at -1 and 1 and the count stays 7/1/8.
    narrow, default = nf4.nf4_codebook(0.9), nf4.nf4_codebook()
    assert torch.all(narrow[8:15] > default[8:15]) and narrow[0] == -1 and narrow[-1] == 1
    with pytest.raises(ValueError, match="offset"):
        nf4.nf4_codebook(1.0)


def test_fp4_codebook_equals_bitsandbytes():
    assert torch.equal(nf4.fp4_codebook(), bitsandbytes_functional().get_4bit_type("fp4", device="cpu"))


def test_int4_codebook_is_symmetric_k_over_7():
    code = nf4.int4_codebook()
    used = code[code >= -1]  # -8/7 is never chosen: |w / absmax| <= 1
    assert used.unique().numel() == 15 and torch.equal(used.sort().values, torch.arange(-7, 8) / 7)


def test_dynamic_map_equals_bitsandbytes_create_dynamic_map():
    assert torch.equal(nf4.dynamic_map(), bitsandbytes_functional().create_dynamic_map())


# ----------------------------------------------------------------------------------- rounding, packing


def test_nearest_code_matches_brute_force_argmin():
    code = nf4.nf4_codebook()
    x = torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    brute = (x[:, None] - code[None, :]).abs().argmin(dim=1)
    assert torch.equal(nf4.nearest_code(x, code).long(), brute)


def test_nearest_code_sends_a_tie_to_the_lower_level():
    code = nf4.nf4_codebook()
    midpoint = (code[7] + code[8]) / 2
    assert int(nf4.nearest_code(midpoint.reshape(1), code)) == 7


def test_thresholds_are_midpoints_and_ties_go_to_the_lower_code():
    code = nf4.nf4_codebook()
    mids = (code[:-1] + code[1:]) / 2
    assert torch.equal(nf4.nearest_code(mids, code).long(), torch.arange(15))
    above = torch.nextafter(mids, torch.ones(15))
    assert torch.equal(nf4.nearest_code(above, code).long(), torch.arange(1, 16))


def test_first_value_goes_in_the_high_nibble():
    codes = torch.tensor([3, 12, 15, 0], dtype=torch.uint8)
    assert nf4.pack_4bit(codes).tolist() == [3 << 4 | 12, 15 << 4 | 0]
    assert torch.equal(nf4.unpack_4bit(nf4.pack_4bit(codes), 4), codes.long())


def test_odd_count_is_padded_with_the_code_of_zero():
    q = nf4.quantize(torch.tensor([1.0, -1.0, 0.5]), blocksize=64, double_quant=False)
    assert q.packed[-1] & 0x0F == 7  # NF4's index of 0.0, as bitsandbytes pads the *value* 0


# ----------------------------------------------------------------------------------- vs bitsandbytes


@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_every_blocksize_matches_bitsandbytes(blocksize, quant_type, double_quant):
    torch.manual_seed(blocksize)
    w = torch.randn(37, 300) * 0.05  # 11,100 values: odd rows, partial last block for every blocksize
    assert_matches_bnb(w, blocksize, quant_type, double_quant)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_matches_bitsandbytes(dtype):
    torch.manual_seed(0)
    assert_matches_bnb(torch.randn(65, 129).to(dtype), 64)  # odd count, partial block


@st.composite
def weights(draw):
    shape = draw(st.sampled_from([(1,), (7,), (63,), (3, 5), (16, 64), (9, 130), (2, 3, 33), (300,)]))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["normal", "heavy", "zero_blocks", "on_thresholds"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    n = math.prod(shape)
    if kind == "normal":
        w = torch.randn(n, generator=g) * draw(st.sampled_from([1e-3, 0.02, 1.0, 300.0]))
    elif kind == "heavy":  # Student-t with 1 degree of freedom: a few huge outliers per block
        w = torch.randn(n, generator=g) / torch.randn(n, generator=g).abs().clamp(min=1e-3)
    elif kind == "zero_blocks":
        w = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.1)
    else:  # values exactly on the NF4 thresholds, with the block's absmax fixed at 1
        code = nf4.nf4_codebook()
        mids = (code[:-1] + code[1:]) / 2
        w = mids[torch.randint(0, 15, (n,), generator=g)]
        w[::32] = 1.0
    return w.reshape(shape).to(dtype), draw(st.sampled_from(nf4.BLOCKSIZES[:4])), draw(st.booleans())


@settings(max_examples=40, deadline=None)
@given(weights(), st.sampled_from(["nf4", "fp4"]))
def test_property_random_weights_match_bitsandbytes(case, quant_type):
    w, blocksize, double_quant = case
    assert_matches_bnb(w, blocksize, quant_type, double_quant)


# -------------------------------------------------------------------------- double quant, sizes, int4


def test_double_quant_subtracts_the_mean_and_keeps_absmax_close():
    torch.manual_seed(0)
    w = torch.randn(128, 512)
    plain, double = nf4.quantize_nf4(w, double_quant=False), nf4.quantize_nf4(w)
    assert torch.equal(double.offset, plain.absmax.mean())
    # 8-bit dynamic codes of values scaled into [-1, 1]: the relative step is at most ~1/2**6 near 1,
    # so an absmax of ~3 (after taking the mean ~3 back out) moves by far less than 1%.
    rel = (double.block_absmax() - plain.absmax).abs() / plain.absmax
    assert 0 < rel.max() < 0.01


def test_bits_per_param_is_4_5_without_and_4_127_with_double_quant():
    w = torch.randn(256, 256)  # 1,024 blocks of 64, 4 nested blocks of 256
    assert nf4.quantize_nf4(w, double_quant=False).bits_per_param == 4 + 32 / 64
    # 4 + 8/64 + 32/(64*256) as in QLoRA §3, plus the one float32 mean spread over all weights.
    assert nf4.quantize_nf4(w).bits_per_param == 4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel()


def test_int4_rounds_7w_over_absmax_to_an_integer():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q = nf4.quantize_int4(w, double_quant=False)
    absmax = w.abs().amax(dim=1, keepdim=True)
    # Random floats are never exactly half-way, so round-half-even and ties-down agree.
    torch.testing.assert_close(q.dequantize(), torch.round(7 * w / absmax) / 7 * absmax, rtol=1e-6, atol=1e-7)


def test_fused_binned_search_equals_the_readable_path():
    torch.manual_seed(0)
    w = torch.randn(4 * 64 * 7 + 5, dtype=torch.bfloat16)
    for quant_type in ("nf4", "fp4", "int4"):
        code = nf4.codebook(quant_type)
        fused = nf4_fast.fused_codes(w[:-5].reshape(-1, 64), *nf4_fast.bin_tables(code))
        assert all(torch.equal(a, b) for a, b in zip(nf4.quantize_blocks(w[:-5], code, 64), fused))


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])  # compare bit patterns, not values


@pytest.mark.parametrize("double_quant", [False, True])
def test_fused_dequantize_equals_the_readable_path_bit_for_bit(double_quant):
    torch.manual_seed(0)
    w = torch.randn(300 * 64 + 5)  # 300 full blocks: more than one nested block of 256, and a partial one
    q = nf4.quantize_nf4(w, double_quant=double_quant)
    readable = nf4.dequantize_blocks(q.packed, q.block_absmax(), q.code, 64, w.numel())[:300 * 64]
    for dtype in DTYPES:
        fused = nf4_fast.fused_dequantize(q.packed[: 300 * 32].reshape(300, 32), q.code, q.block_absmax()[:300], dtype,
                                      torch.tensor([4, 0], dtype=torch.int32).repeat(32))
        assert torch.equal(bits(fused.reshape(-1)), bits(readable.to(dtype)))


@pytest.mark.parametrize("kernel, dtype", [(nf4_fast.bf16_words, torch.bfloat16),
                                           (nf4_fast.float32_words, torch.float32)])
def test_word_kernels_equal_the_readable_path_bit_for_bit(kernel, dtype):
    torch.manual_seed(0)
    w = torch.randn(300 * 64) * torch.logspace(-30, 30, 300).repeat_interleave(64)  # scales far apart: rounding
    q = nf4.quantize_nf4(w)
    readable = nf4.dequantize_blocks(q.packed, q.block_absmax(), q.code, 64, w.numel()).to(dtype)
    words = kernel(q.packed.reshape(300, 32), q.code, q.block_absmax(),
                   torch.tensor(nf4_fast.WORD_CONSTANTS, dtype=torch.int32))
    assert torch.equal(bits(words.view(dtype).reshape(-1)), bits(readable))


@settings(max_examples=25, deadline=None)
@given(weights(), st.sampled_from(["nf4", "fp4", "int4"]), st.sampled_from(DTYPES))
def test_property_every_dequantize_path_gives_the_same_bits(case, quant_type, dtype):
    w, blocksize, double_quant = case
    q = nf4.quantize(w, quant_type, blocksize, double_quant)
    readable = nf4.dequantize(q, dtype, fast=False)
    for fast in (None, True):  # the eager byte table (small weights) and the fused kernel
        assert torch.equal(bits(nf4.dequantize(q, dtype, fast=fast)), bits(readable))
        out = torch.full(q.shape, float("nan"), dtype=dtype)  # every element must be written
        assert nf4.dequantize(q, fast=fast, out=out) is out and torch.equal(bits(out), bits(readable))
    assert torch.equal(nf4_fast.block_scales(q), q.block_absmax())


def test_dequantize_into_a_reused_buffer_overwrites_it_each_call():
    first, second = nf4.quantize_nf4(torch.randn(64, 128)), nf4.quantize_nf4(torch.randn(64, 128))
    out = torch.empty(64, 128)
    for fast in (False, None, True):
        nf4.dequantize(first, fast=fast, out=out)
        assert torch.equal(nf4.dequantize(second, fast=fast, out=out), second.dequantize())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_into_a_buffer_that_starts_at_an_odd_element(dtype):
    q = nf4.quantize_nf4(torch.randn(64, 128))
    out = torch.full((1 + 64 * 128,), float("nan"), dtype=dtype)[1:].view(64, 128)  # contiguous, odd offset
    nf4.dequantize(q, fast=True, out=out)
    assert torch.equal(bits(out), bits(nf4.dequantize(q, dtype, fast=False)))


@pytest.mark.parametrize("out, dtype, message", [
    (torch.empty(64, 127), None, "shape"),
    (torch.empty(64, 128, dtype=torch.float16), torch.bfloat16, "bfloat16"),
    (torch.empty(128, 64).T, None, "non-contiguous"),
    (torch.empty(64, 128, requires_grad=True), None, "requires grad"),
    (torch.empty(64, 128, dtype=torch.int32), None, "dtype"),
    (torch.empty(64, 128).numpy(), None, "torch.Tensor"),
])
def test_a_wrong_out_buffer_is_refused_and_left_untouched(out, dtype, message):
    q = nf4.quantize_nf4(torch.randn(64, 128))
    before = out.clone() if isinstance(out, torch.Tensor) else out.copy()
    with pytest.raises((ValueError, TypeError), match=message):
        nf4.dequantize(q, dtype, out=out)
    assert bits(torch.as_tensor(out).detach()).equal(bits(torch.as_tensor(before).detach()))


def test_byte_table_holds_both_nibbles_of_every_byte():
    code = nf4.nf4_codebook()
    table = nf4_fast.byte_table(code).view(256, 2)
    assert torch.equal(table[0x3C], torch.stack([code[3], code[12]]))
    assert torch.equal(table.reshape(-1), code[nf4.unpack_4bit(torch.arange(256, dtype=torch.uint8), 512)])


@pytest.mark.parametrize("shape", [(64, 128), (3, 5, 7), (257 * 64 + 3,)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_a_meta_weight_gets_the_shapes_and_dtypes_a_real_one_does(shape, double_quant):
    real = nf4.quantize_fp4(torch.randn(shape, dtype=torch.bfloat16), blocksize=128, double_quant=double_quant)
    meta = nf4.quantize_fp4(torch.empty(shape, dtype=torch.bfloat16, device="meta"), blocksize=128,
                            double_quant=double_quant)
    for name in ("packed", "absmax", "code", "offset", "nested_absmax", "nested_code"):
        a, b = getattr(real, name), getattr(meta, name)
        assert (a is None and b is None) or (a.shape == b.shape and a.dtype == b.dtype and b.is_meta), name
    assert (meta.shape, meta.dtype, meta.nbytes) == (real.shape, real.dtype, real.nbytes)
    back = meta.dequantize(torch.float16)
    assert back.is_meta and (back.shape, back.dtype) == (real.dequantize(torch.float16).shape, torch.float16)


def test_dequantize_returns_original_shape_and_dtype():
    q = nf4.quantize_nf4(torch.randn(3, 5, 7, dtype=torch.bfloat16))
    assert q.dequantize().shape == (3, 5, 7) and q.dequantize().dtype == torch.bfloat16
    assert q.dequantize(torch.float32).dtype == torch.float32 and q.numel == 105 and q.packed.numel() == 53


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(10)
    w[3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4.quantize_nf4(w)


@pytest.mark.parametrize("blocksize", [48, 16, 8192, 0, 64.0])
def test_blocksizes_bitsandbytes_refuses_are_refused(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize_nf4(torch.randn(128), blocksize=blocksize)


def test_empty_and_integer_weights_are_refused():
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize_nf4(torch.empty(0, 4))
    with pytest.raises(TypeError, match="float32"):
        nf4.quantize_nf4(torch.ones(4, dtype=torch.int32))


def test_packed_codes_that_do_not_fit_the_shape_are_refused():
    q = nf4.quantize_nf4(torch.randn(10, 10))
    with pytest.raises(ValueError, match="ceil"):
        nf4.QuantizedWeight(**{**q.__dict__, "shape": torch.Size([10, 12])})
    with pytest.raises(ValueError, match="one scale per block"):
        nf4.QuantizedWeight(**{**q.__dict__, "shape": torch.Size([10, 10]), "blocksize": 32})


def tampered(double_quant, **changes):
    """A state of a random weight with some of its tensors replaced (as a damaged file would give them)."""
    q = nf4.quantize_nf4(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), double_quant=double_quant)
    values = {k: v(q) if callable(v) else v for k, v in changes.items()}
    return lambda: nf4.dequantize(nf4.QuantizedWeight(**{**q.__dict__, **values}))


NAN = float("nan")


@pytest.mark.parametrize("make, match", [
    (tampered(False, absmax=lambda q: torch.full_like(q.absmax, NAN)), "absmax holds NaN"),
    (tampered(False, absmax=lambda q: -q.absmax), "negative"),
    (tampered(False, code=lambda q: torch.full_like(q.code, float("inf"))), "code holds NaN or inf"),
    (tampered(False, code=lambda q: q.code.to(torch.int32)), "code must be a floating-point"),
    (tampered(True, nested_absmax=lambda q: torch.full_like(q.nested_absmax, NAN)), "nested_absmax holds NaN"),
    (tampered(True, offset=torch.tensor(float("inf"))), "offset holds NaN or inf"),
    (tampered(True, nested_code=lambda q: torch.full_like(q.nested_code, NAN)), "nested_code holds NaN"),
    (tampered(True, nested_blocksize=0), "nested_blocksize"),
], ids=["nan-absmax", "negative-absmax", "inf-code", "int-code", "nan-nested-absmax", "inf-offset",
        "nan-nested-code", "zero-nested-blocksize"])
def test_a_tampered_state_is_refused_not_dequantized_to_nan(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_compiled_dequantize_kernel_gives_the_same_bits():
    # The other tests run the fused function eagerly (see the fixture above); this one compiles it once,
    # since a compiler could reorder the float32 multiply and add of the scale decoding.
    torch.manual_seed(0)
    q = nf4.quantize_nf4(torch.randn(300 * 64 + 5, dtype=torch.bfloat16))
    with torch._dynamo.config.patch(disable=False):
        fast = nf4.dequantize(q, fast=True)
    assert torch.equal(bits(fast), bits(nf4.dequantize(q, fast=False)))
