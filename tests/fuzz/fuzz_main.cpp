// The driver: halo_fuzz [--target NAME] [--small] [--iterations N] [--seed S] [--list]
// Prints per target: iterations, accepted, refused, corpus size and seconds.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <csignal>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <set>
#include <string>

#include "fuzz.hpp"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace halo::fuzz {

std::vector<Target>& targets() {
  static std::vector<Target> all;
  return all;
}

Register::Register(Target target) { targets().push_back(std::move(target)); }

bool valid_utf8(const std::string& text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto c = static_cast<unsigned char>(text[i]);
    size_t len = 0;
    uint32_t cp = 0, min = 0;
    if (c < 0x80) {
      ++i;
      continue;
    }
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
    else return false;
    if (i + len > text.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      const auto b = static_cast<unsigned char>(text[i + k]);
      if ((b & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (b & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000)) return false;
    i += len;
  }
  return true;
}

namespace {

// Integer boundaries as JSON text: sizes, int32/int64/uint64 edges, float forms.
const char* const kTextNumbers[] = {
    "0", "1", "-1", "2", "7", "8", "64", "65", "255", "256", "4096", "65535", "65536", "2147483647", "2147483648",
    "-2147483648", "4294967295", "4294967296", "9007199254740993", "4611686018427387904", "9223372036854775807",
    "9223372036854775808", "-9223372036854775808", "18446744073709551615", "18446744073709551616",
    "100000000000000000000000000000", "1e400", "-0", "0.5", "1.5", "1e3", "1E-300", "1e308", "-1e308", "00", "0x10",
    "NaN", "Infinity", "null", "true", "\"1\""};

// JSON fragments worth inserting.
const char* const kTokens[] = {"\"", "\\", "{", "}", "[", "]", ",", ":", "null", "[]", "{}", "\"\"", "\\u0000",
                               "\\ud800", "\\udc00", "\xc0\x80", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xff", "\x00",
                               "\"__metadata__\"", "\"dtype\"", "\"shape\"", "\"data_offsets\"", "\"F32\"", "\"BF16\"",
                               "\"U8\"", "\"F8_E4M3\"", "\"BOOL\""};

const uint64_t kBinaryNumbers[] = {0,
                                   1,
                                   7,
                                   8,
                                   255,
                                   256,
                                   0x7fff,
                                   0xffff,
                                   0x7fffffffULL,
                                   0x80000000ULL,
                                   0xffffffffULL,
                                   0x100000000ULL,
                                   100'000'000,
                                   100'000'001,
                                   0x7fffffffffffffffULL,
                                   0x8000000000000000ULL,
                                   0xffffffffffffffffULL};

}  // namespace

void Mutator::edit(Bytes& data, const std::vector<Bytes>& corpus) {
  const uint64_t size = data.size();
  switch (below(11)) {
    case 0:  // flip one bit
      if (size) data[below(size)] ^= char(1u << below(8));
      break;
    case 1:  // set a byte
      if (size) data[below(size)] = char(rng_());
      break;
    case 2: {  // insert random bytes
      Bytes chunk(1 + below(8), '\0');
      for (auto& c : chunk) c = char(rng_());
      data.insert(below(size + 1), chunk);
      break;
    }
    case 3: {  // insert a JSON fragment
      const char* token = kTokens[below(std::size(kTokens))];
      data.insert(below(size + 1), token[0] ? Bytes(token) : Bytes(1, '\0'));
      break;
    }
    case 4:  // delete a range
      if (size) {
        const uint64_t at = below(size);
        data.erase(at, 1 + below(std::min<uint64_t>(16, size - at)));
      }
      break;
    case 5:  // copy a range elsewhere
      if (size) {
        const uint64_t from = below(size), len = 1 + below(std::min<uint64_t>(32, size - from));
        data.insert(below(size + 1), data.substr(from, len));
      }
      break;
    case 6: {  // splice: this input's prefix, another's suffix
      const Bytes& other = corpus[below(corpus.size())];
      data = data.substr(0, below(size + 1)) + other.substr(below(other.size() + 1));
      break;
    }
    case 7:  // truncate
      data.resize(below(size + 1));
      break;
    case 8:
    case 9: {  // replace a run of digits (a number in JSON) by a boundary value
      std::vector<uint64_t> starts;
      for (uint64_t i = 0; i < size; ++i)
        if (std::isdigit(static_cast<unsigned char>(data[i])) && (i == 0 || !std::isdigit(static_cast<unsigned char>(data[i - 1]))))
          starts.push_back(i);
      if (starts.empty()) break;
      const uint64_t at = starts[below(starts.size())];
      uint64_t end = at;
      while (end < size && std::isdigit(static_cast<unsigned char>(data[end]))) ++end;
      data.replace(at, end - at, kTextNumbers[below(std::size(kTextNumbers))]);
      break;
    }
    default: {  // overwrite 1, 2, 4 or 8 bytes with a little-endian boundary value
      const uint64_t width = uint64_t(1) << below(4);
      if (size < width) break;
      uint64_t value = kBinaryNumbers[below(std::size(kBinaryNumbers))];
      if (below(4) == 0) value += below(3) - 1;  // and its neighbours
      const uint64_t at = below(4) == 0 ? 0 : below(size - width + 1);
      for (uint64_t k = 0; k < width; ++k) data[at + k] = char((value >> (8 * k)) & 0xFF);
      break;
    }
  }
}

void Mutator::mutate(Bytes& data, const std::vector<Bytes>& corpus) {
  // Mostly few edits (small steps from inputs that work), sometimes many.
  const uint64_t edits = 1 + (below(4) == 0 ? below(8) : below(2));
  for (uint64_t k = 0; k < edits; ++k) edit(data, corpus);
}

}  // namespace halo::fuzz

namespace {

using halo::fuzz::Bytes;

const char* g_target = "";
const Bytes* g_input = nullptr;
long g_iteration = -1;
constexpr unsigned kSecondsPerInput = 20;

// Saves the input being run (on a sanitizer report, a timeout or a failed property).
void save_input() {
  if (!g_input) return;
  char name[256];
  std::snprintf(name, sizeof name, "fuzz-failure-%s-%ld.bin", g_target, g_iteration);
  if (std::FILE* f = std::fopen(name, "wb")) {
    std::fwrite(g_input->data(), 1, g_input->size(), f);
    std::fclose(f);
    std::fprintf(stderr, "halo_fuzz: target %s, iteration %ld: input saved to %s\n", g_target, g_iteration, name);
  }
}

void on_timeout(int) {
  static const char msg[] = "halo_fuzz: an input ran longer than the per-input limit (a hang)\n";
  [[maybe_unused]] auto ignored = ::write(2, msg, sizeof msg - 1);
  save_input();
  ::_exit(2);
}

int usage() {
  std::fprintf(stderr, "usage: halo_fuzz [--target NAME] [--small] [--iterations N] [--seed S] [--list]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string only;
  bool small = false, list = false;
  long iterations = -1;
  uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--small") small = true;
    else if (arg == "--list") list = true;
    else if (arg == "--target" && i + 1 < argc) only = argv[++i];
    else if (arg == "--iterations" && i + 1 < argc) iterations = std::atol(argv[++i]);
    else if (arg == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else return usage();
  }
  auto& all = halo::fuzz::targets();
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  if (list) {
    for (const auto& t : all) std::printf("%s (full %d, small %d)\n", t.name.c_str(), t.full_iterations, t.small_iterations);
    return 0;
  }
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_set_death_callback(save_input);
#endif
  std::signal(SIGALRM, on_timeout);
  bool found = only.empty();
  for (const auto& target : all) {
    if (!only.empty() && target.name != only) continue;
    found = true;
    const long count = iterations >= 0 ? iterations : (small ? target.small_iterations : target.full_iterations);
    halo::fuzz::Mutator mutator(seed * 0x9E3779B97F4A7C15ULL + std::hash<std::string>{}(target.name));
    std::vector<Bytes> corpus = target.seeds();
    std::set<Bytes> known(corpus.begin(), corpus.end());
    long accepted = 0;
    g_target = target.name.c_str();
    const auto start = std::chrono::steady_clock::now();
    for (long it = 0; it < count; ++it) {
      const Bytes& base = corpus[mutator.below(corpus.size())];
      Bytes input;
      if (target.mutate) {
        input = target.mutate(base, mutator, corpus);
      } else {
        input = base;
        mutator.mutate(input, corpus);
      }
      g_input = &input;
      g_iteration = it;
      ::alarm(kSecondsPerInput);
      bool ok = false;
      try {
        ok = target.run_one(input);
      } catch (const halo::fuzz::Failure& e) {
        std::fprintf(stderr, "halo_fuzz: %s: property broken at iteration %ld (seed %llu): %s\n", g_target, it,
                     static_cast<unsigned long long>(seed), e.what());
        save_input();
        return 1;
      } catch (const std::exception& e) {
        std::fprintf(stderr, "halo_fuzz: %s: unexpected exception at iteration %ld (seed %llu): %s\n", g_target, it,
                     static_cast<unsigned long long>(seed), e.what());
        save_input();
        return 1;
      }
      ::alarm(0);
      if (ok) {
        ++accepted;
        // Accepted inputs seed further mutations (a cheap stand-in for coverage feedback).
        if (corpus.size() < 512 && known.insert(input).second) corpus.push_back(input);
      }
    }
    g_input = nullptr;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("%-12s %8ld inputs  %7ld accepted  %8ld refused  corpus %4zu  %7.2f s  (seed %llu)\n", g_target, count,
                accepted, count - accepted, corpus.size(), seconds, static_cast<unsigned long long>(seed));
    std::fflush(stdout);
  }
  if (!found) {
    std::fprintf(stderr, "halo_fuzz: no target named '%s' (try --list)\n", only.c_str());
    return 2;
  }
  return 0;
}
