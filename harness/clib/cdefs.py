"""The one cffi declaration of the C ABI: structs and exported functions of train_gpt2.c.

Field order is the ABI (see shared/spec/train_gpt2-reference.md). The harness binds our
own library and a user's build of llm.c's original through this same text, and checks it
against the layout the compiler chose (``llmc_abi_layout``) before trusting it.
"""

import re

from pyref.config import ACT_NAMES, PARAM_NAMES

# GPT2's fields in declaration order (the ABI): (C type, name, array length or None)
GPT2_STRUCT = (
    ("GPT2Config", "config", None),
    ("ParameterTensors", "params", None), ("size_t", "param_sizes", len(PARAM_NAMES)),
    ("float*", "params_memory", None), ("size_t", "num_parameters", None),
    ("ParameterTensors", "grads", None), ("float*", "grads_memory", None),
    ("float*", "m_memory", None), ("float*", "v_memory", None),
    ("ActivationTensors", "acts", None), ("size_t", "act_sizes", len(ACT_NAMES)),
    ("float*", "acts_memory", None), ("size_t", "num_activations", None),
    ("ActivationTensors", "grads_acts", None), ("float*", "grads_acts_memory", None),
    ("int", "batch_size", None), ("int", "seq_len", None), ("int*", "inputs", None),
    ("int*", "targets", None), ("float", "mean_loss", None),
)
# GPT2 fields in declaration order, as llmc_abi_layout reports their offsets
GPT2_FIELDS = tuple(name for _, name, _ in GPT2_STRUCT)


def _struct(name: str, fields) -> str:
    return "typedef struct {\n" + "".join(f"    {t} {n}{'' if k is None else f'[{k}]'};\n"
                                          for t, n, k in fields) + "} " + name + ";\n"


# every function the spec requires a library to export, declared as the C has it
_REQUIRED_FUNCTIONS = r"""
void encoder_forward(float* out, int* inp, float* wte, float* wpe, int B, int T, int C);
void encoder_backward(float* dwte, float* dwpe, float* dout, int* inp, int B, int T, int C);
void layernorm_forward(float* out, float* mean, float* rstd, float* inp, float* weight, float* bias, int B, int T, int C);
void layernorm_backward(float* dinp, float* dweight, float* dbias, float* dout, float* inp, float* weight, float* mean, float* rstd, int B, int T, int C);
void matmul_forward_naive(float* out, const float* inp, const float* weight, const float* bias, int B, int T, int C, int OC);
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int B, int T, int C, int OC);
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp, const float* weight, int B, int T, int C, int OC);
void attention_forward(float* out, float* preatt, float* att, float* inp, int B, int T, int C, int NH);
void attention_backward(float* dinp, float* dpreatt, float* datt, float* dout, float* inp, float* att, int B, int T, int C, int NH);
void gelu_forward(float* out, float* inp, int N);
void gelu_backward(float* dinp, float* inp, float* dout, int N);
void residual_forward(float* out, float* inp1, float* inp2, int N);
void residual_backward(float* dinp1, float* dinp2, float* dout, int N);
void softmax_forward(float* probs, float* logits, int B, int T, int V, int Vp);
void crossentropy_forward(float* losses, float* probs, int* targets, int B, int T, int Vp);
void crossentropy_softmax_backward(float* dlogits, float* dlosses, float* probs, int* targets, int B, int T, int V, int Vp);
void fill_in_parameter_sizes(size_t* param_sizes, GPT2Config config);
float* malloc_and_point_parameters(ParameterTensors* params, size_t* param_sizes);
void fill_in_activation_sizes(size_t* act_sizes, GPT2Config config, int B, int T);
float* malloc_and_point_activations(ActivationTensors* acts, size_t* act_sizes);
void gpt2_build_from_checkpoint(GPT2 *model, const char* checkpoint_path);
void gpt2_forward(GPT2 *model, int* inputs, int* targets, size_t B, size_t T);
void gpt2_zero_grad(GPT2 *model);
void gpt2_backward(GPT2 *model);
void gpt2_update(GPT2 *model, float learning_rate, float beta1, float beta2, float eps, float weight_decay, int t);
void gpt2_free(GPT2 *model);
"""
_OPTIONAL_FUNCTIONS = r"""
/* optional: present in libraries built by `make lib` (llmc/abi_probe.c) */
int llmc_abi_layout(size_t* out);
int llmc_build_features(void);
void llmc_set_team_fenv(const void* env);
/* optional: from the OpenMP runtime the library links */
void omp_set_num_threads(int n);
int omp_get_max_threads(void);
/* C stdio, to flush the library's printf output before we restore stdout */
int fflush(void* stream);
"""
_FUNCTIONS = _REQUIRED_FUNCTIONS + _OPTIONAL_FUNCTIONS
# the symbols a library must export: the names the declarations above give, in their order
REQUIRED_SYMBOLS = tuple(re.findall(r"^[^(]*?\b(\w+)\(", _REQUIRED_FUNCTIONS, re.M))

CDEF = (
    _struct("GPT2Config", [("int", n, None) for n in ("max_seq_len", "vocab_size", "padded_vocab_size",
                                                       "num_layers", "num_heads", "channels")])
    + _struct("ParameterTensors", [("float*", n, None) for n in PARAM_NAMES])
    + _struct("ActivationTensors", [("float*", n, None) for n in ACT_NAMES])
    + _struct("GPT2", GPT2_STRUCT)
    + _FUNCTIONS
)

