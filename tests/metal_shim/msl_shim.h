// Just enough of the Metal Shading Language, as C++, to run a kernel body written for
// mx.fast.metal_kernel on the CPU: one call of the kernel function per grid position.
//
// Modelled: the address-space qualifiers (device, constant, thread: dropped, they only matter
// for where memory lives), `kernel`, uint/uint3, float16_t/half, bfloat16_t, the scalar float
// math of metal::, metal::precise:: and metal::fast::, and threadgroup memory with
// threadgroup_barrier: an array declared `threadgroup` in the kernel body becomes one static
// array shared by the threads of the group (the driver runs one group at a time, and its
// threads one at a time between barriers, so the sharing is exact); threadgroup_barrier is the
// driver's (driver.h).  The [[...]] attributes of the generated signature are ignored by g++
// (-Wno-attributes); the driver passes the values.
//
// Deliberately NOT modelled, so a kernel using them fails to compile here instead of being
// "verified" with the wrong semantics: SIMD-group and quad-group functions (simd_sum,
// simd_shuffle...), atomics, textures, vector types, threadgroup pointers (a `threadgroup T*`
// variable would become a static pointer, initialised once: use indices into the arrays).
#pragma once

// Every standard header the shim and driver.h use comes first: the macros below (thread,
// device, ...) would rewrite the library's own names.
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// driver.h's name for std::thread, which the `thread` macro below would break.
using OsThread = std::thread;

#define kernel
#define device
#define constant
#define thread
// Kernel-scope threadgroup arrays: one shared array per kernel (see above).  Not re-initialised
// between groups, as on a GPU, where threadgroup memory starts undefined.
#define threadgroup static

typedef unsigned int uint;

struct uint3 {
  uint x, y, z;
};

typedef _Float16 half;
typedef half float16_t;

// bfloat16: storage only; it converts to float exactly and from float with round-to-nearest-even.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) {
      bits = 0x7FC0;
    } else {
      bits = static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    }
  }
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat16_t bfloat;

namespace metal {

inline float tanh(float x) { return std::tanh(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float abs(float x) { return std::fabs(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
template <typename T> inline T max(T a, T b) { return a > b ? a : b; }
template <typename T> inline T min(T a, T b) { return a < b ? a : b; }
template <typename T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }

// On the GPU these differ from the default functions only in accuracy; here all are exact libm.
namespace precise {
using metal::exp;
using metal::log;
using metal::rsqrt;
using metal::sqrt;
using metal::tanh;
}  // namespace precise
namespace fast {
using metal::exp;
using metal::log;
using metal::rsqrt;
using metal::sqrt;
using metal::tanh;
}  // namespace fast

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
// Every thread of the group waits here until all have arrived (defined by the driver).
void threadgroup_barrier(mem_flags flags);

}  // namespace metal

// MLX prepends `using namespace metal;` to every custom kernel (its utils header does).
using namespace metal;
