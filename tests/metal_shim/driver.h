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
//
// Kernels with threadgroup_barrier run one threadgroup at a time, each thread of the group on
// an OS thread of its own, but only one of them running at any moment: the threads take turns
// in thread order (ascending in the first run, descending in the second) up to the next
// barrier; once every thread of the group has arrived, all continue, again in turn.  The order
// within each stretch between barriers is thus fixed and reversed between the runs, so a result
// that depends on it (a missing barrier, two threads writing one element) differs between the
// runs; a barrier that some threads of a group never reach is reported.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
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
  bool barriers;  // the source calls threadgroup_barrier: run its groups with GroupTurns
};

// The threads of one threadgroup, taking turns (see the top of this file).
struct GroupTurns {
  enum Phase { RUNNABLE, AT_BARRIER, FINISHED };
  std::mutex m;
  std::vector<std::condition_variable> turn;  // per slot: woken when its turn comes
  std::vector<int> order;    // thread slots in the order they take turns
  size_t pos = 0;            // order[pos] runs now
  std::vector<Phase> phase;  // per slot

  void wait_turn(int slot, std::unique_lock<std::mutex>& lock) {
    turn[slot].wait(lock, [&] {
      return pos < order.size() && order[pos] == slot && phase[slot] == RUNNABLE;
    });
  }
  // The running thread stops (at a barrier or finished): the next runnable slot goes, or, when
  // none is left, the barrier opens for all.
  void pass_turn(std::unique_lock<std::mutex>&) {
    size_t p = pos + 1;
    while (p < order.size() && phase[order[p]] != RUNNABLE) ++p;
    if (p == order.size()) {
      bool waiting = false, finished = false;
      for (Phase ph : phase) {
        waiting |= ph == AT_BARRIER;
        finished |= ph == FINISHED;
      }
      if (waiting && finished) {
        std::fprintf(stderr, "threadgroup_barrier not reached by every thread of the group\n");
        std::_Exit(4);
      }
      for (Phase& ph : phase)
        if (ph == AT_BARRIER) ph = RUNNABLE;
      p = 0;
      while (p < order.size() && phase[order[p]] != RUNNABLE) ++p;
    }
    pos = p;
    if (pos < order.size()) turn[order[pos]].notify_one();
  }
};

static thread_local GroupTurns* current_group = nullptr;
static thread_local int current_slot = -1;

namespace metal {
void threadgroup_barrier(mem_flags) {
  if (current_group == nullptr) {
    std::fprintf(stderr, "threadgroup_barrier outside a threadgroup run\n");
    std::_Exit(4);
  }
  std::unique_lock<std::mutex> lock(current_group->m);
  current_group->phase[current_slot] = GroupTurns::AT_BARRIER;
  current_group->pass_turn(lock);
  current_group->wait_turn(current_slot, lock);
}
}  // namespace metal

// One threadgroup of a barrier kernel: its threads (infos[slot]) taking turns.
static void run_group(const ThreadFn& fn, void** bufs, const std::vector<ThreadInfo>& infos,
                      bool reverse) {
  GroupTurns group;
  int n = int(infos.size());
  group.turn = std::vector<std::condition_variable>(n);
  group.phase.assign(n, GroupTurns::RUNNABLE);
  for (int k = 0; k < n; ++k) group.order.push_back(reverse ? n - 1 - k : k);
  std::vector<OsThread> threads;
  for (int slot = 0; slot < n; ++slot) {
    threads.emplace_back([&, slot] {
      current_group = &group;
      current_slot = slot;
      {
        std::unique_lock<std::mutex> lock(group.m);
        group.wait_turn(slot, lock);
      }
      fn(bufs, infos[slot]);
      std::unique_lock<std::mutex> lock(group.m);
      group.phase[slot] = GroupTurns::FINISHED;
      group.pass_turn(lock);
    });
  }
  for (OsThread& t : threads) t.join();
}

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

static void run_grid(const ThreadFn& fn, void** bufs, uint3 grid, uint3 tg, bool reverse,
                     bool barriers) {
  // MLX dispatches with threadgroup = min(requested, grid) on each axis.
  tg = {std::min(tg.x, grid.x), std::min(tg.y, grid.y), std::min(tg.z, grid.z)};
  uint3 groups = {(grid.x + tg.x - 1) / tg.x, (grid.y + tg.y - 1) / tg.y,
                  (grid.z + tg.z - 1) / tg.z};
  auto info = [&](uint3 pos) {
    ThreadInfo t;
    t.thread_position_in_grid = pos;
    t.thread_position_in_threadgroup = {pos.x % tg.x, pos.y % tg.y, pos.z % tg.z};
    t.threadgroup_position_in_grid = {pos.x / tg.x, pos.y / tg.y, pos.z / tg.z};
    t.threads_per_grid = grid;
    t.threadgroups_per_grid = groups;
    return t;
  };
  if (barriers) {  // group by group, each group's threads taking turns
    uint64_t n_groups = uint64_t(groups.x) * groups.y * groups.z;
    for (uint64_t n = 0; n < n_groups; ++n) {
      uint64_t g = reverse ? n_groups - 1 - n : n;
      uint3 gp = {uint(g % groups.x), uint(g / groups.x % groups.y),
                  uint(g / groups.x / groups.y)};
      std::vector<ThreadInfo> infos;
      for (uint z = gp.z * tg.z; z < std::min(grid.z, (gp.z + 1) * tg.z); ++z)
        for (uint y = gp.y * tg.y; y < std::min(grid.y, (gp.y + 1) * tg.y); ++y)
          for (uint x = gp.x * tg.x; x < std::min(grid.x, (gp.x + 1) * tg.x); ++x)
            infos.push_back(info({x, y, z}));
      run_group(fn, bufs, infos, reverse);
    }
    return;
  }
  uint64_t total = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t n = 0; n < total; ++n) {
    uint64_t idx = reverse ? total - 1 - n : n;
    uint3 pos = {uint(idx % grid.x), uint(idx / grid.x % grid.y), uint(idx / grid.x / grid.y)};
    fn(bufs, info(pos));
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
    run_grid(entry->fn, bufs.data(), grid, tg, /*reverse=*/pass == 1, entry->barriers);
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
