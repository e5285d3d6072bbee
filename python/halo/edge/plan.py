"""Plans for halo's edge runtime: which worker computes which neuron group, and the predictors.

``make_plan`` splits every layer of a model into groups (``model.layout``), measures each
group's importance on calibration text (mean norm of its output term), places the groups of
every (layer, part) with ``halo.sched.balance`` (or round-robin, the naive tensor-parallel
split) and fits, per (layer, part), the semantic predictor that scores groups from the layer
input before it runs (``halo.sched.partition.Predictor``) and a low-rank estimate of each group's
term that the root can use in place of a lost one. A plan is a JSON file (with an ``.npz`` of
predictor weights beside it); ``load_plan`` checks it against the model and the workers.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import sched
from .._moved import moved_names
from .compute import LocalCluster, RootModel
from .model import (
    ATTN,
    FFN,
    Checkpoint,
    EdgeError,
    GroupDef,
    Spec,
    default_heads_per_group,
    fingerprint,
    group_cost,
    layout,
    read_spec,
    tensor_names,
)
from .predictor import Calibration, PartPredictor, fit_predictors

PLAN_FORMAT = "halo-edge-plan"
PLAN_VERSION = 1
PLACEMENTS = ("balance", "round_robin")
_DEVICE_FIELDS = set(sched.Device.__dataclass_fields__)


def docstring_text(first: str = "a", last: str = "m", max_words: int | None = None) -> str:
    """English prose from the docstrings of the standard library's modules whose names start
    with a letter in [first, last], in sorted module order, read with ``ast`` (nothing is
    imported). Calibration uses a-m, evaluation n-z, so the two never overlap."""
    parts: list[str] = []
    words = 0
    for name in sorted(n for n in sys.stdlib_module_names if not n.startswith("_")):
        if not first <= name[0] <= last:
            continue
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if found is None or not found.origin or not found.origin.endswith(".py"):
            continue
        try:
            tree = ast.parse(Path(found.origin).read_text(encoding="utf-8", errors="replace"))
        except (OSError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
                    words += len(doc.split())
                    if max_words is not None and words >= max_words:
                        return "\n\n".join(parts)
    return "\n\n".join(parts)


def tokenize(model_dir: str | os.PathLike, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return list(tok(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------
# Placement


def _device(value: Any, index: int, where: str) -> sched.Device:
    if isinstance(value, sched.Device):
        return value
    if not isinstance(value, dict):
        raise EdgeError(f"{where}: device {index} must be an object, got {type(value).__name__}")
    unknown = set(value) - _DEVICE_FIELDS
    if unknown:
        raise EdgeError(f"{where}: device {index} has unknown field(s) {sorted(unknown)}")
    try:
        device = sched.Device(**{k: float(v) for k, v in value.items()})
        sched.evaluate([], [device], [])  # validates every field
    except (TypeError, ValueError) as exc:
        raise EdgeError(f"{where}: device {index}: {exc}") from None
    return device


def assign_groups(
    spec: Spec,
    groups: list[list[list[GroupDef]]],
    importance: list[list[list[float]]],
    devices: Sequence[sched.Device],
    placement: str,
    loss_budget: float,
    alive: Sequence[int] | None = None,
) -> list[list[list[int]]]:
    """Worker index of every group, (layer, part) by (layer, part) so each exchange is balanced.
    ``alive``: the workers still usable (indices into ``devices``); the rest get nothing."""
    live = list(range(len(devices))) if alive is None else list(alive)
    if not live:
        raise EdgeError("no worker left to place groups on")
    out: list[list[list[int]]] = []
    turn = 0
    for layer in range(spec.layers):
        parts = []
        for part in (ATTN, FFN):
            gs = groups[layer][part]
            if placement == "round_robin":
                parts.append([live[(turn + i) % len(live)] for i in range(len(gs))])
                turn += len(gs)
                continue
            items = [
                {**group_cost(spec, g), "importance": importance[layer][part][i]} for i, g in enumerate(gs)
            ]
            plan = sched.balance(items, [devices[w] for w in live], policy="halo", loss_budget=loss_budget)
            parts.append([live[d] for d in plan.device_of])
        out.append(parts)
    return out


def _write_predictors(path: Path, predictors: dict[tuple[int, int], PartPredictor]) -> None:
    arrays = {}
    for (layer, part), p in predictors.items():
        for name, value in asdict(p).items():
            arrays[f"{layer}.{part}.{name}"] = np.asarray(value)
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to a temp name
        np.savez(f, **arrays)


def save_predictors(path: Path, predictors: dict[tuple[int, int], PartPredictor]) -> None:
    """Writes `predictors` to `path` through the output guard (halo._output): never over an
    input, replaces only a predictor file halo wrote."""
    with _check_output(path, (), "predictor file", _is_predictor_file).writing() as out:
        _write_predictors(out.temp, predictors)
        out.commit()


_OUTPUT_LIMIT = 1 << 28  # bytes of an existing plan read to tell whether halo wrote it


def _is_plan_file(path: Path) -> bool:
    if path.stat().st_size > _OUTPUT_LIMIT:
        return False
    raw = json.loads(path.read_text(encoding="utf-8"))
    return isinstance(raw, dict) and raw.get("format") == PLAN_FORMAT


def _is_predictor_file(path: Path) -> bool:
    """A .npz holding nothing but predictor arrays (LAYER.PART.FIELD.npy): what make_plan writes."""
    import zipfile

    fields = "|".join(PartPredictor.__dataclass_fields__)
    pattern = re.compile(rf"\d+\.[01]\.(?:{fields})\.npy")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return bool(names) and all(pattern.fullmatch(n) for n in names)


def _check_output(path, inputs, flag: str, halo_made):
    """The output guard for a plan file or its predictor (halo edge plan: one-line ValueError)."""
    from .._output import check

    return check("edge plan", path, inputs, "file", True, halo_made, flag=flag)


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    fingerprint: str
    family: str
    layers: int
    group_size: int
    heads_per_group: int
    devices: list[sched.Device]
    placement: str
    loss_budget: float
    assignment: list[list[list[int]]]  # [layer][part][group] -> worker index
    importance: list[list[list[float]]]
    critical_fraction: float = 0.25
    predictor: str | None = None  # file name of the .npz beside the plan
    path: Path | None = field(default=None, compare=False)

    @property
    def workers(self) -> int:
        return len(self.devices)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": {"fingerprint": self.fingerprint, "family": self.family, "layers": self.layers},
            "group_size": self.group_size,
            "heads_per_group": self.heads_per_group,
            "devices": [asdict(d) for d in self.devices],
            "placement": self.placement,
            "loss_budget": self.loss_budget,
            "critical_fraction": self.critical_fraction,
            "predictor": self.predictor,
            "assignment": self.assignment,
            "importance": self.importance,
        }

    def save(self, path: str | os.PathLike, inputs: Sequence[tuple[str | os.PathLike, str]] = ()) -> Path:
        """Writes the plan through the output guard (halo._output): never over or inside one
        of `inputs` ((path, what) pairs), replaces only a plan halo wrote (no --force needed)."""
        with _check_output(path, inputs, "--out", _is_plan_file).writing() as out:
            out.temp.write_text(json.dumps(self.to_json(), indent=1))
            out.commit()
        self.path = Path(path)
        return self.path

    def predictor_path(self) -> Path | None:
        if self.predictor is None:
            return None
        base = self.path.parent if self.path is not None else Path(".")
        return base / self.predictor


def _bad(where: str, message: str) -> EdgeError:
    return EdgeError(f"{where}: {message}")


def load_plan(
    path: str | os.PathLike, spec: Spec | None = None, model_fingerprint: str | None = None
) -> Plan:
    """Reads and checks a plan file; with ``spec``/``model_fingerprint`` also against the model."""
    where = str(path)
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise _bad(where, "no such plan file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad(where, f"unreadable ({exc})") from None
    except ValueError as exc:
        raise _bad(where, f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
        raise _bad(where, f"not a halo edge plan (format must be '{PLAN_FORMAT}')")
    if raw.get("version") != PLAN_VERSION:
        raise _bad(where, f"plan version {raw.get('version')!r}, this halo reads version {PLAN_VERSION}")
    model = raw.get("model")
    if not isinstance(model, dict):
        raise _bad(where, "'model' must be an object")
    devices = raw.get("devices")
    if not isinstance(devices, list) or not devices:
        raise _bad(where, "'devices' must be a non-empty list")
    try:
        plan = Plan(
            fingerprint=str(model["fingerprint"]),
            family=str(model["family"]),
            layers=int(model["layers"]),
            group_size=int(raw["group_size"]),
            heads_per_group=int(raw["heads_per_group"]),
            devices=[_device(d, i, where) for i, d in enumerate(devices)],
            placement=str(raw["placement"]),
            loss_budget=float(raw["loss_budget"]),
            assignment=raw["assignment"],
            importance=raw["importance"],
            critical_fraction=float(raw.get("critical_fraction", 0.25)),
            predictor=raw.get("predictor"),
            path=Path(path),
        )
    except KeyError as exc:
        raise _bad(where, f"missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise _bad(where, f"bad field ({exc})") from None
    if plan.placement not in PLACEMENTS:
        raise _bad(where, f"placement must be one of {PLACEMENTS}, got {plan.placement!r}")
    if not 0.0 <= plan.critical_fraction <= 1.0:
        raise _bad(where, f"critical_fraction must be in [0, 1], got {plan.critical_fraction}")
    if plan.predictor is not None and (not isinstance(plan.predictor, str) or "/" in plan.predictor):
        raise _bad(where, "'predictor' must be a file name beside the plan")
    if model_fingerprint is not None and plan.fingerprint != model_fingerprint:
        raise _bad(
            where,
            f"made for another model (fingerprint {plan.fingerprint}, the model's is {model_fingerprint})",
        )
    if spec is not None:
        check_plan_shape(plan, spec, where)
    return plan


def check_plan_shape(plan: Plan, spec: Spec, where: str = "plan") -> None:
    if plan.family != spec.family or plan.layers != spec.layers:
        raise _bad(
            where,
            f"made for a {plan.layers}-layer {plan.family} model, this is a {spec.layers}-layer {spec.family}",
        )
    try:
        groups = layout(spec, plan.group_size, plan.heads_per_group)
    except EdgeError as exc:
        raise _bad(where, str(exc)) from None
    for name, table, kind in (("assignment", plan.assignment, int), ("importance", plan.importance, float)):
        if not isinstance(table, list) or len(table) != spec.layers:
            raise _bad(where, f"'{name}' must list {spec.layers} layers")
        for layer, parts in enumerate(table):
            if not isinstance(parts, list) or len(parts) != 2:
                raise _bad(where, f"'{name}' layer {layer} must have 2 parts (attention, ffn)")
            for part, row in enumerate(parts):
                want = len(groups[layer][part])
                if not isinstance(row, list) or len(row) != want:
                    raise _bad(where, f"'{name}' layer {layer} part {part} must have {want} groups")
                for value in row:
                    if (
                        isinstance(value, bool)
                        or not isinstance(value, (int, float))
                        or not math.isfinite(value)
                    ):
                        raise _bad(where, f"'{name}' layer {layer} part {part} holds {value!r}")
                    if kind is int and (value != int(value) or not 0 <= value < plan.workers):
                        raise _bad(
                            where,
                            f"layer {layer} part {part} places a group on worker {value!r}; "
                            f"the plan has {plan.workers} workers",
                        )
                    if kind is float and value < 0:
                        raise _bad(where, f"negative importance in layer {layer} part {part}")


def _static_importance(checkpoint: Checkpoint, spec: Spec, groups) -> list[list[list[float]]]:
    """Without calibration: FFN groups by ||up rows|| x ||down columns||, head groups by
    ||o columns|| x ||v rows|| (as ``halo.sched.partition.importance`` does)."""
    out = []
    for layer in range(spec.layers):
        names = tensor_names(spec, layer)
        up = checkpoint.get(names["up"] + ".weight").numpy()
        down = checkpoint.get(names["down"] + ".weight").numpy()
        o = checkpoint.get(names["o"] + ".weight").numpy()
        v = checkpoint.get(names["v"] + ".weight").numpy()
        d = spec.head_dim
        attn = []
        for g in groups[layer][ATTN]:
            cols = np.concatenate([np.arange(h * d, (h + 1) * d) for h in g.heads])
            rows = np.concatenate([np.arange(h * d, (h + 1) * d) for h in g.kv])
            attn.append(float(np.linalg.norm(o[:, cols]) * np.linalg.norm(v[rows]) / np.sqrt(len(cols))))
        ffn = [
            float(np.linalg.norm(up[g.start : g.stop]) * np.linalg.norm(down[:, g.start : g.stop]))
            for g in groups[layer][FFN]
        ]
        out.append([attn, ffn])
    return out


def make_plan(
    model_dir: str | os.PathLike,
    devices: Sequence[sched.Device | dict] | int,
    placement: str = "balance",
    loss_budget: float = 0.01,
    group_size: int = 128,
    heads_per_group: int | None = None,
    calibration_tokens: int = 512,
    critical_fraction: float = 0.25,
    predictor_steps: int = 500,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    inputs: Sequence[tuple[str | os.PathLike, str]] = (),
) -> Plan:
    """Builds (and with ``out`` writes) a plan for ``devices`` (or that many identical workers).

    With ``calibration_tokens > 0`` the groups' importance is measured on that many tokens of
    calibration prose (standard-library docstrings a-m) and predictors are fitted and saved
    beside the plan (``OUT.predictor.npz``); with 0 the importance is static (weight norms) and
    there is no predictor. Both files go through the output guard (halo._output), checked
    before any work: never over or inside the model folder or one of ``inputs`` ((path, what)
    pairs, e.g. the CLI's --devices file), and they replace only a plan and a predictor file
    halo wrote; both are written to temp files and renamed in together."""
    import torch

    if placement not in PLACEMENTS:
        raise EdgeError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if isinstance(devices, int):
        if devices <= 0:
            raise EdgeError(f"need at least one worker, got {devices}")
        devices = [sched.Device(speed=1e9, bandwidth=12.5e6) for _ in range(devices)]
    devices = [_device(d, i, "devices") for i, d in enumerate(devices)]
    if not devices:
        raise EdgeError("need at least one worker")
    if not 0.0 <= critical_fraction <= 1.0:
        raise EdgeError(f"critical_fraction must be in [0, 1], got {critical_fraction}")
    spec = read_spec(model_dir)
    hpg = default_heads_per_group(spec) if heads_per_group is None else heads_per_group
    groups = layout(spec, group_size, hpg)
    checkpoint = Checkpoint(model_dir)
    predictor_name = predictor_out = plan_out = None
    if calibration_tokens > 0 and out is None:
        raise EdgeError("calibration writes predictor weights beside the plan: give out=")
    if out is not None:
        inputs = [(model_dir, "model folder"), *inputs]
        plan_out = _check_output(out, inputs, "--out", _is_plan_file)
        if calibration_tokens > 0:
            predictor_name = Path(out).name + ".predictor.npz"
            predictor_path = Path(out).with_name(predictor_name)
            predictor_out = _check_output(predictor_path, inputs, "predictor file", _is_predictor_file)
    if calibration_tokens > 0:
        ids = tokenize(model_dir, docstring_text("a", "m", max_words=2 * calibration_tokens + 200))
        ids = ids[:calibration_tokens]
        cluster = LocalCluster(checkpoint, spec, groups)
        root = RootModel(checkpoint, spec)
        cal = Calibration(spec, groups, checkpoint, rank=16)
        cluster.observer = cal
        chunk = min(128, spec.max_positions)
        with torch.no_grad():
            for start in range(0, len(ids), chunk):
                root.forward(ids[start : start + chunk], 0, cluster.exchange)
        importance = [
            [np.concatenate(cal.norms[(layer, part)]).mean(0).tolist() for part in (ATTN, FFN)]
            for layer in range(spec.layers)
        ]
        predictors = fit_predictors(cal, predictor_steps, seed)
    else:
        importance = _static_importance(checkpoint, spec, groups)
    assignment = assign_groups(spec, groups, importance, devices, placement, loss_budget)
    plan = Plan(
        fingerprint=fingerprint(model_dir),
        family=spec.family,
        layers=spec.layers,
        group_size=group_size,
        heads_per_group=hpg,
        devices=devices,
        placement=placement,
        loss_budget=float(loss_budget),
        assignment=assignment,
        importance=importance,
        critical_fraction=float(critical_fraction),
        predictor=predictor_name,
    )
    if plan_out is not None:
        _write_plan(plan, plan_out, predictor_out, predictors if predictor_out is not None else None)
    return plan


def _write_plan(plan: Plan, plan_out, predictor_out, predictors) -> None:
    """Both temp files written, then renamed in with signals deferred between the two renames
    (a plan never sits beside another run's predictor)."""
    from contextlib import ExitStack

    from .._atomic import blocked

    with ExitStack() as stack:
        outputs = [stack.enter_context(o.writing()) for o in (predictor_out, plan_out) if o is not None]
        if predictor_out is not None:
            _write_predictors(predictor_out.temp, predictors)
        plan_out.temp.write_text(json.dumps(plan.to_json(), indent=1))
        with blocked():
            for o in outputs:
                o.commit()
    plan.path = plan_out.given


def with_placement(
    plan: Plan, spec: Spec, placement: str, devices: Sequence[sched.Device] | None = None
) -> Plan:
    """The same plan (importance, predictors) placed anew: another placement or other devices."""
    groups = layout(spec, plan.group_size, plan.heads_per_group)
    devs = list(devices) if devices is not None else plan.devices
    assignment = assign_groups(spec, groups, plan.importance, devs, placement, plan.loss_budget)
    return Plan(**{**plan.__dict__, "placement": placement, "devices": devs, "assignment": assignment})


# names that moved to halo.edge.predictor when this module was split
_MOVED = ("load_predictors", "fit_estimates")
__getattr__ = moved_names(__name__, "halo.edge.predictor", _MOVED)
