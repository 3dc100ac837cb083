"""The C's numerical constants, and the float32 unit roundoff, in one place.

The kernels (pyref.numpy_kernels, pyref.torch_kernels) import them as module attributes
and read them at call time, so a test builds a mutant by patching a kernel module's copy.
"""
from __future__ import annotations

import math

LN_EPS = 1e-5                          # layernorm_forward: float eps = 1e-5f
GELU_COEF = 0.044715                   # gelu: 0.044715f
GELU_SCALING = math.sqrt(2.0 / math.pi)  # gelu: GELU_SCALING_FACTOR sqrtf(2.0f / M_PI)
ATT_MAXVAL_INIT = -10000.0             # attention_forward / softmax_forward: float maxval = -10000.0f
U = 2.0 ** -24                         # float32 unit roundoff: half an ulp at 1.0


class Held(float):
    """An AdamW setting as an optimizer holds it in double precision (torch's AdamW keeps
    ``betas=(0.9, 0.999)`` as Python floats), where it is the C's setting up to the C's
    ``float`` rounding: the same setting, which a float64 AdamW then uses as given, not as
    the C's float (1 - 0.9 and 1.0f - 0.9f differ by 2.4e-7 relative, more than an update's
    own rounding: judged as the C's floats, a correct torch AdamW would fail)."""
