"""Accelerator chips: dense peak TFLOP/s by math mode and compute capability. The one table of chip
peaks: the trainer reads its MFU peak from it, the planner's GPU profiles name a chip and take their
peaks from it.

Math modes: "bf16" (bf16 and fp16 tensors: tensor cores), "tf32" (fp32 tensors with TF32 matmuls
switched on, torch's `allow_tf32`), "fp32" (fp32 tensors, TF32 off: the plain FP32 units).
"""

from __future__ import annotations

# vendor data sheets, SXM parts, dense (no sparsity)
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "V100": {"bf16": 125.0, "fp32": 15.7},  # fp16 tensor cores; no bf16 or TF32 units
}
COMPUTE_CAPABILITY = {"H200": 9.0, "H100": 9.0, "A100": 8.0, "L40S": 8.9, "A10": 8.6, "V100": 7.0}
MATH_MODES = ("bf16", "tf32", "fp32")


def math_mode(dtype, tf32: bool) -> str:
    """The math mode GEMMs of this dtype (a torch dtype or its name) run in."""
    name = str(dtype).replace("torch.", "")
    if name in ("bfloat16", "float16", "bf16", "fp16"):
        return "bf16"
    return "tf32" if tf32 else "fp32"


def chip_of(device_name: str) -> str | None:
    """The chip of a device name ('NVIDIA A100-SXM4-40GB' -> 'A100'); None if unknown."""
    return next((k for k in PEAK_TFLOPS if k in device_name), None)


def chip_peak(chip: str, mode: str) -> float | None:
    return PEAK_TFLOPS.get(chip, {}).get(mode)


def default_tf32(chip: str | None) -> bool:
    """train.tf32 null: TF32 on for compute capability 8.0 (Ampere) and newer."""
    return chip is not None and COMPUTE_CAPABILITY.get(chip, 0.0) >= 8.0
