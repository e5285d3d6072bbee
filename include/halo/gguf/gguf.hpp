// GGUF files (llama.cpp's model format, versions 2 and 3): a memory-mapped
// reader that validates everything before handing out a byte, and a streaming
// writer (header first, then tensors in order, into a temp file renamed on
// finish).
//
// Layout (little-endian): "GGUF", u32 version, u64 tensor count, u64 key/value
// count; key/values (string key, u32 value type, value; arrays are u32 element
// type, u64 count, elements; strings are u64 length + bytes); tensor infos
// (string name, u32 n_dims, u64 ne[n_dims] with ne[0] the contiguous axis, u32
// ggml type, u64 offset into the data section); zero padding to
// `general.alignment` (u32, default 32); the data section, each tensor padded
// to the alignment. Every problem with a file raises halo::FormatError naming
// the file, the item and the offending value.
#pragma once

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "halo/gguf/convert.hpp"

namespace halo::gguf {

enum class ValueType : uint32_t {
  u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7,
  string = 8, array = 9, u64 = 10, i64 = 11, f64 = 12,
};

std::string_view value_type_name(ValueType type);
// Bytes of one element of a numeric (or bool) type; 0 for string and array.
int64_t value_type_size(ValueType type);

// One metadata value. Numbers (scalars and arrays) are kept as their
// little-endian bytes; strings as std::string (any bytes, not checked for UTF-8).
// Arrays of arrays are not supported (llama.cpp does not read them either).
struct Value {
  ValueType type = ValueType::u32;
  ValueType element_type = ValueType::u8;  // arrays only
  uint64_t count = 1;                      // elements of an array (1 for a scalar)
  std::vector<uint8_t> bytes;              // numeric data
  std::vector<std::string> strings;        // string value or string array

  static Value number(ValueType type, const void* data);  // one scalar of a numeric type
  static Value u32(uint32_t v);
  static Value i32(int32_t v);
  static Value f32(float v);
  static Value boolean(bool v);
  static Value string(std::string v);
  static Value string_array(std::vector<std::string> items);
  static Value numeric_array(ValueType element_type, const void* data, uint64_t count);

  bool is_array() const { return type == ValueType::array; }
  // Scalar accessors; InvalidArgument when the type does not fit.
  uint64_t as_u64() const;
  int64_t as_i64() const;
  double as_f64() const;
  const std::string& as_string() const;
};

struct KeyValue {
  std::string key;
  Value value;
};

struct TensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // ne: dims[0] is the contiguous axis (the reverse of a torch shape)
  GgmlType type = GgmlType::f32;
  uint64_t offset = 0;  // into the data section
  uint64_t nbytes = 0;
  int64_t numel() const;
};

class GgufFile {
 public:
  // Maps `path` read-only and validates header, key/values, tensor infos and
  // data ranges; FormatError on any problem.
  static std::shared_ptr<GgufFile> open(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // of the data section in the file
  uint64_t file_size() const { return size_; }
  const std::vector<KeyValue>& metadata() const { return kv_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // nullptr when absent.
  const Value* find(std::string_view key) const;
  const TensorInfo* find_tensor(std::string_view name) const;
  // InvalidArgument when absent.
  const TensorInfo& tensor(std::string_view name) const;
  const std::byte* data(const TensorInfo& info) const { return base_ + data_offset_ + info.offset; }
  // Dequantizes a tensor of a convertible type into float32 (numel values).
  void to_float(const TensorInfo& info, float* out, Backend backend = Backend::automatic) const;
  // Drops this process's resident pages of the mapping (as SafetensorsFile does).
  void release_pages() const;

 private:
  GgufFile() = default;
  void parse();
  std::string path_;
  void* map_ = nullptr;
  const std::byte* base_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<KeyValue> kv_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> kv_index_, tensor_index_;
};

struct TensorSpec {
  std::string name;           // < 64 bytes (llama.cpp's limit)
  std::vector<int64_t> dims;  // ne order, 1..4 dims
  GgmlType type = GgmlType::f32;
};

// Writes a GGUF v3 file tensor by tensor: the whole header (key/values in the
// given order, tensor infos with packed offsets) goes out first, then `write`
// must be called for each spec in order with exactly type_bytes(type, numel)
// bytes in total (one call, or several calls that append parts of the same
// tensor in order); `finish` pads, flushes and renames the temp file (".NAME.halo-tmp-PID"
// beside the target) into place. Destroying an unfinished writer removes the
// temp file, so an interrupted export never leaves a partial .gguf behind.
class GgufWriter {
 public:
  GgufWriter(std::string path, std::vector<KeyValue> metadata, std::vector<TensorSpec> tensors,
             uint32_t alignment = 32);
  ~GgufWriter();
  GgufWriter(const GgufWriter&) = delete;
  GgufWriter& operator=(const GgufWriter&) = delete;

  void write(const std::string& name, const void* data, uint64_t nbytes);
  void finish();
  // Closes and removes the temp file (what the destructor does to an unfinished writer).
  void abort() noexcept { abandon(); }
  size_t written() const { return next_; }
  uint64_t bytes_written() const { return bytes_; }
  const std::vector<TensorInfo>& tensors() const { return infos_; }

 private:
  void put(const void* data, uint64_t nbytes);
  void pad_to_alignment();
  void abandon() noexcept;
  std::string path_, temp_;
  std::vector<TensorInfo> infos_;
  uint32_t alignment_;
  std::FILE* file_ = nullptr;
  size_t next_ = 0;
  uint64_t part_ = 0;  // bytes of tensor next_ written so far
  uint64_t bytes_ = 0;
};

// The serialized header (everything before the data section, padding included).
std::vector<uint8_t> serialize_header(const std::vector<KeyValue>& metadata, const std::vector<TensorInfo>& tensors,
                                      uint32_t alignment);

}  // namespace halo::gguf
