// A small strict JSON parser (RFC 8259 values) for file headers. Depth and
// size are bounded so hostile input cannot exhaust the stack.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace halo::io::json {

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object } kind = Kind::Null;
  bool boolean = false;
  std::string text;  // String: decoded text; Number: the literal as written
  std::vector<Value> items;
  std::vector<std::pair<std::string, Value>> members;  // in file order
};

// Throws std::runtime_error with a position on malformed input or duplicate keys.
Value parse(std::string_view text);

// Parses a Number literal as a non-negative integer; false if it is not one or overflows.
bool as_uint64(const Value& v, uint64_t& out);

}  // namespace halo::io::json
