// The thread pool behind parallel_for: every index exactly once, chunk
// boundaries on the grain, errors surfaced, nesting and concurrent callers
// safe, and a forked child that can still run parallel work.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <thread>
#include <vector>

#include "halo/core/parallel.hpp"

using halo::parallel_for;

namespace {
struct ThreadCount {
  explicit ThreadCount(const char* n) { setenv("HALO_NUM_THREADS", n, 1); }
  ~ThreadCount() { unsetenv("HALO_NUM_THREADS"); }
};
}  // namespace

TEST_CASE("parallel_for covers every index once with grain-aligned chunks", "[parallel]") {
  for (const char* threads : {"1", "2", "3", "7"}) {
    ThreadCount pin(threads);
    for (int64_t count : {1, 2, 63, 64, 65, 1000, 100003}) {
      for (int64_t grain : {1, 8, 64}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(count));
        std::atomic<int> misaligned{0};
        parallel_for(count, grain, [&](int64_t begin, int64_t end) {
          if (begin % grain != 0) ++misaligned;
          for (int64_t i = begin; i < end; ++i) ++hits[size_t(i)];
        });
        INFO("threads " << threads << " count " << count << " grain " << grain);
        CHECK(misaligned == 0);
        for (auto& h : hits) REQUIRE(h == 1);
      }
    }
  }
}

TEST_CASE("parallel_for runs work on more than one thread and rethrows errors", "[parallel]") {
  ThreadCount pin("4");
  std::vector<std::thread::id> seen(4);
  std::atomic<int> started{0};
  parallel_for(4, 1, [&](int64_t begin, int64_t) {
    seen[size_t(begin)] = std::this_thread::get_id();
    ++started;
    // The caller runs every chunk no worker has claimed; chunk 0 (the caller's) gives the
    // workers up to 5 s to claim theirs, so a loaded machine does not make this flaky.
    for (int i = 0; begin == 0 && started < 2 && i < 500; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  });
  int distinct = 0;
  for (size_t i = 0; i < seen.size(); ++i) {
    bool repeat = false;
    for (size_t j = 0; j < i; ++j) repeat = repeat || seen[j] == seen[i];
    distinct += repeat ? 0 : 1;
  }
  CHECK(distinct > 1);
  std::atomic<int> finished{0};
  CHECK_THROWS_WITH(parallel_for(8, 1,
                                 [&](int64_t begin, int64_t) {
                                   ++finished;
                                   if (begin == 4) throw std::runtime_error("chunk 4 failed");
                                 }),
                    "chunk 4 failed");
  CHECK(finished == 4);  // four workers, two units each: every chunk ran
}

TEST_CASE("nested and concurrent parallel_for calls complete", "[parallel]") {
  ThreadCount pin("3");
  std::atomic<int64_t> total{0};
  parallel_for(30, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      parallel_for(100, 10, [&](int64_t b, int64_t e) { total += e - b; });
  });
  CHECK(total == 3000);
  std::atomic<int64_t> sum{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&] {
      for (int round = 0; round < 50; ++round)
        parallel_for(1000, 16, [&](int64_t b, int64_t e) { sum += e - b; });
    });
  for (auto& t : callers) t.join();
  CHECK(sum == 4 * 50 * 1000);
}

TEST_CASE("a forked child runs parallel work on a fresh pool", "[parallel]") {
  ThreadCount pin("3");
  std::atomic<int64_t> warm{0};
  parallel_for(300, 1, [&](int64_t b, int64_t e) { warm += e - b; });  // the parent's pool exists
  REQUIRE(warm == 300);
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    std::atomic<int64_t> count{0};
    parallel_for(3000, 1, [&](int64_t b, int64_t e) { count += e - b; });
    _exit(count == 3000 ? 0 : 1);
  }
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
