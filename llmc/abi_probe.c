/*
The translation unit that `make lib` compiles: it includes a train_gpt2.c unmodified
(ours by default, or a user's via LLMC_SRC) and adds one exported function that
reports the struct layout the compiler actually chose. The harness checks it against
its own cffi declaration before it trusts any pointer it reads out of a GPT2 struct.
*/
#ifndef LLMC_SOURCE
#define LLMC_SOURCE "train_gpt2.c"
#endif
#include LLMC_SOURCE

#include <stddef.h>

#define LLMC_ABI_FIELDS 25
// out[0..3]: sizeof GPT2Config, ParameterTensors, ActivationTensors, GPT2;
// out[4..24]: offsetof each GPT2 field, in declaration order. Returns the count.
int llmc_abi_layout(size_t* out) {
    size_t layout[LLMC_ABI_FIELDS] = {
        sizeof(GPT2Config), sizeof(ParameterTensors), sizeof(ActivationTensors), sizeof(GPT2),
        offsetof(GPT2, config), offsetof(GPT2, params), offsetof(GPT2, param_sizes),
        offsetof(GPT2, params_memory), offsetof(GPT2, num_parameters), offsetof(GPT2, grads),
        offsetof(GPT2, grads_memory), offsetof(GPT2, m_memory), offsetof(GPT2, v_memory),
        offsetof(GPT2, acts), offsetof(GPT2, act_sizes), offsetof(GPT2, acts_memory),
        offsetof(GPT2, num_activations), offsetof(GPT2, grads_acts),
        offsetof(GPT2, grads_acts_memory), offsetof(GPT2, batch_size), offsetof(GPT2, seq_len),
        offsetof(GPT2, inputs), offsetof(GPT2, targets), offsetof(GPT2, mean_loss),
        0,
    };
    layout[24] = LLMC_ABI_FIELDS;
    for (int i = 0; i < LLMC_ABI_FIELDS; i++) { out[i] = layout[i]; }
    return LLMC_ABI_FIELDS;
}

// What the compiler assumed about floating point when it built this translation unit,
// as bits: 1 = -ffinite-math-only (NaN and Inf assumed absent: a NaN loss can pass the
// `mean_loss == -1.0f` guard), 2 = -ffast-math (reassociation, FTZ/DAZ at load),
// 4 = OpenMP. The harness reports it and guards the C's exit() paths accordingly.
int llmc_build_features(void) {
    int f = 0;
#if defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__
    f |= 1;
#endif
#ifdef __FAST_MATH__
    f |= 2;
#endif
#ifdef _OPENMP
    f |= 4;
#endif
    return f;
}

// Sets the floating-point environment (a fenv_t the harness saved) in every thread of a
// parallel team of the current size. The OpenMP runtime can be shared with another
// library in the process (torch ships a libgomp.so.1 of the same soname): its worker
// threads keep whatever environment they were last given, so the harness gives them the
// C's before a call and the caller's back after it, as it does for its own thread.
#include <fenv.h>
void llmc_set_team_fenv(const void* env) {
#ifdef _OPENMP
    #pragma omp parallel
    { fesetenv((const fenv_t*)env); }
#else
    fesetenv((const fenv_t*)env);
#endif
}
