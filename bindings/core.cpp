// halo._core.core: the format table, read by Python so both sides share one source.
#include "bindings/registry.hpp"
#include "halo/core/format.hpp"

namespace halo::bindings {
namespace {

std::string_view kind_name(FormatKind kind) {
  switch (kind) {
    case FormatKind::floating: return "float";
    case FormatKind::integer: return "int";
    case FormatKind::boolean: return "bool";
    case FormatKind::bnb4: return "bnb4";
    case FormatKind::ggml_block: return "ggml_block";
  }
  return "?";
}

void bind(py::module_& m) {
  m.def(
      "formats",
      [] {
        py::list rows;
        for (const FormatTraits& t : kFormats) {
          py::dict row;
          row["name"] = t.name;
          row["kind"] = kind_name(t.kind);
          row["torch"] = t.torch;
          row["numpy"] = t.numpy;
          row["safetensors"] = t.safetensors;
          row["gguf"] = t.gguf;
          row["ggml_type"] = t.ggml_type;
          row["block_elems"] = t.block_elems;
          row["block_bytes"] = t.block_bytes;
          row["bits_per_element"] = t.bits_per_element;
          row["code_book"] = t.code_book ? py::object(py::cast(std::vector<float>(t.code_book, t.code_book + t.code_size)))
                                         : py::object(py::none());
          const RowCodec& codec = row_codec(t.format);
          row["to_float"] = codec.to_float != nullptr;
          row["from_float"] = codec.from_float != nullptr;
          rows.append(row);
        }
        return rows;
      },
      "Every row of halo's format table as a dict (names per library, block shape, code book, codecs).");
  m.def("bnb4_blocksize_range", [] { return py::make_tuple(kBnb4MinBlock, kBnb4MaxBlock); },
        "(smallest, largest) bitsandbytes 4-bit block size; every power of two between is valid.");
}

Registrar registrar("core", bind);

}  // namespace
}  // namespace halo::bindings
