#include "json_lite.hpp"

#include <set>
#include <stdexcept>

namespace halo::io::json {
namespace {

constexpr int kMaxDepth = 64;

struct Parser {
  std::string_view s;
  size_t i = 0;

  [[noreturn]] void error(const std::string& what) const {
    throw std::runtime_error("invalid JSON at byte " + std::to_string(i) + ": " + what);
  }
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  char peek() {
    if (i >= s.size()) error("unexpected end");
    return s[i];
  }
  void expect(char c) {
    if (peek() != c) error(std::string("expected '") + c + "'");
    ++i;
  }
  void literal(std::string_view word) {
    if (s.substr(i, word.size()) != word) error("bad literal");
    i += word.size();
  }
  static void utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }
  uint32_t hex4() {
    if (i + 4 > s.size()) error("short \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s[i++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') v |= uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= uint32_t(c - 'A' + 10);
      else error("bad \\u escape");
    }
    return v;
  }
  std::string string() {
    expect('"');
    std::string out;
    for (;;) {
      char c = peek();
      ++i;
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) error("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      char e = peek();
      ++i;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (i + 2 > s.size() || s[i] != '\\' || s[i + 1] != 'u') error("unpaired surrogate");
            i += 2;
            uint32_t lo = hex4();
            if (lo < 0xDC00 || lo >= 0xE000) error("unpaired surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            error("unpaired surrogate");
          }
          utf8(out, cp);
          break;
        }
        default: error("bad escape");
      }
    }
  }
  std::string number() {
    size_t start = i;
    if (peek() == '-') ++i;
    if (peek() == '0') {
      ++i;
    } else if (peek() >= '1' && peek() <= '9') {
      while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    } else {
      error("bad number");
    }
    if (i < s.size() && s[i] == '.') {
      ++i;
      if (!(i < s.size() && s[i] >= '0' && s[i] <= '9')) error("bad number");
      while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    }
    if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
      ++i;
      if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
      if (!(i < s.size() && s[i] >= '0' && s[i] <= '9')) error("bad number");
      while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    }
    return std::string(s.substr(start, i - start));
  }
  Value value(int depth) {
    if (depth > kMaxDepth) error("nested too deeply");
    ws();
    Value v;
    char c = peek();
    if (c == '{') {
      v.kind = Value::Kind::Object;
      ++i;
      ws();
      std::set<std::string> seen;
      if (peek() == '}') {
        ++i;
        return v;
      }
      for (;;) {
        ws();
        std::string key = string();
        if (!seen.insert(key).second) error("duplicate key \"" + key + "\"");
        ws();
        expect(':');
        v.members.emplace_back(std::move(key), value(depth + 1));
        ws();
        if (peek() == ',') {
          ++i;
          continue;
        }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.kind = Value::Kind::Array;
      ++i;
      ws();
      if (peek() == ']') {
        ++i;
        return v;
      }
      for (;;) {
        v.items.push_back(value(depth + 1));
        ws();
        if (peek() == ',') {
          ++i;
          continue;
        }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.kind = Value::Kind::String;
      v.text = string();
      return v;
    }
    if (c == 't') {
      literal("true");
      v.kind = Value::Kind::Bool;
      v.boolean = true;
      return v;
    }
    if (c == 'f') {
      literal("false");
      v.kind = Value::Kind::Bool;
      return v;
    }
    if (c == 'n') {
      literal("null");
      return v;
    }
    v.kind = Value::Kind::Number;
    v.text = number();
    return v;
  }
};

// Offset of the first byte that breaks UTF-8 (overlongs, surrogates and values
// above U+10FFFF included), or npos when the text is valid.
size_t invalid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = 0;
    uint32_t cp = 0, min = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07, min = 0x10000;
    } else {
      return i;
    }
    if (i + len > s.size()) return i;
    for (size_t k = 1; k < len; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (b & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000)) return i;
    i += len;
  }
  return std::string_view::npos;
}

}  // namespace

Value parse(std::string_view text) {
  if (size_t bad = invalid_utf8(text); bad != std::string_view::npos)
    throw std::runtime_error("invalid UTF-8 at byte " + std::to_string(bad));
  Parser p{text};
  Value v = p.value(0);
  p.ws();
  if (p.i != text.size()) p.error("trailing characters");
  return v;
}

bool as_uint64(const Value& v, uint64_t& out) {
  if (v.kind != Value::Kind::Number || v.text.empty()) return false;
  uint64_t acc = 0;
  for (char c : v.text) {
    if (c < '0' || c > '9') return false;  // sign, fraction or exponent
    uint64_t d = uint64_t(c - '0');
    if (acc > (UINT64_MAX - d) / 10) return false;
    acc = acc * 10 + d;
  }
  out = acc;
  return true;
}

}  // namespace halo::io::json
