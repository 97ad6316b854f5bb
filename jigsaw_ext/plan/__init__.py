"""Plan a run before paying for it: per-rank communication, FLOPs and memory of any layout, read off
the model's own code on the meta device (jigsaw_ext.plan.trace), priced with a hardware profile
(jigsaw_ext.plan.hardware) by an explicit cost model (jigsaw_ext.plan.cost), ranked over every
layout of a world size (jigsaw_ext.plan.search). Knows nothing about weather: a model package
describes its model with a `PlanModel` (weathermixer.plan does for WeatherMixer)."""

from .trace import FakeGroup, StepTrace, fake_mesh, trace_step

__all__ = ["FakeGroup", "StepTrace", "fake_mesh", "trace_step"]
