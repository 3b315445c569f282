"""Quality: attention error against unquantized attention, per configuration, on TNI data.

Data: ``oscar.synthetic.make_tni_kv`` (Llama-3.1-8B-like layer: 8 KV / 32 query heads,
head_dim 128, seq_len 1024, low-norm attention sinks taking 40% of the softmax mass). Metric: the
relative error of the attention output against float64 attention over the unquantized K/V,
``err = ||out_cfg - out_fp|| / ||out_fp||``, also given as SQNR ``-20 log10(err)`` dB.

Measured on the reference backend (seeds 0 / 1, R = 128, so the last 128 tokens stay exact):

=======================  ======================  ======================  ======================
config                   INT2 K / INT2 V         INT2 K / INT8 V         mean rel. key error
                                                                         on the sink tokens
=======================  ======================  ======================  ======================
KIVI-style               0.621 / 0.662 (4.1 dB)  0.461 / 0.475 (6.7 dB)  2.20 / 2.18
rotation only            0.537 / 0.546 (5.4 dB)  0.339 / 0.358 (9.4 dB)  2.19 / 2.21
scaling only             0.445 / 0.442 (7.0 dB)  0.188 / 0.193 (14.5 dB) 0.251 / 0.251
OScaR (default)          0.439 / 0.435 (7.2 dB)  0.170 / 0.173 (15.4 dB) 0.246 / 0.245
=======================  ======================  ======================  ======================

OScaR INT4 K/V: 0.088 / 0.087 (21.1 dB); INT8: 0.0052 / 0.0050 (45.7 dB).

KIVI / OScaR error ratio: 1.42 / 1.52 at INT2 K/V, 2.72 / 2.74 with INT8 values (which isolates
the keys, where TNI acts). The sinks show why: their 2-bit keys share groups with keys ~7x larger,
and KIVI reconstructs them with more than 100% relative error. On this data scaling-only is close
to the full method and rotation-only helps less: the synthetic sinks are not flat tokens, so the
"scaling-induced outlier" effect the paper reports for Qwen2.5-Omni does not show here.

Thresholds sit well below the measured margins (the data are seeded, so the numbers are
deterministic; the margins absorb legitimate changes in rounding or in the generator).
"""

import numpy as np
import pytest

import oscar
from oscar import synthetic
from oscar.reference import attention_dense

from helpers_reference import ABLATIONS

SEEDS = [0, 1]
SEQ_LEN = 1024
#: KIVI error / OScaR error at INT2 K/V must exceed this (measured 1.42, 1.52).
MIN_RATIO_INT2 = 1.25
#: The same with INT8 values, which isolates the key quantization (measured 2.72, 2.74).
MIN_RATIO_KEYS = 2.0
#: KIVI / OScaR relative key error on the sink tokens (measured 2.20 / 0.246 = 8.9).
MIN_RATIO_SINK_KEYS = 4.0


def _rel_err(out, ref):
    return float(np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref))


def _db(err):
    return -20.0 * np.log10(err)


@pytest.fixture(scope="module", params=SEEDS, ids=lambda s: f"seed{s}")
def measured(request):
    """Errors per (config name, value bits) on one seeded synthetic layer."""
    data = synthetic.make_tni_kv(batch=1, num_kv_heads=8, num_q_heads=32, seq_len=SEQ_LEN,
                                 head_dim=128, seed=request.param)
    assert data.k.shape == data.v.shape == (1, 8, SEQ_LEN, 128)
    assert data.q.shape == (1, 32, 1, 128) and data.k.dtype == np.float32
    ref = attention_dense(data.q, data.k, data.v)
    sinks = np.asarray(data.sink_positions)
    attn, sink_key = {}, {}
    for name, kw in ABLATIONS.items():
        for value_bits in (2, 8):
            cache = oscar.quantize_kv(data.k, data.v, oscar.OScaRConfig(value_bits=value_bits,
                                                                        **kw))
            attn[name, value_bits] = _rel_err(oscar.decode_attention(data.q, cache), ref)
            if value_bits == 2:
                k_hat, _ = oscar.dequantize_kv(cache)
                rel = (np.linalg.norm(k_hat - data.k, axis=-1)
                       / np.linalg.norm(data.k, axis=-1))
                sink_key[name] = float(rel[..., sinks].mean())
    for bits in (4, 8):
        cache = oscar.quantize_kv(data.k, data.v, oscar.OScaRConfig(key_bits=bits,
                                                                    value_bits=bits))
        attn["oscar", f"int{bits}"] = _rel_err(oscar.decode_attention(data.q, cache), ref)
    return dict(seed=request.param, attn=attn, sink_key=sink_key, sinks=sinks)


def test_report(measured, record_property):
    # Recorded (junit properties; printed with -s) so the numbers can be compared across runs.
    lines = [f"seed {measured['seed']}: relative attention error (SQNR dB)"]
    for (name, vb), err in sorted(measured["attn"].items(), key=lambda kv: str(kv[0])):
        label = f"K2 V{vb}" if isinstance(vb, int) else f"K/V {vb}"
        lines.append(f"  {name:14s} {label:9s} {err:.4f} ({_db(err):5.2f} dB)")
        record_property(f"seed{measured['seed']}_{name}_v{vb}", round(err, 5))
    for name, e in measured["sink_key"].items():
        lines.append(f"  sink-token relative key error {name:14s} {e:.3f}")
    print("\n".join(lines))
    assert all(np.isfinite(e) for e in measured["attn"].values())


def test_sinks_land_in_the_quantized_part(measured):
    # otherwise the comparison would not exercise TNI at all
    assert measured["sinks"].max() < SEQ_LEN - 128 and 0 in measured["sinks"]


def test_oscar_beats_kivi_int2(measured):
    a = measured["attn"]
    assert a["kivi", 2] / a["oscar", 2] >= MIN_RATIO_INT2, a


def test_oscar_beats_kivi_on_keys(measured):
    a = measured["attn"]
    assert a["kivi", 8] / a["oscar", 8] >= MIN_RATIO_KEYS, a


def test_ablation_order(measured):
    a = measured["attn"]
    for vb in (2, 8):
        # each ingredient alone helps over KIVI; both together are at least as good as either
        assert a["oscar", vb] < a["rotation_only", vb] < a["kivi", vb], a
        assert a["scaling_only", vb] < a["kivi", vb], a
        assert a["oscar", vb] <= 1.02 * a["scaling_only", vb], a


def test_sink_keys_survive_scaling(measured):
    s = measured["sink_key"]
    assert s["kivi"] > 1.0  # KIVI: the sinks' keys are mostly lost (measured 2.2)
    assert s["kivi"] / s["oscar"] >= MIN_RATIO_SINK_KEYS, s


def test_more_bits_much_better(measured):
    a = measured["attn"]
    # measured 7.2 / 21.1 / 45.7 dB for INT2 / INT4 / INT8
    assert _db(a["oscar", "int4"]) >= _db(a["oscar", 2]) + 10
    assert _db(a["oscar", "int8"]) >= 35
