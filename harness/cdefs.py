"""The one cffi declaration of the C ABI: structs and exported functions of train_gpt2.c.

Field order is the ABI (see shared/spec/train_gpt2-reference.md). The harness binds our
own library and a user's build of llm.c's original through this same text, and checks it
against the layout the compiler chose (``llmc_abi_layout``) before trusting it.
"""

CDEF = r"""
typedef struct {
    int max_seq_len;
    int vocab_size;
    int padded_vocab_size;
    int num_layers;
    int num_heads;
    int channels;
} GPT2Config;

typedef struct {
    float* wte; float* wpe; float* ln1w; float* ln1b; float* qkvw; float* qkvb;
    float* attprojw; float* attprojb; float* ln2w; float* ln2b; float* fcw; float* fcb;
    float* fcprojw; float* fcprojb; float* lnfw; float* lnfb;
} ParameterTensors;

typedef struct {
    float* encoded; float* ln1; float* ln1_mean; float* ln1_rstd; float* qkv; float* atty;
    float* preatt; float* att; float* attproj; float* residual2; float* ln2; float* ln2_mean;
    float* ln2_rstd; float* fch; float* fch_gelu; float* fcproj; float* residual3; float* lnf;
    float* lnf_mean; float* lnf_rstd; float* logits; float* probs; float* losses;
} ActivationTensors;

typedef struct {
    GPT2Config config;
    ParameterTensors params;
    size_t param_sizes[16];
    float* params_memory;
    size_t num_parameters;
    ParameterTensors grads;
    float* grads_memory;
    float* m_memory;
    float* v_memory;
    ActivationTensors acts;
    size_t act_sizes[23];
    float* acts_memory;
    size_t num_activations;
    ActivationTensors grads_acts;
    float* grads_acts_memory;
    int batch_size;
    int seq_len;
    int* inputs;
    int* targets;
    float mean_loss;
} GPT2;

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

# every symbol the spec requires a library to export
REQUIRED_SYMBOLS = (
    "encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
    "matmul_forward_naive", "matmul_forward", "matmul_backward", "attention_forward",
    "attention_backward", "gelu_forward", "gelu_backward", "residual_forward",
    "residual_backward", "softmax_forward", "crossentropy_forward",
    "crossentropy_softmax_backward", "fill_in_parameter_sizes", "malloc_and_point_parameters",
    "fill_in_activation_sizes", "malloc_and_point_activations", "gpt2_build_from_checkpoint",
    "gpt2_forward", "gpt2_zero_grad", "gpt2_backward", "gpt2_update", "gpt2_free",
)

# GPT2 fields in declaration order, as llmc_abi_layout reports their offsets
GPT2_FIELDS = (
    "config", "params", "param_sizes", "params_memory", "num_parameters", "grads",
    "grads_memory", "m_memory", "v_memory", "acts", "act_sizes", "acts_memory",
    "num_activations", "grads_acts", "grads_acts_memory", "batch_size", "seq_len",
    "inputs", "targets", "mean_loss",
)
