// Fuzz target: halo::io::SafetensorsFile::open (mapped and copied) on mutated files.
//
// Properties: a refused file raises FormatError whose message names the file and is
// valid UTF-8; an accepted file (checked against the raw input bytes, not the reader's
// own bookkeeping) has tensors that tile the data section exactly, byte sizes that
// match dtype x shape and views onto exactly their bytes, and writes back through
// SafetensorsWriter into a file that reads back identically.
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <map>

#include "fuzz.hpp"
#include "halo/core/error.hpp"
#include "halo/io/safetensors.hpp"

namespace {

using halo::fuzz::Bytes;
using halo::fuzz::Failure;
using namespace halo::io;

Bytes file(const std::string& header, const Bytes& data) {
  Bytes out(8, '\0');
  for (int k = 0; k < 8; ++k) out[size_t(k)] = char((uint64_t(header.size()) >> (8 * k)) & 0xFF);
  return out + header + data;
}

std::vector<Bytes> seeds() {
  Bytes floats(24, '\0');
  const float values[6] = {1.5f, -2.0f, 0.0f, 3.25f, 1e-3f, -7.0f};
  std::memcpy(floats.data(), values, sizeof values);
  return {
      file(R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
           R"("b":{"dtype":"I8","shape":[1,2],"data_offsets":[24,26]}})",
           floats + "\x01\x02"),
      file(R"({"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]},"e":{"dtype":"F64","shape":[0,4],"data_offsets":[6,6]},)"
           R"("s":{"dtype":"U8","shape":[],"data_offsets":[6,7]}})       ",
           Bytes("\x80\x3f\x00\x40\x00\xc0\x07", 7)),
      file(R"({"__metadata__":{"k\u00e9y":"v\n"},"f8":{"dtype":"F8_E4M3","shape":[2,1],"data_offsets":[0,2]},)"
           R"("t":{"dtype":"BOOL","shape":[1],"data_offsets":[2,3]}})",
           Bytes("\x38\xb8\x01", 3)),
      file("{}", ""),
  };
}

// Mutates the JSON header and the data separately, then (usually) writes the true header
// length, so that most mutants get past the length check into the JSON and layout checks.
Bytes mutate(const Bytes& input, halo::fuzz::Mutator& m, const std::vector<Bytes>& corpus) {
  uint64_t n = 0;
  for (int k = 7; k >= 0 && input.size() >= 8; --k) n = (n << 8) | static_cast<unsigned char>(input[size_t(k)]);
  if (input.size() < 8 || n > input.size() - 8 || m.below(8) == 0) {
    Bytes whole = input;
    m.mutate(whole, corpus);
    return whole;
  }
  Bytes header = input.substr(8, n), data = input.substr(8 + n);
  switch (m.below(4)) {
    case 0: m.mutate(data, corpus); break;
    case 1: m.mutate(header, corpus), m.mutate(data, corpus); break;
    default: m.mutate(header, corpus); break;
  }
  Bytes out = file(header, data);
  if (m.below(6) == 0) m.mutate(out, corpus);  // and sometimes the length too
  return out;
}

using halo::fuzz::Scratch;

// Checks an accepted file against its raw bytes, independently of the reader's own checks.
void check_accepted(const SafetensorsFile& f, const Bytes& input, const Scratch& scratch) {
  uint64_t header = 0;
  for (int k = 7; k >= 0; --k) header = (header << 8) | static_cast<unsigned char>(input[size_t(k)]);
  if (input.size() < 8 || header > input.size() - 8) throw Failure("accepted a header length past the end");
  const uint64_t data_size = input.size() - 8 - header;
  const char* data = input.data() + 8 + header;
  uint64_t cursor = 0;
  for (const auto& t : f.tensors()) {
    if (t.begin != cursor || t.end < t.begin || t.end > data_size)
      throw Failure("accepted tensors do not tile the data section");
    uint64_t nbytes = 0;
    if (!shape_problem(t.dtype, t.shape, nbytes).empty() || nbytes != t.nbytes())
      throw Failure("accepted tensor " + t.name + " has a shape that does not match its bytes");
    if (t.nbytes() && std::memcmp(f.data(t), data + t.begin, t.nbytes()) != 0)
      throw Failure("tensor " + t.name + " does not view its own bytes");
    cursor = t.end;
  }
  if (cursor != data_size) throw Failure("accepted a file whose tensors do not cover the data section");
  // Round trip: what halo reads, halo writes back, and reads back the same.
  std::vector<TensorSpec> specs;
  for (const auto& t : f.tensors()) specs.push_back({t.name, t.dtype, t.shape});
  const std::string out = (scratch.folder / "roundtrip.safetensors").string();
  {
    SafetensorsWriter w(out, specs, f.metadata(), /*durable=*/false);
    for (const auto& t : f.tensors()) w.write(t.name, f.data(t), t.nbytes());
    w.finish();
  }
  auto back = SafetensorsFile::open(out);
  if (back->metadata() != f.metadata() || back->tensors().size() != f.tensors().size())
    throw Failure("round trip changed the metadata or the tensor count");
  for (const auto& t : f.tensors()) {
    const auto& u = back->info(t.name);
    if (u.dtype != t.dtype || u.shape != t.shape || u.nbytes() != t.nbytes() ||
        std::memcmp(back->data(u), f.data(t), t.nbytes()) != 0)
      throw Failure("round trip changed tensor " + t.name);
  }
}

bool run_one(const Bytes& input) {
  static const Scratch scratch("safetensors");
  scratch.store(input);
  bool accepted[2] = {false, false};
  for (int copy = 0; copy < 2; ++copy) {
    try {
      auto f = SafetensorsFile::open(scratch.path, copy ? LoadMode::copy : LoadMode::map);
      check_accepted(*f, input, scratch);
      accepted[copy] = true;
    } catch (const halo::FormatError& e) {
      const std::string message = e.what();
      if (message.find(scratch.path) == std::string::npos) throw Failure("error does not name the file: " + message);
      if (!halo::fuzz::valid_utf8(message)) throw Failure("error message is not valid UTF-8");
    }
  }
  if (accepted[0] != accepted[1]) throw Failure("mapped and copied reads disagree");
  return accepted[0];
}

halo::fuzz::Register reg({"safetensors", 20000, 1500, seeds, run_one, mutate});

}  // namespace
