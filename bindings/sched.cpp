// halo._core.sched: the PLR-aware balancer, the loss monitor and the cluster
// simulator. Devices and groups come in as lists of dicts (field names as in
// halo/sched/balance.hpp); python/halo/sched.py builds them.
#include "bindings/registry.hpp"
#include "halo/sched/balance.hpp"
#include "halo/sched/monitor.hpp"
#include "halo/sched/simulate.hpp"

namespace halo::bindings {
namespace {

using namespace halo::sched;

double field(const py::dict& d, const char* key, double fallback) {
  return d.contains(key) ? py::cast<double>(d[key]) : fallback;
}

std::vector<Device> to_devices(const py::list& items) {
  std::vector<Device> out;
  for (const auto& item : items) {
    const py::dict d = py::cast<py::dict>(item);
    Device dev;
    dev.speed = field(d, "speed", dev.speed);
    dev.bandwidth = field(d, "bandwidth", dev.bandwidth);
    dev.bandwidth_down = field(d, "bandwidth_down", dev.bandwidth_down);
    dev.latency = field(d, "latency", dev.latency);
    dev.plr = field(d, "plr", dev.plr);
    dev.burst_length = field(d, "burst_length", dev.burst_length);
    dev.capacity_bytes = field(d, "capacity_bytes", dev.capacity_bytes);
    out.push_back(dev);
  }
  return out;
}

std::vector<Group> to_groups(const py::list& items) {
  std::vector<Group> out;
  for (const auto& item : items) {
    const py::dict d = py::cast<py::dict>(item);
    out.push_back(Group{field(d, "flops", 0), field(d, "weight_bytes", 0), field(d, "exchange_bytes", 0),
                        field(d, "input_bytes", 0), field(d, "importance", 0)});
  }
  return out;
}

py::dict plan_dict(const Plan& p) {
  py::dict out;
  out["device_of"] = p.device_of;
  out["device_time"] = p.device_time;
  out["makespan"] = p.makespan;
  out["expected_loss"] = p.expected_loss;
  return out;
}

void bind(py::module_& m) {
  m.def(
      "balance",
      [](const py::list& groups, const py::list& devices, const std::string& policy, double loss_budget) {
        Policy p;
        if (policy == "halo") p = Policy::halo;
        else if (policy == "makespan") p = Policy::makespan;
        else if (policy == "round_robin") p = Policy::round_robin;
        else fail("balance", "policy must be 'halo', 'makespan' or 'round_robin', got '", policy, "'");
        auto g = to_groups(groups);
        auto d = to_devices(devices);
        Plan plan;
        {
          py::gil_scoped_release release;
          plan = balance(g, d, p, loss_budget);
        }
        return plan_dict(plan);
      },
      py::arg("groups"), py::arg("devices"), py::arg("policy"), py::arg("loss_budget"));
  m.def(
      "evaluate",
      [](const py::list& groups, const py::list& devices, const std::vector<int32_t>& device_of) {
        auto d = to_devices(devices);
        validate_devices("evaluate", d);
        return plan_dict(evaluate(to_groups(groups), d, device_of));
      },
      py::arg("groups"), py::arg("devices"), py::arg("device_of"));
  m.def(
      "validate_devices",
      [](const std::string& function, const py::list& devices) { validate_devices(function, to_devices(devices)); },
      py::arg("function"), py::arg("devices"));
  m.def(
      "simulate",
      [](const py::list& groups, const py::list& devices, const std::vector<int32_t>& device_of,
         const std::vector<uint8_t>& critical, double packet_bytes, double rto, double nack_timeout,
         double deadline_factor, int32_t steps, uint64_t seed) {
        SimConfig c{packet_bytes, rto, nack_timeout, deadline_factor, steps, seed};
        auto g = to_groups(groups);
        auto d = to_devices(devices);
        SimResult r;
        {
          py::gil_scoped_release release;
          r = simulate(g, d, device_of, critical, c);
        }
        py::dict out;
        out["tcp_time"] = r.tcp_time;
        out["halo_time"] = r.halo_time;
        py::array_t<uint8_t> mask({static_cast<py::ssize_t>(steps), static_cast<py::ssize_t>(g.size())});
        std::copy(r.delivered.begin(), r.delivered.end(), mask.mutable_data());
        out["delivered"] = mask;
        out["lossless_time"] = r.lossless_time;
        return out;
      },
      py::arg("groups"), py::arg("devices"), py::arg("device_of"), py::arg("critical"), py::arg("packet_bytes"),
      py::arg("rto"), py::arg("nack_timeout"), py::arg("deadline_factor"), py::arg("steps"), py::arg("seed"));
  py::class_<PlrMonitor>(m, "PlrMonitor")
      .def(py::init<int32_t, double>(), py::arg("devices"), py::arg("alpha"))
      .def("observe", &PlrMonitor::observe, py::arg("device"), py::arg("delivered"), py::arg("latency"))
      .def("plr", &PlrMonitor::plr, py::arg("device"))
      .def("latency", &PlrMonitor::latency, py::arg("device"))
      .def("count", &PlrMonitor::count, py::arg("device"))
      .def("drifted", &PlrMonitor::drifted, py::arg("threshold"))
      .def("mark", &PlrMonitor::mark)
      .def_property_readonly("devices", &PlrMonitor::devices);
}

Registrar registrar("sched", bind);

}  // namespace
}  // namespace halo::bindings
