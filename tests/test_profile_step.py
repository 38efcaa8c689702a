"""benchmarks/profile_step.py's summaries: GPU kernel time by the convolution each kernel runs; CPU device time by
what each XLA:CPU operation computes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from profile_step import summarize, summarize_cpu  # noqa: E402

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


CPU_HLO = """
%fused_conv (p0: f32[2,8,8,4], p1: f32[3,3,4,8]) -> f32[2,8,8,8] {
  ROOT %c = f32[2,8,8,8]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

ENTRY %main (a: f32[2,8,8,4]) -> f32[2,8,8,8] {
  %ynn_fusion.1 = f32[2,8,8,8]{3,2,1,0} fusion(%a, %w), kind=kCustom, calls=%fused_conv, metadata={op_name="jit(f)/jvp()/conv_general_dilated"}
  %while.3 = (s32[], f32[2,7,7,4]{3,2,1,0}) while(%t), condition=%cond, body=%body, metadata={op_name="jit(f)/transpose(jvp())/cond/branch_0_fun/jit(_kernel_grad)/while"}
  %multiply_add_fusion.9 = f32[2,7,7,4]{3,2,1,0} fusion(%x), kind=kLoop, calls=%body_fusion, metadata={op_name="jit(f)/transpose(jvp())/jit(_kernel_grad)/while/body/add"}
  %all-reduce.5 = (f32[8]{0}) all-reduce(%g), to_apply=%sum, metadata={op_name="jit(f)/transpose(jvp())/(reduce_sum:jit(_kernel_grad)/reduce_sum)"}
  %transpose_copy_fusion.2 = f32[3,3,8,4]{3,2,1,0} fusion(%w), kind=kLoop, calls=%tc
  %select_select_fusion.4 = f32[2,8,8,8]{3,2,1,0} fusion(%y), kind=kLoop, calls=%ss, metadata={op_name="jit(f)/jvp()/erfc"}
  %negate_fusion.6 = f32[2,8,8,8]{3,2,1,0} fusion(%y), kind=kLoop, calls=%ng, metadata={op_name="jit(f)/transpose(jvp())/mul"}
  ROOT %multiply_add_fusion.7 = f32[3,3,4,8]{3,2,1,0} fusion(%w, %g), kind=kLoop, calls=%adam, metadata={op_name="jit(f)/mul"}
}
"""


def test_cpu_device_time_is_grouped_by_what_each_operation_computes():
    def op(name, ts, dur, tid=7):
        return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name}

    # One device thread from t=0 to t=1000 us over 2 steps; the while loop's body runs inside the loop.
    events = [op("ThunkExecutor::Execute", 0, 1000), op("ynn_fusion.1", 0, 100), op("while.3", 100, 200),
              op("multiply_add_fusion.9", 120, 50), op("all-reduce.5", 300, 80), op("Rendezvous", 310, 60),
              op("transpose_copy_fusion.2", 400, 40), op("select_select_fusion.4", 440, 30),
              op("negate_fusion.6", 470, 20), op("multiply_add_fusion.7", 490, 10),
              op("ynn_fusion.1", 995, 5),  # the thread's last event: its span is 1000 us
              op("ynn_fusion.1", 0, 1, tid=8)]  # a thread with a hundredth of the work is not a device
    rows = dict(summarize_cpu({"traceEvents": events}, CPU_HLO, steps=2))
    assert rows == {
        "dense convolutions traced (YNNPACK's; Eigen's dispatch)": 0.0525,
        "depthwise convolutions (depthwise.py: forward and both gradients)": 0.1,
        "all-reduce of the gradients (waiting for the other devices included)": 0.04,
        "layout transposes and copies": 0.02,
        "other forward-pass operations (GELU, GroupNorm, adds)": 0.015,
        "other backward-pass operations (GELU, GroupNorm, adds, reductions)": 0.01,
        "outside the loss: optimizer, EMA, noise": 0.005,
        "not covered by any event: Eigen's dense convolutions (and the gaps between steps)": 0.2575,
    }


def test_a_trace_without_cpu_operation_events_is_a_clear_error():
    with pytest.raises(SystemExit, match="no XLA:CPU operation events"):
        summarize_cpu({"traceEvents": [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5, "name": "PjitFunction"}]},
                      CPU_HLO, steps=1)
