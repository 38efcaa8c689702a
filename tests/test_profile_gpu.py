"""benchmarks/profile_gpu.py's summary: GPU kernel time per step, by the convolution each kernel runs."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from profile_gpu import summarize  # noqa: E402

HLO = """
  %cudnn-conv-bw-filter.7 = (f32[64,7,7,1]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), window={size=7x7 pad=3_3x3_3}, dim_labels=b01f_o01i->b01f, feature_group_count=64, custom_call_target="__cudnn$convBackwardFilter"
  ROOT %cudnn-conv.3 = (f32[2,8,8,16]{3,2,1,0}, u8[0]{0}) custom-call(%c, %d), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward"
  %fusion.1 = f32[] fusion(%e), kind=kInput, calls=%f
"""


def _trace(events, device="/device:GPU:0"):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": device}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    return {"traceEvents": meta + events}


def test_kernel_time_is_grouped_by_convolution_kind_per_step():
    k = lambda name, op, dur, pid=1: {"ph": "X", "pid": pid, "tid": 1, "ts": 0, "dur": dur, "name": name,
                                      "args": {"hlo_op": op}}
    events = [k("sm80_xmma_wgrad", "cudnn-conv-bw-filter.7", 3000), k("tensorTransform", "cudnn-conv-bw-filter.7", 1000),
              k("sm90_xmma_fprop", "cudnn-conv.3", 500), k("input_reduce_fusion", "fusion.1", 200),
              k("memcpy32_post", "", 100), k("PjitFunction", "", 99999, pid=2)]  # host events do not count
    rows = dict(summarize(_trace(events), HLO, steps=2))
    assert rows == {"depthwise conv, weight gradient": 2.0, "dense conv, forward": 0.25,
                    "XLA reductions": 0.1, "other": 0.05}


def test_a_trace_without_gpu_events_is_a_clear_error():
    with pytest.raises(SystemExit, match="no GPU device events"):
        summarize(_trace([], device="/host:CPU"), HLO, steps=1)
