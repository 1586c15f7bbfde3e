// LIPFAST_CPU_CLONES: compile a function three times (AVX-512, AVX2+FMA, baseline) with GCC's
// target_clones and pick the copy for the running CPU at load time, so a portable wheel still vectorises.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LIPFAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LIPFAST_CPU_CLONES
#endif
