// safetensors files: a memory-mapped, zero-copy reader with a fully validated
// header, and a streaming writer (header first, then tensors in order, into a
// temp file that is renamed on finish). Shared by every halo format reader.
//
// Opening checks the file type first (a FIFO or device is refused, never opened).
// A mapped file must not be truncated while views of it live: touching a page past
// the new end raises SIGBUS (as for any mmap). LoadMode::copy reads the file into
// private memory instead, for files that others may rewrite.
//
// Layout: 8-byte little-endian header length N, N bytes of JSON
//   {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}
// then the raw little-endian data; offsets are relative to the end of the header.
// Every problem with a file raises halo::FormatError naming the file and the problem.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "halo/core/format.hpp"

namespace halo::io {

// Tensor dtypes are rows of the format table (core/format.hpp) that have a
// safetensors name: traits(f).safetensors, element_size(f), parse_safetensors_dtype.
// The safetensors spelling of a format; InvalidArgument when it has none (e.g. nf4).
std::string_view dtype_name(Format dtype);

// NumPy's and torch's limit on dimensions; headers with more are refused.
constexpr size_t kMaxDims = 64;

// Empty when a tensor of `dtype` and `shape` can exist (at most kMaxDims non-negative
// dimensions whose byte size and strides fit in int64), setting `nbytes`; otherwise
// the reason, for an error message.
std::string shape_problem(Format dtype, const std::vector<int64_t>& shape, uint64_t& nbytes);

struct TensorInfo {
  std::string name;
  Format dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the data section
  uint64_t end = 0;
  int64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

struct Header {
  std::vector<TensorInfo> tensors;  // in file (offset) order
  std::map<std::string, std::string> metadata;
};

// Validates the JSON header text against a data section of `data_size` bytes;
// `source` names the file in error messages.
Header parse_header(std::string_view json, uint64_t data_size, const std::string& source);

enum class LoadMode {
  map,   // zero-copy memory map (the default)
  copy,  // read into private memory: later changes to the file cannot affect (or SIGBUS) the views
};

class SafetensorsFile {
 public:
  // Maps (or copies) `path` and validates it; FormatError on any problem.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path, LoadMode mode = LoadMode::map);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // InvalidArgument if the name is absent.
  const TensorInfo& info(const std::string& name) const;
  // Pointer into the mapping (valid while this object lives).
  const std::byte* data(const TensorInfo& info) const { return data_ + info.begin; }
  uint64_t file_size() const { return size_; }
  bool copied() const { return copied_; }
  // Drops this process's resident pages of the mapping (they stay in the page cache), so
  // streaming through a large file keeps RSS near one tensor. Views stay valid: pages are
  // read back from the file on the next access.
  void release_pages() const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  uint64_t size_ = 0;
  bool copied_ = false;
  const std::byte* data_ = nullptr;
  Header header_;
  std::map<std::string, size_t> index_;
};

struct TensorSpec {
  std::string name;
  Format dtype;
  std::vector<int64_t> shape;
};

// Writes a safetensors file tensor by tensor so only one tensor needs to be in
// memory: the header (from the specs, every size checked before the file is
// created) is written first, then `write` must be called once per spec in the
// given order; `finish` fsyncs the temp file, renames it into place and fsyncs
// the folder (with durable = false it skips both fsyncs: faster, but a power cut
// may leave an empty or partial file under the final name). Destroying an
// unfinished writer removes the temp file.
class SafetensorsWriter {
 public:
  SafetensorsWriter(std::string path, std::vector<TensorSpec> specs, std::map<std::string, std::string> metadata,
                    bool durable = true);
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // The next tensor's bytes; InvalidArgument if the name or size does not match.
  void write(const std::string& name, const void* data, uint64_t nbytes);
  void finish();
  size_t written() const { return next_; }

 private:
  void abandon() noexcept;
  std::string path_, temp_;
  std::vector<TensorSpec> specs_;
  std::vector<uint64_t> sizes_;  // bytes of each spec
  bool durable_ = true;
  std::FILE* file_ = nullptr;
  size_t next_ = 0;
};

// Serializes a header (names in spec order, contiguous offsets), padded with
// spaces to a multiple of 8 bytes as the reference writer does. InvalidArgument
// for anything the reader would refuse (bad shape, invalid UTF-8, size overflow).
std::string make_header(const std::vector<TensorSpec>& specs, const std::map<std::string, std::string>& metadata);

}  // namespace halo::io
