// Runs a compiled kernel over its grid the way MTLComputeCommandEncoder::dispatchThreads does
// (non-uniform threadgroups: the last group along an axis may be partial), one thread at a time.
//
// Usage: prog KERNEL_NAME DIR GX GY GZ TX TY TZ N_IN OUT_BYTES...
//   DIR/buf{i}.bin for i < N_IN hold the buffers [[buffer(i)]] in MLX's order (inputs with their
//   _shape/_strides/_ndim extras); outputs follow as buffers N_IN.. and are written to
//   DIR/buf{N_IN + j}.bin.
// The grid runs twice, ascending then descending thread order, over outputs pre-filled with
// 0xFF then 0x00 bytes.  Both runs must give identical bytes: this fails on any output element
// no thread writes, and on any result that depends on the order threads run in.  Every buffer
// is its own exact-size allocation, so AddressSanitizer reports out-of-bounds accesses.
// Modelled thread attributes: those in ThreadInfo.  Not modelled (the harness refuses kernels
// that name them): the size/index of a partial threadgroup, SIMD- and quad-group attributes.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

struct ThreadInfo {
  uint3 thread_position_in_grid;
  uint3 thread_position_in_threadgroup;
  uint3 threadgroup_position_in_grid;
  uint3 threads_per_grid;
  uint3 threadgroups_per_grid;
};

typedef std::function<void(void** bufs, const ThreadInfo& t)> ThreadFn;

struct KernelEntry {
  const char* name;
  ThreadFn fn;
};

static std::vector<char> read_file(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    std::fprintf(stderr, "cannot open %s\n", path.c_str());
    std::exit(2);
  }
  std::vector<char> data;
  char chunk[65536];
  size_t n;
  while ((n = std::fread(chunk, 1, sizeof(chunk), f)) > 0)
    data.insert(data.end(), chunk, chunk + n);
  std::fclose(f);
  return data;
}

static void run_grid(const ThreadFn& fn, void** bufs, uint3 grid, uint3 tg, bool reverse) {
  // MLX dispatches with threadgroup = min(requested, grid) on each axis.
  tg = {std::min(tg.x, grid.x), std::min(tg.y, grid.y), std::min(tg.z, grid.z)};
  uint3 groups = {(grid.x + tg.x - 1) / tg.x, (grid.y + tg.y - 1) / tg.y,
                  (grid.z + tg.z - 1) / tg.z};
  uint64_t total = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t n = 0; n < total; ++n) {
    uint64_t idx = reverse ? total - 1 - n : n;
    uint3 pos = {uint(idx % grid.x), uint(idx / grid.x % grid.y), uint(idx / grid.x / grid.y)};
    ThreadInfo t;
    t.thread_position_in_grid = pos;
    t.thread_position_in_threadgroup = {pos.x % tg.x, pos.y % tg.y, pos.z % tg.z};
    t.threadgroup_position_in_grid = {pos.x / tg.x, pos.y / tg.y, pos.z / tg.z};
    t.threads_per_grid = grid;
    t.threadgroups_per_grid = groups;
    fn(bufs, t);
  }
}

static int driver_main(int argc, char** argv, const KernelEntry* entries, int n_entries) {
  if (argc < 10) {
    std::fprintf(stderr, "usage: %s KERNEL DIR GX GY GZ TX TY TZ N_IN OUT_BYTES...\n", argv[0]);
    return 2;
  }
  const KernelEntry* entry = nullptr;
  for (int i = 0; i < n_entries; ++i)
    if (std::strcmp(entries[i].name, argv[1]) == 0) entry = &entries[i];
  if (!entry) {
    std::fprintf(stderr, "kernel %s was not compiled into this program\n", argv[1]);
    return 2;
  }
  std::string dir = argv[2];
  uint3 grid = {uint(std::atoi(argv[3])), uint(std::atoi(argv[4])), uint(std::atoi(argv[5]))};
  uint3 tg = {uint(std::atoi(argv[6])), uint(std::atoi(argv[7])), uint(std::atoi(argv[8]))};
  int n_in = std::atoi(argv[9]);
  int n_out = argc - 10;

  std::vector<void*> bufs(n_in + n_out);
  for (int i = 0; i < n_in; ++i) {
    std::vector<char> data = read_file(dir + "/buf" + std::to_string(i) + ".bin");
    bufs[i] = std::malloc(std::max<size_t>(data.size(), 1));
    std::memcpy(bufs[i], data.data(), data.size());
  }
  std::vector<size_t> out_bytes(n_out);
  std::vector<std::vector<char>> first(n_out);
  for (int j = 0; j < n_out; ++j) {
    out_bytes[j] = std::strtoull(argv[10 + j], nullptr, 10);
    bufs[n_in + j] = std::malloc(std::max<size_t>(out_bytes[j], 1));
  }
  for (int pass = 0; pass < 2; ++pass) {
    for (int j = 0; j < n_out; ++j)
      std::memset(bufs[n_in + j], pass == 0 ? 0xFF : 0x00, out_bytes[j]);
    run_grid(entry->fn, bufs.data(), grid, tg, /*reverse=*/pass == 1);
    for (int j = 0; j < n_out; ++j) {
      const char* out = static_cast<const char*>(bufs[n_in + j]);
      if (pass == 0) {
        first[j].assign(out, out + out_bytes[j]);
        continue;
      }
      for (size_t b = 0; b < out_bytes[j]; ++b) {
        if (first[j][b] != out[b]) {
          std::fprintf(stderr,
                       "output %d byte %zu differs between the two runs: an element no thread "
                       "writes, or a result that depends on thread order\n", j, b);
          return 3;
        }
      }
    }
  }
  for (int j = 0; j < n_out; ++j) {
    std::string path = dir + "/buf" + std::to_string(n_in + j) + ".bin";
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(bufs[n_in + j], 1, out_bytes[j], f) != out_bytes[j]) {
      std::fprintf(stderr, "cannot write %s\n", path.c_str());
      return 2;
    }
    std::fclose(f);
  }
  for (void* b : bufs) std::free(b);
  return 0;
}
