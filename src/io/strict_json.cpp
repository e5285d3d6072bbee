#include "strict_json.hpp"

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace halo::io {
namespace {

using Json = nlohmann::json;

// nlohmann's messages quote the bytes last read, which may be invalid UTF-8.
std::string printable(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (unsigned char c : text) out += (c >= 0x20 && c < 0x7f) ? char(c) : '?';
  return out;
}

// Builds the document from nlohmann's SAX events, refusing duplicate keys and deep nesting.
// (nlohmann's parser callback could check both, but its DOM builder then scans the parent
// object for discarded members after every child object: quadratic in the tensor count.)
class StrictBuilder final : public nlohmann::json_sax<Json> {
 public:
  StrictBuilder(Json& root, int max_depth) : root_(root), max_depth_(max_depth) {}

  bool null() override { return put(nullptr) != nullptr; }
  bool boolean(bool v) override { return put(v) != nullptr; }
  bool number_integer(number_integer_t v) override { return put(v) != nullptr; }
  bool number_unsigned(number_unsigned_t v) override { return put(v) != nullptr; }
  bool number_float(number_float_t v, const string_t&) override { return put(v) != nullptr; }
  bool string(string_t& v) override { return put(std::move(v)) != nullptr; }
  bool binary(binary_t&) override { throw std::runtime_error("binary values are not JSON"); }
  bool start_object(std::size_t) override { return open(Json::object()); }
  bool start_array(std::size_t) override { return open(Json::array()); }
  bool end_object() override { return close(); }
  bool end_array() override { return close(); }
  bool key(string_t& k) override {
    if (open_.back()->contains(k)) throw std::runtime_error("duplicate key \"" + printable(k.substr(0, 80)) + "\"");
    key_ = std::move(k);
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& error) override {
    throw std::runtime_error(printable(error.what()));
  }

 private:
  // Stores v where the document is being built; the pointer stays valid while the value is
  // open, because its parent is not modified until it closes.
  template <typename V>
  Json* put(V&& v) {
    if (open_.empty()) {
      root_ = Json(std::forward<V>(v));
      return &root_;
    }
    Json& parent = *open_.back();
    if (parent.is_array()) {
      parent.emplace_back(std::forward<V>(v));
      return &parent.back();
    }
    Json& slot = parent[key_];
    slot = Json(std::forward<V>(v));
    return &slot;
  }
  bool open(Json&& container) {
    if (int(open_.size()) >= max_depth_)
      throw std::runtime_error("nested deeper than " + std::to_string(max_depth_) + " levels");
    open_.push_back(put(std::move(container)));
    return true;
  }
  bool close() {
    open_.pop_back();
    return true;
  }

  Json& root_;
  int max_depth_;
  std::vector<Json*> open_;
  std::string key_;
};

}  // namespace

nlohmann::json parse_strict_json(std::string_view text, int max_depth) {
  Json root;
  StrictBuilder builder(root, max_depth);
  try {
    Json::sax_parse(text.begin(), text.end(), &builder);
  } catch (const nlohmann::json::exception& error) {
    throw std::runtime_error(printable(error.what()));
  }
  return root;
}

bool json_to_uint64(const nlohmann::json& v, uint64_t& out) {
  // nlohmann stores integer literals that fit in uint64 as number_unsigned; negative
  // ones as number_integer, and fractions, exponents and larger ones as number_float.
  if (!v.is_number_unsigned()) return false;
  out = v.get<uint64_t>();
  return true;
}

}  // namespace halo::io
