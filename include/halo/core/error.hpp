// Error types shared by every halo area.
//
// C++ callers catch them as std::exception; the Python bindings translate
// InvalidArgument -> ValueError, TypeMismatch -> TypeError and
// BackendUnavailable -> RuntimeError. Every message names the function
// that raised it and the offending value.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace halo {

struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct TypeMismatch : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct BackendUnavailable : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Parts>
std::string cat(std::string_view function, const Parts&... parts) {
  std::ostringstream out;
  out << '[' << function << "] ";
  (out << ... << parts);
  return out.str();
}
}  // namespace detail

// Throws E with the message "[function] parts...".
template <typename E = InvalidArgument, typename... Parts>
[[noreturn]] void fail(std::string_view function, const Parts&... parts) {
  throw E(detail::cat(function, parts...));
}

template <typename E = InvalidArgument, typename... Parts>
void require(bool condition, std::string_view function, const Parts&... parts) {
  if (!condition) fail<E>(function, parts...);
}

}  // namespace halo
