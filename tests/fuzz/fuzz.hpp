// halo_fuzz: a seeded mutation fuzzer for halo's readers of untrusted input.
//
// Built with the tests; in the sanitizer build (HALO_SANITIZE=ON) ASan and UBSan
// turn memory errors and undefined behaviour into aborts. libFuzzer would need
// clang, which halo does not require: this driver needs only the C++ compiler.
// It mutates a corpus (seeds, plus inputs a target accepted) with bit flips,
// byte sets/inserts/deletes, chunk copies, splices, truncation, integer boundary
// values written as text (in JSON) or as little-endian binary (in length fields).
// Runs are reproducible: the same --seed gives the same inputs.
//
// Adding a target (e.g. a GGUF reader): create tests/fuzz/target_<name>.cpp
// (the CMake glob adds it, and a ctest `fuzz:<name>` running it at small size) with
//   static halo::fuzz::Register reg({"<name>", full_iterations, small_iterations,
//                                    seeds, run_one, /*mutate=*/nullptr});
// where run_one(bytes) returns true when the reader accepted the input, returns
// false when it refused it with one of halo's exceptions, and throws
// halo::fuzz::Failure when a property is broken (anything else escaping counts as
// a failure too). `mutate` may keep structure intact (see target_safetensors.cpp).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace halo::fuzz {

using Bytes = std::string;

// A broken property (the message says which); the driver saves the input and fails.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Mutator {
 public:
  explicit Mutator(uint64_t seed) : rng_(seed) {}
  // 1 to 8 generic edits of `data` (other corpus entries feed splices).
  void mutate(Bytes& data, const std::vector<Bytes>& corpus);
  // A uniformly drawn integer in [0, n) (0 when n is 0).
  uint64_t below(uint64_t n) { return n ? rng_() % n : 0; }
  std::mt19937_64& rng() { return rng_; }

 private:
  void edit(Bytes& data, const std::vector<Bytes>& corpus);
  std::mt19937_64 rng_;
};

struct Target {
  std::string name;
  int full_iterations = 0;   // `make fuzz`
  int small_iterations = 0;  // the ctest run (part of `make test`)
  std::function<std::vector<Bytes>()> seeds;
  std::function<bool(const Bytes&)> run_one;
  // Optional structure-aware mutation; default: Mutator::mutate on the whole input.
  std::function<Bytes(const Bytes&, Mutator&, const std::vector<Bytes>&)> mutate;
};

struct Register {
  explicit Register(Target target);
};

std::vector<Target>& targets();

// True when `text` is valid UTF-8 (error messages must be, for Python to show them).
bool valid_utf8(const std::string& text);

// One memory file reused for every input of a target: /proc/self/fd/N is a path to a
// regular file with no disk I/O; `folder` is a private scratch folder removed at exit.
struct Scratch {
  int fd = -1;
  std::string path;
  std::filesystem::path folder;
  explicit Scratch(const std::string& target) {
    fd = ::memfd_create(("halo-fuzz-" + target).c_str(), MFD_CLOEXEC);
    if (fd < 0) throw std::runtime_error("memfd_create failed");
    path = "/proc/self/fd/" + std::to_string(fd);
    folder = std::filesystem::temp_directory_path() / ("halo-fuzz-" + target + "-" + std::to_string(::getpid()));
    std::filesystem::create_directories(folder);
  }
  ~Scratch() {
    ::close(fd);
    std::error_code ignored;
    std::filesystem::remove_all(folder, ignored);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void store(const Bytes& bytes) const {
    if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, bytes.data(), bytes.size(), 0) != ssize_t(bytes.size()))
      throw std::runtime_error("writing the memory file failed");
  }
};

}  // namespace halo::fuzz
