// Fuzz target: halo::gguf::GgufFile::open on mutated GGUF files.
//
// Properties: a refused file raises FormatError whose message names the file and is
// valid UTF-8; an accepted file's tensors lie inside the file, aligned and without
// overlap, every byte of them can be read and every convertible one dequantized (ASan
// checks the bounds), and it writes back through GgufWriter into a file that reads
// back with the same metadata and tensor bytes.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <vector>

#include "fuzz.hpp"
#include "halo/core/error.hpp"
#include "halo/gguf/gguf.hpp"

namespace {

using halo::fuzz::Bytes;
using halo::fuzz::Failure;
using namespace halo::gguf;

using halo::fuzz::Scratch;

const Scratch& scratch() {
  static const Scratch s("gguf");
  return s;
}

Bytes read_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  Bytes out;
  char buffer[4096];
  for (size_t n; f && (n = std::fread(buffer, 1, sizeof buffer, f)) > 0;) out.append(buffer, n);
  if (f) std::fclose(f);
  return out;
}

Bytes write_seed(const std::string& name, std::vector<KeyValue> kv, std::vector<TensorSpec> specs,
                 uint32_t alignment = 32) {
  const std::string path = (scratch().folder / name).string();
  GgufWriter w(path, std::move(kv), specs, alignment);
  for (const auto& t : w.tensors()) {
    Bytes data(t.nbytes, '\0');
    for (size_t i = 0; i < data.size(); ++i) data[i] = char((i * 37 + t.name.size()) & 0x3b);  // finite fp16 scales
    w.write(t.name, data.data(), data.size());
  }
  w.finish();
  return read_file(path);
}

std::vector<Bytes> seeds() {
  const int32_t ints[3] = {1, -2, 3};
  const float floats[2] = {0.5f, -1.25f};
  return {
      write_seed("a.gguf",
                 {{"general.architecture", Value::string("llama")},
                  {"llama.block_count", Value::u32(2)},
                  {"list", Value::numeric_array(ValueType::i32, ints, 3)},
                  {"tokens", Value::string_array({"a", "b\xc3\xa9", ""})}},
                 {{"w", {32, 2}, GgmlType::q8_0}, {"n", {4}, GgmlType::f32}}),
      write_seed("b.gguf",
                 {{"general.alignment", Value::u32(64)},
                  {"f", Value::numeric_array(ValueType::f32, floats, 2)},
                  {"flag", Value::boolean(true)}},
                 {{"k", {256}, GgmlType::q4_k}, {"h", {8, 1, 2}, GgmlType::f16}, {"q", {32}, GgmlType::q5_0}}, 64),
      write_seed("c.gguf", {{"only", Value::string("metadata")}}, {}),
      write_seed("d.gguf", {},
                 {{"x", {256}, GgmlType::q6_k}, {"y", {256}, GgmlType::q2_k}, {"z", {64}, GgmlType::bf16},
                  {"i", {256}, GgmlType::iq2_xxs}}),
  };
}

void check_accepted(const GgufFile& f) {
  uint64_t checksum = 0;
  std::vector<const TensorInfo*> order;
  for (const TensorInfo& t : f.tensors()) {
    if (t.offset % f.alignment() != 0) throw Failure("accepted a misaligned tensor " + t.name);
    if (f.data_offset() + t.offset + t.nbytes > f.file_size()) throw Failure("accepted tensor past the end: " + t.name);
    if (t.nbytes != type_bytes(t.type, t.numel())) throw Failure("tensor bytes do not match its shape: " + t.name);
    const auto* bytes = reinterpret_cast<const unsigned char*>(f.data(t));
    for (uint64_t i = 0; i < t.nbytes; ++i) checksum += bytes[i];
    if (convertible(t.type) && t.numel() <= (int64_t(1) << 22)) {
      std::vector<float> out(size_t(t.numel()));
      f.to_float(t, out.data(), halo::Backend::scalar);
    }
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < order.size(); ++k)
    if (order[k - 1]->offset + order[k - 1]->nbytes > order[k]->offset) throw Failure("accepted overlapping tensors");
  static volatile uint64_t sink;
  sink = checksum;

  // Round trip through the writer (which, like llama.cpp, refuses names of 64 bytes or more).
  for (const TensorInfo& t : f.tensors())
    if (t.name.size() >= 64) return;
  std::vector<TensorSpec> specs;
  for (const TensorInfo& t : f.tensors()) specs.push_back({t.name, t.dims, t.type});
  const std::string out = (scratch().folder / "roundtrip.gguf").string();
  {
    GgufWriter w(out, f.metadata(), specs, uint32_t(f.alignment()));
    for (const TensorInfo& t : f.tensors()) w.write(t.name, f.data(t), t.nbytes);
    w.finish();
  }
  auto back = GgufFile::open(out);
  if (back->metadata().size() != f.metadata().size() || back->tensors().size() != f.tensors().size())
    throw Failure("round trip changed the key or tensor count");
  for (size_t i = 0; i < f.metadata().size(); ++i) {
    const Value& a = f.metadata()[i].value;
    const Value& b = back->metadata()[i].value;
    if (f.metadata()[i].key != back->metadata()[i].key || a.type != b.type || a.element_type != b.element_type ||
        a.count != b.count || a.bytes != b.bytes || a.strings != b.strings)
      throw Failure("round trip changed key " + f.metadata()[i].key);
  }
  for (const TensorInfo& t : f.tensors()) {
    const TensorInfo& u = back->tensor(t.name);
    if (u.dims != t.dims || u.type != t.type || std::memcmp(back->data(u), f.data(t), t.nbytes) != 0)
      throw Failure("round trip changed tensor " + t.name);
  }
}

bool run_one(const Bytes& input) {
  scratch().store(input);
  try {
    auto f = GgufFile::open(scratch().path);
    check_accepted(*f);
    return true;
  } catch (const halo::FormatError& e) {
    const std::string message = e.what();
    if (message.find(scratch().path) == std::string::npos) throw Failure("error does not name the file: " + message);
    if (!halo::fuzz::valid_utf8(message)) throw Failure("error message is not valid UTF-8");
    return false;
  }
}

halo::fuzz::Register reg({"gguf", 20000, 1500, seeds, run_one, nullptr});

}  // namespace
