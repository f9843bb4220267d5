"""Release gates: thresholds on a finished report, each check passed or failed, with its margin.

A recipe's `gates:` picks candidates (a variant and a calibrator, or all of them) and sets thresholds:

    gates:
      variant: minmax-w4a16-g64   # default: every quantized variant
      calibrator: ats             # default: every calibrator
      max_accuracy_drop: 0.02     # per task, below the baseline with the same calibrator
      max_ece_increase: 0.01      # per task, above the baseline's uncalibrated answer-level ECE
      max_token_ece: 0.05

Each threshold yields one check per candidate (and task); a threshold with nothing to check fails, so a
gate can never pass by matching nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pydantic import BaseModel, ConfigDict, Field

from calq.errors import CalqError


class Gates(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    variant: str | None = Field(
        None, description="candidate variant the gates check (default: every quantized variant)")
    calibrator: str | None = Field(
        None, description="candidate calibrator: none, temperature or ats (default: every calibrator)")
    tasks: tuple[str, ...] | None = Field(
        None, description="tasks the task gates check (default: every evaluated task)")
    max_accuracy_drop: float | None = Field(
        None, description="largest allowed drop of a task's accuracy below the baseline's with the same calibrator, "
                          "in absolute terms (0.02 = 2 points)")
    max_ece: float | None = Field(
        None, ge=0, le=1, description="largest allowed answer-level ECE on a multiple-choice task")
    max_ece_increase: float | None = Field(
        None, description="largest allowed rise of a multiple-choice task's answer-level ECE above the baseline's "
                          "uncalibrated ('none') ECE on that task")
    max_token_ece: float | None = Field(
        None, ge=0, le=1, description="largest allowed token-level ECE on the held-out text")
    max_deployed_ece_drift: float | None = Field(
        None, ge=0, description="largest allowed change of token-level ECE between an exported artifact on its runtime "
                                "and the PyTorch variant it came from (needs an `export:` section)")
    min_deployed_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="smallest allowed share of positions where the exported artifact's top token is "
                                      "the PyTorch variant's")

    def task_gates(self) -> list[str]:
        return [g for g in ("max_accuracy_drop", "max_ece", "max_ece_increase") if getattr(self, g) is not None]


@dataclass(frozen=True)
class GateResult:
    gate: str                 # e.g. "max_accuracy_drop"
    variant: str | None
    calibrator: str | None
    task: str | None          # None for token-level gates
    value: float | None       # None: nothing to check
    threshold: float
    passed: bool
    margin: float | None      # threshold - value: headroom when passed, how far over when negative

    @property
    def name(self) -> str:
        where = "/".join(p for p in (self.variant, self.calibrator, self.task) if p) or "no match"
        return f"{self.gate} [{where}]"


def check_gates(gates: Gates, variants: list[str], calibrators: list[str], tasks: list[str],
                where: str = "gates") -> None:
    """Before a run: every name a gate uses exists, and task gates have tasks to check."""
    for key, value, known in (("variant", gates.variant, variants), ("calibrator", gates.calibrator, calibrators)):
        if value is not None and value not in known:
            raise CalqError(f"unknown {key} '{value}'", f"{where}.{key}", f"use one of: {', '.join(known)}")
    for task in gates.tasks or ():
        if task not in tasks:
            raise CalqError(f"task '{task}' is not evaluated", f"{where}.tasks",
                            f"use one of: {', '.join(tasks)}" if tasks else "add it to the evaluation tasks")
    needs_tasks = gates.task_gates()
    if needs_tasks and not tasks:
        raise CalqError(f"{needs_tasks[0]} needs evaluation tasks, and none are listed", f"{where}.{needs_tasks[0]}",
                        "add evaluation tasks or remove the gate")


TOLERANCE = 1e-9  # a value exactly at its threshold passes despite float rounding (0.52 - 0.50 > 0.02 in floats)


def _check(gate: str, row: dict, task: str | None, value: float, threshold: float) -> GateResult:
    return GateResult(gate, row["variant"], row.get("calibrator"), task, value, threshold,
                      value <= threshold + TOLERANCE, threshold - value)


def _nothing_to_check(gate: str, gates: Gates) -> GateResult:
    return GateResult(gate, gates.variant, gates.calibrator, None, None, getattr(gates, gate), False, None)


def _task_value(gate: str, row: dict, base: dict) -> float | None:
    if gate == "max_accuracy_drop":
        return base[row["calibrator"], row["task"]]["accuracy"] - row["accuracy"]
    if row["ece"] is None:  # not a multiple-choice task: no answer-level ECE
        return None
    if gate == "max_ece":
        return row["ece"]
    return row["ece"] - base["none", row["task"]]["ece"]


def evaluate_gates(gates: Gates, report: dict, baseline: str = "baseline") -> list[GateResult]:
    """Every check of every threshold in `gates` against report.json's content (pure: no I/O).

    Task rows come from report["tasks"]["results"]; token-level rows from report["variants"] (a row
    without a `calibrator` key is uncalibrated). `baseline` is the unquantized variant's name.
    """
    def selected(row: dict) -> bool:
        variant_ok = row["variant"] == gates.variant if gates.variant else row["variant"] != baseline
        return variant_ok and gates.calibrator in (None, row.get("calibrator", "none"))

    task_rows = [r for r in (report.get("tasks") or {}).get("results", [])
                 if gates.tasks is None or r["task"] in gates.tasks]
    base = {(r["calibrator"], r["task"]): r for r in task_rows if r["variant"] == baseline}
    results = []
    for gate in gates.task_gates():
        checks = [_check(gate, row, row["task"], value, getattr(gates, gate)) for row in filter(selected, task_rows)
                  if (value := _task_value(gate, row, base)) is not None]
        results += checks or [_nothing_to_check(gate, gates)]
    if gates.max_token_ece is not None:
        token_rows = [{"variant": v["variant"], "calibrator": cal, "ece": m["ece"]} for v in report["variants"]
                      for cal, m in ((v.get("calibrated") or {}).get("tokens") or {"none": v}).items()]
        checks = [_check("max_token_ece", row, None, row["ece"], gates.max_token_ece)
                  for row in token_rows if selected(row)]
        results += checks or [_nothing_to_check("max_token_ece", gates)]
    deployed = [r for r in report.get("deployed") or [] if selected({**r, "calibrator": None})]
    if gates.max_deployed_ece_drift is not None:
        checks = [_check("max_deployed_ece_drift", r, r["format"], abs(r["ece_drift"]), gates.max_deployed_ece_drift)
                  for r in deployed]
        results += checks or [_nothing_to_check("max_deployed_ece_drift", gates)]
    if gates.min_deployed_top1_agreement is not None:
        threshold = gates.min_deployed_top1_agreement
        checks = [GateResult("min_deployed_top1_agreement", r["variant"], r["calibrator"], r["format"], r["top1"],
                             threshold, r["top1"] >= threshold - TOLERANCE, r["top1"] - threshold) for r in deployed]
        results += checks or [_nothing_to_check("min_deployed_top1_agreement", gates)]
    return results


def gates_section(gates: Gates | None, report: dict, baseline: str = "baseline") -> dict | None:
    """report.json's `gates`: {"config", "passed", "results"}; None when the recipe sets no gates."""
    if gates is None:
        return None
    results = evaluate_gates(gates, report, baseline)
    return {"config": gates.model_dump(mode="json"), "passed": all(r.passed for r in results),
            "results": [{**asdict(r), "name": r.name} for r in results]}
