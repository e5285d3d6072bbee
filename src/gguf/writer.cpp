// GGUF metadata values, header serialization and the streaming writer.
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <set>

#include "halo/core/error.hpp"
#include "halo/gguf/gguf.hpp"

namespace halo::gguf {

std::string_view value_type_name(ValueType type) {
  switch (type) {
    case ValueType::u8: return "uint8";
    case ValueType::i8: return "int8";
    case ValueType::u16: return "uint16";
    case ValueType::i16: return "int16";
    case ValueType::u32: return "uint32";
    case ValueType::i32: return "int32";
    case ValueType::f32: return "float32";
    case ValueType::boolean: return "bool";
    case ValueType::string: return "string";
    case ValueType::array: return "array";
    case ValueType::u64: return "uint64";
    case ValueType::i64: return "int64";
    case ValueType::f64: return "float64";
  }
  return "?";
}

int64_t value_type_size(ValueType type) {
  switch (type) {
    case ValueType::u8:
    case ValueType::i8:
    case ValueType::boolean: return 1;
    case ValueType::u16:
    case ValueType::i16: return 2;
    case ValueType::u32:
    case ValueType::i32:
    case ValueType::f32: return 4;
    case ValueType::u64:
    case ValueType::i64:
    case ValueType::f64: return 8;
    case ValueType::string:
    case ValueType::array: return 0;
  }
  return 0;
}

Value Value::number(ValueType type, const void* data) {
  require(value_type_size(type) > 0, "Value.number", "type ", value_type_name(type), " is not numeric");
  Value v;
  v.type = type;
  const auto* p = static_cast<const uint8_t*>(data);
  v.bytes.assign(p, p + value_type_size(type));
  return v;
}
Value Value::u32(uint32_t x) { return number(ValueType::u32, &x); }
Value Value::i32(int32_t x) { return number(ValueType::i32, &x); }
Value Value::f32(float x) { return number(ValueType::f32, &x); }
Value Value::boolean(bool x) {
  const uint8_t byte = x ? 1 : 0;
  return number(ValueType::boolean, &byte);
}
Value Value::string(std::string x) {
  Value v;
  v.type = ValueType::string;
  v.strings.push_back(std::move(x));
  return v;
}
Value Value::string_array(std::vector<std::string> items) {
  Value v;
  v.type = ValueType::array;
  v.element_type = ValueType::string;
  v.count = items.size();
  v.strings = std::move(items);
  return v;
}
Value Value::numeric_array(ValueType element_type, const void* data, uint64_t count) {
  require(value_type_size(element_type) > 0, "Value.numeric_array", "element type ", value_type_name(element_type),
          " is not numeric");
  Value v;
  v.type = ValueType::array;
  v.element_type = element_type;
  v.count = count;
  const auto* p = static_cast<const uint8_t*>(data);
  v.bytes.assign(p, p + count * uint64_t(value_type_size(element_type)));
  return v;
}

namespace {
template <typename T>
T load(const std::vector<uint8_t>& bytes) {
  T value;
  std::memcpy(&value, bytes.data(), sizeof(T));
  return value;
}
}  // namespace

uint64_t Value::as_u64() const {
  switch (type) {
    case ValueType::u8: return load<uint8_t>(bytes);
    case ValueType::u16: return load<uint16_t>(bytes);
    case ValueType::u32: return load<uint32_t>(bytes);
    case ValueType::u64: return load<uint64_t>(bytes);
    case ValueType::i8:
    case ValueType::i16:
    case ValueType::i32:
    case ValueType::i64: {
      const int64_t v = as_i64();
      require(v >= 0, "Value.as_u64", "value ", v, " is negative");
      return uint64_t(v);
    }
    default: fail("Value.as_u64", "a ", value_type_name(type), " is not an integer");
  }
}

int64_t Value::as_i64() const {
  switch (type) {
    case ValueType::i8: return load<int8_t>(bytes);
    case ValueType::i16: return load<int16_t>(bytes);
    case ValueType::i32: return load<int32_t>(bytes);
    case ValueType::i64: return load<int64_t>(bytes);
    case ValueType::u8:
    case ValueType::u16:
    case ValueType::u32: return int64_t(as_u64());
    case ValueType::u64: {
      const uint64_t v = load<uint64_t>(bytes);
      require(v <= uint64_t(INT64_MAX), "Value.as_i64", "value ", v, " does not fit in int64");
      return int64_t(v);
    }
    default: fail("Value.as_i64", "a ", value_type_name(type), " is not an integer");
  }
}

double Value::as_f64() const {
  switch (type) {
    case ValueType::f32: return load<float>(bytes);
    case ValueType::f64: return load<double>(bytes);
    case ValueType::u8:
    case ValueType::u16:
    case ValueType::u32:
    case ValueType::u64: return double(as_u64());
    case ValueType::i8:
    case ValueType::i16:
    case ValueType::i32:
    case ValueType::i64: return double(as_i64());
    default: fail("Value.as_f64", "a ", value_type_name(type), " is not a number");
  }
}

const std::string& Value::as_string() const {
  require(type == ValueType::string, "Value.as_string", "a ", value_type_name(type), " is not a string");
  return strings.at(0);
}

// ------------------------------------------------------------- serialization

namespace {

class Buffer {
 public:
  template <typename T>
  void put(T value) {
    const auto* p = reinterpret_cast<const uint8_t*>(&value);
    out.insert(out.end(), p, p + sizeof(T));
  }
  void put_string(const std::string& s) {
    put<uint64_t>(s.size());
    out.insert(out.end(), s.begin(), s.end());
  }
  std::vector<uint8_t> out;
};

void check_value(const std::string& key, const Value& v) {
  const std::string fn = "GgufWriter";
  if (v.type == ValueType::string) {
    require(v.strings.size() == 1, fn, "key '", key, "': a string value holds exactly one string");
    return;
  }
  if (v.type != ValueType::array) {
    require(int64_t(v.bytes.size()) == value_type_size(v.type), fn, "key '", key, "': a ", value_type_name(v.type),
            " needs ", value_type_size(v.type), " bytes, got ", v.bytes.size());
    return;
  }
  require(v.element_type != ValueType::array, fn, "key '", key, "': arrays of arrays are not supported");
  if (v.element_type == ValueType::string) {
    require(v.strings.size() == v.count, fn, "key '", key, "': array claims ", v.count, " strings, holds ",
            v.strings.size());
    return;
  }
  require(v.bytes.size() == v.count * uint64_t(value_type_size(v.element_type)), fn, "key '", key, "': array of ",
          v.count, " ", value_type_name(v.element_type), " needs ", v.count * uint64_t(value_type_size(v.element_type)),
          " bytes, got ", v.bytes.size());
}

}  // namespace

std::vector<uint8_t> serialize_header(const std::vector<KeyValue>& metadata, const std::vector<TensorInfo>& tensors,
                                      uint32_t alignment) {
  Buffer b;
  b.out.insert(b.out.end(), {'G', 'G', 'U', 'F'});
  b.put<uint32_t>(3);
  b.put<uint64_t>(tensors.size());
  b.put<uint64_t>(metadata.size());
  for (const KeyValue& kv : metadata) {
    b.put_string(kv.key);
    b.put<uint32_t>(uint32_t(kv.value.type));
    const Value& v = kv.value;
    if (v.type == ValueType::string) {
      b.put_string(v.strings[0]);
    } else if (v.type == ValueType::array) {
      b.put<uint32_t>(uint32_t(v.element_type));
      b.put<uint64_t>(v.count);
      if (v.element_type == ValueType::string)
        for (const std::string& s : v.strings) b.put_string(s);
      else
        b.out.insert(b.out.end(), v.bytes.begin(), v.bytes.end());
    } else {
      b.out.insert(b.out.end(), v.bytes.begin(), v.bytes.end());
    }
  }
  for (const TensorInfo& t : tensors) {
    b.put_string(t.name);
    b.put<uint32_t>(uint32_t(t.dims.size()));
    for (int64_t d : t.dims) b.put<int64_t>(d);
    b.put<uint32_t>(uint32_t(t.type));
    b.put<uint64_t>(t.offset);
  }
  while (b.out.size() % alignment != 0) b.out.push_back(0);
  return std::move(b.out);
}

// ------------------------------------------------------------- writer

GgufWriter::GgufWriter(std::string path, std::vector<KeyValue> metadata, std::vector<TensorSpec> tensors,
                       uint32_t alignment)
    : path_(std::move(path)), alignment_(alignment) {
  const std::string fn = "GgufWriter";
  require(alignment != 0 && (alignment & (alignment - 1)) == 0, fn, "alignment must be a power of two, got ", alignment);
  std::set<std::string> keys;
  for (const KeyValue& kv : metadata) {
    require(!kv.key.empty(), fn, "empty metadata key");
    require(keys.insert(kv.key).second, fn, "duplicate metadata key '", kv.key, "'");
    check_value(kv.key, kv.value);
    if (kv.key == "general.alignment")
      require(kv.value.type == ValueType::u32 && kv.value.as_u64() == alignment, fn,
              "general.alignment in the metadata must be a uint32 equal to the writer's alignment ", alignment);
  }
  if (alignment != 32)
    require(keys.count("general.alignment") == 1, fn, "alignment ", alignment,
            " needs a general.alignment key in the metadata (readers assume 32 otherwise)");
  std::set<std::string> names;
  uint64_t offset = 0;
  for (TensorSpec& spec : tensors) {
    require(!spec.name.empty() && spec.name.size() < 64, fn, "tensor name '", spec.name,
            "' must have 1 to 63 bytes (llama.cpp's limit)");
    require(names.insert(spec.name).second, fn, "duplicate tensor name '", spec.name, "'");
    require(!spec.dims.empty() && spec.dims.size() <= 4, fn, "tensor '", spec.name, "' has ", spec.dims.size(),
            " dimensions (must be 1 to 4)");
    TensorInfo info;
    info.name = spec.name;
    info.type = spec.type;
    info.dims = spec.dims;
    int64_t numel = 1;
    for (int64_t d : spec.dims) {
      require(d >= 0, fn, "tensor '", spec.name, "' has a negative dimension ", d);
      require(d == 0 || numel <= INT64_MAX / d, fn, "tensor '", spec.name, "' is too large");
      numel *= d;
    }
    const auto layout = type_layout(uint32_t(spec.type));
    require(layout.has_value(), fn, "tensor '", spec.name, "' has unknown type id ", uint32_t(spec.type));
    require(spec.dims[0] % layout->block == 0, fn, "tensor '", spec.name, "' has ", spec.dims[0],
            " elements per row, not a multiple of ", layout->name, "'s block size ", layout->block);
    info.nbytes = type_bytes(spec.type, numel);
    info.offset = offset;
    offset += (info.nbytes + alignment - 1) / alignment * alignment;
    infos_.push_back(std::move(info));
  }
  const std::vector<uint8_t> header = serialize_header(metadata, infos_, alignment);
  const size_t slash = path_.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "" : path_.substr(0, slash + 1);
  const std::string base = slash == std::string::npos ? path_ : path_.substr(slash + 1);
  require(!base.empty(), fn, "output path '", path_, "' names a folder, not a file");
  temp_ = dir + "." + base + ".halo-tmp-" + std::to_string(::getpid());
  file_ = std::fopen(temp_.c_str(), "wb");
  if (!file_) fail(fn, "cannot create ", temp_, ": ", std::strerror(errno));
  put(header.data(), header.size());
}

GgufWriter::~GgufWriter() { abandon(); }

void GgufWriter::abandon() noexcept {
  if (file_) {
    std::fclose(file_);
    file_ = nullptr;
    std::remove(temp_.c_str());
  }
}

void GgufWriter::put(const void* data, uint64_t nbytes) {
  if (nbytes != 0 && std::fwrite(data, 1, nbytes, file_) != nbytes) {
    const int err = errno;
    abandon();
    fail("GgufWriter.write", "write to ", temp_, " failed: ", std::strerror(err));
  }
  bytes_ += nbytes;
}

void GgufWriter::pad_to_alignment() {
  static const uint8_t zeros[256] = {};
  while (bytes_ % alignment_ != 0) put(zeros, std::min<uint64_t>(sizeof(zeros), alignment_ - bytes_ % alignment_));
}

void GgufWriter::write(const std::string& name, const void* data, uint64_t nbytes) {
  const std::string fn = "GgufWriter.write";
  require(file_ != nullptr, fn, "the writer is finished or failed");
  require(next_ < infos_.size(), fn, "all ", infos_.size(), " tensors are written already; got '", name, "'");
  const TensorInfo& info = infos_[next_];
  require(name == info.name, fn, "expected tensor '", info.name, "' next, got '", name, "'");
  require(nbytes <= info.nbytes - part_, fn, "tensor '", name, "' of type ", type_name(info.type), " needs ",
          info.nbytes, " bytes; ", part_, " are written and ", nbytes, " more would be too many");
  put(data, nbytes);
  part_ += nbytes;
  if (part_ == info.nbytes) {
    pad_to_alignment();
    part_ = 0;
    ++next_;
  }
}

void GgufWriter::finish() {
  const std::string fn = "GgufWriter.finish";
  require(file_ != nullptr, fn, "the writer is finished or failed");
  if (next_ != infos_.size()) {
    const std::string missing = infos_[next_].name;
    abandon();
    fail(fn, "only ", next_, " of ", infos_.size(), " tensors were written completely (next: '", missing, "')");
  }
  bool ok = std::fflush(file_) == 0 && ::fsync(::fileno(file_)) == 0;
  const int err = errno;
  ok = (std::fclose(file_) == 0) && ok;
  file_ = nullptr;
  if (!ok || std::rename(temp_.c_str(), path_.c_str()) != 0) {
    const int rename_err = ok ? errno : err;
    std::remove(temp_.c_str());
    fail(fn, "cannot finish ", path_, ": ", std::strerror(rename_err));
  }
}

}  // namespace halo::gguf
