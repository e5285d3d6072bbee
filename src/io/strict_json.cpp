#include "strict_json.hpp"

#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace halo::io {
namespace {

// nlohmann's messages quote the bytes last read, which may be invalid UTF-8.
std::string printable(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (unsigned char c : text) out += (c >= 0x20 && c < 0x7f) ? char(c) : '?';
  return out;
}

}  // namespace

nlohmann::json parse_strict_json(std::string_view text, int max_depth) {
  // One key set per open object: nlohmann reports object_start/key/object_end in document order.
  std::vector<std::set<std::string>> open_objects;
  auto check = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) -> bool {
    using Event = nlohmann::json::parse_event_t;
    if ((event == Event::object_start || event == Event::array_start) && depth >= max_depth)
      throw std::runtime_error("nested deeper than " + std::to_string(max_depth) + " levels");
    if (event == Event::object_start) {
      open_objects.emplace_back();
    } else if (event == Event::object_end) {
      open_objects.pop_back();
    } else if (event == Event::key) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second)
        throw std::runtime_error("duplicate key \"" + printable(key.substr(0, 80)) + "\"");
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), check);
  } catch (const nlohmann::json::exception& error) {
    throw std::runtime_error(printable(error.what()));
  }
}

bool json_to_uint64(const nlohmann::json& v, uint64_t& out) {
  // nlohmann stores integer literals that fit in uint64 as number_unsigned; negative
  // ones as number_integer, and fractions, exponents and larger ones as number_float.
  if (!v.is_number_unsigned()) return false;
  out = v.get<uint64_t>();
  return true;
}

}  // namespace halo::io
