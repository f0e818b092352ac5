// CPU decode kernels (at::parallel_for over slots and channel groups / heads; fp32 math).
#pragma once

#include "../common/decode_params.h"

// Hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time by the
// dynamic loader (GCC function multi-versioning), so the extension is fast on the build machine and
// still runs on an older x86 CPU. Other compilers or targets get the baseline build only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MEGA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MEGA_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define MEGA_CPU_CLONES
#define MEGA_ALWAYS_INLINE inline
#endif

namespace megalodon::cpu {

// TimestepNorm (+ CEMA when p.cema_h is set) for every row; see TsnCemaParams.
void tsn_cema_step(const TsnCemaParams& p);

// KV append and attention over each slot's current chunk (allocates its own scratch).
void attention_decode(const AttentionDecodeParams& p);

}  // namespace megalodon::cpu
