// Fuzz target: halo::hwq::from_json on mutated hardware-model JSON texts.
// Property: it either returns a model or throws one of halo's exception types
// (InvalidArgument, TypeMismatch, FormatError, BackendUnavailable); anything
// else escaping (a JSON library exception, std::out_of_range, ...) or a crash fails.
#include "fuzz.hpp"
#include "halo/core/error.hpp"
#include "halo/hwq/hardware_model.hpp"

namespace {

using halo::fuzz::Bytes;

std::vector<Bytes> seeds() {
  return {halo::hwq::to_json(halo::hwq::HardwareModel::default_model()), R"({"schema":"halo.hwq.hardware_model","version":1})", "{}"};
}

bool run_one(const Bytes& input) {
  try {
    halo::hwq::from_json(input);
    return true;
  } catch (const halo::InvalidArgument&) {
  } catch (const halo::TypeMismatch&) {
  } catch (const halo::FormatError&) {
  } catch (const halo::BackendUnavailable&) {
  }
  return false;
}

halo::fuzz::Register reg({"hwq_json", 5000, 400, seeds, run_one, nullptr});

}  // namespace
