"""Where our training step spends its time on the GPU: torch.profiler over steady-state steps.

`python -m benchmarks.system ... --profile` adds a `profile` object to the run's JSON:
    wall_s            wall time of the profiled steps (each ends with a device sync)
    gpu_busy_s        time during which at least one kernel or copy ran (union of their intervals)
    gpu_busy_frac     gpu_busy_s / wall_s: the rest is the GPU waiting on Python, launches or the host
    kernels_per_step  GPU operations (kernels, and the few copies and memsets) per optimizer step
    families          seconds of kernel time per family (4-bit dequantisation, matmul, attention, ...)
    top_kernels       the 15 kernels with the most time: [name, seconds, launches]
    host_s_per_step   seconds per step the host spent in each named span of the step (dpo/trainer.py's
                      dpo:data, dpo:forward, dpo:backward, dpo:metrics, dpo:clip, dpo:optimizer; nested
                      spans count in their parents too)
    idle_s_per_step   seconds per step the GPU sat idle, by the innermost span the host was in meanwhile
                      ("outside the step": the loop between steps): where the GPU waits on the host
    launch_sources    (--profile-stacks) the 25 host ops (aten::*) called most per step, each with the
                      Python frames that called it: [op, calls per step, stack]: where the launches come from
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict

FAMILIES = (  # first match wins; names lower-cased
    ("communication (NCCL)", ("nccl",)),
    ("4-bit dequantise", ("dequant",)),
    ("matmul", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "matmul", "wgmma")),
    ("attention", ("flash", "fmha", "attention", "efficient_attention")),
    ("copy/memset", ("memcpy", "memset", "copy_kernel")),
    ("softmax/log-softmax", ("softmax",)),
    ("fused (Triton)", ("triton",)),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other elementwise/reduction"


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """[start, end) intervals merged where they overlap or touch: disjoint, in order."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals."""
    return sum(end - start for start, end in merged(intervals))


OUTSIDE = "outside the step"


def idle_intervals(busy: list[tuple[float, float]], window: tuple[float, float]) -> list[tuple[float, float]]:
    """The parts of `window` that no busy interval covers, in order: the gaps between the merged busy spans."""
    lo, hi = window
    edges = [lo] + [t for span in merged(busy) for t in span] + [hi]
    gaps = zip(edges[0::2], edges[1::2])  # (before the first span), between spans, (after the last)
    return [(max(a, lo), min(b, hi)) for a, b in gaps if min(b, hi) > max(a, lo)]


def idle_by_region(busy: list[tuple[float, float]], regions: list[tuple[float, float, str]],
                   window: tuple[float, float]) -> dict[str, float]:
    """GPU idle time within `window`, by the innermost host region open meanwhile.

    busy: (start, end) of every kernel/copy; regions: (start, end, name) host spans, nested or disjoint.
    Time in no region counts under OUTSIDE. The values sum to the window's idle time.
    """
    idle = idle_intervals(busy, window)
    starts = [a for a, _ in idle]
    points = sorted({window[0], window[1], *(t for a, b in idle for t in (a, b)),
                     *(t for a, b, _ in regions for t in (a, b) if window[0] < t < window[1])})
    out: dict[str, float] = defaultdict(float)
    for a, b in zip(points, points[1:]):
        mid = (a + b) / 2
        i = bisect.bisect_right(starts, mid) - 1
        if i < 0 or not idle[i][0] <= mid < idle[i][1]:
            continue  # the GPU was busy
        covering = [(e - s, name) for s, e, name in regions if s <= mid < e]
        out[min(covering)[1] if covering else OUTSIDE] += b - a
    return dict(out)


class StepProfiler:
    """Call step() after every optimizer step; profiles `active` steps after `warmup` ones."""

    def __init__(self, warmup: int, active: int, out: dict, stacks: bool = False):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.skip, self.active, self.out, self.calls, self.t0 = max(warmup, 1), active, out, 0, None
        self.stacks = stacks
        self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=stacks,
                            schedule=schedule(wait=self.skip - 1, warmup=1, active=active, repeat=1),
                            on_trace_ready=self._summarise)
        self.prof.start()

    def step(self) -> None:
        if self.calls >= self.skip + self.active:
            return  # done and summarised
        self.calls += 1
        if self.calls == self.skip:
            self.t0 = time.perf_counter()
        if self.calls == self.skip + self.active:
            self.wall = time.perf_counter() - self.t0
        self.prof.step()
        if self.calls == self.skip + self.active:
            self.prof.stop()

    def _summarise(self, prof) -> None:
        from torch.autograd import DeviceType

        # GPU-timeline events, less the profiler's own annotations (ProfilerStep#N, Optimizer.step#...),
        # which span whole steps and are not work.
        events = prof.events()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith("dpo:")
                   and not getattr(e, "is_user_annotation", False) and "#" not in e.name]
        by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        families: dict[str, float] = defaultdict(float)
        for e in kernels:
            seconds = (e.time_range.end - e.time_range.start) / 1e6
            by_name[e.name][0] += seconds
            by_name[e.name][1] += 1
            families[family(e.name)] += seconds
        busy = union_length([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6
        wall = getattr(self, "wall", None) or busy
        top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
        self.out["profile"] = {
            "profiled_steps": self.active, "wall_s": wall, "gpu_busy_s": busy, "gpu_busy_frac": busy / wall,
            "kernel_time_s": sum(v[0] for v in by_name.values()), "kernels_per_step": len(kernels) / self.active,
            "families": dict(sorted(families.items(), key=lambda kv: -kv[1])),
            "top_kernels": [[name[:120], v[0], v[1]] for name, v in top],
        }
        self.out["profile"].update(host_and_idle(events, kernels, self.active))
        if self.stacks:
            self.out["profile"]["launch_sources"] = launch_sources(prof, self.active)


def host_and_idle(events, kernels, steps: int) -> dict:
    """host_s_per_step and idle_s_per_step (see the module's docstring) from the profile's events; the
    window is the profiled steps (the profiler's ProfilerStep spans on the host)."""
    from torch.autograd import DeviceType

    host = [e for e in events if e.device_type == DeviceType.CPU]
    steps_spans = [(e.time_range.start, e.time_range.end) for e in host if e.name.startswith("ProfilerStep")]
    regions = [(e.time_range.start, e.time_range.end, e.name) for e in host if e.name.startswith("dpo:")]
    if not steps_spans:
        return {}
    window = (min(a for a, _ in steps_spans), max(b for _, b in steps_spans))
    busy = [(e.time_range.start, e.time_range.end) for e in kernels]
    host_s: dict[str, float] = defaultdict(float)
    for a, b, name in regions:
        host_s[name] += (b - a) / 1e6 / steps
    idle = idle_by_region(busy, regions, window)
    return {"host_s_per_step": dict(sorted(host_s.items(), key=lambda kv: -kv[1])),
            "idle_s_per_step": {k: v / 1e6 / steps for k, v in sorted(idle.items(), key=lambda kv: -kv[1])}}


def launch_sources(prof, steps: int, top: int = 25) -> list:
    """The host ops called most often, grouped by the Python frames that called them (the profile's
    stacks, innermost first, site-packages paths cut to the package)."""
    rows = [e for e in prof.key_averages(group_by_stack_n=6) if e.key.startswith("aten::")]
    rows.sort(key=lambda e: -e.count)

    def short(frame: str) -> str:
        return frame.split("site-packages/")[-1].split("/work/")[-1][:110]
    return [[e.key, e.count / steps, [short(f) for f in e.stack]] for e in rows[:top]]
