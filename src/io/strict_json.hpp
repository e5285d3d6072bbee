// Strict JSON for file headers, on top of nlohmann_json.
//
// nlohmann already rejects what RFC 8259 forbids (ill-formed UTF-8, unpaired
// surrogates, control characters in strings, trailing text). Two things it
// accepts silently must not pass in a header a hostile user wrote: a duplicate
// object key (the later value would win, so two readers could see different
// tensors) and unbounded nesting.
#pragma once

#include <nlohmann/json.hpp>
#include <string_view>

namespace halo::io {

constexpr int kMaxJsonDepth = 64;

// Throws std::runtime_error whose message is printable ASCII (safe to embed in
// any error text) on malformed input, a duplicate key or nesting deeper than max_depth.
nlohmann::json parse_strict_json(std::string_view text, int max_depth = kMaxJsonDepth);

// True when v is a JSON integer in [0, 2^64) written without sign, fraction or exponent.
bool json_to_uint64(const nlohmann::json& v, uint64_t& out);

}  // namespace halo::io
