// The GGUF reader: maps the file and checks every count, length, type and
// offset against the bytes that are really there before anything is allocated
// or read, so a truncated or hostile file gives a FormatError, never a crash,
// a huge allocation or a read past the mapping.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "halo/core/error.hpp"
#include "halo/gguf/gguf.hpp"

namespace halo::gguf {
namespace {

constexpr uint32_t kMaxDims = 4;  // GGML_MAX_DIMS
constexpr uint64_t kMaxAlignment = uint64_t(1) << 30;

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  fail<FormatError>("read_gguf", path, ": ", what);
}

// A key or tensor name from the file as it may appear in a message: valid UTF-8 (Python
// must be able to show it), control characters and invalid bytes as \xNN, at most 96 bytes.
std::string shown(std::string_view raw) {
  std::string out;
  size_t i = 0;
  auto hex = [&](unsigned char c) {
    const char* digits = "0123456789abcdef";
    out += "\\x";
    out += digits[c >> 4];
    out += digits[c & 15];
  };
  while (i < raw.size() && out.size() < 96) {
    const auto c = static_cast<unsigned char>(raw[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += char(c);
      ++i;
      continue;
    }
    // Length of a well-formed UTF-8 sequence starting here (0 if not one).
    size_t len = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    if (len && i + len <= raw.size()) {
      const auto c1 = static_cast<unsigned char>(raw[i + 1]);
      bool ok = (c1 & 0xc0) == 0x80;
      if (c == 0xe0) ok = ok && c1 >= 0xa0;
      if (c == 0xed) ok = ok && c1 < 0xa0;  // no surrogates
      if (c == 0xf0) ok = ok && c1 >= 0x90;
      if (c == 0xf4) ok = ok && c1 < 0x90;
      for (size_t k = 2; k < len; ++k) ok = ok && (static_cast<unsigned char>(raw[i + k]) & 0xc0) == 0x80;
      if (ok) {
        out.append(raw.substr(i, len));
        i += len;
        continue;
      }
    }
    hex(c);
    ++i;
  }
  if (i < raw.size()) out += "...";
  return out;
}

// A bounds-checked little-endian cursor over the mapping.
class Cursor {
 public:
  Cursor(const std::byte* base, uint64_t size, const std::string& path) : base_(base), size_(size), path_(path) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  void need(uint64_t n, const std::string& what) const {
    if (n > remaining())
      bad(path_, what + " needs " + std::to_string(n) + " bytes at offset " + std::to_string(pos_) + " but only " +
                     std::to_string(remaining()) + " remain; the file is truncated or corrupt");
  }
  template <typename T>
  T get(const std::string& what) {
    need(sizeof(T), what);
    T value;
    std::memcpy(&value, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }
  std::string string(const std::string& what) {
    const uint64_t length = get<uint64_t>(what + " length");
    if (length > remaining())
      bad(path_, what + " has length " + std::to_string(length) + " at offset " + std::to_string(pos_ - 8) +
                     ", more than the " + std::to_string(remaining()) + " bytes left in the file");
    std::string out(reinterpret_cast<const char*>(base_ + pos_), size_t(length));
    pos_ += length;
    return out;
  }
  const std::byte* take(uint64_t n, const std::string& what) {
    need(n, what);
    const std::byte* p = base_ + pos_;
    pos_ += n;
    return p;
  }

 private:
  const std::byte* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
  const std::string& path_;
};

bool known_value_type(uint32_t t) { return t <= uint32_t(ValueType::f64); }

Value read_value(Cursor& in, ValueType type, const std::string& what, const std::string& path) {
  Value v;
  v.type = type;
  if (type == ValueType::string) {
    v.strings.push_back(in.string(what));
    return v;
  }
  if (type != ValueType::array) {
    const auto size = uint64_t(value_type_size(type));
    const std::byte* p = in.take(size, what);
    v.bytes.assign(reinterpret_cast<const uint8_t*>(p), reinterpret_cast<const uint8_t*>(p) + size);
    if (type == ValueType::boolean && v.bytes[0] > 1)
      bad(path, what + " is a bool with byte value " + std::to_string(v.bytes[0]) + " (must be 0 or 1)");
    return v;
  }
  const uint32_t element = in.get<uint32_t>(what + " element type");
  if (!known_value_type(element))
    bad(path, what + " is an array of unknown value type " + std::to_string(element));
  if (element == uint32_t(ValueType::array)) bad(path, what + " is an array of arrays, which GGUF readers do not support");
  v.element_type = ValueType(element);
  v.count = in.get<uint64_t>(what + " element count");
  if (v.element_type == ValueType::string) {
    // Each string needs at least its 8-byte length: bound the count before reserving.
    if (v.count > in.remaining() / 8)
      bad(path, what + " claims " + std::to_string(v.count) + " strings but only " + std::to_string(in.remaining()) +
                    " bytes remain");
    v.strings.reserve(size_t(v.count));
    for (uint64_t i = 0; i < v.count; ++i) v.strings.push_back(in.string(what + "[" + std::to_string(i) + "]"));
    return v;
  }
  const auto size = uint64_t(value_type_size(v.element_type));
  if (v.count > in.remaining() / size)
    bad(path, what + " claims " + std::to_string(v.count) + " elements of " + std::to_string(size) + " bytes but only " +
                  std::to_string(in.remaining()) + " bytes remain");
  const std::byte* p = in.take(v.count * size, what);
  v.bytes.assign(reinterpret_cast<const uint8_t*>(p), reinterpret_cast<const uint8_t*>(p) + v.count * size);
  if (v.element_type == ValueType::boolean)
    for (uint64_t i = 0; i < v.count; ++i)
      if (v.bytes[i] > 1) bad(path, what + "[" + std::to_string(i) + "] is a bool with byte value " + std::to_string(v.bytes[i]));
  return v;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

std::shared_ptr<GgufFile> GgufFile::open(const std::string& path) {
  std::shared_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) bad(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st{};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    bad(path, "not a regular file");
  }
  f->size_ = uint64_t(st.st_size);
  if (f->size_ < 24) {
    ::close(fd);
    bad(path, "file has " + std::to_string(f->size_) + " bytes, fewer than a GGUF header's 24; it is truncated or not GGUF");
  }
  void* map = ::mmap(nullptr, f->size_, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) bad(path, std::string("mmap failed: ") + std::strerror(errno));
  f->map_ = map;
  f->base_ = static_cast<const std::byte*>(map);
  f->parse();
  return f;
}

GgufFile::~GgufFile() {
  if (map_) ::munmap(map_, size_);
}

void GgufFile::release_pages() const {
  if (map_) ::madvise(map_, size_, MADV_DONTNEED);
}

void GgufFile::parse() {
  Cursor in(base_, size_, path_);
  const std::byte* magic = in.take(4, "magic");
  if (std::memcmp(magic, "GGUF", 4) != 0) {
    std::string shown;
    for (int i = 0; i < 4; ++i) {
      const auto c = static_cast<unsigned char>(magic[i]);
      shown += (c >= 32 && c < 127) ? std::string(1, char(c)) : "\\x" + std::to_string(c);
    }
    bad(path_, "magic is '" + shown + "', not 'GGUF'; this is not a GGUF file");
  }
  version_ = in.get<uint32_t>("version");
  if (version_ == 0x03000000u || version_ == 0x02000000u)
    bad(path_, "version field reads " + std::to_string(version_) + ": a big-endian GGUF file, which is not supported");
  if (version_ == 1) bad(path_, "GGUF version 1 is obsolete and not supported (use version 2 or 3)");
  if (version_ != 2 && version_ != 3) bad(path_, "unsupported GGUF version " + std::to_string(version_) + " (expected 2 or 3)");
  const uint64_t n_tensors = in.get<uint64_t>("tensor count");
  const uint64_t n_kv = in.get<uint64_t>("key/value count");
  // A key/value takes at least 8 (key length) + 1 (key) + 4 (type) + 1 bytes, a tensor info at least 8 + 1 + 4 + 8 + 4 + 8.
  if (n_kv > in.remaining() / 14)
    bad(path_, "key/value count " + std::to_string(n_kv) + " cannot fit in the " + std::to_string(in.remaining()) + " bytes after the header");
  if (n_tensors > in.remaining() / 33)
    bad(path_, "tensor count " + std::to_string(n_tensors) + " cannot fit in the " + std::to_string(in.remaining()) + " bytes after the header");

  kv_.reserve(size_t(n_kv));
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string where = "key/value " + std::to_string(i);
    std::string key = in.string(where + " key");
    if (key.empty()) bad(path_, where + " has an empty key");
    const std::string name = "key '" + shown(key) + "'";
    const uint32_t type = in.get<uint32_t>("type of " + name);
    if (!known_value_type(type)) bad(path_, name + " has unknown value type " + std::to_string(type));
    if (kv_index_.count(key)) bad(path_, "duplicate " + name);
    Value value = read_value(in, ValueType(type), "value of " + name, path_);
    kv_index_.emplace(key, kv_.size());
    kv_.push_back({std::move(key), std::move(value)});
  }
  if (const Value* a = find("general.alignment")) {
    if (a->type != ValueType::u32)
      bad(path_, "general.alignment must be uint32, not " + std::string(value_type_name(a->type)));
    alignment_ = a->as_u64();
    if (alignment_ == 0 || (alignment_ & (alignment_ - 1)) != 0 || alignment_ > kMaxAlignment)
      bad(path_, "general.alignment " + std::to_string(alignment_) + " is not a power of two up to 2^30");
  }

  tensors_.reserve(size_t(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo t;
    t.name = in.string("name of tensor " + std::to_string(i));
    const std::string what = "tensor '" + shown(t.name) + "'";
    if (t.name.empty()) bad(path_, "tensor " + std::to_string(i) + " has an empty name");
    if (tensor_index_.count(t.name)) bad(path_, "duplicate " + what);
    const uint32_t n_dims = in.get<uint32_t>(what + " dimension count");
    if (n_dims == 0 || n_dims > kMaxDims)
      bad(path_, what + " has " + std::to_string(n_dims) + " dimensions (must be 1 to 4)");
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const auto ne = in.get<int64_t>(what + " dimension " + std::to_string(d));
      if (ne < 0) bad(path_, what + " dimension " + std::to_string(d) + " is negative (" + std::to_string(ne) + ")");
      if (ne != 0 && numel > uint64_t(std::numeric_limits<int64_t>::max()) / uint64_t(ne))
        bad(path_, what + " has more elements than fit in 64 bits");
      numel *= uint64_t(ne);
      t.dims.push_back(ne);
    }
    const uint32_t type = in.get<uint32_t>(what + " type");
    const auto layout = type_layout(type);
    if (!layout) bad(path_, what + " has unknown ggml type " + std::to_string(type));
    t.type = layout->type;
    if (t.dims[0] % layout->block != 0)
      bad(path_, what + " of type " + std::string(layout->name) + " has " + std::to_string(t.dims[0]) +
                     " elements per row, not a multiple of the block size " + std::to_string(layout->block));
    const uint64_t blocks = numel / uint64_t(layout->block);
    if (blocks > std::numeric_limits<uint64_t>::max() / uint64_t(layout->bytes))
      bad(path_, what + " has a byte size that does not fit in 64 bits");
    t.nbytes = blocks * uint64_t(layout->bytes);
    t.offset = in.get<uint64_t>(what + " offset");
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }

  const uint64_t header_end = in.pos();
  data_offset_ = (header_end + alignment_ - 1) / alignment_ * alignment_;
  if (tensors_.empty()) return;
  if (data_offset_ > size_)
    bad(path_, "the data section would start at offset " + std::to_string(data_offset_) + ", past the end of the file (" +
                   std::to_string(size_) + " bytes); the file is truncated");
  const uint64_t data_size = size_ - data_offset_;
  std::vector<const TensorInfo*> by_offset;
  for (const TensorInfo& t : tensors_) {
    const std::string what = "tensor '" + shown(t.name) + "'";
    if (t.offset % alignment_ != 0)
      bad(path_, what + " has data offset " + std::to_string(t.offset) + ", not a multiple of the alignment " +
                     std::to_string(alignment_));
    if (t.offset > data_size || t.nbytes > data_size - t.offset)
      bad(path_, what + " needs bytes [" + std::to_string(t.offset) + ", " + std::to_string(t.offset + t.nbytes) +
                     ") of a data section of " + std::to_string(data_size) + " bytes; the file is truncated or the offset is wrong");
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < by_offset.size(); ++k) {
    const TensorInfo& a = *by_offset[k - 1];
    const TensorInfo& b = *by_offset[k];
    if (a.offset + a.nbytes > b.offset)
      bad(path_, "tensor '" + shown(b.name) + "' (offset " + std::to_string(b.offset) + ") overlaps tensor '" + shown(a.name) +
                     "' (bytes " + std::to_string(a.offset) + " to " + std::to_string(a.offset + a.nbytes) + ")");
  }
}

const Value* GgufFile::find(std::string_view key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].value;
}

const TensorInfo* GgufFile::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& GgufFile::tensor(std::string_view name) const {
  const TensorInfo* t = find_tensor(name);
  if (t == nullptr) fail("GgufFile.tensor", path_, " has no tensor '", shown(name), "'");
  return *t;
}

void GgufFile::to_float(const TensorInfo& info, float* out, Backend backend) const {
  if (!convertible(info.type))
    fail("GgufFile.to_float", path_, ": tensor '", shown(info.name), "' has type ", type_name(info.type),
         ", which halo cannot dequantize");
  dequantize_rows(info.type, data(info), out, info.numel(), backend);
}

}  // namespace halo::gguf
