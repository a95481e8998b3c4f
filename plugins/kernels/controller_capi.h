/*
 * The CLADA threshold controller (runtime/include/clada/controller.hpp) behind the kernel
 * library's C ABI, for runtimes that reach the library through a foreign-function
 * interface: the Python GPU runtime's decode loop calls it between CUDA-graph replays
 * (clada_export/runtime/native_controller.py), where the Python controller's per-step host
 * time would otherwise sit between two GPU steps. Same decisions, bit for bit: it is the
 * header's controller, compiled with -ffp-contract=off.
 *
 * Layouts as in the header: thresholds and act_stats [L, B, 2] row-major, profile tables
 * [L, S]. Functions return 0 or a negative code; the message of the last failure of a
 * create call is written to `error`.
 */
#ifndef CLADA_CONTROLLER_CAPI_H_
#define CLADA_CONTROLLER_CAPI_H_

#include <stddef.h>
#include <stdint.h>

/* as in sparse_mlp.h, which this header does not include: it needs no CUDA headers */
#ifndef CLADA_API
#if defined(_WIN32)
#define CLADA_API __declspec(dllexport)
#else
#define CLADA_API __attribute__((visibility("default")))
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct clada_controller clada_controller;

/* clada::ControllerConfig; has_* = 0 leaves the optional field unset (its default rule). */
typedef struct {
  int window, min_history, easy_steps, payback_steps;
  double high, high_margin, low, low_margin, dense_offset, sparse_offset, max_correction;
  double scale_min, scale_max, prefix_strength;
  int has_min_sparsity, has_max_sparsity, has_target;
  double min_sparsity, max_sparsity, target;
} clada_controller_config;

/* clada::StepRecord without the thresholds; state: 0 normal, 1 denser, 2 sparser. */
typedef struct {
  int64_t step, token;
  int32_t seq, has_token, has_load, state;
  double surprisal, entropy, load, target, realized, debt, t_in_mean, t_mid_mean;
} clada_controller_record;

/* gated_mlp: the profile's MLP form (nonzero: gated, whose input sparsity weighs 2 in byte
 * sparsity; 0: plain, weight 1). */
CLADA_API clada_controller* clada_controller_create(int layers, int num_levels, const double* levels,
                                                    const double* t_in, const double* t_mid,
                                                    const double* calib_mean_abs, const double* s_in,
                                                    const double* s_mid, double target_sparsity, int gated_mlp,
                                                    const clada_controller_config* config, int batch, char* error,
                                                    size_t error_len);
CLADA_API void clada_controller_destroy(clada_controller* c);
/* The generation's target and the bounds of a step's target (after the default rules). */
CLADA_API int clada_controller_targets(const clada_controller* c, double* target, double* min_sparsity,
                                       double* max_sparsity);
/* act_stats [L, B, 2] or NULL; out [L, B, 2]. */
CLADA_API int clada_controller_begin(clada_controller* c, const double* act_stats, float* out);
/* surprisal, entropy [B]; tokens [B] or NULL; active [B] (nonzero: generating) or NULL;
 * out [L, B, 2]; records [B]: the decision of each active sequence (others untouched). */
CLADA_API int clada_controller_step(clada_controller* c, const double* surprisal, const double* entropy,
                                    const int64_t* tokens, const uint8_t* active, float* out,
                                    clada_controller_record* records);
/* Per sequence: mean realized sparsity (NaN before a step), steps, denser and sparser steps. */
CLADA_API int clada_controller_stats(const clada_controller* c, double* mean_sparsity, int64_t* steps,
                                     int64_t* denser, int64_t* sparser);

#ifdef __cplusplus
}
#endif

#endif /* CLADA_CONTROLLER_CAPI_H_ */
