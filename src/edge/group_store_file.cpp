// Group store files: the writer (two passes over a small index, one over the data) and the
// strict reader of the header and index.
#include "group_store_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "halo/core/error.hpp"
#include "halo/quant/quant4.hpp"

namespace halo::edge {

namespace {

using nlohmann::json;
using detail::align_up;

constexpr int64_t kMaxDim = int64_t(1) << 24;
constexpr int64_t kMaxNumel = int64_t(1) << 31;
constexpr uint64_t kMaxIndexBytes = uint64_t(1) << 28;
constexpr size_t kMaxTensors = 64;
constexpr size_t kMaxName = 64;

void put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i));
}
void put64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i));
}
uint32_t get32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
uint64_t get64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

bool is_4bit(Format f) { return is_bnb4(f); }

std::string hex64(uint64_t v) {
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(v));
  return text;
}

std::string key_text(GroupKey k) {
  return "(" + std::to_string(k.layer) + ", " + std::to_string(k.part) + ", " + std::to_string(k.index) + ")";
}

void write_all(int fd, const void* data, uint64_t bytes, uint64_t offset, const std::string& path) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (bytes > 0) {
    const ssize_t n = ::pwrite(fd, p, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail<FormatError>("GroupStoreWriter", path, ": write failed (", std::strerror(errno), ")");
    p += n;
    bytes -= uint64_t(n);
    offset += uint64_t(n);
  }
}

void check_spec(const TensorSpec& t, const GroupKey& key) {
  const char* fn = "GroupStoreWriter";
  require(!t.name.empty() && t.name.size() <= kMaxName, fn, "group ", key_text(key), ": tensor name '", t.name,
          "' must have 1..", kMaxName, " characters");
  require(t.rows >= 1 && t.cols >= 1 && t.rows <= kMaxDim && t.cols <= kMaxDim && t.rows * t.cols <= kMaxNumel, fn,
          "group ", key_text(key), ": tensor '", t.name, "' shape [", t.rows, ", ", t.cols, "] out of range");
  require(t.format == Format::f32 || is_4bit(t.format), fn, "group ", key_text(key), ": tensor '", t.name,
          "' must be nf4, fp4 or f32, got ", format_name(t.format));
  if (is_4bit(t.format))
    require(valid_bnb4_blocksize(t.blocksize), fn, "group ", key_text(key), ": tensor '", t.name,
            "' blocksize must be a power of two in 32..4096, got ", t.blocksize);
}

}  // namespace

GroupKey group_key(std::string_view function, int64_t layer, int64_t part, int64_t index) {
  require(layer >= 0 && layer <= 65535 && part >= 0 && part <= 255 && index >= 0 && index <= 65535, function,
          "group key (", layer, ", ", part, ", ", index, ") out of range");
  return GroupKey{int32_t(layer), int32_t(part), int32_t(index)};
}

Format parse_store_format(std::string_view function, std::string_view name) {
  if (name == "f32") return Format::f32;
  if (const auto f = format_from_name(name); f && is_bnb4(*f)) return *f;
  fail(function, "tensor format must be 'nf4', 'fp4' or 'f32', got '", name, "'");
}

std::string_view store_format_name(Format format) { return format == Format::f32 ? "f32" : format_name(format); }

StoreOptions::Mode StoreOptions::parse_mode(std::string_view function, std::string_view name) {
  if (name == "resident") return Mode::resident;
  if (name == "mmap") return Mode::mmap;
  fail(function, "mode must be 'resident' or 'mmap', got '", name, "'");
}

uint64_t TensorEntry::absmax_offset() const { return align_up(uint64_t(packed_size(numel())), 4); }

const TensorEntry* GroupEntry::find(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

uint64_t tensor_bytes(Format format, int64_t rows, int64_t cols, int64_t blocksize) {
  const int64_t n = rows * cols;
  if (!is_4bit(format)) return uint64_t(n) * 4;
  return align_up(uint64_t(packed_size(n)), 4) + uint64_t(num_blocks(n, blocksize)) * 4;
}

uint64_t store_hash(const void* data, uint64_t bytes) { return XXH3_64bits(data, bytes); }

// ------------------------------------------------------------------------------------------
// Writer

struct GroupStoreWriter::State {
  std::string path, tmp;
  int fd = -1;
  std::vector<GroupEntry> groups;
  std::string meta;
  uint64_t index_bytes = 0, file_bytes = 0;
  size_t next = 0;
  bool finished = false;

  std::string index_text() const {
    json doc;
    doc["meta"] = json::parse(meta);
    json list = json::array();
    for (const auto& g : groups) {
      json tensors = json::array();
      for (const auto& t : g.tensors) {
        json e = {{"name", t.name},   {"format", std::string(store_format_name(t.format))}, {"blocksize", t.blocksize},
                  {"shape", {t.rows, t.cols}}, {"offset", t.offset}, {"bytes", t.bytes}};
        tensors.push_back(std::move(e));
      }
      list.push_back({{"layer", g.key.layer},
                      {"part", g.key.part},
                      {"index", g.key.index},
                      {"offset", g.offset},
                      {"bytes", g.bytes},
                      {"hash", hex64(g.hash)},
                      {"tensors", std::move(tensors)}});
    }
    doc["groups"] = std::move(list);
    return doc.dump();
  }
};

GroupStoreWriter::GroupStoreWriter(std::string path, std::string meta_json, std::vector<GroupSpec> layout)
    : state_(std::make_unique<State>()) {
  const char* fn = "GroupStoreWriter";
  State& s = *state_;
  s.path = std::move(path);
  try {
    const json meta = json::parse(meta_json);
    require(meta.is_object(), fn, "meta must be a JSON object");
    s.meta = meta.dump();
  } catch (const json::exception& e) {
    fail(fn, "meta is not valid JSON (", e.what(), ")");
  }
  require(!layout.empty(), fn, "the layout has no groups");
  std::set<GroupKey> seen;
  for (auto& spec : layout) {
    const GroupKey k = spec.key;
    require(k.layer >= 0 && k.layer <= 65535 && k.part >= 0 && k.part <= 255 && k.index >= 0 && k.index <= 65535, fn,
            "group key ", key_text(k), " out of range");
    require(seen.insert(k).second, fn, "group ", key_text(k), " is listed twice");
    require(!spec.tensors.empty() && spec.tensors.size() <= kMaxTensors, fn, "group ", key_text(k), " must have 1..",
            kMaxTensors, " tensors, got ", spec.tensors.size());
    GroupEntry g;
    g.key = k;
    std::set<std::string> names;
    uint64_t at = 0;
    for (const auto& t : spec.tensors) {
      check_spec(t, k);
      require(names.insert(t.name).second, fn, "group ", key_text(k), ": tensor '", t.name, "' is listed twice");
      TensorEntry e;
      e.name = t.name;
      e.format = t.format;
      e.blocksize = is_4bit(t.format) ? t.blocksize : 0;
      e.rows = t.rows;
      e.cols = t.cols;
      e.offset = align_up(at, 64);
      e.bytes = tensor_bytes(t.format, t.rows, t.cols, t.blocksize);
      at = e.offset + e.bytes;
      g.tensors.push_back(std::move(e));
    }
    g.bytes = at;
    s.groups.push_back(std::move(g));
  }
  // The index sits before the data and its length depends on the offsets it lists (their
  // digit counts): lay out, measure, repeat until the data start stops moving. Hashes are
  // 16 hex digits whatever their value, so the final index has the measured length.
  uint64_t data_start = 0;
  for (int round = 0; round < 8; ++round) {
    uint64_t at = data_start;
    for (auto& g : s.groups) {
      g.offset = at;
      at = align_up(at + g.bytes, kStoreAlignment);
    }
    s.file_bytes = at;
    s.index_bytes = s.index_text().size();
    const uint64_t want = align_up(kStoreHeaderBytes + s.index_bytes, kStoreAlignment);
    if (want == data_start) break;
    data_start = want;
    require<FormatError>(round < 7, fn, "index layout did not settle");
  }
  // The last group ends the file exactly (no padding after it).
  s.file_bytes = s.groups.back().offset + s.groups.back().bytes;
  require(s.index_bytes <= kMaxIndexBytes, fn, "index of ", s.index_bytes, " bytes is too large");
  s.tmp = s.path + ".tmp-" + std::to_string(::getpid());
  s.fd = ::open(s.tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  require<FormatError>(s.fd >= 0, fn, s.tmp, ": cannot create (", std::strerror(errno), ")");
}

GroupStoreWriter::~GroupStoreWriter() {
  if (state_ && state_->fd >= 0) ::close(state_->fd);
  if (state_ && !state_->finished && !state_->tmp.empty()) ::unlink(state_->tmp.c_str());
}

void GroupStoreWriter::write_group(GroupKey key, const std::vector<TensorData>& tensors) {
  const char* fn = "GroupStoreWriter.write_group";
  State& s = *state_;
  require(!s.finished, fn, "the store is already finished");
  require(s.next < s.groups.size(), fn, "all ", s.groups.size(), " groups of the layout are written already");
  GroupEntry& g = s.groups[s.next];
  require(key == g.key, fn, "expected group ", key_text(g.key), " next, got ", key_text(key));
  require(tensors.size() == g.tensors.size(), fn, "group ", key_text(key), " has ", g.tensors.size(),
          " tensors, got data for ", tensors.size());
  std::vector<uint8_t> bytes(g.bytes, 0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorEntry& t = g.tensors[i];
    const TensorData& d = tensors[i];
    uint8_t* out = bytes.data() + t.offset;
    if (is_4bit(t.format)) {
      require(d.packed != nullptr && d.absmax != nullptr, fn, "group ", key_text(key), ": tensor '", t.name,
              "' needs packed codes and absmax");
      require(d.packed_bytes == packed_size(t.numel()) && d.absmax_count == num_blocks(t.numel(), t.blocksize), fn,
              "group ", key_text(key), ": tensor '", t.name, "' [", t.rows, ", ", t.cols, "] needs ",
              packed_size(t.numel()), " packed bytes and ", num_blocks(t.numel(), t.blocksize), " absmax, got ",
              d.packed_bytes, " and ", d.absmax_count);
      std::memcpy(out, d.packed, size_t(packed_size(t.numel())));
      std::memcpy(out + t.absmax_offset(), d.absmax, size_t(num_blocks(t.numel(), t.blocksize)) * 4);
    } else {
      require(d.values != nullptr, fn, "group ", key_text(key), ": tensor '", t.name, "' needs values");
      require(d.values_count == t.numel(), fn, "group ", key_text(key), ": tensor '", t.name, "' needs ", t.numel(),
              " values, got ", d.values_count);
      std::memcpy(out, d.values, size_t(t.numel()) * 4);
    }
  }
  g.hash = store_hash(bytes.data(), bytes.size());
  write_all(s.fd, bytes.data(), bytes.size(), g.offset, s.tmp);
  ++s.next;
}

void GroupStoreWriter::finish() {
  const char* fn = "GroupStoreWriter.finish";
  State& s = *state_;
  require(!s.finished, fn, "the store is already finished");
  require(s.next == s.groups.size(), fn, "only ", s.next, " of ", s.groups.size(), " groups were written");
  const std::string index = s.index_text();
  require<FormatError>(index.size() == s.index_bytes, fn, "index length changed between passes");
  uint8_t header[kStoreHeaderBytes] = {};
  std::memcpy(header, kStoreMagic, 8);
  put32(header + 8, kStoreVersion);
  put32(header + 12, uint32_t(kStoreAlignment));
  put64(header + 16, kStoreHeaderBytes);
  put64(header + 24, index.size());
  put64(header + 32, store_hash(index.data(), index.size()));
  put64(header + 40, s.file_bytes);
  put64(header + 56, store_hash(header, 56));
  write_all(s.fd, header, sizeof header, 0, s.tmp);
  write_all(s.fd, index.data(), index.size(), kStoreHeaderBytes, s.tmp);
  require<FormatError>(::ftruncate(s.fd, static_cast<off_t>(s.file_bytes)) == 0, fn, s.tmp, ": ftruncate failed (",
                       std::strerror(errno), ")");
  require<FormatError>(::fsync(s.fd) == 0, fn, s.tmp, ": fsync failed (", std::strerror(errno), ")");
  ::close(s.fd);
  s.fd = -1;
  require<FormatError>(::rename(s.tmp.c_str(), s.path.c_str()) == 0, fn, "cannot rename ", s.tmp, " to ", s.path,
                       " (", std::strerror(errno), ")");
  s.finished = true;
}

// ------------------------------------------------------------------------------------------
// Reader

namespace detail {

namespace {

// Field access with one-line errors naming the group, tensor and field.
struct Checker {
  const std::string& path;
  [[noreturn]] void bad(const std::string& where, const std::string& what) const {
    fail<FormatError>("GroupStore", path, ": index: ", where, what);
  }
  const json& field(const json& obj, const char* name, const std::string& where) const {
    if (!obj.is_object() || !obj.contains(name)) bad(where, std::string("missing field '") + name + "'");
    return obj.at(name);
  }
  uint64_t uint(const json& obj, const char* name, const std::string& where, uint64_t max) const {
    const json& v = field(obj, name, where);
    if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0))
      bad(where, std::string("'") + name + "' must be a non-negative integer, got " + v.dump());
    const uint64_t value = v.get<uint64_t>();
    if (value > max) bad(where, std::string("'") + name + "' = " + std::to_string(value) + " is out of range");
    return value;
  }
};

}  // namespace

StoreIndex read_index(int fd, const std::string& path) {
  const char* fn = "GroupStore";
  struct stat st{};
  require<FormatError>(::fstat(fd, &st) == 0, fn, path, ": cannot stat (", std::strerror(errno), ")");
  require<FormatError>(S_ISREG(st.st_mode), fn, path, ": not a regular file");
  const uint64_t actual = uint64_t(st.st_size);
  require<FormatError>(actual >= kStoreHeaderBytes, fn, path, ": ", actual,
                       " bytes is too short for a group store (the header alone is 64)");
  uint8_t header[kStoreHeaderBytes];
  require<FormatError>(::pread(fd, header, sizeof header, 0) == ssize_t(sizeof header), fn, path,
                       ": cannot read the header");
  require<FormatError>(std::memcmp(header, kStoreMagic, 8) == 0, fn, path, ": not a halo group store (bad magic)");
  require<FormatError>(get64(header + 56) == store_hash(header, 56), fn, path,
                       ": header checksum mismatch (the header is corrupt)");
  const uint32_t version = get32(header + 8);
  require<FormatError>(version == kStoreVersion, fn, path, ": group store version ", version,
                       ", this halo reads version ", kStoreVersion);
  require<FormatError>(get32(header + 12) == kStoreAlignment, fn, path, ": alignment ", get32(header + 12),
                       ", expected ", kStoreAlignment);
  StoreIndex out;
  const uint64_t index_offset = get64(header + 16), index_bytes = get64(header + 24);
  out.file_bytes = get64(header + 40);
  require<FormatError>(index_offset == kStoreHeaderBytes && index_bytes > 0 && index_bytes <= kMaxIndexBytes, fn,
                       path, ": bad index location [", index_offset, ", +", index_bytes, ")");
  require<FormatError>(index_offset + index_bytes <= actual, fn, path, ": truncated: the index needs bytes up to ",
                       index_offset + index_bytes, ", the file has ", actual);
  std::string text(index_bytes, '\0');
  uint64_t got = 0;
  while (got < index_bytes) {
    const ssize_t n = ::pread(fd, text.data() + got, index_bytes - got, off_t(index_offset + got));
    if (n < 0 && errno == EINTR) continue;
    require<FormatError>(n > 0, fn, path, ": cannot read the index");
    got += uint64_t(n);
  }
  require<FormatError>(store_hash(text.data(), text.size()) == get64(header + 32), fn, path,
                       ": index checksum mismatch (the index is corrupt)");
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::exception& e) {
    fail<FormatError>(fn, path, ": index is not valid JSON (", e.what(), ")");
  }
  const Checker c{path};
  if (!doc.is_object()) c.bad("", "not a JSON object");
  const json& meta = c.field(doc, "meta", "");
  if (!meta.is_object()) c.bad("", "'meta' must be an object");
  out.meta = meta.dump();
  const json& groups = c.field(doc, "groups", "");
  if (!groups.is_array() || groups.empty()) c.bad("", "'groups' must be a non-empty array");
  const uint64_t data_start = align_up(kStoreHeaderBytes + index_bytes, kStoreAlignment);
  std::set<GroupKey> seen;
  uint64_t previous_end = data_start;
  for (size_t i = 0; i < groups.size(); ++i) {
    const json& g = groups[i];
    const std::string where = "group " + std::to_string(i) + ": ";
    GroupEntry e;
    e.key.layer = int32_t(c.uint(g, "layer", where, 65535));
    e.key.part = int32_t(c.uint(g, "part", where, 255));
    e.key.index = int32_t(c.uint(g, "index", where, 65535));
    if (!seen.insert(e.key).second) c.bad(where, "key " + key_text(e.key) + " appears twice");
    e.offset = c.uint(g, "offset", where, uint64_t(1) << 50);
    e.bytes = c.uint(g, "bytes", where, uint64_t(1) << 40);
    if (e.bytes == 0) c.bad(where, "'bytes' must be positive");
    if (e.offset % kStoreAlignment != 0 || e.offset < previous_end)
      c.bad(where, "offset " + std::to_string(e.offset) + " is unaligned or overlaps the previous group");
    previous_end = e.offset + e.bytes;
    if (previous_end > out.file_bytes)
      c.bad(where, "ends at byte " + std::to_string(previous_end) + ", past the header's file size " +
                       std::to_string(out.file_bytes));
    const json& hash = c.field(g, "hash", where);
    if (!hash.is_string() || hash.get<std::string>().size() != 16 ||
        hash.get<std::string>().find_first_not_of("0123456789abcdef") != std::string::npos)
      c.bad(where, "'hash' must be 16 lowercase hex digits");
    e.hash = std::stoull(hash.get<std::string>(), nullptr, 16);
    const json& tensors = c.field(g, "tensors", where);
    if (!tensors.is_array() || tensors.empty() || tensors.size() > kMaxTensors)
      c.bad(where, "'tensors' must be an array of 1.." + std::to_string(kMaxTensors));
    std::set<std::string> names;
    uint64_t tensor_end = 0;
    for (size_t j = 0; j < tensors.size(); ++j) {
      const json& t = tensors[j];
      const std::string tw = where + "tensor " + std::to_string(j) + ": ";
      TensorEntry te;
      const json& name = c.field(t, "name", tw);
      if (!name.is_string() || name.get<std::string>().empty() || name.get<std::string>().size() > kMaxName)
        c.bad(tw, "'name' must be a string of 1.." + std::to_string(kMaxName) + " characters");
      te.name = name.get<std::string>();
      if (!names.insert(te.name).second) c.bad(tw, "name '" + te.name + "' appears twice");
      const json& format = c.field(t, "format", tw);
      try {
        te.format = parse_store_format("GroupStore", format.is_string() ? format.get<std::string>() : "");
      } catch (const InvalidArgument&) {
        c.bad(tw, "'format' must be 'nf4', 'fp4' or 'f32', got " + format.dump());
      }
      te.blocksize = int64_t(c.uint(t, "blocksize", tw, 4096));
      if (is_4bit(te.format) && !valid_bnb4_blocksize(te.blocksize))
        c.bad(tw, "blocksize " + std::to_string(te.blocksize) + " is not a power of two in 32..4096");
      const json& shape = c.field(t, "shape", tw);
      if (!shape.is_array() || shape.size() != 2) c.bad(tw, "'shape' must be [rows, cols]");
      for (int d = 0; d < 2; ++d)
        if (!shape[d].is_number_integer() || shape[d].get<int64_t>() < 1 || shape[d].get<int64_t>() > kMaxDim)
          c.bad(tw, "'shape' entries must be integers in [1, " + std::to_string(kMaxDim) + "], got " + shape.dump());
      te.rows = shape[0].get<int64_t>();
      te.cols = shape[1].get<int64_t>();
      if (te.rows * te.cols > kMaxNumel) c.bad(tw, "too many elements " + shape.dump());
      te.offset = c.uint(t, "offset", tw, e.bytes);
      te.bytes = c.uint(t, "bytes", tw, e.bytes);
      const uint64_t want = tensor_bytes(te.format, te.rows, te.cols, te.blocksize);
      if (te.bytes != want)
        c.bad(tw, "'" + te.name + "' takes " + std::to_string(want) + " bytes, the index says " +
                      std::to_string(te.bytes));
      if (te.offset % 64 != 0 || te.offset < tensor_end || te.offset + te.bytes > e.bytes)
        c.bad(tw, "'" + te.name + "' at offset " + std::to_string(te.offset) +
                      " is unaligned, overlaps another tensor or runs past its group");
      tensor_end = te.offset + te.bytes;
      e.tensors.push_back(std::move(te));
    }
    const uint64_t end = e.offset + e.bytes;
    out.problems.push_back(end > actual ? "truncated: the group needs bytes up to " + std::to_string(end) +
                                              ", the file has " + std::to_string(actual)
                                        : "");
    out.groups.push_back(std::move(e));
  }
  return out;
}

}  // namespace detail

}  // namespace halo::edge
