#include "halo/io/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>

#include "halo/core/error.hpp"
#include "json_lite.hpp"

namespace halo::io {
namespace {

// Header lengths above this are refused before allocating (the reference
// implementation uses the same 100 MB bound).
constexpr uint64_t kMaxHeader = 100'000'000;

[[noreturn]] void bad(const std::string& source, const std::string& what) {
  fail<FormatError>("safetensors", source, ": ", what);
}

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s.substr(0, 80)) out += (static_cast<unsigned char>(c) < 0x20) ? '?' : c;
  return out + (s.size() > 80 ? "...\"" : "\"");
}

void json_escape(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  out += '"';
}

}  // namespace

std::string_view dtype_name(Format dtype) {
  const std::string_view name = traits(dtype).safetensors;
  require(!name.empty(), "safetensors", "format ", format_name(dtype), " has no safetensors dtype");
  return name;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Header parse_header(std::string_view text, uint64_t data_size, const std::string& source) {
  json::Value root;
  try {
    root = json::parse(text);
  } catch (const std::runtime_error& e) {
    bad(source, std::string("header is not valid JSON (") + e.what() + ")");
  }
  if (root.kind != json::Value::Kind::Object) bad(source, "header is not a JSON object");
  Header header;
  for (auto& [name, entry] : root.members) {
    if (name == "__metadata__") {
      if (entry.kind != json::Value::Kind::Object) bad(source, "__metadata__ is not an object");
      for (auto& [k, v] : entry.members) {
        if (v.kind != json::Value::Kind::String) bad(source, "__metadata__ value for " + quote(k) + " is not a string");
        header.metadata[k] = v.text;
      }
      continue;
    }
    const std::string who = "tensor " + quote(name);
    if (entry.kind != json::Value::Kind::Object) bad(source, who + " is not an object");
    const json::Value *dtype = nullptr, *shape = nullptr, *offsets = nullptr;
    for (auto& [k, v] : entry.members) {
      if (k == "dtype") dtype = &v;
      else if (k == "shape") shape = &v;
      else if (k == "data_offsets") offsets = &v;
      else bad(source, who + " has unknown field " + quote(k));
    }
    if (!dtype || !shape || !offsets) bad(source, who + " lacks dtype, shape or data_offsets");
    TensorInfo info;
    info.name = name;
    if (dtype->kind != json::Value::Kind::String) bad(source, who + " dtype is not a string");
    const auto format = format_from_safetensors(dtype->text);
    if (!format) bad(source, who + " has unknown dtype " + quote(dtype->text));
    info.dtype = *format;
    if (shape->kind != json::Value::Kind::Array) bad(source, who + " shape is not an array");
    uint64_t numel = 1;
    for (const auto& d : shape->items) {
      uint64_t dim = 0;
      if (!json::as_uint64(d, dim) || dim > uint64_t(std::numeric_limits<int64_t>::max()))
        bad(source, who + " shape has a value that is not a non-negative integer");
      if (dim != 0 && numel > uint64_t(std::numeric_limits<int64_t>::max()) / dim)
        bad(source, who + " shape overflows");
      numel *= dim;
      info.shape.push_back(int64_t(dim));
    }
    if (offsets->kind != json::Value::Kind::Array || offsets->items.size() != 2 ||
        !json::as_uint64(offsets->items[0], info.begin) || !json::as_uint64(offsets->items[1], info.end))
      bad(source, who + " data_offsets is not [begin, end] of non-negative integers");
    if (info.begin > info.end) bad(source, who + " data_offsets has begin > end");
    if (info.end > data_size)
      bad(source, who + " data_offsets end " + std::to_string(info.end) + " is past the data section (" +
                      std::to_string(data_size) + " bytes); the file may be truncated");
    const uint64_t size = uint64_t(element_size(info.dtype));
    if (numel > std::numeric_limits<uint64_t>::max() / size || numel * size != info.nbytes())
      bad(source, who + " has " + std::to_string(info.nbytes()) + " bytes but dtype and shape need " +
                      std::to_string(numel) + " x " + std::to_string(size));
    header.tensors.push_back(std::move(info));
  }
  std::sort(header.tensors.begin(), header.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  // Sorted by offset, the tensors must tile [0, data_size) exactly.
  uint64_t cursor = 0;
  for (const auto& t : header.tensors) {
    if (t.begin < cursor) bad(source, "tensor " + quote(t.name) + " overlaps the previous tensor");
    if (t.begin > cursor)
      bad(source, "bytes " + std::to_string(cursor) + ".." + std::to_string(t.begin) + " belong to no tensor");
    cursor = t.end;
  }
  if (cursor != data_size)
    bad(source, "data section has " + std::to_string(data_size) + " bytes but tensors cover " + std::to_string(cursor));
  return header;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) bad(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st{};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    bad(path, "not a regular file");
  }
  f->size_ = uint64_t(st.st_size);
  if (f->size_ < 8) {
    ::close(fd);
    bad(path, "file has " + std::to_string(f->size_) + " bytes, fewer than the 8-byte header length");
  }
  void* map = ::mmap(nullptr, f->size_, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) bad(path, std::string("mmap failed: ") + std::strerror(errno));
  f->map_ = map;
  const auto* bytes = static_cast<const unsigned char*>(map);
  uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | bytes[k];
  if (n > kMaxHeader) bad(path, "header length " + std::to_string(n) + " is implausibly large");
  if (n > f->size_ - 8)
    bad(path, "header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(f->size_) +
                  " bytes); the file may be truncated");
  std::string_view text(reinterpret_cast<const char*>(bytes + 8), size_t(n));
  f->header_ = parse_header(text, f->size_ - 8 - n, path);
  f->data_ = reinterpret_cast<const std::byte*>(bytes + 8 + n);
  for (size_t k = 0; k < f->header_.tensors.size(); ++k) f->index_[f->header_.tensors[k].name] = k;
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, size_);
}

void SafetensorsFile::release_pages() const {
  if (map_) ::madvise(map_, size_, MADV_DONTNEED);
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) fail("SafetensorsFile.info", path_, " has no tensor \"", name, "\"");
  return header_.tensors[it->second];
}

std::string make_header(const std::vector<TensorSpec>& specs, const std::map<std::string, std::string>& metadata) {
  std::string out = "{";
  bool first = true;
  if (!metadata.empty()) {
    out += "\"__metadata__\":{";
    for (auto it = metadata.begin(); it != metadata.end(); ++it) {
      if (it != metadata.begin()) out += ',';
      json_escape(out, it->first);
      out += ':';
      json_escape(out, it->second);
    }
    out += '}';
    first = false;
  }
  uint64_t offset = 0;
  for (const auto& s : specs) {
    require(s.name != "__metadata__", "make_header", "a tensor may not be named __metadata__");
    uint64_t numel = 1;
    for (int64_t d : s.shape) {
      require(d >= 0, "make_header", "tensor \"", s.name, "\" has negative dimension ", d);
      numel *= uint64_t(d);
    }
    const uint64_t nbytes = numel * uint64_t(element_size(s.dtype));
    if (!first) out += ',';
    first = false;
    json_escape(out, s.name);
    out += ":{\"dtype\":\"" + std::string(dtype_name(s.dtype)) + "\",\"shape\":[";
    for (size_t k = 0; k < s.shape.size(); ++k) out += (k ? "," : "") + std::to_string(s.shape[k]);
    out += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + nbytes) + "]}";
    offset += nbytes;
  }
  out += '}';
  while (out.size() % 8 != 0) out += ' ';
  return out;
}

SafetensorsWriter::SafetensorsWriter(std::string path, std::vector<TensorSpec> specs,
                                     std::map<std::string, std::string> metadata)
    : path_(std::move(path)), specs_(std::move(specs)) {
  std::vector<std::string> names;
  for (const auto& s : specs_) names.push_back(s.name);
  std::sort(names.begin(), names.end());
  auto dup = std::adjacent_find(names.begin(), names.end());
  require(dup == names.end(), "SafetensorsWriter", "tensor name \"", dup == names.end() ? "" : *dup,
          "\" appears twice");
  const std::string header = make_header(specs_, metadata);
  temp_ = path_ + ".tmp-" + std::to_string(::getpid());
  file_ = std::fopen(temp_.c_str(), "wb");
  if (!file_) fail("SafetensorsWriter", "cannot create ", temp_, ": ", std::strerror(errno));
  unsigned char len[8];
  uint64_t n = header.size();
  for (int k = 0; k < 8; ++k) len[k] = static_cast<unsigned char>(n >> (8 * k));
  if (std::fwrite(len, 1, 8, file_) != 8 || std::fwrite(header.data(), 1, header.size(), file_) != header.size()) {
    abandon();
    fail("SafetensorsWriter", "write to ", temp_, " failed");
  }
}

SafetensorsWriter::~SafetensorsWriter() { abandon(); }

void SafetensorsWriter::abandon() noexcept {
  if (file_) {
    std::fclose(file_);
    file_ = nullptr;
    std::remove(temp_.c_str());
  }
}

void SafetensorsWriter::write(const std::string& name, const void* data, uint64_t nbytes) {
  require(file_ != nullptr, "SafetensorsWriter.write", "writer for ", path_, " is closed");
  require(next_ < specs_.size(), "SafetensorsWriter.write", "all ", specs_.size(), " tensors are already written; got \"",
          name, "\"");
  const TensorSpec& s = specs_[next_];
  require(name == s.name, "SafetensorsWriter.write", "expected tensor \"", s.name, "\" next, got \"", name, "\"");
  uint64_t numel = 1;
  for (int64_t d : s.shape) numel *= uint64_t(d);
  const uint64_t want = numel * uint64_t(element_size(s.dtype));
  require(nbytes == want, "SafetensorsWriter.write", "tensor \"", name, "\" needs ", want, " bytes, got ", nbytes);
  if (nbytes && std::fwrite(data, 1, nbytes, file_) != nbytes) {
    abandon();
    fail("SafetensorsWriter.write", "write to ", temp_, " failed (disk full?)");
  }
  ++next_;
}

void SafetensorsWriter::finish() {
  require(file_ != nullptr, "SafetensorsWriter.finish", "writer for ", path_, " is closed");
  if (next_ != specs_.size()) {
    const std::string missing = specs_[next_].name;
    abandon();
    fail("SafetensorsWriter.finish", path_, ": ", specs_.size() - next_, " tensors were not written (next \"", missing,
         "\")");
  }
  const bool ok = std::fflush(file_) == 0;
  std::fclose(file_);
  file_ = nullptr;
  if (!ok || std::rename(temp_.c_str(), path_.c_str()) != 0) {
    std::remove(temp_.c_str());
    fail("SafetensorsWriter.finish", "cannot write ", path_, ": ", std::strerror(errno));
  }
}

}  // namespace halo::io
