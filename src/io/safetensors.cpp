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
#include "strict_json.hpp"

namespace halo::io {
namespace {

// Header lengths above this are refused before allocating (the reference
// implementation uses the same 100 MB bound).
constexpr uint64_t kMaxHeader = 100'000'000;

[[noreturn]] void bad(const std::string& source, const std::string& what) {
  fail<FormatError>("safetensors", source, ": ", what);
}

// At most 80 bytes of a name, cut on a UTF-8 character boundary so the message stays valid UTF-8.
std::string quote(const std::string& s) {
  size_t cut = std::min<size_t>(s.size(), 80);
  while (cut > 0 && cut < s.size() && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
  std::string out = "\"";
  for (char c : s.substr(0, cut)) out += (static_cast<unsigned char>(c) < 0x20) ? '?' : c;
  return out + (cut < s.size() ? "...\"" : "\"");
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t k = 0; k < shape.size() && k < 8; ++k) out += (k ? ", " : "") + std::to_string(shape[k]);
  return out + (shape.size() > 8 ? ", ...]" : "]");
}

// Paths reach C as NUL-terminated strings: an embedded NUL would silently name another file.
std::string path_problem(const std::string& path) {
  if (path.empty()) return "path is empty";
  if (path.find('\0') != std::string::npos) return "path contains a NUL byte";
  return {};
}

std::string file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

// fsync of the folder holding `path`, so a rename into it survives a crash.
bool sync_parent_folder(const std::string& path) {
  std::string folder = std::filesystem::path(path).parent_path().string();
  if (folder.empty()) folder = ".";
  const int fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::fsync(fd) == 0 || errno == EINVAL;  // some file systems cannot sync folders
  ::close(fd);
  return ok;
}

// A JSON string literal for `s`; InvalidArgument when s is not valid UTF-8 (the reader would refuse it).
std::string json_string(const std::string& s, const char* what) {
  try {
    return nlohmann::json(s).dump();
  } catch (const nlohmann::json::exception&) {
    fail("make_header", what, " ", quote(s), " is not valid UTF-8");
  }
}

}  // namespace

std::string_view dtype_name(Format dtype) {
  const std::string_view name = traits(dtype).safetensors;
  require(!name.empty(), "safetensors", "format ", format_name(dtype), " has no safetensors dtype");
  return name;
}

std::string shape_problem(Format dtype, const std::vector<int64_t>& shape, uint64_t& nbytes) {
  if (shape.size() > kMaxDims)
    return "shape has " + std::to_string(shape.size()) + " dimensions; at most " + std::to_string(kMaxDims) +
           " are supported (NumPy's and torch's limit)";
  constexpr uint64_t kLimit = uint64_t(std::numeric_limits<int64_t>::max());
  const uint64_t size = uint64_t(element_size(dtype));
  if (size == 0) return "dtype " + std::string(format_name(dtype)) + " is a block format, not an element type";
  // numel * size is the byte count; the product with empty dimensions counted as 1
  // bounds the largest stride, which NumPy and torch also keep in int64.
  uint64_t numel = 1, extent = size;
  for (int64_t d : shape) {
    if (d < 0) return "shape " + shape_text(shape) + " has a negative dimension";
    const uint64_t dim = uint64_t(d), step = std::max<uint64_t>(dim, 1);
    if (extent > kLimit / step)
      return "shape " + shape_text(shape) + " overflows: its byte size or strides do not fit in 64 bits";
    extent *= step;
    numel *= dim;  // <= extent / size, so no overflow
  }
  nbytes = numel * size;
  return {};
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Header parse_header(std::string_view text, uint64_t data_size, const std::string& source) {
  nlohmann::json root;
  try {
    root = parse_strict_json(text);
  } catch (const std::runtime_error& e) {
    bad(source, std::string("header is not valid JSON (") + e.what() + ")");
  }
  if (!root.is_object()) bad(source, "header is not a JSON object");
  Header header;
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) bad(source, "__metadata__ is not an object");
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string()) bad(source, "__metadata__ value for " + quote(k) + " is not a string");
        header.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string who = "tensor " + quote(name);
    if (!entry.is_object()) bad(source, who + " is not an object");
    for (const auto& [k, v] : entry.items())
      if (k != "dtype" && k != "shape" && k != "data_offsets") bad(source, who + " has unknown field " + quote(k));
    if (entry.size() != 3) bad(source, who + " lacks dtype, shape or data_offsets");
    const auto& dtype = entry["dtype"];
    const auto& shape = entry["shape"];
    const auto& offsets = entry["data_offsets"];
    TensorInfo info;
    info.name = name;
    if (!dtype.is_string()) bad(source, who + " dtype is not a string");
    const auto format = format_from_safetensors(dtype.get_ref<const std::string&>());
    if (!format) bad(source, who + " has unknown dtype " + quote(dtype.get<std::string>()));
    info.dtype = *format;
    if (!shape.is_array()) bad(source, who + " shape is not an array");
    for (const auto& d : shape) {
      uint64_t dim = 0;
      if (!json_to_uint64(d, dim) || dim > uint64_t(std::numeric_limits<int64_t>::max()))
        bad(source, who + " shape has a value that is not a non-negative integer");
      info.shape.push_back(int64_t(dim));
    }
    if (!offsets.is_array() || offsets.size() != 2 || !json_to_uint64(offsets[0], info.begin) ||
        !json_to_uint64(offsets[1], info.end))
      bad(source, who + " data_offsets is not [begin, end] of non-negative integers");
    uint64_t need = 0;
    if (const std::string problem = shape_problem(info.dtype, info.shape, need); !problem.empty())
      bad(source, who + " " + problem);
    if (info.begin > info.end) bad(source, who + " data_offsets has begin > end");
    if (info.end > data_size)
      bad(source, who + " data_offsets end " + std::to_string(info.end) + " is past the data section (" +
                      std::to_string(data_size) + " bytes); the file may be truncated");
    if (need != info.nbytes())
      bad(source, who + " has " + std::to_string(info.nbytes()) + " bytes but dtype and shape need " +
                      std::to_string(info.numel()) + " x " + std::to_string(element_size(info.dtype)));
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

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path, LoadMode mode) {
  if (const std::string problem = path_problem(path); !problem.empty()) bad(quote(path), problem);
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  // The file type is checked before opening: opening a FIFO for reading blocks until a
  // writer appears, and opening some devices has side effects. O_NONBLOCK keeps a FIFO
  // swapped in after the check from blocking; the fstat below then refuses it.
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) bad(path, std::string("cannot open: ") + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) bad(path, "is " + file_kind(st.st_mode) + ", not a regular file");
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) bad(path, std::string("cannot open: ") + std::strerror(errno));
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    bad(path, "is " + file_kind(st.st_mode) + ", not a regular file");
  }
  f->size_ = uint64_t(st.st_size);
  if (f->size_ < 8) {
    ::close(fd);
    bad(path, "file has " + std::to_string(f->size_) + " bytes, fewer than the 8-byte header length");
  }
  void* map = nullptr;
  if (mode == LoadMode::map) {
    map = ::mmap(nullptr, f->size_, PROT_READ, MAP_SHARED, fd, 0);
  } else {
    // A private anonymous copy: immune to the file being truncated or rewritten later.
    map = ::mmap(nullptr, f->size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t done = 0;
    while (map != MAP_FAILED && done < f->size_) {
      const ssize_t got = ::pread(fd, static_cast<char*>(map) + done, f->size_ - done, off_t(done));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        const std::string why = got < 0 ? std::strerror(errno) : "the file shrank while it was read";
        ::munmap(map, f->size_);
        ::close(fd);
        bad(path, "read failed: " + why);
      }
      done += uint64_t(got);
    }
    if (map != MAP_FAILED) ::mprotect(map, f->size_, PROT_READ);
    f->copied_ = true;
  }
  const int map_errno = errno;
  ::close(fd);
  if (map == MAP_FAILED) bad(path, std::string("mmap failed: ") + std::strerror(map_errno));
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
  // On the private copy MADV_DONTNEED would zero the data: only file-backed pages are dropped.
  if (map_ && !copied_) ::madvise(map_, size_, MADV_DONTNEED);
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
      out += json_string(it->first, "metadata key") + ':' + json_string(it->second, "metadata value");
    }
    out += '}';
    first = false;
  }
  uint64_t offset = 0;
  for (const auto& s : specs) {
    require(s.name != "__metadata__", "make_header", "a tensor may not be named __metadata__");
    uint64_t nbytes = 0;
    const std::string problem = shape_problem(s.dtype, s.shape, nbytes);
    require(problem.empty(), "make_header", "tensor ", quote(s.name), " ", problem);
    require(offset <= uint64_t(std::numeric_limits<int64_t>::max()) - nbytes, "make_header",
            "the tensors' total size overflows 64 bits at tensor ", quote(s.name));
    if (!first) out += ',';
    first = false;
    out += json_string(s.name, "tensor name");
    out += ":{\"dtype\":\"" + std::string(dtype_name(s.dtype)) + "\",\"shape\":[";
    for (size_t k = 0; k < s.shape.size(); ++k) {
      if (k) out += ',';
      out += std::to_string(s.shape[k]);
    }
    out += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + nbytes) + "]}";
    offset += nbytes;
  }
  out += '}';
  while (out.size() % 8 != 0) out += ' ';
  require(out.size() <= kMaxHeader, "make_header", "the header would have ", out.size(),
          " bytes; readers refuse more than ", kMaxHeader);
  return out;
}

SafetensorsWriter::SafetensorsWriter(std::string path, std::vector<TensorSpec> specs,
                                     std::map<std::string, std::string> metadata, bool durable)
    : path_(std::move(path)), specs_(std::move(specs)), durable_(durable) {
  const std::string problem = path_problem(path_);
  require(problem.empty(), "SafetensorsWriter", problem, " (", quote(path_), ")");
  std::vector<std::string> names;
  for (const auto& s : specs_) names.push_back(s.name);
  std::sort(names.begin(), names.end());
  auto dup = std::adjacent_find(names.begin(), names.end());
  require(dup == names.end(), "SafetensorsWriter", "tensor name \"", dup == names.end() ? "" : *dup,
          "\" appears twice");
  // Every size is checked (make_header) before the file is created.
  const std::string header = make_header(specs_, metadata);
  for (const auto& s : specs_) {
    uint64_t nbytes = 0;
    shape_problem(s.dtype, s.shape, nbytes);
    sizes_.push_back(nbytes);
  }
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
  const uint64_t want = sizes_[next_];
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
  // Data reaches the disk before the rename makes it visible, and the folder entry after:
  // a crash leaves either the old file or the complete new one.
  int error = std::fflush(file_) == 0 ? 0 : errno;
  if (!error && durable_ && ::fsync(::fileno(file_)) != 0) error = errno;
  if (std::fclose(file_) != 0 && !error) error = errno;
  file_ = nullptr;
  if (!error && std::rename(temp_.c_str(), path_.c_str()) != 0) error = errno;
  if (error) {
    std::remove(temp_.c_str());
    fail("SafetensorsWriter.finish", "cannot write ", path_, ": ", std::strerror(error));
  }
  if (durable_ && !sync_parent_folder(path_))
    fail("SafetensorsWriter.finish", "wrote ", path_, " but could not fsync its folder: ", std::strerror(errno));
}

}  // namespace halo::io
