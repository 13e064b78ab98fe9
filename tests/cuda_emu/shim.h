// A CPU stand-in for the CUDA C the CUDA backend generates, so its kernels can
// be compiled with a host C++ compiler and run by tests/cuda.rs on machines
// without a GPU. One block runs at a time, its threads as OS threads
// (`__syncthreads` is a barrier); `__shared__` variables are function statics,
// shared by the threads of that block. Grid-stride loops cover any size with
// one block, so the emulation runs a grid of one block, except for reductions
// to a scalar, whose blocks (three) run one after the other.
#include <cmath>
#include <cstring>
#include <pthread.h>
using namespace std;

struct lossc_dim3 { unsigned x, y, z; };
static thread_local lossc_dim3 threadIdx = {0, 0, 0};
static thread_local lossc_dim3 blockDim = {1, 1, 1};
static thread_local lossc_dim3 blockIdx = {0, 0, 0};
static thread_local lossc_dim3 gridDim = {1, 1, 1};
static pthread_barrier_t lossc_emu_barrier;

extern "C" void lossc_emu_begin(unsigned threads) {
    pthread_barrier_init(&lossc_emu_barrier, 0, threads);
}
extern "C" void lossc_emu_end() { pthread_barrier_destroy(&lossc_emu_barrier); }
extern "C" void lossc_emu_thread(unsigned x, unsigned y, unsigned bx, unsigned by,
                                 unsigned block, unsigned grid) {
    threadIdx = {x, y, 0};
    blockDim = {bx, by, 1};
    blockIdx = {block, 0, 0};
    gridDim = {grid, 1, 1};
}
static inline void __threadfence() { __sync_synchronize(); }
static inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    return __sync_fetch_and_add(a, v);
}
static inline void __syncthreads() { pthread_barrier_wait(&lossc_emu_barrier); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
static inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c,
                                           unsigned long long v) {
    return __sync_val_compare_and_swap(a, c, v);
}
